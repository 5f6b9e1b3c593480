"""Prompt sets shipped with mtpkit (sources and licenses in SOURCES.md beside this file).

``builtin.jsonl``: mtpkit's own 480 prompts over 8 categories, 48 train + 12 held out in each; training
never reads the held-out part. Those 96 shaped several of mtpkit's design choices (the tree widening, the
forward-cost fitting, calibration per agreement of sources), so they are a *development* set, not a test set.
``mt_bench.jsonl``: MT-Bench's 80 questions (Apache-2.0, questions only), a benchmark set nothing was tuned on.
Training prompts only: ``gsm8k_train.jsonl``, 1,200 questions of GSM8K's training split (MIT);
``gpteacher_train.jsonl``, 2,000 GPTeacher code and role-play instructions (MIT).
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


def load_training_set(name: str) -> list[dict]:
    """The records of a shipped training prompt file (``gsm8k_train``, ``gpteacher_train``)."""
    text = resources.files(__package__).joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_mt_bench() -> list[dict]:
    """MT-Bench's 80 questions: ``{"question_id", "category", "turns"}`` (benchmarks use the first turn)."""
    text = resources.files(__package__).joinpath("mt_bench.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
