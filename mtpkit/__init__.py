"""mtpkit: multi-token-prediction draft heads and lossless self-speculative decoding.

``mtpkit.load(heads_dir)`` (``mtpkit.api``) is imported on first use, so ``import mtpkit`` loads no torch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load":
        from mtpkit.api import load

        return load
    raise AttributeError(f"module 'mtpkit' has no attribute {name!r}")
