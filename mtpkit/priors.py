"""The acceptance prior a heads directory ships (``acceptance_prior.json``, written by ``mtpkit calibrate``).

A tree chosen per step trusts each node as much as the calibrator says (``mtpkit.drafting.calibrator``): how often
nodes of that agreement of sources, depth and raw confidence were accepted. Started from the drafters' raw
confidences, it overrates them at the start of every prompt (a lookup's raw confidence is 1.0; measured on 8
MT-Bench prompts, hybrid trees expected 2.2-3.4 tokens per step and got 1.3-2.1), and verifies trees too large to pay.
The prior is those counts measured once, by decoding prompts the heads never trained on (never a benchmark set: the
held-out split of their own training data, unless their suffix corpus holds its responses, or prompts given with
``--data``) with every source in one tree, weighed as at most ``PRIOR_TRIALS``
trials per bin so that a prompt's own acceptances soon count. Greedy decoders start from it
(``mtpkit.draft_sources.build_decoder``); ``mtpkit bench`` resets every run to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from mtpkit.config import PRIOR_NAME
from mtpkit.data import load_data, prompt_ids
from mtpkit.draft_sources import build_decoder, corpus_path
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.drafting.registry import HYBRID
from mtpkit.errors import MtpkitError
from mtpkit.files import atomic_write_text

PRIOR_TRIALS = 16  # per bin: the prior weighs as this many trials at most
PRIOR_NEW_TOKENS = 128  # as `mtpkit calibrate` decodes by default (its --max-new-tokens)


def heldout_prompts(heads, heads_dir: Path, limit: int, data: list[str] | None = None) -> list[list[int]]:
    """Token ids of up to ``limit`` prompts: of ``data`` if given (all its records), else of the held-out split of
    the heads' own training data (its sources, ``eval_fraction`` and seed, as ``finetune`` recorded them)."""
    training = heads.config.training
    if data:
        sources, fraction, seed = data, 0.0, 0
    else:
        sources, fraction, seed = training.get("data"), _eval_fraction(training), training.get("seed", 0)
        if not sources or not fraction:
            raise MtpkitError(f"{heads_dir} records no held-out split of its training data: pass --data with "
                              "prompts the heads never trained on")
        sources = [_resolve(source, heads_dir) for source in sources]
        corpus = corpus_path(heads_dir, heads.config)
        if corpus is not None and any(Path(source).resolve() == corpus.resolve() for source in sources if ":" not in source):
            raise MtpkitError(f"the suffix corpus of {heads_dir} holds the responses to its held-out prompts (it is "
                              "their training data), so they would measure the suffix drafter copying them: pass "
                              "--data with prompts the heads never trained on")
    dataset = load_data(list(sources), max_examples=None if data else training.get("max_examples"),
                        eval_fraction=fraction, seed=seed, backbone=heads.backbone)
    examples = dataset.train if data else dataset.eval
    tokenizer = heads.backbone.tokenizer
    prompts = [ids for ids in (prompt_ids(tokenizer, e) if e.text is None else None for e in examples) if ids]
    if not prompts:
        raise MtpkitError("no prompts to measure the acceptance prior on (plain-text records have none)")
    return prompts[:limit]


def _eval_fraction(training: dict) -> float | None:
    """The held-out fraction finetune used: recorded, or (heads trained before it was) the held-out share of the
    records, which ``load_data`` rounds back to the same split."""
    if training.get("eval_fraction") is not None:
        return training["eval_fraction"]
    held_out, records = training.get("eval_sequences"), sum((training.get("data_shapes") or {}).values())
    return held_out / records if held_out and records else None


def _resolve(source: str, heads_dir: Path) -> str:
    """A recorded data path as given (relative to where finetune ran), else relative to the heads directory."""
    if ":" in source or Path(source).exists() or not (Path(heads_dir) / source).exists():
        return source
    return str(Path(heads_dir) / source)


@torch.inference_mode()
def measure_prior(heads, heads_dir: Path, prompts: list[list[int]], max_new_tokens: int = PRIOR_NEW_TOKENS,
                  on_prompt: Callable[[int, int], None] | None = None) -> ConfidenceCalibrator:
    """The calibrator's counts after greedy hybrid decoding of every prompt, each from a fresh decoder state but
    one calibrator learning throughout, started from the raw confidences (not from an earlier prior)."""
    decoder = build_decoder(heads, heads_dir, HYBRID, prior=False)
    for done, ids in enumerate(prompts, start=1):
        decoder.reset(keep_calibrator=True)
        decoder.generate(torch.tensor([ids]), max_new_tokens)
        if on_prompt:
            on_prompt(done, len(prompts))
    return decoder.calibrator


def write_prior(heads_dir: Path, calibrator: ConfidenceCalibrator, trials: int = PRIOR_TRIALS) -> Path:
    """Write the prior (weighed as at most ``trials`` trials per bin) into the heads directory, atomically."""
    path = Path(heads_dir) / PRIOR_NAME
    atomic_write_text(path, json.dumps(calibrator.weighed_as(trials).state_dict(), sort_keys=True) + "\n")
    return path
