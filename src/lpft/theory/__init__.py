"""Theory lab: the paper's two-layer linear network results, simulated and checkable."""

from lpft.theory.simulate import METHODS, TheorySettings, simulate, summarise

__all__ = ["METHODS", "TheorySettings", "simulate", "summarise"]
