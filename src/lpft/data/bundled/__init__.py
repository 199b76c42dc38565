"""The bundled offline benchmarks; importing this package registers them by name."""

from lpft.data.bundled import digits, emoji_styles  # noqa: F401  (register "digits", "emoji-styles")
from lpft.data.bundled import sentiment_domains  # noqa: F401  (register "sentiment-domains")
from lpft.data.bundled import tweet_sentiment  # noqa: F401  (register "tweet-sentiment")
