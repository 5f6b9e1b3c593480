"""Self-speculative decoding: each step proposes a tree, verifies it in one base forward, accepts a path, keeps
that path's KV entries and lets the proposer learn what held.

One step, given the KV cache of every committed token but the last (the *root*, the base's own next token,
already emitted):

1. propose: the heads draft their static tree from the base's features of the last committed positions (no extra
   base forward), or several drafters' candidates are merged and the tree worth verifying is chosen
   (``mtpkit.decoding.proposers``);
2. verify: one base forward over all tree nodes, with a 4-D mask letting each node see the cache and its own
   ancestors, at positions ``prefix + depth`` (``mtpkit.decoding.masks``);
3. accept: the longest path the base agrees with (greedy), a rejection-sampling walk (sampling, lossless) or
   Medusa's typical acceptance (lossy), and the base's own next token after it, next step's root
   (``mtpkit.decoding.acceptance``);
4. keep path: the accepted nodes' KV entries move into place, the rest of the tree's are cropped;
5. observe: the proposer learns what was accepted; a trace, if asked for, records the step.

Every draft is a point mass, so greedy output is the base's greedy output and sampling is lossless. Batch size 1.
Only the public transformers API is used: the decoder, ``DynamicCache`` and 4-D masks. Sliding-window layers get
full cache layers (so they roll back at any length) and the window goes into the mask; caches that cannot roll
back (recurrent, linear-attention layers) are refused.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from mtpkit.backbone import Backbone
from mtpkit.decoding.acceptance import Acceptance
from mtpkit.decoding.io import GenerationResult, Output, check_prompt
from mtpkit.decoding.masks import attention_windows, rollback_problem, tree_attention_problem, warn_once
from mtpkit.decoding.plan import TreePlan
from mtpkit.decoding.proposers import DynamicTreeProposer, HeadsDrafter, Proposal, StaticTreeProposer, Verified
from mtpkit.drafting.base import Drafter
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads
from mtpkit.kv_cache import decoder_cache
from mtpkit.tree import Tree, build_tree

MAX_DYNAMIC_NODES = 32  # nodes (root included) of a tree chosen per step from several drafters


class SpeculativeDecoder:
    """Greedy (exact), sampling (lossless) or typical (lossy) self-speculative decoding, batch size 1.

    With ``drafters`` (any ``mtpkit.drafting.base.Drafter``, the heads included as a ``HeadsDrafter``) each step
    merges their candidates into one trie, calibrates their confidences (``calibrator``) and verifies the tree
    worth verifying under ``cost`` ({tokens in a base forward: seconds}) and the measured drafting time. Without
    ``drafters`` the heads draft ``tree`` alone. Either way verification, acceptance and the cache's rollback are
    the same code.
    """

    def __init__(self, heads: DraftHeads, tree: "str | list[list[int]] | Tree" = "chain", *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, typical: bool = False, seed: int | None = None,
                 drafters: "Sequence[Drafter] | None" = None, cost: dict[int, float] | None = None,
                 draft_cost: float = 0.0, max_nodes: int = MAX_DYNAMIC_NODES,
                 calibrator: ConfidenceCalibrator | None = None):
        self.heads = heads
        self.backbone: Backbone = heads.backbone
        device = self.backbone.device
        self.acceptance = Acceptance(device, temperature, top_p, top_k, typical, seed)
        architecture = self.backbone.architecture
        problem = rollback_problem(decoder_cache(self.backbone))
        if problem:
            raise MtpkitError(f"{architecture} cannot decode speculatively: {problem} (rejected drafts would "
                              "leave a trace)")
        windows = attention_windows(self.backbone)
        root_plan = TreePlan(build_tree([]), device, heads.is_sequential, windows)  # near the context's end
        if drafters is None:
            self.proposer: StaticTreeProposer | DynamicTreeProposer = StaticTreeProposer(HeadsDrafter(heads, tree),
                                                                                         root_plan)
            return
        if not drafters:
            raise MtpkitError("hybrid drafting needs at least one drafter")
        if not cost:
            raise MtpkitError("hybrid drafting needs a cost table {tokens in a base forward: seconds}")
        if max_nodes < 1:
            raise MtpkitError(f"a tree has at least its root (max_nodes={max_nodes})")
        problem = tree_attention_problem(self.backbone)
        if problem:
            warn_once(f"{architecture} cannot verify a tree ({problem}): verifying the most confident chain of the "
                      "drafts")
        self.proposer = DynamicTreeProposer(drafters, cost, draft_cost, max_nodes, calibrator, problem is not None,
                                            root_plan, windows, device, self.backbone.dtype)

    @property
    def tree(self) -> Tree | None:
        """The heads' static tree (None: a tree is chosen per step)."""
        return self.proposer.tree

    @property
    def calibrator(self) -> ConfidenceCalibrator | None:
        """What the per-step tree chooser learned of each source's acceptance (None for a static tree)."""
        return self.proposer.calibrator

    def describe(self) -> str:
        return self.proposer.describe()

    def reset(self, keep_calibrator: bool = False) -> None:
        """Back to the state this decoder was built in (calibrator unless ``keep_calibrator``, drafting-time
        estimate, every drafter's learned entries). ``mtpkit bench`` calls it before each (prompt, method) run, so
        no figure depends on the prompts measured before it."""
        self.proposer.reset(keep_calibrator)

    def reseed(self, seed: int) -> None:
        """Restart the sampler's random streams from ``seed``."""
        self.acceptance.reseed(seed)

    @torch.inference_mode()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int = 128, *, stop_strings=(), on_tokens=None,
                 trace=None, eos_token_ids: "Sequence[int] | None" = None,
                 stop_when: Callable[[list[int]], bool] | None = None) -> GenerationResult:
        """Decode up to ``max_new_tokens``; ``on_tokens(list[int])`` streams, ``trace(dict)`` sees each step.

        ``eos_token_ids`` replaces the base's EOS ids (empty: none); ``stop_when(new_tokens)``, asked after every
        token, ends generation at the first one it returns true for."""
        backbone, heads, proposer = self.backbone, self.heads, self.proposer
        ids, budget = check_prompt(backbone, input_ids, max_new_tokens)
        context = backbone.max_context
        capacity = ids.shape[1] + budget + 1
        output = Output(backbone, budget, stop_strings, on_tokens, eos_token_ids, stop_when)
        start = time.perf_counter()
        cache = decoder_cache(backbone)
        outputs = backbone.hidden(ids, past_key_values=cache, use_cache=True, **heads.feature_kwargs)
        root = self.acceptance.next_token(backbone.logits(outputs.last_hidden_state[0, -1:])[0])
        proposer.start(ids[0].tolist(), root, heads.features(outputs)[0], capacity)
        prefix, steps, draft_seconds = ids.shape[1], [], 0.0
        output.push([root])
        prefill = time.perf_counter() - start
        while output.stop_reason is None:
            step_start = time.perf_counter()
            room = None if context is None else context - 1 - prefix  # a node at depth d sits at prefix + d
            proposal = proposer.propose(room, trace is not None)
            drafted = time.perf_counter()
            draft_seconds += drafted - step_start
            verified = self._verify(proposal, cache, prefix, capacity)
            keep_path(cache, proposal.plan, verified.nodes, prefix)
            proposer.observe(proposal, verified)
            steps.append(output.push(verified.new_tokens))
            if trace is not None:
                trace(step_record(proposal, verified, len(steps), prefix, steps[-1], drafted - step_start,
                                  time.perf_counter() - step_start))
            prefix += len(verified.nodes)
        decode = time.perf_counter() - start - prefill
        return output.result(len(steps) + 1, steps, prefill, decode, draft_seconds)

    def _verify(self, proposal: Proposal, cache, prefix: int, capacity: int) -> Verified:
        """One base forward over the proposed tree, and what the acceptance keeps of it."""
        plan, tokens = proposal.plan, proposal.tokens
        positions = (plan.offsets + prefix).unsqueeze(0)
        outputs = self.backbone.hidden(tokens.unsqueeze(0), past_key_values=cache, position_ids=positions,
                                       attention_mask=plan.mask(prefix, capacity, self.backbone.dtype),
                                       use_cache=True, **self.heads.feature_kwargs)
        logits = self.backbone.logits(outputs.last_hidden_state[0])
        nodes, new_tokens, rejected = self.acceptance.accept(plan, tokens, logits)
        return Verified(nodes, new_tokens, rejected, logits, self.heads.features(outputs)[0])


