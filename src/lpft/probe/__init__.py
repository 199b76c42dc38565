"""The linear probe: L2 multinomial logistic regression on frozen features along a path of C values."""

from lpft.probe.linear_probe import LinearProbe, fit_logistic, resolve_device

__all__ = ["LinearProbe", "fit_logistic", "resolve_device"]
