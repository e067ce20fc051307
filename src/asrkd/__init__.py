"""asrkd: train a speech recogniser and distil it into a small, fast student."""

__version__ = "0.1.0"
