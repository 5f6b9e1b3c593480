"""A tree's device buffers, built once per tree: drafting order per depth, positions, masks, retrieve paths."""

from __future__ import annotations

from pathlib import Path

import torch

from mtpkit.decoding.masks import tree_attention_problem, verify_mask, warn_once
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads
from mtpkit.tree import Tree, build_tree, chain_choices, load_tree_file


class TreePlan:
    """Device buffers of one tree: what drafting and verification index with. Built once for a static tree of the
    heads; per step, for a tree chosen from several drafters' candidates (``sequential=None``: no head drafts into
    it, and ``masks`` is the generate call's one preallocated mask buffer)."""

    def __init__(self, tree: Tree, device: torch.device, sequential: bool | None, windows: dict[str, int | None],
                 masks: "MaskBuffer | None" = None):
        self.tree = tree
        self.windows = windows
        self.num_nodes = n = tree.num_nodes
        self.max_depth = tree.max_depth
        self.is_chain = tree.is_chain
        depths = tree.depths.tolist()
        parents = tree.parents.tolist()
        ranks = tree.ranks.tolist()
        self.depths = depths
        self.children: list[list[int]] = [[] for _ in range(n)]  # in rank order
        for child in range(1, n):
            self.children[parents[child]].append(child)
        # per depth d: the parents that expand (nodes of depth d-1 with children), the slot of
        # each one's own parent among depth d-1's expanding nodes, and where each child's token lies
        self.depth_plans = []
        previous: list[int] = [0]
        for d in range(1, self.max_depth + 1 if sequential is not None else 1):
            expanding = [i for i in range(n) if depths[i] == d - 1 and self.children[i]] if sequential else [0]
            children = [i for i in range(n) if depths[i] == d]
            slot = {node: s for s, node in enumerate(expanding)}
            top_k = tree.top_k(d)
            flat = [(slot[parents[c]] if sequential else 0) * top_k + ranks[c] for c in children]
            parent_slots = [previous.index(parents[p]) for p in expanding] if d > 1 and sequential else None
            self.depth_plans.append(dict(
                depth=d, start=children[0], stop=children[-1] + 1, top_k=top_k,
                expanding=torch.tensor(expanding, device=device),
                parent_slots=None if parent_slots is None else torch.tensor(parent_slots, device=device),
                flat=torch.tensor(flat, device=device)))
            previous = expanding
        self.parents = tree.parents.to(device)
        self.offsets = tree.position_offsets.to(device)
        self.ancestor_mask = tree.ancestor_mask.to(device)
        self.retrieve_raw = tree.retrieve_indices.to(device)
        self.retrieve = self.retrieve_raw.clamp(min=0)
        self.retrieve_valid = self.retrieve_raw[:, 1:] >= 0
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self._shared_masks = masks
        self._masks: "torch.Tensor | dict[str, torch.Tensor] | None" = None
        self._mask_capacity, self._mask_dtype = 0, None

    def mask(self, prefix_length: int, capacity: int, dtype: torch.dtype):
        """The verification mask (``verify_mask``) for a cache of ``prefix_length``: views into the masks built
        once per generate call for a cache of ``capacity``, whose last columns are this prefix's (a sliding
        window looks back from each node, so it lines up too)."""
        if self.is_chain:
            return None  # the model's own causal (and sliding-window) masks are right for a chain
        if self._shared_masks is not None:
            return self._shared_masks.fill(self.ancestor_mask, self.offsets, self.depths, prefix_length)
        if self._masks is None or capacity > self._mask_capacity or self._mask_dtype != dtype:
            self._mask_capacity, self._mask_dtype = capacity, dtype
            self._masks = verify_mask(self.windows, self.ancestor_mask, self.offsets, capacity, dtype)
        start = self._mask_capacity - prefix_length
        if isinstance(self._masks, dict):
            return {kind: mask[..., start:] for kind, mask in self._masks.items()}
        return self._masks[..., start:]


class MaskBuffer:
    """One verification mask buffer per attention layer type, for every per-step tree of a generate call (at most
    ``max_nodes`` nodes after at most ``capacity`` cached tokens). A step rewrites only its tree's rows, in place:
    ``fill`` gives what ``verify_mask`` gives, as views of the buffer."""

    def __init__(self, windows: dict[str, int | None], max_nodes: int, capacity: int, dtype: torch.dtype,
                 device: torch.device):
        self.windows, self.max_nodes, self.capacity, self.dtype = windows, max_nodes, capacity, dtype
        self.blocked = torch.finfo(dtype).min
        # columns: [cache positions, right-aligned to ``capacity``][tree nodes]; cache columns start visible
        self.buffers = {kind: torch.zeros(1, 1, max_nodes, capacity + max_nodes, dtype=dtype, device=device)
                        for kind in windows}

    def fits(self, max_nodes: int, capacity: int, dtype: torch.dtype) -> bool:
        return max_nodes <= self.max_nodes and capacity <= self.capacity and dtype == self.dtype

    def fill(self, ancestor_mask: torch.Tensor, depths: torch.Tensor, depth_list: list[int], prefix_length: int):
        n, capacity = ancestor_mask.shape[0], self.capacity
        start, stop = capacity - prefix_length, capacity + n
        views = {}
        for kind, window in self.windows.items():
            rows = self.buffers[kind][0, 0, :n]
            block = rows[:, capacity:stop]
            block.zero_()
            block.masked_fill_(~ancestor_mask, self.blocked)
            if window is not None:
                # cache column c holds position c - start; node i sits at prefix + depth i: it sees c while
                # the gap is below the window, i.e. c > capacity + depth - window, whatever the prefix
                rows[:, :capacity].zero_()
                for node, depth in enumerate(depth_list):
                    rows[node, :max(0, capacity + depth - window + 1)].fill_(self.blocked)
                if max(depth_list) >= window:
                    block.masked_fill_(depths[:, None] - depths[None, :] >= window, self.blocked)
            views[kind] = self.buffers[kind][..., :n, start:stop]
        return next(iter(views.values())) if len(views) == 1 else views


def resolve_tree(tree, heads: DraftHeads) -> Tree:
    """A ``Tree`` from "chain", a JSON file of choices, a list of choices, or a Tree. The "auto" tree is the
    calibration's choices (``mtpkit.draft_sources.build_decoder`` resolves it): decoding measures nothing."""
    if isinstance(tree, Tree):
        resolved = tree
    elif isinstance(tree, (str, Path)):
        name = str(tree)
        if name == "chain":
            resolved = build_tree(chain_choices(heads.num_heads))
        elif name == "auto":
            raise MtpkitError("the auto tree comes from calibration: pass its choices "
                              "(mtpkit.calibrate.auto_tree, or mtpkit.draft_sources.build_decoder)")
        else:
            resolved = build_tree(load_tree_file(Path(name)))
    else:
        resolved = build_tree(tree)
    if resolved.max_depth > heads.num_heads:
        raise MtpkitError(f"the tree is {resolved.max_depth} deep but the heads directory has only "
                          f"{heads.num_heads} heads")
    return resolved


def verifiable_tree(tree, heads: DraftHeads) -> Tree:
    """``resolve_tree``, then a chain of the same depth where the model cannot verify a tree (with a warning)."""
    resolved = resolve_tree(tree, heads)
    problem = None if resolved.is_chain else tree_attention_problem(heads.backbone)
    if problem:
        warn_once(f"{heads.backbone.architecture} cannot verify a tree ({problem}): falling back to chain drafts")
        resolved = build_tree(chain_choices(min(resolved.max_depth, heads.num_heads)))
    return resolved
