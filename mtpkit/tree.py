"""Candidate trees: which drafts to verify, and the buffers that verify them in one forward.

A tree is given by its *choices*, Medusa-style paths such as ``[[0], [1], [0, 0]]``: the
i-th entry of a path is the rank, within head i's top-k, of the token at depth i. Node 0
is the root, the base's own next token (certain); a node at depth d holds a draft of head
d (``mtpkit.targets``: it predicts the token d positions after the root).

``build_tree`` is the one pure function that turns choices into buffers; everything that
verifies a tree reads them. ``greedy_tree`` chooses the choices that maximise expected
tokens per second from per-head accuracies and measured forward costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mtpkit.errors import MtpkitError

MAX_RANK = 10  # head_topk_accuracy covers top-1 .. top-10
MAX_NODES = 128


@dataclass(frozen=True)
class Tree:
    """Buffers of one candidate tree (N nodes, root first, nodes sorted by depth then path).

    ``parents[i]``: index of node i's parent (-1 for the root). ``depths[i]``: 0 for the root.
    ``ranks[i]``: rank of node i's token in its head's top-k (-1 for the root).
    ``ancestor_mask[i, j]``: node i may attend to node j (j is i or an ancestor of i).
    ``position_offsets``: position of each node after the last committed token (its depth).
    ``retrieve_indices[p]``: node indices along root-to-leaf path p, padded with -1.
    """

    choices: tuple[tuple[int, ...], ...]
    parents: torch.Tensor
    depths: torch.Tensor
    ranks: torch.Tensor
    ancestor_mask: torch.Tensor
    position_offsets: torch.Tensor
    retrieve_indices: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return len(self.choices) + 1

    @property
    def max_depth(self) -> int:
        return max((len(c) for c in self.choices), default=0)

    @property
    def is_chain(self) -> bool:
        return all(all(r == 0 for r in c) for c in self.choices) and len(self.choices) == self.max_depth

    def top_k(self, depth: int) -> int:
        """How many of head ``depth``'s top tokens the tree uses."""
        return 1 + max((c[-1] for c in self.choices if len(c) == depth), default=-1)

    def nodes_at(self, depth: int) -> list[int]:
        return [i for i, d in enumerate(self.depths.tolist()) if d == depth]

    def describe(self) -> str:
        return "chain" if self.is_chain else f"tree of {self.num_nodes} nodes, depth {self.max_depth}"


def build_tree(choices) -> Tree:
    """Tree buffers from Medusa-style choices (every prefix of a path must be a path too)."""
    paths = _validate(choices)
    nodes = [()] + paths
    index = {path: i for i, path in enumerate(nodes)}
    n = len(nodes)
    parents = [-1] + [index[path[:-1]] for path in paths]
    depths = [len(path) for path in nodes]
    ranks = [-1] + [path[-1] for path in paths]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, path in enumerate(nodes):
        for d in range(len(path) + 1):
            mask[i, index[path[:d]]] = True
    has_child = set(parents[1:])
    leaves = [i for i in range(n) if i not in has_child]
    width = max(depths) + 1
    retrieve = torch.full((len(leaves), width), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        path = nodes[leaf]
        retrieve[row, : len(path) + 1] = torch.tensor([index[path[:d]] for d in range(len(path) + 1)])
    return Tree(choices=tuple(paths), parents=torch.tensor(parents), depths=torch.tensor(depths),
                ranks=torch.tensor(ranks), ancestor_mask=mask, position_offsets=torch.tensor(depths),
                retrieve_indices=retrieve)


def _validate(choices) -> list[tuple[int, ...]]:
    if not isinstance(choices, (list, tuple)):
        raise MtpkitError(f"tree choices must be a list of paths like [[0], [1], [0, 0]], got {type(choices).__name__}")
    paths = []
    for choice in choices:
        if (not isinstance(choice, (list, tuple)) or not choice
                or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < MAX_RANK for r in choice)):
            raise MtpkitError(f"bad tree path {choice!r}: each path is a non-empty list of ranks 0..{MAX_RANK - 1}")
        paths.append(tuple(choice))
    if len(set(paths)) != len(paths):
        raise MtpkitError("the tree lists a path twice")
    if len(paths) + 1 > MAX_NODES:
        raise MtpkitError(f"the tree has {len(paths) + 1} nodes; at most {MAX_NODES} are supported")
    known = set(paths)
    for path in paths:
        if len(path) > 1 and path[:-1] not in known:
            raise MtpkitError(f"tree path {list(path)} has no parent path {list(path[:-1])}")
    return sorted(paths, key=lambda p: (len(p), p))


