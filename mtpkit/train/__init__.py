"""``mtpkit finetune``: train the draft heads of a heads directory on a frozen base.

One module per responsibility, read in this order:

- ``options``: every setting, declared once (the CLI options, recipe keys and help text derive from it);
- ``recipe``: ``setup`` (model, data, optimizer), ``train`` (the loop), ``save``, and ``finetune`` calling them;
- ``hidden``: the frozen base's hidden states, computed once per process for its shard;
- ``batches``: collation, the epoch order and each process's shard, the training vocabulary;
- ``losses``: the module accelerate prepares and one micro-batch's forward, loss and backward;
- ``evaluation``: held-out per-head accuracy; ``checkpoints``: resumable state; ``card``: plot and model card.

The public API is importable from here (``from mtpkit.train import finetune, FinetuneOptions``). Only
``options`` is imported eagerly: it is torch-free, so the CLI builds its signature without loading torch.
"""

from __future__ import annotations

import importlib

from mtpkit.train.options import RECIPE_KEYS, FinetuneOptions, parse_head_weights

_PUBLIC = {
    "recipe": ("Callbacks", "FinetuneResult", "Run", "TrainingInterrupted", "finetune", "is_main_process", "save",
               "setup", "train"),
    "hidden": ("HiddenStore", "compute_hidden"),
    "batches": ("Batch", "TrainVocab", "collate", "draft_vocab", "epoch_order", "shard", "target_rows"),
    "losses": ("TrainedModel", "backward_heads", "head_rows"),
    "evaluation": ("chain_tokens", "eval_counts", "eval_summary", "evaluate"),
    "checkpoints": ("CHECKPOINT_FILE", "load_checkpoint", "save_checkpoint"),
    "card": ("model_card", "plot_history"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = ["FinetuneOptions", "RECIPE_KEYS", "parse_head_weights", *_WHERE]


def __getattr__(name: str):
    """The torch-side API, imported on first use (PEP 562)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'mtpkit.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mtpkit.train.{_WHERE[name]}"), name)
