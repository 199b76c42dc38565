"""Built-in methods; importing this module registers them (one name per method)."""

from lpft.methods import finetuning, l2sp, linear_probe, llrd, lora, spd, surgical, wise_ft  # noqa: F401