def chain_choices(depth: int) -> list[list[int]]:
    """Top-1 of each of ``depth`` heads."""
    return [[0] * d for d in range(1, depth + 1)]


def widen_choices(choices, siblings: int) -> list[list[int]]:
    """``choices`` with each node that has children given its top ``siblings`` children; leaves stay leaves.

    Heads compute their logits at every node they expand, so a node's next-ranked children cost no drafting,
    only verification: a tree chosen per step (``mtpkit.drafting.merge.select_tree``) verifies them where
    their chance pays for the longer forward, and a static tree would pay for them every step.
    """
    if siblings < 1:
        raise MtpkitError(f"a node keeps at least one child (siblings={siblings})")
    paths = _validate(choices)
    expanded = {path[:-1] for path in paths}
    wide = set(paths) | {parent + (rank,) for parent in expanded for rank in range(min(siblings, MAX_RANK))}
    widened = sorted(wide, key=lambda path: (len(path), path))
    if len(widened) + 1 > MAX_NODES:
        raise MtpkitError(f"the widened tree has {len(widened) + 1} nodes; at most {MAX_NODES} are supported")
    return [list(path) for path in widened]


def load_tree_file(path: Path) -> list[list[int]]:
    """Choices from a JSON file: a list of paths, or an object with a "choices" list."""
    path = Path(path)
    if not path.is_file():
        raise MtpkitError(f"tree file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MtpkitError(f"tree file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("choices")
    if not isinstance(data, list) or not data:
        raise MtpkitError(f"tree file {path} must hold a non-empty list of paths like [[0], [1], [0, 0]]")
    _validate(data)
    return data


def rank_probabilities(topk_accuracy: list[list[float]]) -> list[list[float]]:
    """P(the true token is exactly rank r of head k) from P(it is within head k's top-i)."""
    probs = []
    for row in topk_accuracy:
        cumulative = [min(1.0, max(0.0, float(a))) for a in row[:MAX_RANK]]
        for i in range(1, len(cumulative)):  # measured accuracies may dip by noise
            cumulative[i] = max(cumulative[i], cumulative[i - 1])
        probs.append([cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])])
    return probs


def expected_tokens(choices, topk_accuracy: list[list[float]]) -> float:
    """Expected tokens per step: the bonus plus, per node, the chance its whole path is accepted."""
    probs = rank_probabilities(topk_accuracy)
    total = 1.0
    for path in choices:
        p = 1.0
        for depth, rank in enumerate(path):
            p *= probs[depth][rank] if depth < len(probs) and rank < len(probs[depth]) else 0.0
        total += p
    return total


def greedy_tree(topk_accuracy: list[list[float]], cost: dict[int, float], max_nodes: int = 64,
                draft_cost: "float | Sequence[float]" = 0.0) -> tuple[list[list[int]], float]:
    """Choices maximising expected tokens per second, and that rate.

    Nodes are added greedily by the chance their path is accepted (Medusa / EAGLE); of the
    trees built along the way, the size n with the best ``E[tokens](n) / (cost(n) + draft)``
    wins, where ``cost(n)`` is the measured time of a base forward over n tokens and ``draft`` the
    time to draft the tree: ``draft_cost`` itself, or ``draft_cost[d - 1]`` for a tree d deep when it
    is a list (sequential and eagle heads run one more head per depth; an empty tree drafts nothing).
    """
    def draft_seconds(depth: int) -> float:
        if isinstance(draft_cost, (int, float)):
            return float(draft_cost)
        return 0.0 if depth == 0 else float(draft_cost[min(depth, len(draft_cost)) - 1])

    probs = rank_probabilities(topk_accuracy)
    depth_limit = len(probs)
    value = {(): 1.0}
    chosen: list[tuple[int, ...]] = []
    expected, depth = 1.0, 0
    best = ([], 1.0 / (_interpolate(cost, 1) + draft_seconds(0)))
    while len(chosen) + 1 < max_nodes:
        frontier = [(value[parent] * probs[len(parent)][rank], parent + (rank,))
                    for parent in value if len(parent) < depth_limit
                    for rank in range(len(probs[len(parent)])) if parent + (rank,) not in value]
        if not frontier:
            break
        gain, path = max(frontier, key=lambda item: (item[0], -len(item[1])))
        if gain <= 0:
            break
        value[path] = gain
        chosen.append(path)
        expected += gain
        depth = max(depth, len(path))
        rate = expected / (_interpolate(cost, len(chosen) + 1) + draft_seconds(depth))
        if rate > best[1]:
            best = ([list(p) for p in chosen], rate)
    return best


