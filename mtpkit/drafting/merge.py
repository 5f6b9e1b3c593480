"""Several drafters' candidates as one trie, and the part of it worth verifying (EAGLE-2's rule).

``merge_candidates`` joins identical token paths (a prefix proposed by two drafters is verified
once) and keeps, per node, every source with its raw confidence and the calibrated chance that the
node is accepted once its parent is (per agreement of sources: ``ConfidenceCalibrator.calibrate_node``;
siblings' chances scaled to sum to at most 1).
``select_tree`` scores each node by its path's acceptance probability (the product of calibrated
confidences from the root), adds nodes best first (a node only after its parent), and keeps the
size n that maximises expected tokens per second, (1 + sum of chosen path probabilities) /
(cost(n) + draft_cost), n counting the root. Its buffers come from ``mtpkit.tree.tree_from_parents``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import torch

from mtpkit.drafting.base import Candidates
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.errors import MtpkitError
from mtpkit.tree import Tree, _interpolate, tree_from_parents


@dataclass(frozen=True)
class DraftTrie:
    """Merged candidates, parent-first; per node its sources and their raw confidences (aligned)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    confidences: tuple[float, ...]  # calibrated P(accepted | parent accepted); without a calibrator the largest raw
    sources: tuple[tuple[str, ...], ...]
    raw_confidences: tuple[tuple[float, ...], ...]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class DraftTree:
    """The nodes to verify: ``tree`` (buffers, node 0 = the root) and, per node, what the decoder and
    the calibrator need. ``trie_nodes[i]``: node i's index in the merged trie (-1 for the root)."""

    tree: Tree
    tokens: torch.Tensor
    trie_nodes: tuple[int, ...]
    path_probabilities: tuple[float, ...]
    confidences: tuple[float, ...]
    sources: tuple[tuple[str, ...], ...]
    raw_confidences: tuple[tuple[float, ...], ...]
    expected_tokens: float
    tokens_per_second: float


def merge_candidates(candidates: Sequence[Candidates], calibrator: ConfidenceCalibrator | None = None) -> DraftTrie:
    """One trie of all candidates: node = (parent node, token); sources and raw confidences gathered."""
    tokens: list[int] = []
    parents: list[int] = []
    raw: list[dict[str, float]] = []
    index: dict[tuple[int, int], int] = {}
    for proposal in candidates:
        merged_as: list[int] = []
        for token, parent, confidence, source in zip(proposal.tokens, proposal.parents, proposal.confidences,
                                                     proposal.sources):
            key = (merged_as[parent] if parent >= 0 else -1, token)
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(token)
                parents.append(key[0])
                raw.append({})
            raw[node][source] = max(confidence, raw[node].get(source, 0.0))
            merged_as.append(node)

    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)

    if calibrator is None:
        confidences = [max(node.values()) for node in raw]
    else:
        confidences = [calibrator.calibrate_node(tuple(node), tuple(node.values()), d) for node, d in zip(raw, depths)]
    return DraftTrie(tuple(tokens), tuple(parents), tuple(_exclusive(confidences, parents)),
                     tuple(tuple(node) for node in raw), tuple(tuple(node.values()) for node in raw))


def _exclusive(confidences: list[float], parents: list[int]) -> list[float]:
    """Siblings' chances scaled down where they sum past 1: at most one child of a node is accepted (greedy: the
    base's argmax; sampling: the rejection walk stops at the first), so their chances cannot add up to more."""
    total: dict[int, float] = {}
    for confidence, parent in zip(confidences, parents):
        total[parent] = total.get(parent, 0.0) + confidence
    return [c / total[p] if total[p] > 1.0 else c for c, p in zip(confidences, parents)]


