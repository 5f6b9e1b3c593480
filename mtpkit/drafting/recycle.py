"""Token Recycling (Luo et al., 2024): draft from the successors the base already ranked at every verified node.

Each verification forward computes the base's logits at every node of the tree, and keeps only what the accepted
path needs. Token recycling keeps the rest: for each token, the ``successors`` tokens the base ranked highest the
last time it saw that token (at any node, accepted or not), in a table [vocab, successors]. Drafting walks that
table from the root (the last committed token): the root's row gives depth 1, each of those tokens' rows depth 2,
and so on, best-first by the product of the recorded probabilities. No extra forward and no training: the table
costs one top-k over the tree's logits per step.

A row holds what the base predicted after the token in *one* context (the latest), so the drafts are a guess
that the next occurrence continues alike; the calibrator learns how often that holds, as for every source.

Every prompt starts from the same table: empty, or a warm one (``successor_table``) counted from the base's own
earlier responses (the heads directory's corpus): each token's most frequent successors there, with their
frequencies as probabilities. Rows the verification records replace the warm ones as decoding goes. (The paper
keeps the table across prompts instead, so a prompt's drafts depend on the prompts before it.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtpkit.drafting.base import Candidates, best_first
from mtpkit.errors import MtpkitError

EMPTY = -1  # a table entry with no successor recorded


class RecycleDrafter:
    """Token recycling behind the ``Drafter`` interface, learning through ``observe_verification``.

    ``successors``: tokens kept per row (the paper's k, 8); ``max_depth``: the deepest draft. The table lives on
    the CPU, where drafting reads it. ``start`` sets it back to ``warm`` (a ``successor_table``; None: empty), so a
    prompt's drafts (and bench's figures) never depend on the prompts decoded before.
    """

    name = "recycle"

    def __init__(self, vocab_size: int, successors: int = 8, max_depth: int = 6,
                 warm: tuple[torch.Tensor, torch.Tensor] | None = None):
        if vocab_size < 1 or successors < 1 or max_depth < 1:
            raise MtpkitError(f"token recycling needs vocab_size, successors and max_depth >= 1 (got {vocab_size}, "
                              f"{successors}, {max_depth})")
        if warm is not None and tuple(warm[0].shape) != (vocab_size, successors):
            raise MtpkitError(f"a warm recycling table must be [{vocab_size}, {successors}] (got {tuple(warm[0].shape)})")
        self.vocab_size, self.successors, self.max_depth, self.warm = vocab_size, successors, max_depth, warm
        # [vocab, successors]: token ids, and the base's probability of each when it was recorded (0 where empty)
        self.table = torch.full((vocab_size, successors), EMPTY, dtype=torch.long) if warm is None else warm[0].clone()
        self.confidences = torch.zeros(vocab_size, successors) if warm is None else warm[1].clone()

    # -------------------------------------------------------------- learning

    def start(self, prompt_ids: Sequence[int]) -> None:
        if self.warm is None:
            self.table.fill_(EMPTY)
            self.confidences.zero_()
        else:
            self.table.copy_(self.warm[0])
            self.confidences.copy_(self.warm[1])

    def reset(self) -> None:
        self.start(())  # the table is per prompt already

    def update(self, accepted_ids: Sequence[int]) -> None:
        pass  # the table learns from the verification's logits (``observe_verification``), not from the tokens

    @torch.inference_mode()
    def observe_verification(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Each verified node's row becomes the base's top ``successors`` at that node: ``tokens`` [N] (the tree's
        tokens, root first), ``logits`` [N, V] (the base's logits at each)."""
        top = torch.topk(logits, min(self.successors, logits.shape[-1]), dim=-1)
        probabilities = (top.values.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)).exp()
        self.record(tokens, top.indices, probabilities)

    def record(self, tokens: torch.Tensor, successor_ids: torch.Tensor, probabilities: torch.Tensor) -> None:
        """Replace the rows of ``tokens`` [N] with ``successor_ids`` [N, m] (m <= successors, best first, EMPTY
        allowed) and their ``probabilities`` [N, m]. A token given twice keeps its last row."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).cpu().reshape(-1)
        successor_ids = torch.as_tensor(successor_ids, dtype=torch.long).cpu()
        probabilities = torch.as_tensor(probabilities, dtype=torch.float32).cpu()
        if successor_ids.shape[-1] > self.successors or successor_ids.shape[0] != tokens.shape[0]:
            raise MtpkitError(f"token recycling records at most {self.successors} successors per token, one row per "
                              f"token (got {tuple(successor_ids.shape)} for {tokens.shape[0]} tokens)")
        known = (tokens >= 0) & (tokens < self.vocab_size)  # a token outside the table has no row to draft from
        successor_ids = successor_ids.masked_fill((successor_ids < 0) | (successor_ids >= self.vocab_size), EMPTY)
        tokens, successor_ids, probabilities = tokens[known], successor_ids[known], probabilities[known]
        if tokens.numel() == 0:
            return
        # index assignment with repeated indices keeps an unspecified one: pick each token's last row first
        unique, inverse = torch.unique(tokens, return_inverse=True)
        positions = torch.arange(tokens.shape[0])
        last = torch.full((unique.shape[0],), -1, dtype=torch.long).scatter_reduce_(0, inverse, positions, "amax")
        rows = torch.full((unique.shape[0], self.successors), EMPTY, dtype=torch.long)
        row_confidences = torch.zeros(unique.shape[0], self.successors)
        width = successor_ids.shape[-1]
        rows[:, :width] = successor_ids[last]
        row_confidences[:, :width] = probabilities[last].clamp(0.0, 1.0).masked_fill(rows[:, :width] == EMPTY, 0.0)
        self.table[unique] = rows
        self.confidences[unique] = row_confidences

    # -------------------------------------------------------------- drafting

    def successors_of(self, token: int) -> list[tuple[int, float]]:
        """The recorded (successor, probability) pairs of ``token``, best first (none for an unseen token)."""
        if not 0 <= token < self.vocab_size:
            return []
        ids, probabilities = self.table[token].tolist(), self.confidences[token].tolist()
        return [(t, p) for t, p in zip(ids, probabilities) if t != EMPTY]

    def propose(self, context_ids: Sequence[int], budget: int) -> Candidates:
        if not context_ids or budget < 1:
            return Candidates()

        def children(token: int):
            return [(successor, probability, successor) for successor, probability in self.successors_of(token)]

        # a node's handle is its own token: its children are that token's row, whatever the path to it
        return best_first(int(context_ids[-1]), children, self.max_depth, budget, self.name, normalise=False)


def successor_table(documents: Sequence[Sequence[int]], vocab_size: int, successors: int = 8,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A warm table from token sequences: each token's ``successors`` most frequent next tokens over all of
    ``documents`` (ties: the smaller id first), with their relative frequencies after it as probabilities; rows
    of tokens never followed by anything stay EMPTY. Tokens outside ``[0, vocab_size)`` are not counted."""
    table = torch.full((vocab_size, successors), EMPTY, dtype=torch.long)
    confidences = torch.zeros(vocab_size, successors)
    pairs = [torch.as_tensor(list(d), dtype=torch.long) for d in documents if len(d) > 1]
    if not pairs:
        return table, confidences
    first = torch.cat([d[:-1] for d in pairs])
    second = torch.cat([d[1:] for d in pairs])
    inside = (first >= 0) & (first < vocab_size) & (second >= 0) & (second < vocab_size)
    keys, counts = torch.unique(first[inside] * vocab_size + second[inside], return_counts=True)
    token, successor = keys // vocab_size, keys % vocab_size
    # by token, then count (descending), then successor id: one sort on a composite key
    order = torch.argsort(token * (1 << 40) + ((1 << 20) - counts.clamp(max=(1 << 20) - 1)) * (1 << 20) + successor)
    token, successor, counts = token[order], successor[order], counts[order]
    starts = torch.ones_like(token, dtype=torch.bool)
    starts[1:] = token[1:] != token[:-1]
    group_start = torch.cummax(torch.where(starts, torch.arange(token.numel()), 0), 0).values
    rank = torch.arange(token.numel()) - group_start
    totals = torch.zeros(vocab_size).index_add_(0, token, counts.float())
    kept = rank < successors
    table[token[kept], rank[kept]] = successor[kept]
    confidences[token[kept], rank[kept]] = counts[kept].float() / totals[token[kept]]
    return table, confidences
