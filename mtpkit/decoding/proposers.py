"""Who proposes each step's tree: the heads' static tree, or a tree chosen per step from every drafter's candidates.

A proposer is picked once, when the decoder is built; a step never asks which one it has. Each step it proposes a
tree (``propose``), and after the base verified it, it learns what was accepted (``observe``): the heads read the
features of the newly committed positions, the drafters the committed tokens, the calibrator which nodes held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from mtpkit.decoding.masks import attention_windows
from mtpkit.decoding.plan import MaskBuffer, TreePlan, verifiable_tree
from mtpkit.drafting.base import Candidates, Drafter, ObservesVerification
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.drafting.merge import DraftTree, best_path, cut_depth, merge_candidates, select_tree
from mtpkit.heads import DraftHeads
from mtpkit.tree import Tree

DRAFT_COST_SMOOTHING = 0.2  # weight of the newest step in the running draft-time estimate


@dataclass
class Proposal:
    """One step's tree to verify."""

    plan: TreePlan  # the tree's device buffers
    tokens: torch.Tensor  # [N] long: the root, then every draft in node order
    confidences: list[float] | None = None  # per draft (the static tree: only when tracing)
    sources: list[list[str]] | None = None  # per draft, the drafters that proposed it (trees chosen per step)
    draft: DraftTree | None = None  # what the calibrator learns from (trees chosen per step)


@dataclass
class Verified:
    """What one verification forward decided."""

    nodes: list[int]  # the accepted nodes, root first
    new_tokens: list[int]  # the accepted drafts and the base's own token after them
    rejected: int | None  # the first node off the accepted path, if any
    logits: torch.Tensor  # [N, V] the base's logits at every node
    features: torch.Tensor  # [N, ...] every node's features as the heads read them


class HeadsDrafter:
    """The draft heads behind the ``Drafter`` interface: their static tree (chain, auto or given choices), drafted
    depth by depth (eagle with its draft cache), each node's confidence the drafting head's softmax probability.

    Unlike the other drafters the heads read the base's hidden states: the decoder hands them over each step
    (``condition``) before it asks for drafts.
    """

    name = "heads"

    def __init__(self, heads: DraftHeads, tree: "str | list[list[int]] | Tree" = "chain"):
        self.heads = heads
        self.tree = verifiable_tree(tree, heads)
        self.plan = TreePlan(self.tree, heads.backbone.device, heads.is_sequential, attention_windows(heads.backbone))
        self._draft_cache = None  # the style's per-prompt drafting state (eagle: its draft KV cache)
        self._root: torch.Tensor | None = None

    @property
    def reads_every_position(self) -> bool:
        """Eagle heads attend over the draft cache: they need the hidden state of every committed position."""
        return self.heads.style.attends

    def start(self, prompt_ids: Sequence[int]) -> None:
        self._draft_cache = self.heads.style.start(self.heads)
        self._root = None

    def condition(self, hidden: torch.Tensor, next_tokens: list[int]) -> None:
        """The base's hidden states of the positions committed last, and the token after each (the last: the root)."""
        self._root = self.heads.style.condition(self.heads, self._draft_cache, hidden, next_tokens)

    def draft(self, plan: TreePlan, tokens: torch.Tensor, tracing: bool) -> list[float] | None:
        """Fill ``tokens[1:]`` (``tokens[0]`` is the root) with the heads' drafts along ``plan``; return their
        confidences when ``tracing``."""
        return self.heads.style.draft(self.heads, plan, self._draft_cache, self._root, tokens, tracing)

    def propose(self, context_ids: Sequence[int], budget: int) -> Candidates:
        plan = self.plan
        size = max(0, min(budget, plan.num_nodes - 1))
        if size == 0:
            return Candidates()
        tokens = plan.tokens
        tokens[0] = int(context_ids[-1])
        confidences = self.draft(plan, tokens, tracing=True)
        # the tree's nodes come depth by depth: its first ``size`` drafts hold every one's parent
        parents = [p - 1 for p in plan.tree.parents[1:size + 1].tolist()]
        return Candidates(tuple(tokens[1:size + 1].tolist()), tuple(parents),
                          tuple(min(1.0, max(0.0, c)) for c in confidences[:size]), (self.name,) * size)

    def update(self, accepted_ids: Sequence[int]) -> None:
        pass  # the heads learn what was committed from ``condition``

    def reset(self) -> None:
        self.start(())  # the draft cache is per prompt; the heads learn nothing while decoding


class _HeadsConditioning:
    """The features the heads read next step: every committed position's (eagle attends over them) or the last
    one's, and the token after each (the last: the root)."""

    def __init__(self, heads_drafter: HeadsDrafter | None):
        self.heads_drafter = heads_drafter
        self.features: torch.Tensor | None = None
        self.next_tokens: list[int] = []

    def start(self, prompt: list[int], root: int, features: torch.Tensor) -> None:
        self.features, self.next_tokens = features, prompt[1:] + [root]

    def condition(self) -> None:
        if self.heads_drafter is not None:
            self.heads_drafter.condition(self.features, self.next_tokens)

    def observe(self, verified: Verified) -> None:
        nodes, last = verified.nodes, verified.nodes[-1]
        every = self.heads_drafter is not None and self.heads_drafter.reads_every_position
        self.features = verified.features[nodes] if every else verified.features[last:last + 1]
        self.next_tokens = verified.new_tokens


