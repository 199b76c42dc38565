"""lpft: linear probing, fine-tuning and LP-FT, measured in and out of distribution."""

__version__ = "0.1.0"
