"""Acceptance: which drafted nodes the base keeps, and the token it adds after them.

Greedy keeps the longest root-to-leaf path whose every node is the base's argmax at its parent (exact: the output
is the base's greedy output as the verification forward computes it). Sampling walks the tree by rejection
sampling over point-mass drafts (lossless: the output follows the warped base distribution). Typical acceptance
(Medusa's) keeps a node whose probability clears an entropy-dependent threshold: faster, not lossless.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from mtpkit.decoding.plan import TreePlan
from mtpkit.errors import MtpkitError

TYPICAL_THRESHOLD = 0.09  # Medusa's posterior_threshold (epsilon)
TYPICAL_ALPHA = 0.3  # Medusa's posterior_alpha (delta)


def check_sampling(temperature: float, top_p: float, top_k: int, typical: bool) -> None:
    """Fail with one line on sampling options that make no sense."""
    if temperature < 0:
        raise MtpkitError(f"--temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise MtpkitError(f"--top-p must be in (0, 1] (got {top_p})")
    if top_k < 0:
        raise MtpkitError(f"--top-k must be >= 0 (got {top_k})")
    if typical and temperature == 0:
        raise MtpkitError("--typical needs --temperature > 0 (greedy decoding is already exact)")


class Acceptance:
    """The sampling settings of a decoder and its random streams: picks the root, accepts a verified tree."""

    def __init__(self, device: torch.device, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 typical: bool = False, seed: int | None = None):
        check_sampling(temperature, top_p, top_k, typical)
        self.temperature, self.top_p, self.top_k, self.typical = temperature, top_p, top_k, typical
        self.sampling = temperature > 0
        self._generator = torch.Generator(device=device)
        self.reseed(seed if seed is not None else random.randrange(2**63))

    def reseed(self, seed: int) -> None:
        """Restart the random streams from ``seed``."""
        self._rng = random.Random(seed)
        self._generator.manual_seed(seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """The base's own next token after a prefill: argmax, or a draw from the warped distribution."""
        if not self.sampling:
            return logits.argmax(-1).item()
        return self._sample(self._target_probs(logits))

    def accept(self, plan: TreePlan, tokens: torch.Tensor, logits: torch.Tensor):
        """(accepted nodes, root first; the committed tokens: accepted drafts and the bonus; the first rejected
        node on the best path or None) for a tree whose nodes hold ``tokens`` and whose verification gave
        ``logits`` [N, V]."""
        if self.sampling and not self.typical:
            return self._accept_sampling(plan, tokens, logits)
        return self._accept_longest(plan, tokens, logits)

    def _accept_longest(self, plan: TreePlan, tokens: torch.Tensor, logits: torch.Tensor):
        """Greedy (base argmax) or typical acceptance: the longest accepted root-to-leaf path."""
        if self.typical:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            entropy = -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1)
            threshold = torch.minimum(torch.full_like(entropy, TYPICAL_THRESHOLD),
                                      TYPICAL_ALPHA * torch.exp(-entropy))
            node_ok = probs[plan.parents[1:], tokens[1:]] > threshold[plan.parents[1:]]
        else:
            prediction = logits.argmax(-1)
            node_ok = prediction[plan.parents[1:]] == tokens[1:]
        node_ok = torch.cat([node_ok.new_ones(1), node_ok])
        match = node_ok[plan.retrieve[:, 1:]] & plan.retrieve_valid
        accepted = match.to(torch.int32).cumprod(1).sum(1)
        best = accepted.argmax()
        path_nodes = plan.retrieve[best]
        parts = [accepted[best].view(1).long(), plan.retrieve_raw[best], tokens[path_nodes]]
        if not self.typical:
            parts.append(prediction[path_nodes])
        row = torch.cat(parts).tolist()  # the one host sync of the step
        width = plan.max_depth + 1
        length, path, path_tokens = row[0], row[1:1 + width], row[1 + width:1 + 2 * width]
        nodes = path[:length + 1]
        bonus = self._sample(probs[nodes[-1]]) if self.typical else row[1 + 2 * width + length]
        rejected = path[length + 1] if length + 1 < width and path[length + 1] >= 0 else None
        return nodes, path_tokens[1:length + 1] + [bonus], rejected

    def _accept_sampling(self, plan: TreePlan, tokens: torch.Tensor, logits: torch.Tensor):
        """Lossless rejection sampling over deterministic drafts (chains and trees).

        At a node, its children are tried in rank order: child c is accepted with probability
        r(c) under the current residual r (the base distribution at the node with the rejected
        children removed and renormalised); if all fail, the next token is drawn from r. The
        emitted tokens are then distributed exactly as the (warped) base's. Only the rows the walk
        visits are warped (at most depth + 1 of the tree's nodes), each with one softmax.
        """
        token_list = tokens.tolist()
        warped: dict[int, torch.Tensor] = {}

        def probs_at(node: int) -> torch.Tensor:
            if node not in warped:
                warped[node] = self._target_probs(logits[node])
            return warped[node]

        def child_probs(node: int) -> list[float]:
            children = plan.children[node]
            return probs_at(node)[[token_list[c] for c in children]].tolist() if children else []

        nodes, rejected = rejection_walk(plan.children, child_probs, self._rng.random)
        distribution = probs_at(nodes[-1])
        rejected_tokens = [token_list[c] for c in rejected]
        if rejected_tokens:
            residual = distribution.clone()
            residual[rejected_tokens] = 0
            if residual.sum() > 0:  # rounding can leave no mass: the base's own distribution is the limit
                distribution = residual
        bonus = self._sample(distribution)
        drafts = [token_list[n] for n in nodes[1:]]
        return nodes, drafts + [bonus], (rejected[-1] if rejected else None)

    def _target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def _sample(self, distribution: torch.Tensor) -> int:
        return torch.multinomial(distribution, 1, generator=self._generator).item()


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The base's sampling distribution over the last dimension: temperature, then top-k, then top-p (the smallest
    set of most likely tokens holding ``top_p`` of the mass, the most likely always kept), with one softmax."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keeps the top token
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def rejection_walk(children: list[list[int]], child_probs: Callable[[int], list[float]],
                   uniform: Callable[[], float]):
    """Walk the tree from the root accepting children by rejection sampling.

    ``child_probs(node)``: the base's probability, at ``node``, of each of its children's tokens (in
    ``children[node]``'s order), asked only for the nodes the walk reaches. Returns the accepted nodes (root
    first) and the children rejected at the last node, whose tokens the caller removes from that node's
    distribution before drawing the next token.
    """
    node, nodes = 0, [0]
    while True:
        rejected, rejected_mass, accepted = [], 0.0, None
        for child, probability in zip(children[node], child_probs(node) if children[node] else ()):
            remaining = 1.0 - rejected_mass
            if remaining > 0 and uniform() < probability / remaining:
                accepted = child
                break
            rejected.append(child)
            rejected_mass += probability
        if accepted is None:
            return nodes, rejected
        node = accepted
        nodes.append(node)