class StaticTreeProposer:
    """The heads alone, on their static tree (chain, auto or given choices); near the context's end, the root."""

    calibrator = None  # nothing is calibrated: every node is verified every step

    def __init__(self, heads_drafter: HeadsDrafter, root_plan: TreePlan):
        self.heads_drafter, self.root_plan = heads_drafter, root_plan
        self.tree, self.plan = heads_drafter.tree, heads_drafter.plan
        self._conditioning = _HeadsConditioning(heads_drafter)

    def describe(self) -> str:
        return self.tree.describe()

    def reset(self, keep_calibrator: bool = False) -> None:
        self.heads_drafter.reset()  # nothing is calibrated here

    def start(self, prompt: list[int], root: int, features: torch.Tensor, capacity: int) -> None:
        self.heads_drafter.start(prompt)
        self._conditioning.start(prompt, root, features)

    def propose(self, room: int | None, tracing: bool) -> Proposal:
        """``room``: how deep a node may sit before the context ends (None: no end)."""
        self._conditioning.condition()
        plan = self.plan if room is None or plan_fits(self.plan, room) else self.root_plan
        tokens = plan.tokens
        tokens[0] = self._conditioning.next_tokens[-1]
        return Proposal(plan, tokens, self.heads_drafter.draft(plan, tokens, tracing))

    def observe(self, proposal: Proposal, verified: Verified) -> None:
        self._conditioning.observe(verified)


def plan_fits(plan: TreePlan, room: int) -> bool:
    return plan.max_depth <= room


class DynamicTreeProposer:
    """Every drafter's candidates merged into one trie (a prefix proposed twice is verified once), confidences
    calibrated by what was accepted so far, cut to the context's end, and the subtree with the best expected tokens
    per second under the measured forward costs and drafting time (EAGLE-2's dynamic tree) verified."""

    tree = None  # chosen per step

    def __init__(self, drafters: Sequence[Drafter], cost: dict[int, float], draft_cost: float, max_nodes: int,
                 calibrator: ConfidenceCalibrator | None, chains_only: bool, root_plan: TreePlan,
                 windows: dict[str, int | None], device: torch.device, dtype: torch.dtype):
        self.drafters = list(drafters)
        self.heads_drafter = next((d for d in self.drafters if isinstance(d, HeadsDrafter)), None)
        # drafters that learn from every verification's logits (token recycling), chosen once: a step asks no one
        self.observers = [d for d in self.drafters if isinstance(d, ObservesVerification)]
        self.cost, self.max_nodes, self.chains_only = dict(cost), max_nodes, chains_only
        self.calibrator = calibrator if calibrator is not None else ConfidenceCalibrator()
        self.draft_cost = draft_cost  # a running estimate, replaced by what drafting measures
        self._initial = self.calibrator.state_dict(), draft_cost
        self.root_plan, self.windows, self.device, self.dtype = root_plan, windows, device, dtype
        self._masks: MaskBuffer | None = None
        self._conditioning = _HeadsConditioning(self.heads_drafter)
        self._committed: list[int] = []

    def describe(self) -> str:
        names = list(dict.fromkeys(drafter.name for drafter in self.drafters))
        return f"dynamic tree of up to {self.max_nodes} nodes from {', '.join(names)}"

    def reset(self, keep_calibrator: bool = False) -> None:
        """Back to the state it was built in: the calibrator's counts (unless ``keep_calibrator``), the
        drafting-time estimate and every drafter's learned entries."""
        if not keep_calibrator:
            self.calibrator = ConfidenceCalibrator.from_state_dict(self._initial[0])
        self.draft_cost = self._initial[1]
        for drafter in self.drafters:
            drafter.reset()

    def start(self, prompt: list[int], root: int, features: torch.Tensor, capacity: int) -> None:
        for drafter in self.drafters:
            drafter.start(prompt)
            drafter.update([root])
        self._committed = prompt + [root]
        self._conditioning.start(prompt, root, features)
        if self._masks is None or not self._masks.fits(self.max_nodes, capacity, self.dtype):
            self._masks = MaskBuffer(self.windows, self.max_nodes, capacity, self.dtype, self.device)

    def propose(self, room: int | None, tracing: bool) -> Proposal:
        self._conditioning.condition()
        committed = self._committed
        if room is not None and room < 1:  # the context's end leaves room for the root alone
            plan = self.root_plan
            plan.tokens[0] = committed[-1]
            return Proposal(plan, plan.tokens)
        started = time.perf_counter()
        proposals = [drafter.propose(committed, self.max_nodes - 1) for drafter in self.drafters]
        trie = merge_candidates(proposals, self.calibrator)
        if room is not None:
            trie = cut_depth(trie, room)
        if self.chains_only:
            trie = best_path(trie)
        draft = select_tree(trie, committed[-1], self.cost, self.draft_cost, self.max_nodes)
        plan = TreePlan(draft.tree, self.device, None, self.windows, self._masks)
        self.draft_cost += DRAFT_COST_SMOOTHING * (time.perf_counter() - started - self.draft_cost)
        return Proposal(plan, draft.tokens.to(self.device), list(draft.confidences[1:]),
                        [list(s) for s in draft.sources[1:]], draft)

    def observe(self, proposal: Proposal, verified: Verified) -> None:
        for observer in self.observers:
            observer.observe_verification(proposal.tokens, verified.logits)
        if proposal.draft is not None:
            self.calibrator.observe(proposal.draft, verified.nodes)
        for drafter in self.drafters:
            drafter.update(verified.new_tokens)
        self._committed.extend(verified.new_tokens)
        self._conditioning.observe(verified)
