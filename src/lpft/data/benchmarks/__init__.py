"""The bundled offline benchmarks; importing this package registers them by name."""

from lpft.data.benchmarks import emoji_styles  # noqa: F401  (registers "emoji-styles")