def monotone_cost(cost: dict[int, float]) -> dict[int, float]:
    """The closest non-decreasing cost table (least squares, pool-adjacent-violators).

    A forward over more tokens never costs less, but measured medians on a busy machine dip (16 tokens
    timed below 10): a tree chooser reading such a table snaps to the dips and verifies trees that cost
    more than it thinks. Pooled runs take their mean, so a dip and its neighbours become one level.
    """
    sizes = sorted(cost)
    blocks: list[list[float]] = []  # [sum, count]
    for n in sizes:
        blocks.append([float(cost[n]), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted = [total / count for total, count in blocks for _ in range(int(count))]
    return dict(zip(sizes, fitted))


def _interpolate(cost: dict[int, float], n: int) -> float:
    """Cost of a forward over n tokens: a size between two measured ones costs what the larger one does (measured
    on a Zen 4 CPU, such sizes cost at least that: 19 tokens 128 ms where 20 cost 99, 7 tokens 64 ms where 8 cost
    62), so trees stop at measured sizes; beyond the largest, linear in n."""
    sizes = sorted(cost)
    if n in cost:
        return cost[n]
    if n <= sizes[0]:
        return cost[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if lo < n < hi:
            return cost[hi]
    lo, hi = sizes[-2:] if len(sizes) > 1 else (sizes[0], sizes[0])
    slope = (cost[hi] - cost[lo]) / (hi - lo) if hi != lo else 0.0
    return cost[hi] + slope * (n - hi)


def tree_from_parents(parents) -> Tree:
    """Tree buffers from a parents list: ``parents[0] == -1`` (the root), ``parents[i] < i`` for the others.

    The one pure function for trees given node by node (drafters' tries, dynamic trees). Each node's
    rank is its order among its parent's children (in index order), so ``choices`` are the rank paths;
    when the nodes come in ``build_tree``'s order (depth, then rank path), the buffers equal
    ``build_tree(choices)``'s.
    """
    parents = [int(p) for p in parents]
    if not parents or parents[0] != -1:
        raise MtpkitError("a tree's parents list starts with -1, its root")
    for i, parent in enumerate(parents[1:], start=1):
        if not 0 <= parent < i:
            raise MtpkitError(f"node {i} has parent {parent}: every node's parent must come before it")
    n = len(parents)
    paths: list[tuple[int, ...]] = [()]
    ancestors: list[list[int]] = [[0]]  # root first, the node itself last
    child_count = [0] * n
    for i in range(1, n):
        parent = parents[i]
        paths.append(paths[parent] + (child_count[parent],))
        child_count[parent] += 1
        ancestors.append(ancestors[parent] + [i])
    depths = [len(path) for path in paths]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, line in enumerate(ancestors):
        mask[i, line] = True
    leaves = [i for i in range(n) if child_count[i] == 0]
    retrieve = torch.full((len(leaves), max(depths) + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        retrieve[row, : len(ancestors[leaf])] = torch.tensor(ancestors[leaf])
    return Tree(choices=tuple(paths[1:]), parents=torch.tensor(parents), depths=torch.tensor(depths),
                ranks=torch.tensor([-1] + [path[-1] for path in paths[1:]]), ancestor_mask=mask,
                position_offsets=torch.tensor(depths), retrieve_indices=retrieve)