def cut_depth(trie: DraftTrie, max_depth: int) -> DraftTrie:
    """The nodes of ``trie`` at most ``max_depth`` below the root (renumbered, still parent-first)."""
    depths: list[int] = []
    renumbered: dict[int, int] = {}
    for node, parent in enumerate(trie.parents):
        depths.append(1 if parent < 0 else depths[parent] + 1)
        if depths[-1] <= max_depth:  # a kept node's parent is shallower: kept before it
            renumbered[node] = len(renumbered)
    if len(renumbered) == len(trie):
        return trie
    kept = list(renumbered)
    return DraftTrie(tuple(trie.tokens[n] for n in kept),
                     tuple(-1 if trie.parents[n] < 0 else renumbered[trie.parents[n]] for n in kept),
                     tuple(trie.confidences[n] for n in kept), tuple(trie.sources[n] for n in kept),
                     tuple(trie.raw_confidences[n] for n in kept))


def best_path(trie: DraftTrie) -> DraftTrie:
    """The trie's chain of most confident children from the root (for models that verify chains only)."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(trie.parents):
        children.setdefault(parent, []).append(node)
    path, node = [], -1
    while children.get(node):
        node = max(children[node], key=lambda c: (trie.confidences[c], -trie.tokens[c]))
        path.append(node)
    return DraftTrie(tuple(trie.tokens[n] for n in path), tuple(range(-1, len(path) - 1)),
                     tuple(trie.confidences[n] for n in path), tuple(trie.sources[n] for n in path),
                     tuple(trie.raw_confidences[n] for n in path))


def select_tree(trie: DraftTrie, root_token: int, cost: dict[int, float], draft_cost: float = 0.0,
                max_nodes: int = 64) -> DraftTree:
    """The best-first subtree of ``trie`` (root included, at most ``max_nodes``) with the highest
    expected tokens per second under ``cost`` ({tokens in a base forward: seconds})."""
    if not cost:
        raise MtpkitError("select_tree needs a cost table {tokens: seconds of a base forward}")
    if max_nodes < 1:
        raise MtpkitError(f"a tree has at least its root (max_nodes={max_nodes})")
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(trie.parents):
        children.setdefault(parent, []).append(node)
    probability: dict[int, float] = {-1: 1.0}
    frontier = [(-trie.confidences[c], 1, c) for c in children.get(-1, [])]
    heapq.heapify(frontier)
    order: list[int] = []
    expected = 1.0
    best_size, best_rate, best_expected = 0, 1.0 / (_interpolate(cost, 1) + draft_cost), 1.0
    while frontier and len(order) + 1 < max_nodes:
        negative, depth, node = heapq.heappop(frontier)
        probability[node] = -negative
        order.append(node)
        expected += -negative
        rate = expected / (_interpolate(cost, len(order) + 1) + draft_cost)
        if rate > best_rate:
            best_size, best_rate, best_expected = len(order), rate, expected
        for child in children.get(node, []):
            heapq.heappush(frontier, (negative * trie.confidences[child], depth + 1, child))
    chosen = set(order[:best_size])
    # canonical order (depth, then siblings by confidence): the tree equals build_tree of its rank paths
    nodes, tree_parents, level = [-1], [-1], [(-1, 0)]
    while level:
        next_level = []
        for trie_node, tree_index in level:
            kids = sorted((c for c in children.get(trie_node, []) if c in chosen),
                          key=lambda c: (-trie.confidences[c], trie.tokens[c]))
            for kid in kids:
                next_level.append((kid, len(nodes)))
                nodes.append(kid)
                tree_parents.append(tree_index)
        level = next_level
    drafted = nodes[1:]
    return DraftTree(
        tree=tree_from_parents(tree_parents),
        tokens=torch.tensor([root_token] + [trie.tokens[n] for n in drafted], dtype=torch.long),
        trie_nodes=tuple(nodes),
        path_probabilities=(1.0,) + tuple(probability[n] for n in drafted),
        confidences=(1.0,) + tuple(trie.confidences[n] for n in drafted),
        sources=((),) + tuple(trie.sources[n] for n in drafted),
        raw_confidences=((),) + tuple(trie.raw_confidences[n] for n in drafted),
        expected_tokens=best_expected, tokens_per_second=best_rate)
