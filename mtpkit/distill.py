"""Self-distillation: the frozen base writes the responses its heads will learn to predict.

Heads are only useful if they guess what *this* base will say, so for prompt-only data (and
with ``--self-distill`` for any chat-like data) the response is the base's own greedy
continuation. Generations are cached under ``cache_root()/distill``, one append-only JSONL
file per (base fingerprint, settings), one line per prompt keyed by a hash of its token ids.
Each batch is appended with a single write, so an interrupted run loses at most the batch in
flight, and a torn last line is ignored on reading: the next run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mtpkit.backbone import Backbone
from mtpkit.data import Example, prompt_ids
from mtpkit.files import append_lines, cache_root
from mtpkit.generation import default_batch_size, eos_ids, generate
from mtpkit.quality import Degeneracy, degeneracy

@dataclass
class DistillStats:
    generated: int = 0
    cached: int = 0
    seconds: float = 0.0
    new_tokens: int = 0
    degeneracy: Degeneracy | None = None  # empty and looping responses among all of them


@dataclass
class KeepStates:
    """What self-distillation does with the hidden states generation computes for each sequence it writes:
    which ones (``layer_ids``; None: the final ones), in which dtype, and ``put(prompt + response ids, states)``."""

    put: Callable[[list[int], torch.Tensor], None]
    layer_ids: list[int] | None = None
    dtype: torch.dtype = torch.float32


def cache_file(backbone: Backbone, max_new_tokens: int) -> Path:
    settings = f"greedy-n{max_new_tokens}"
    return cache_root() / "distill" / f"{backbone.fingerprint}-{settings}.jsonl"


def prompt_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]


def read_cache(path: Path) -> dict[str, list[int]]:
    cached = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                cached[entry["key"]] = entry["response"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by an interruption: that prompt is generated again
    return cached


def generate_responses(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int,
                       keep: KeepStates | None = None) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (see ``generate``), their states handed to ``keep``."""
    if keep is None:
        return generate(backbone, prompts, max_new_tokens).responses
    made = generate(backbone, prompts, max_new_tokens, keep_hidden=True, layer_ids=keep.layer_ids,
                    hidden_dtype=keep.dtype)
    for prompt, response, states in zip(prompts, made.responses, made.hidden):
        keep.put(prompt + response, states)
    return made.responses


def distill(backbone: Backbone, examples: list[Example], max_new_tokens: int, *, batch_size: int | None = None,
            on_batch: Callable[[int, int], None] | None = None,
            keep: KeepStates | None = None) -> tuple[list[list[int]], DistillStats]:
    """The base's own response (token ids) to every example's prompt, from the cache where possible.

    ``on_batch(done, total)`` is called after each batch (a progress bar, say); ``keep`` receives the hidden
    states of every sequence generated now (not of those read from the cache).
    """
    import time

    start = time.perf_counter()
    path = cache_file(backbone, max_new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    cached = read_cache(path)
    prompts = [prompt_ids(backbone.tokenizer, e) for e in examples]
    keys = [prompt_key(p) for p in prompts]
    stats = DistillStats(cached=sum(key in cached for key in keys))
    # longest first, so padding is small and a too-large batch fails at once rather than at the end
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cached}.values(), key=lambda i: -len(prompts[i]))
    batch_size = batch_size or default_batch_size(backbone)
    done = len(keys) - len(todo)
    if on_batch:
        on_batch(done, len(keys))
    for first in range(0, len(todo), batch_size):
        batch = todo[first: first + batch_size]
        responses = generate_responses(backbone, [prompts[i] for i in batch], max_new_tokens, keep)
        entries = [{"key": keys[i], "response": r} for i, r in zip(batch, responses)]
        append_lines(path, entries)
        for entry in entries:
            cached[entry["key"]] = entry["response"]
        stats.generated += len(batch)
        stats.new_tokens += sum(len(r) for r in responses)
        done += len(batch)
        if on_batch:
            on_batch(min(done, len(keys)), len(keys))
    stats.seconds = time.perf_counter() - start
    responses = [cached[key] for key in keys]
    stats.degeneracy = degeneracy(responses, eos_ids(backbone))
    return responses, stats