def keep_path(cache, plan: TreePlan, nodes: list[int], prefix: int) -> None:
    """Keep the KV entries of the accepted nodes, drop the rest of the tree's."""
    keep = len(nodes)
    if nodes != list(range(keep)):
        source = None
        for layer in cache.layers:
            if layer.keys is None:
                continue  # a layer without its own KV (it reads another layer's)
            if source is None:
                source = torch.tensor(nodes, device=layer.keys.device) + prefix
            layer.keys[:, :, prefix:prefix + keep] = layer.keys.index_select(2, source)
            layer.values[:, :, prefix:prefix + keep] = layer.values.index_select(2, source)
    if plan.num_nodes > keep:
        cache.crop(keep - plan.num_nodes)


def step_record(proposal: Proposal, verified: Verified, step: int, prefix: int, committed: int,
                draft_seconds: float, seconds: float) -> dict:
    """One step as ``--trace`` writes it: drafts (tokens, parents, confidences, sources), what was accepted."""
    record = {"draft_confidences": proposal.confidences}
    if proposal.sources is not None:
        record["draft_sources"] = proposal.sources
    record.update(draft_tokens=proposal.tokens.tolist(), draft_parents=proposal.plan.tree.parents.tolist(),
                  accepted_nodes=verified.nodes, accepted_length=len(verified.new_tokens),
                  rejected_node=verified.rejected, step=step, prefix_length=prefix, committed=committed,
                  draft_seconds=draft_seconds, seconds=seconds)
    return record
