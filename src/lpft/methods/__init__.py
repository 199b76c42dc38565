"""Methods (LP, FT, LP-FT, ...): one small class each, registered by name."""

from lpft.methods.base import Method, MethodResult, create_method, method_names, register_method

__all__ = ["Method", "MethodResult", "create_method", "method_names", "register_method"]
