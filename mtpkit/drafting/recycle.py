"""Token Recycling (Luo et al., 2024): draft from the successors the base already ranked at every verified node.

Each verification forward computes the base's logits at every node of the tree, and keeps only what the accepted
path needs. Token recycling keeps the rest: for each token, the ``successors`` tokens the base ranked highest the
last time it saw that token (at any node, accepted or not), in a table [vocab, successors]. Drafting walks that
table from the root (the last committed token): the root's row gives depth 1, each of those tokens' rows depth 2,
and so on, best-first by the product of the recorded probabilities. No extra forward and no training: the table
costs one top-k over the tree's logits per step.

A row holds what the base predicted after the token in *one* context (the latest), so the drafts are a guess
that the next occurrence continues alike; the calibrator learns how often that holds, as for every source.
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
    the CPU, where drafting reads it. ``start`` clears it: every prompt starts from an empty table, so a prompt's
    drafts (and bench's figures) never depend on the prompts decoded before. (The paper keeps the table across
    prompts, a warm start that mtpkit does not offer yet.)
    """

    name = "recycle"

    def __init__(self, vocab_size: int, successors: int = 8, max_depth: int = 6):
        if vocab_size < 1 or successors < 1 or max_depth < 1:
            raise MtpkitError(f"token recycling needs vocab_size, successors and max_depth >= 1 (got {vocab_size}, "
                              f"{successors}, {max_depth})")
        self.vocab_size, self.successors, self.max_depth = vocab_size, successors, max_depth
        self.table = torch.full((vocab_size, successors), EMPTY, dtype=torch.long)  # [vocab, successors] token ids
        # [vocab, successors]: the base's probability of each successor when it was recorded (0 where empty)
        self.confidences = torch.zeros(vocab_size, successors)

    # -------------------------------------------------------------- learning

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.table.fill_(EMPTY)
        self.confidences.zero_()

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


def build(context) -> list[RecycleDrafter]:
    """The ``recycle`` source (``mtpkit.drafting.registry``): a table over the base's vocabulary, fresh per prompt."""
    return [RecycleDrafter(context.heads.backbone.vocab_size)]
