"""Methods (LP, FT, LP-FT, ...): one small class each, with its own config, registered by name."""

from lpft.methods.base import (
    Method, MethodResult, create_method, method_class, method_config, method_label, method_names, register_method,
)

__all__ = [
    "Method", "MethodResult", "create_method", "method_class", "method_config", "method_label", "method_names",
    "register_method",
]
