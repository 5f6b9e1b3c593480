"""mtpkit's own prompt set: 480 prompts over 8 categories, 48 train + 12 held out in each.

The held-out part is for evaluation and benchmarks only; training never reads it.
"""

from __future__ import annotations

import json
from importlib import resources

CATEGORIES = ("chat", "writing", "code", "math", "extraction", "summarization", "reasoning", "translation")
SPLITS = ("train", "heldout")


def load_builtin(split: str | None = None) -> list[dict]:
    """Records ``{"id", "category", "prompt", "split"}``; ``split`` selects train or heldout."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
    text = resources.files(__package__).joinpath("builtin.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]
