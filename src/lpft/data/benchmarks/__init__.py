"""The bundled offline benchmarks; importing this package registers them by name."""

from lpft.data.benchmarks import digits, emoji_styles  # noqa: F401  (register "digits", "emoji-styles")
