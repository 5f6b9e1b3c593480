"""mtpkit: multi-token-prediction draft heads and lossless self-speculative decoding."""

__version__ = "0.1.0"
