"""Built-in methods; importing this module registers them."""

from lpft.methods import finetuning, linear_probe  # noqa: F401
