"""What every drafter proposes, and the one interface the verify loop will call.

A drafter sees the committed tokens (prompt, then every token the base has emitted; the last
one is the *root* of the next tree, the base's own next token) and proposes draft tokens after
it as a small trie: node i holds ``tokens[i]``, hangs under ``parents[i]`` (-1: under the root)
and carries ``confidences[i]``, the drafter's estimate of P(node accepted | its parent accepted).
A path's chance of being accepted is then the product of its nodes' confidences, which is what
``mtpkit.drafting.merge`` ranks nodes by.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from mtpkit.errors import MtpkitError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Candidates:
    """Draft nodes, flat and parent-first: ``parents[i] < i`` (or -1, the root)."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    confidences: tuple[float, ...] = ()
    sources: tuple[str, ...] = ()

    def __post_init__(self):
        n = len(self.tokens)
        if not len(self.parents) == len(self.confidences) == len(self.sources) == n:
            raise MtpkitError("candidates need one parent, confidence and source per token")
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise MtpkitError(f"candidate {i} has parent {parent}: a parent must come before its child")
        if any(not 0.0 <= c <= 1.0 for c in self.confidences):
            raise MtpkitError("candidate confidences must lie in [0, 1]")

    def __len__(self) -> int:
        return len(self.tokens)

    def paths(self) -> list[tuple[int, ...]]:
        """Each node's token path from the root (the root's own token excluded)."""
        paths: list[tuple[int, ...]] = []
        for token, parent in zip(self.tokens, self.parents):
            paths.append((paths[parent] if parent >= 0 else ()) + (token,))
        return paths


class Drafter(Protocol):
    """Proposes drafts after the committed tokens; learns from what the base commits."""

    name: str

    def start(self, prompt_ids: Sequence[int]) -> None:
        """Forget the previous prompt; ``prompt_ids`` are the committed tokens now."""

    def propose(self, context_ids: Sequence[int], budget: int) -> Candidates:
        """At most ``budget`` nodes continuing ``context_ids`` (all committed tokens, root last)."""

    def update(self, accepted_ids: Sequence[int]) -> None:
        """The tokens one step committed (accepted drafts and the base's bonus token), in order."""

    def reset(self) -> None:
        """Forget what earlier prompts taught it: ``mtpkit bench`` starts every prompt from the same state."""


@runtime_checkable
class ObservesVerification(Protocol):
    """A drafter that also learns from what every verification forward computed (token recycling): the decoder
    hands it each tree node's token and the base's logits there, drafts rejected or not."""

    def observe_verification(self, tokens: "torch.Tensor", logits: "torch.Tensor") -> None:
        """``tokens`` [N]: the verified tree's tokens, root first; ``logits`` [N, V]: the base's logits at each."""


# A trie walked lazily: children(handle) -> [(token, weight, child handle)]; weights are counts of occurrences,
# or (``normalise=False``) each child's confidence itself.
Children = Callable[[Any], Iterable[tuple[int, float, Any]]]


def best_first(root: Any, children: Children, max_depth: int, max_nodes: int, source: str,
               normalise: bool = True) -> Candidates:
    """The ``max_nodes`` most probable nodes of a count trie, parents first (EAGLE-2's expansion).

    A child's confidence is its count over the summed counts of its siblings (occurrences that stop,
    at a document's end or at the context's end, say nothing about what follows), or with ``normalise=False``
    its weight as given (a probability the drafter measured); a path's probability is the product along it.
    Ties go to the shallower node, then the smaller token path, so the choice is deterministic.
    """
    chosen_tokens: list[int] = []
    chosen_parents: list[int] = []
    chosen_confidences: list[float] = []
    frontier: list = []

    def push(handle: Any, parent: int, path: tuple[int, ...], probability: float) -> None:
        if len(path) >= max_depth:
            return
        options = list(children(handle))
        total = sum(count for _, count, _ in options) if normalise else 1.0
        for token, count, child in options:
            confidence = count / total
            heapq.heappush(frontier, (-probability * confidence, len(path) + 1, path + (token,),
                                      confidence, parent, child))

    push(root, -1, (), 1.0)
    while frontier and len(chosen_tokens) < max_nodes:
        negative, _, path, confidence, parent, handle = heapq.heappop(frontier)
        index = len(chosen_tokens)
        chosen_tokens.append(path[-1])
        chosen_parents.append(parent)
        chosen_confidences.append(confidence)
        if len(chosen_tokens) < max_nodes:
            push(handle, index, path, -negative)
    return Candidates(tuple(chosen_tokens), tuple(chosen_parents), tuple(chosen_confidences),
                      (source,) * len(chosen_tokens))
