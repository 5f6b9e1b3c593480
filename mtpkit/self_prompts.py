"""Prompts without a dataset (``--data self:N``): the base writes its users' requests itself (Magpie).

An aligned chat model given its chat template up to the start of a user turn, and nothing else,
continues with a plausible user request. Sampling that turn (temperature, top-p) many times gives a
prompt set in the model's own domain, offline. The raw samples are filtered (empty, over-long, looping),
deduplicated (exact, and near-duplicates by word 3-gram overlap) and reported with their diversity.

Raw samples are cached under ``cache_root()/self-prompts``, one JSONL line per batch, keyed by the base's
fingerprint and the settings; batch i is always drawn with the same seed, so an interrupted run resumes
where it stopped and gives the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from mtpkit.backbone import Backbone
from mtpkit.chat import has_chat_template
from mtpkit.files import append_lines, atomic_write_text
from mtpkit.generation import Sampler, default_batch_size, eos_ids, generate
from mtpkit.errors import MtpkitError
from mtpkit.files import cache_root
from mtpkit.quality import deduplicate, distinct_ngrams, is_looping

SENTINEL = "\ue000mtpkit-user-turn\ue000"  # a private-use marker no template contains
MAX_PROMPT_TOKENS = 96  # a user turn still open after this many tokens is dropped (over-long)
MIN_PROMPT_CHARS = 12
MAX_BATCHES_PER_PROMPT = 4  # give up when kept prompts stay this rare (a model that cannot write requests)


@dataclass(frozen=True)
class SelfPromptSettings:
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    max_tokens: int = MAX_PROMPT_TOKENS

    def key(self) -> str:
        return f"t{self.temperature:g}-p{self.top_p:g}-s{self.seed}-m{self.max_tokens}"


@dataclass
class SelfPromptReport:
    requested: int
    sampled: int
    kept: int
    empty: int
    too_long: int
    looping: int
    exact_duplicates: int
    near_duplicates: int
    distinct_1: float
    distinct_2: float

    def summary(self) -> str:
        return (f"{self.kept} of {self.sampled} sampled prompts kept (empty {self.empty}, over-long {self.too_long}, "
                f"looping {self.looping}, duplicates {self.exact_duplicates} exact + {self.near_duplicates} near); "
                f"distinct-1 {self.distinct_1:.2f}, distinct-2 {self.distinct_2:.2f}")


def user_turn_prefix(backbone: Backbone) -> str:
    """The chat template's text up to where a user's message begins (system prompt included, if any)."""
    tokenizer = backbone.tokenizer
    if not has_chat_template(tokenizer):
        raise MtpkitError(f"self: prompts need a chat model, and {backbone.reference} has no chat template; "
                          "train it on text data instead (--data file.txt or a dataset with a text column)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise MtpkitError(f"self: prompts: the chat template of {backbone.reference} does not show the user's message")
    return text[: text.index(SENTINEL)]


def cache_file(backbone: Backbone, settings: SelfPromptSettings) -> Path:
    return cache_root() / "self-prompts" / f"{backbone.fingerprint}-{settings.key()}.jsonl"


def _read_batches(path: Path) -> list[list[list[int]]]:
    """Cached raw batches, in order; reading stops at a torn or missing line (it is drawn again)."""
    batches = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(entry, dict) or entry.get("batch") != len(batches):
                break
            batches.append(entry["samples"])
    return batches


def self_prompts(backbone: Backbone, count: int, settings: SelfPromptSettings = SelfPromptSettings(), *,
                 batch_size: int | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> tuple[list[str], SelfPromptReport]:
    """``count`` distinct user prompts written by the base, and how they were chosen."""
    if count < 1:
        raise MtpkitError(f"self:N needs N >= 1 (got {count})")
    prefix = user_turn_prefix(backbone)
    prefix_ids = list(backbone.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    stop_ids = eos_ids(backbone)
    path = cache_file(backbone, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = _read_batches(path)
    lines = "".join(json.dumps({"batch": i, "samples": b}) + "\n" for i, b in enumerate(batches))
    if path.is_file() and path.read_text() != lines:  # drop a torn tail so appended batches stay in order
        atomic_write_text(path, lines)
    batch_size = batch_size or default_batch_size(backbone)
    sampler = Sampler(settings.temperature, settings.top_p)
    limit = MAX_BATCHES_PER_PROMPT * math.ceil(count / batch_size) + 2
    while True:
        texts, report = _select([s for b in batches for s in b], count, stop_ids, backbone, settings)
        if on_batch:
            on_batch(min(report.kept, count), count)
        if report.kept >= count or len(batches) >= limit:
            break
        generator = torch.Generator(device=backbone.device).manual_seed(settings.seed * 1_000_003 + len(batches))
        samples = generate(backbone, [prefix_ids] * batch_size, settings.max_tokens, sampler=sampler,
                           generator=generator).responses
        append_lines(path, [{"batch": len(batches), "samples": samples}])
        batches.append(samples)
    if report.kept < count:
        raise MtpkitError(f"self:{count}: the base wrote only {report.kept} usable prompts in {report.sampled} tries "
                          f"({report.summary()}); ask for fewer, or give a prompt file")
    return texts[:count], report


def _select(samples: list[list[int]], count: int, eos_ids: set[int], backbone: Backbone,
            settings: SelfPromptSettings) -> tuple[list[str], SelfPromptReport]:
    """Filter and deduplicate raw samples (in order), keeping at most ``count``."""
    candidates: list[str] = []
    empty = too_long = looping = 0
    for ids in samples:
        finished = bool(ids) and ids[-1] in eos_ids
        content = ids[:-1] if finished else ids
        text = backbone.tokenizer.decode(content, skip_special_tokens=True).strip()
        if len(text) < MIN_PROMPT_CHARS:
            empty += 1
        elif not finished:
            too_long += 1
        elif is_looping(content):
            looping += 1
        else:
            candidates.append(text)
    keep, exact, near = deduplicate(candidates)
    texts = [candidates[i] for i in keep][:count]
    report = SelfPromptReport(requested=count, sampled=len(samples), kept=len(texts), empty=empty, too_long=too_long,
                              looping=looping, exact_duplicates=exact, near_duplicates=near,
                              distinct_1=round(distinct_ngrams(texts, 1), 4), distinct_2=round(distinct_ngrams(texts, 2), 4))
    return texts, report


def report_dict(report: SelfPromptReport, settings: SelfPromptSettings) -> dict:
    return {**asdict(report), "settings": asdict(settings)}
