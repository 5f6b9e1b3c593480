"""Decoding: plain (``plain``) and self-speculative (``speculative``), one base forward per step.

The speculative loop reads top to bottom in ``speculative``: propose (``proposers``: the heads' static tree, or a
tree chosen per step from every drafter), verify (``masks``, ``plan``: the tree's buffers), accept
(``acceptance``), keep the path, observe. ``io`` holds what goes in and comes out.
"""

from mtpkit.decoding.acceptance import Acceptance, check_sampling, rejection_walk, sampling_probs
from mtpkit.decoding.io import GenerationResult, TextStream, encode_prompt
from mtpkit.decoding.masks import (attention_windows, rollback_problem, supports_tree_attention, tree_attention_problem,
                                   tree_mask, verify_mask)
from mtpkit.decoding.plain import PlainDecoder, greedy_generate
from mtpkit.decoding.plan import MaskBuffer, TreePlan, resolve_tree, verifiable_tree
from mtpkit.decoding.proposers import (DynamicTreeProposer, HeadsDrafter, Proposal, StaticTreeProposer, Verified)
from mtpkit.decoding.speculative import MAX_DYNAMIC_NODES, SpeculativeDecoder, keep_path
from mtpkit.kv_cache import decoder_cache

__all__ = ["Acceptance", "DynamicTreeProposer", "GenerationResult", "HeadsDrafter", "MAX_DYNAMIC_NODES", "MaskBuffer",
           "PlainDecoder", "Proposal", "SpeculativeDecoder", "StaticTreeProposer", "TextStream", "TreePlan",
           "Verified", "attention_windows", "check_sampling", "decoder_cache", "encode_prompt", "greedy_generate",
           "keep_path", "rejection_walk", "resolve_tree", "rollback_problem", "sampling_probs",
           "supports_tree_attention", "tree_attention_problem", "tree_mask", "verifiable_tree", "verify_mask"]
