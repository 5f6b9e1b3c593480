"""Prompt lookup (PLD): continue the context the way it continued before, in the prompt or output.

The context's last n tokens (longest n first, ``max_ngram`` down to ``min_ngram``) are looked up
among all earlier n-grams; what followed each earlier occurrence becomes a branch of a trie, so
several matches give several distinct continuations. The index (n-gram -> positions after it) is
extended as tokens are committed: a step costs O(new tokens + matches x max_tokens), never a rescan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mtpkit.drafting.base import Candidates, best_first
from mtpkit.errors import MtpkitError


@dataclass
class PromptLookup:
    """Prompt-lookup drafter; ``max_matches`` most recent occurrences of the matched n-gram are used."""

    min_ngram: int = 2
    max_ngram: int = 4
    max_tokens: int = 10
    max_matches: int = 16
    name: str = "lookup"
    _tokens: list[int] = field(default_factory=list, init=False, repr=False)
    # n-gram (a tuple, its length is n) -> positions of the token right after each occurrence
    _following: dict[tuple[int, ...], list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise MtpkitError(f"prompt lookup needs 1 <= min_ngram <= max_ngram (got {self.min_ngram}, "
                              f"{self.max_ngram})")
        if self.max_tokens < 1 or self.max_matches < 1:
            raise MtpkitError("prompt lookup needs max_tokens >= 1 and max_matches >= 1")

    def start(self, prompt_ids: Sequence[int]) -> None:
        self._tokens = []
        self._following = {}
        self.update(prompt_ids)

    def reset(self) -> None:
        self.start(())  # it learns nothing across prompts

    def update(self, accepted_ids: Sequence[int]) -> None:
        tokens, following = self._tokens, self._following
        for token in accepted_ids:
            tokens.append(int(token))
            end = len(tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                following.setdefault(tuple(tokens[end - n:]), []).append(end)

    def propose(self, context_ids: Sequence[int], budget: int) -> Candidates:
        if len(context_ids) < len(self._tokens):
            raise MtpkitError("the context is shorter than the tokens committed so far: call start() on a new prompt")
        self.update(context_ids[len(self._tokens):])  # a caller that skipped update() is caught up
        matches = self.matches()
        if not matches or budget < 1:
            return Candidates()
        tokens = self._tokens

        def children(node: tuple[int, list[int]]):
            # a trie node: its depth and the positions of the matches that agree with it so far
            depth, starts = node
            groups: dict[int, list[int]] = {}
            for start in starts:
                if start + depth < len(tokens):
                    groups.setdefault(tokens[start + depth], []).append(start)
            return [(token, len(group), (depth + 1, group)) for token, group in groups.items()]

        return best_first((0, matches), children, self.max_tokens, budget, self.name)

    def matches(self) -> list[int]:
        """Positions right after the earlier occurrences of the longest matching suffix n-gram, newest first."""
        tokens = self._tokens
        end = len(tokens)
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            # the last position is the suffix's own (indexed when its last token came): nothing follows it yet
            earlier = self._following.get(tuple(tokens[end - n:]), [])[-self.max_matches - 1:-1]
            if earlier:
                return earlier[::-1]
        return []


def build(context) -> list[PromptLookup]:
    """The ``lookup`` source (``mtpkit.drafting.registry``): a fresh prompt-lookup drafter."""
    return [PromptLookup()]
