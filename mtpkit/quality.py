"""How good is a piece of generated text as training data: loops, emptiness, duplicates, diversity.

Pure functions over token ids or strings, shared by the self-written prompts (``mtpkit.self_prompts``)
and the self-distilled responses (``mtpkit.distill``, ``mtpkit.corpus``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

LOOP_WINDOW = 64  # the tail of a sequence that is checked for repetition
LOOP_MIN_TOKENS = 24  # shorter sequences are never called loops
LOOP_DISTINCT_4GRAMS = 0.35  # fewer distinct 4-grams than this share of the tail's 4-grams: a loop
LOOP_TOP_TOKEN = 0.5  # one token filling this share of the tail: a loop
DEGENERATE_WARN = 0.5  # warn when this share of the responses is empty or looping
NEAR_DUPLICATE_JACCARD = 0.6  # word 3-gram overlap above which two prompts count as one


def is_looping(ids: list[int]) -> bool:
    """Whether the tail of ``ids`` repeats itself: the same token, or the same few n-grams, over and over."""
    if len(ids) < LOOP_MIN_TOKENS:
        return False
    tail = ids[-LOOP_WINDOW:]
    grams = [tuple(tail[i:i + 4]) for i in range(len(tail) - 3)]
    if len(set(grams)) < LOOP_DISTINCT_4GRAMS * len(grams):
        return True
    return Counter(tail).most_common(1)[0][1] >= LOOP_TOP_TOKEN * len(tail)


@dataclass
class Degeneracy:
    """How many responses are empty (nothing before the end-of-sequence) or loops."""

    responses: int
    empty: int
    looping: int

    @property
    def empty_rate(self) -> float:
        return self.empty / max(1, self.responses)

    @property
    def looping_rate(self) -> float:
        return self.looping / max(1, self.responses)

    @property
    def degenerate(self) -> bool:
        return self.responses > 0 and (self.empty + self.looping) >= DEGENERATE_WARN * self.responses

    def warning(self) -> str | None:
        """One line with the figures when most of the data is degenerate, else None."""
        if not self.degenerate:
            return None
        return (f"{self.looping} of {self.responses} responses ({self.looping_rate:.0%}) are loops and {self.empty} "
                f"({self.empty_rate:.0%}) are empty: accuracies measured on such data are not what decoding will "
                "see (a base model given a chat prompt often loops; use a chat model or text data)")

    def as_dict(self) -> dict:
        return {"responses": self.responses, "empty": self.empty, "looping": self.looping,
                "empty_rate": round(self.empty_rate, 4), "looping_rate": round(self.looping_rate, 4)}


def degeneracy(responses: list[list[int]], eos_ids: set[int]) -> Degeneracy:
    """Count empty and looping responses (the end-of-sequence token is not part of the content)."""
    empty = looping = 0
    for response in responses:
        content = response[:-1] if response and response[-1] in eos_ids else response
        if not content:
            empty += 1
        elif is_looping(content):
            looping += 1
    return Degeneracy(len(responses), empty, looping)


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = _normalise(text).split()
    if len(words) < 3:
        return {tuple(words)}
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def deduplicate(texts: list[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> tuple[list[int], int, int]:
    """Indices of the texts to keep (first of each group), and how many were exact / near duplicates.

    Exact: equal after lower-casing and dropping punctuation. Near: word 3-gram Jaccard overlap of at
    least ``threshold`` with a kept text (candidates found through an inverted index, not all pairs).
    """
    keep, exact, near = [], 0, 0
    seen: set[str] = set()
    kept_shingles: list[set] = []
    index: dict[tuple[str, ...], list[int]] = {}
    for i, text in enumerate(texts):
        key = _normalise(text)
        if key in seen:
            exact += 1
            continue
        shingles = _shingles(text)
        overlap = Counter(j for s in shingles for j in index.get(s, ()))
        if any(shared / len(shingles | kept_shingles[j]) >= threshold for j, shared in overlap.items()):
            near += 1
            continue
        seen.add(key)
        for s in shingles:
            index.setdefault(s, []).append(len(kept_shingles))
        kept_shingles.append(shingles)
        keep.append(i)
    return keep, exact, near


def distinct_ngrams(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of ``texts`` (distinct-n: 1.0 when nothing repeats)."""
    total, distinct = 0, set()
    for text in texts:
        words = _normalise(text).split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0
