"""Built-in methods; importing this module registers them (one line per method)."""

from lpft.methods import finetuning, linear_probe, lora, spd  # noqa: F401
