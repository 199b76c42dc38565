"""From finished runs to conclusions: sweep specs, the results database, selection rules, tables and plots."""
