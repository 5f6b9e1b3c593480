"""Self-speculative decoding with draft heads: draft a tree, verify it in one base forward.

One step, given the KV cache of every committed token but the last (the *root*, the base's
own next token, already emitted) and the base's hidden state h of the token before it:

1. draft: head d's top-k tokens become the depth-d nodes of the candidate tree (sequential
   heads are run per depth, batched over that depth's parents, each conditioned on its
   parent's token and state); no extra base forward is needed, h is carried over;
2. verify: one base forward over all tree nodes, with a 4-D mask letting each node see the
   cache and its own ancestors, at positions ``prefix + depth``;
3. accept the longest path the base agrees with (greedy: argmax; sampling: lossless
   rejection sampling; ``typical``: Medusa's typical acceptance, lossy), emit its tokens and
   the base's own next token after it (the "bonus", next step's root), and keep only the
   path's KV entries (crop for a chain, index-select for a tree).

Step 1 may instead ask several drafters (``mtpkit.drafting``: the heads, prompt lookup, a suffix index of
earlier outputs, token recycling) and verify the part of their merged candidates worth verifying, a tree chosen per
step; every draft is a point mass, so the same acceptance stays exact (greedy) and lossless (sampling). Drafters
that learn from the verification itself (``ObservesVerification``) see every node's token and logits after step 2.

Greedy output is the base's greedy output token for token. Batch size 1 only.
Only the public transformers API is used: the decoder, ``DynamicCache`` and 4-D masks. Sliding-window
layers get full cache layers (so they roll back at any length) and the window goes into the mask; caches
that cannot roll back (recurrent, linear-attention layers) are refused.
"""

from __future__ import annotations

import random
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mtpkit.backbone import Backbone
from mtpkit.chat import prompt_token_ids
from mtpkit.drafting.base import Candidates, Drafter, ObservesVerification
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.drafting.merge import best_path, cut_depth, merge_candidates, select_tree
from mtpkit.errors import MtpkitError
from mtpkit.generation import eos_ids
from mtpkit.heads import DraftHeads
from mtpkit.kernels import kernel_plan
from mtpkit.kv_cache import GrowingLayer, decoder_cache
from mtpkit.tree import Tree, build_tree, chain_choices, load_tree_file

TYPICAL_THRESHOLD = 0.09  # Medusa's posterior_threshold (epsilon)
TYPICAL_ALPHA = 0.3  # Medusa's posterior_alpha (delta)


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    text: str  # decoded new tokens (skip_special_tokens=True)
    forward_passes: int  # base forward passes INCLUDING prefill
    accepted_lengths: list[int]  # tokens committed by each verification step
    prefill_seconds: float
    decode_seconds: float
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens" | "stop_when"
    draft_seconds: float = 0.0  # of decode_seconds, the time spent drafting (and choosing the tree)

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens per base forward pass (plain decoding scores 1.00)."""
        return len(self.tokens) / max(1, self.forward_passes)

    @property
    def tokens_per_second(self) -> float:
        seconds = self.prefill_seconds + self.decode_seconds
        return len(self.tokens) / seconds if seconds > 0 else 0.0


# --------------------------------------------------------------------------- inputs and outputs


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.LongTensor:
    """Token ids [1, L] of a user prompt: as a chat turn (``mtpkit.chat``: the chat template, or plain turns
    without one, as the heads were trained on) when ``chat``, else the raw text."""
    if chat:
        ids = torch.tensor([prompt_token_ids(tokenizer, [{"role": "user", "content": prompt}])], dtype=torch.long)
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise MtpkitError("the prompt is empty: it encodes to no tokens")
    return ids


def _check_prompt(backbone: Backbone, input_ids, max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """Validate the prompt; return it as [1, L] on the model's device and the token budget."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise MtpkitError(f"generate takes one prompt at a time (batch size 1), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise MtpkitError("the prompt is empty: it encodes to no tokens")
    if max_new_tokens < 1:
        raise MtpkitError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    context = backbone.max_context
    budget = max_new_tokens
    if context is not None:
        if ids.shape[1] >= context:
            raise MtpkitError(f"the prompt has {ids.shape[1]} tokens; the model's context is {context}")
        budget = min(max_new_tokens, context - ids.shape[1])  # the last new token is never fed back
    return ids.to(backbone.device), budget


class _Output:
    """Collects committed tokens and decides, token by token, where generation stops."""

    def __init__(self, backbone: Backbone, budget: int, stop_strings: Sequence[str],
                 on_tokens: Callable[[list[int]], None] | None, eos: "Sequence[int] | None" = None,
                 stop_when: Callable[[list[int]], bool] | None = None):
        self.tokenizer = backbone.tokenizer
        self.eos = eos_ids(backbone) if eos is None else set(eos)
        self.stop_when = stop_when  # a caller's own rule, asked after every token (transformers' stopping criteria)
        self.budget = budget
        self.stop_strings = [s for s in stop_strings if s]
        self.window = max((len(s) for s in self.stop_strings), default=0) + 8
        self.on_tokens = on_tokens
        self.tokens: list[int] = []
        self.stop_reason: str | None = None

    def push(self, new: list[int]) -> int:
        """Commit tokens up to the first stop; return how many were committed."""
        taken = 0
        for token in new:
            self.tokens.append(token)
            taken += 1
            if token in self.eos:
                self.stop_reason = "eos"
            elif self.stop_strings and self._stop_string_completed():
                self.stop_reason = "stop_string"
            elif len(self.tokens) >= self.budget:
                self.stop_reason = "max_new_tokens"
            elif self.stop_when is not None and self.stop_when(self.tokens):
                self.stop_reason = "stop_when"
            if self.stop_reason:
                break
        if self.on_tokens is not None and taken:
            self.on_tokens(new[:taken])
        return taken

    def _stop_string_completed(self) -> bool:
        # the stop string was absent before this token, so it must end in the recent text
        tail = self.tokenizer.decode(self.tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)

    def result(self, forward_passes: int, accepted: list[int], prefill: float, decode: float,
               draft: float = 0.0) -> GenerationResult:
        return GenerationResult(tokens=self.tokens, text=self.tokenizer.decode(self.tokens, skip_special_tokens=True),
                                forward_passes=forward_passes, accepted_lengths=accepted, prefill_seconds=prefill,
                                decode_seconds=decode, stop_reason=self.stop_reason or "max_new_tokens",
                                draft_seconds=draft)


class TextStream:
    """Turns streamed token ids into text pieces for ``write`` (waits out partial UTF-8 characters)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.written = 0

    def __call__(self, new_tokens: list[int]) -> None:
        self.tokens.extend(new_tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self) -> None:
        self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if len(text) > self.written:
            self.write(text[self.written:])
            self.written = len(text)


# --------------------------------------------------------------------------- plain greedy


@torch.inference_mode()
def greedy_generate(backbone: Backbone, input_ids, max_new_tokens: int = 128, *, stop_strings=(),
                    on_tokens=None, pick: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GenerationResult:
    """Plain greedy decoding, one token per base forward, on the same decoder/output layer/cache and on the kernel
    plan the model runs (``mtpkit.kernels``: the token padded to two rows where that measured faster). ``pick``
    turns the logits [1, V] into the next token [1] (default: argmax; ``PlainDecoder`` samples)."""
    pick = pick or (lambda logits: logits.argmax(-1))
    ids, budget = _check_prompt(backbone, input_ids, max_new_tokens)
    output = _Output(backbone, budget, stop_strings, on_tokens)
    # where a forward over two tokens measured cheaper than over one, the token goes in twice and the copy's
    # cache entry is dropped: causal attention keeps the first row's result the one-token forward's
    padded = kernel_plan(backbone.model).padded_token
    start = time.perf_counter()
    cache = decoder_cache(backbone)
    hidden = backbone.hidden(ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1:]
    token = pick(backbone.logits(hidden[:, 0]))[:, None]
    forward_passes = 1
    output.push([token.item()])
    prefill = time.perf_counter() - start
    while output.stop_reason is None:
        if padded:
            hidden = backbone.hidden(token.repeat(1, 2), past_key_values=cache, use_cache=True).last_hidden_state
            cache.crop(-1)
            hidden = hidden[:, :1]
        else:
            hidden = backbone.hidden(token, past_key_values=cache, use_cache=True).last_hidden_state
        token = pick(backbone.logits(hidden[:, 0]))[:, None]
        forward_passes += 1
        output.push([token.item()])
    decode = time.perf_counter() - start - prefill
    return output.result(forward_passes, [1] * (forward_passes - 1), prefill, decode)


class PlainDecoder:
    """Plain decoding, one token per forward, on mtpkit's kernels and cache (``--draft none``): greedy, or sampling
    from the same warped distribution the speculative decoder samples losslessly from. The baseline every
    speculation gain is measured against."""

    calibrator = None  # nothing to learn between runs

    def __init__(self, backbone: Backbone, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 typical: bool = False, seed: int | None = None):
        check_sampling(temperature, top_p, top_k, typical)
        if typical:
            raise MtpkitError("--typical accepts drafts: it needs a draft source other than none")
        self.backbone = backbone
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._generator = torch.Generator(device=backbone.device)
        self._generator.manual_seed(seed if seed is not None else random.randrange(2**63))

    def describe(self) -> str:
        return "plain decoding, no drafts"

    def reset(self) -> None:
        pass  # nothing carries over from one prompt to the next

    def generate(self, input_ids, max_new_tokens: int = 128, *, stop_strings=(), on_tokens=None,
                 trace=None) -> GenerationResult:
        return greedy_generate(self.backbone, input_ids, max_new_tokens, stop_strings=stop_strings,
                               on_tokens=on_tokens, pick=self._sample if self.temperature > 0 else None)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        probs = sampling_probs(logits, self.temperature, self.top_k, self.top_p)
        return torch.multinomial(probs, 1, generator=self._generator)[:, 0]


# --------------------------------------------------------------------------- the cache and the masks


_TREE_PROBLEMS: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()
_TREE_LAYER_TYPES = ("full_attention", "sliding_attention")  # the layer types ``tree_mask`` knows


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def rollback_problem(cache) -> str | None:
    """Why speculative decoding cannot roll ``cache`` back to an accepted path (None if it can)."""
    from transformers.cache_utils import DummyLayer, DynamicLayer

    # per-token KV can be cropped and index-selected; recurrent or conv states fold in every token they saw
    kinds = sorted({type(layer).__name__ for layer in cache.layers
                    if type(layer) not in (DynamicLayer, GrowingLayer, DummyLayer)})
    return f"its {', '.join(kinds)} cache layers cannot be rolled back to a verified prefix" if kinds else None


def attention_windows(backbone: Backbone) -> dict[str, int | None]:
    """Each attention layer type of the model and its sliding window (None: full), read as its cache reads them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_kwargs = get_layer_types_and_kwargs(backbone.config.get_text_config(decoder=True))
    return {kind: kwargs.get("sliding_window") for kind, kwargs in zip(layer_types, layer_kwargs) if kind != "dummy"}


def tree_mask(ancestor_mask: torch.Tensor, prefix_length: int, dtype: torch.dtype, *,
              depths: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Additive 4-D mask [1, 1, N, prefix + N]: every node sees the cache and its ancestors; with a sliding
    ``window``, only the keys fewer than ``window`` positions before its own (node i sits at prefix + depths[i]).

    Additive float (0 / dtype min) works for both the eager (adds it) and sdpa attention paths.
    """
    n = ancestor_mask.shape[0]
    visible = torch.cat([ancestor_mask.new_ones(n, prefix_length), ancestor_mask], dim=1)
    if window is not None:
        queries = depths.to(ancestor_mask.device) + prefix_length
        keys = torch.cat([torch.arange(prefix_length, device=ancestor_mask.device), queries])
        visible &= queries[:, None] - keys[None, :] < window  # transformers' sliding_window_overlay
    mask = torch.zeros(1, 1, n, prefix_length + n, dtype=dtype, device=ancestor_mask.device)
    mask[0, 0].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask


def verify_mask(windows: dict[str, int | None], ancestor_mask: torch.Tensor, depths: torch.Tensor,
                prefix_length: int, dtype: torch.dtype) -> "torch.Tensor | dict[str, torch.Tensor]":
    """What a tree verification passes as ``attention_mask``: one 4-D mask when the model's attention layers
    are all of one type, else a dict of them keyed by layer type (recent transformers models take it as is)."""
    masks = {kind: tree_mask(ancestor_mask, prefix_length, dtype, depths=depths, window=window)
             for kind, window in windows.items()}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def supports_tree_attention(backbone: Backbone) -> bool:
    """Whether this model verifies a tree correctly (see ``tree_attention_problem``)."""
    return tree_attention_problem(backbone) is None


@torch.inference_mode()
def tree_attention_problem(backbone: Backbone) -> str | None:
    """Why this model cannot verify a tree through our masks, or None if it can: a probe tree verified after a
    prefix longer than its shortest sliding window must match plain forwards of the tree's paths (four forwards
    of a window's length, once per model)."""
    if backbone.model in _TREE_PROBLEMS:
        return _TREE_PROBLEMS[backbone.model]
    windows = attention_windows(backbone)
    unknown = sorted(set(windows) - set(_TREE_LAYER_TYPES))
    if unknown:
        problem = f"mtpkit builds no tree mask for its {', '.join(unknown)} layers"
    else:
        problem = _probe_tree(backbone, windows)
    _TREE_PROBLEMS[backbone.model] = problem
    return problem


def _probe_tree(backbone: Backbone, windows: dict[str, int | None]) -> str | None:
    device, dtype = backbone.device, backbone.dtype
    shortest = min((w for w in windows.values() if w is not None), default=None)
    length = 6 if shortest is None else shortest + 6  # past the window, so the probe tests it too
    if backbone.max_context is not None:
        length = min(length, backbone.max_context - 4)
    prefix = (torch.arange(3, 3 + length, device=device) % backbone.vocab_size).unsqueeze(0)
    tree = build_tree([[0], [1], [0, 0]])
    tokens = torch.tensor([[11, 12, 13, 14]], device=device) % backbone.vocab_size
    mask = verify_mask(windows, tree.ancestor_mask.to(device), tree.position_offsets.to(device), length, dtype)
    positions = (tree.position_offsets.to(device) + length).unsqueeze(0)
    try:
        cache = decoder_cache(backbone)
        backbone.hidden(prefix, past_key_values=cache, use_cache=True)
        verified = backbone.hidden(tokens, past_key_values=cache, attention_mask=mask, position_ids=positions,
                                   use_cache=True).last_hidden_state[0].float()
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, NotImplementedError) as exc:
        form = "a dict of 4-D masks by layer type" if isinstance(mask, dict) else "a 4-D mask"
        reason = str(exc).split("\n", 1)[0][:120]
        return f"its forward refuses {form} ({type(exc).__name__}: {reason})"
    # per node, a correct tree differs from plain forwards by rounding alone (1e-6 in fp32, up to ~3 eps in fp16 and
    # bf16 on deep models), a wrong mask by 1e-1 or more
    tolerance = max(2e-2, 8 * torch.finfo(dtype).eps)
    error = 0.0
    for path in tree.retrieve_indices.tolist():
        nodes = [i for i in path if i >= 0]
        expected = backbone.hidden(torch.cat([prefix, tokens[:, nodes]], dim=1)).last_hidden_state[0, -len(nodes):]
        expected = expected.float()
        node_errors = (verified[nodes] - expected).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-6)
        error = max(error, node_errors.max().item())
    if error > tolerance:
        return (f"a probe tree's hidden states differ from plain forwards of its paths by {error:.2g} "
                f"(tolerance {tolerance:.2g} in {str(dtype).removeprefix('torch.')})")
    return None


# --------------------------------------------------------------------------- the speculative decoder


class _Plan:
    """Device buffers of one tree: what drafting and verification index with. Built once for a static tree of the
    heads; per step, for a tree chosen from several drafters' candidates (``sequential=None``: no head drafts into
    it, and ``masks`` is the generate call's one preallocated mask buffer)."""

    def __init__(self, tree: Tree, device: torch.device, sequential: bool | None, windows: dict[str, int | None],
                 masks: "_TreeMasks | None" = None):
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


class _TreeMasks:
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
        _warn_once(f"{heads.backbone.architecture} cannot verify a tree ({problem}): falling back to chain drafts")
        resolved = build_tree(chain_choices(min(resolved.max_depth, heads.num_heads)))
    return resolved


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


# --------------------------------------------------------------------------- the heads as a drafter


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
        self.plan = _Plan(self.tree, heads.backbone.device, heads.is_sequential, attention_windows(heads.backbone))
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

    def draft(self, plan: _Plan, tokens: torch.Tensor, tracing: bool) -> list[float] | None:
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


# --------------------------------------------------------------------------- the speculative decoder


MAX_DYNAMIC_NODES = 32  # nodes (root included) of a tree chosen per step from several drafters
DRAFT_COST_SMOOTHING = 0.2  # weight of the newest step in the running draft-time estimate


class SpeculativeDecoder:
    """Greedy (exact), sampling (lossless) or typical (lossy) self-speculative decoding, batch size 1.

    With ``drafters`` (any ``mtpkit.drafting.base.Drafter``, the heads included as a ``HeadsDrafter``) each step
    merges their candidates into one trie (``merge_candidates``, confidences through ``calibrator``), selects
    the tree worth verifying under ``cost`` ({tokens in a base forward: seconds}) and the measured drafting time
    (``select_tree``), and verifies, accepts and keeps its path with the same code as the heads' static tree.
    Without ``drafters`` the heads draft ``tree`` alone.
    """

    def __init__(self, heads: DraftHeads, tree: "str | list[list[int]] | Tree" = "chain", *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, typical: bool = False, seed: int | None = None,
                 drafters: "Sequence[Drafter] | None" = None, cost: dict[int, float] | None = None,
                 draft_cost: float = 0.0, max_nodes: int = MAX_DYNAMIC_NODES,
                 calibrator: ConfidenceCalibrator | None = None):
        check_sampling(temperature, top_p, top_k, typical)
        self.heads = heads
        self.backbone: Backbone = heads.backbone
        self.temperature, self.top_p, self.top_k, self.typical = temperature, top_p, top_k, typical
        self.sampling = temperature > 0
        architecture = self.backbone.architecture
        problem = rollback_problem(decoder_cache(self.backbone))
        if problem:
            raise MtpkitError(f"{architecture} cannot decode speculatively: {problem} (rejected drafts would "
                              "leave a trace)")
        device, self.windows = self.backbone.device, attention_windows(self.backbone)
        self.drafters = list(drafters) if drafters is not None else None
        # drafters that learn from every verification's logits (token recycling), chosen once: a step asks no one
        self._verification_observers = [d for d in self.drafters or () if isinstance(d, ObservesVerification)]
        if self.drafters is None:
            self.heads_drafter: HeadsDrafter | None = HeadsDrafter(heads, tree)
            self.tree = self.heads_drafter.tree
            self._plan = self.heads_drafter.plan
        else:
            if not self.drafters:
                raise MtpkitError("hybrid drafting needs at least one drafter")
            if not cost:
                raise MtpkitError("hybrid drafting needs a cost table {tokens in a base forward: seconds}")
            if max_nodes < 1:
                raise MtpkitError(f"a tree has at least its root (max_nodes={max_nodes})")
            problem = tree_attention_problem(self.backbone)
            if problem:
                _warn_once(f"{architecture} cannot verify a tree ({problem}): verifying the most confident chain "
                           "of the drafts")
            self.chains_only = problem is not None
            self.heads_drafter = next((d for d in self.drafters if isinstance(d, HeadsDrafter)), None)
            self.tree = None  # chosen per step
            self.cost, self.max_nodes = dict(cost), max_nodes
            self.calibrator = calibrator if calibrator is not None else ConfidenceCalibrator()
            self.draft_cost = draft_cost  # a running estimate, replaced by what drafting measures
            self._initial_calibrator, self._initial_draft_cost = self.calibrator.state_dict(), draft_cost
            self._masks: _TreeMasks | None = None
        self._root_plan = _Plan(build_tree([]), device, heads.is_sequential, self.windows)  # near the context's end
        self._rng = random.Random(seed)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed if seed is not None else random.randrange(2**63))

    def reset(self) -> None:
        """Back to the state this decoder was built in: the calibrator's counts, the drafting-time estimate and
        every drafter's learned entries. ``mtpkit bench`` calls it before each (prompt, method) run, so no
        figure depends on the prompts measured before it."""
        if self.drafters is None:
            return
        self.calibrator = ConfidenceCalibrator.from_state_dict(self._initial_calibrator)
        self.draft_cost = self._initial_draft_cost
        for drafter in self.drafters:
            drafter.reset()

    def reseed(self, seed: int) -> None:
        """Restart the sampler's random streams from ``seed``."""
        self._rng = random.Random(seed)
        self._generator.manual_seed(seed)

    def describe(self) -> str:
        if self.drafters is None:
            return self.tree.describe()
        return f"dynamic tree of up to {self.max_nodes} nodes from {', '.join(_source_names(self.drafters))}"

    # -------------------------------------------------------------- generation loop

    @torch.inference_mode()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int = 128, *, stop_strings=(), on_tokens=None,
                 trace=None, eos_token_ids: "Sequence[int] | None" = None,
                 stop_when: Callable[[list[int]], bool] | None = None) -> GenerationResult:
        """Decode up to ``max_new_tokens``; ``on_tokens(list[int])`` streams, ``trace(dict)`` sees each step.

        ``eos_token_ids`` replaces the base's EOS ids (empty: none); ``stop_when(new_tokens)``, asked after every
        token, ends generation at the first one it returns true for."""
        backbone = self.backbone
        ids, budget = _check_prompt(backbone, input_ids, max_new_tokens)
        context = backbone.max_context
        capacity = ids.shape[1] + budget + 1
        output = _Output(backbone, budget, stop_strings, on_tokens, eos_token_ids, stop_when)
        start = time.perf_counter()
        cache = decoder_cache(backbone)
        prompt = ids[0].tolist()
        drafters = self.drafters if self.drafters is not None else [self.heads_drafter]
        for drafter in drafters:
            drafter.start(prompt)
        heads_drafter = self.heads_drafter
        # the base's hidden states of the newly committed positions; the last one's next token is the root
        outputs = backbone.hidden(ids, past_key_values=cache, use_cache=True, **self.heads.feature_kwargs)
        hidden = self.heads.features(outputs)[0]  # what the heads read (eagle3: three layers' states)
        root = self._next_token(backbone.logits(outputs.last_hidden_state[0, -1:])[0])
        next_tokens = prompt[1:] + [root]  # the token after each row of ``hidden``
        forward_passes, accepted_lengths, draft_seconds = 1, [], 0.0
        prefix = ids.shape[1]
        output.push([root])
        if self.drafters is not None:
            committed = prompt + [root]
            for drafter in self.drafters:
                drafter.update([root])
            if self._masks is None or not self._masks.fits(self.max_nodes, capacity, backbone.dtype):
                self._masks = _TreeMasks(self.windows, self.max_nodes, capacity, backbone.dtype, backbone.device)
        prefill = time.perf_counter() - start
        while output.stop_reason is None:
            step_start = time.perf_counter()
            if heads_drafter is not None:
                heads_drafter.condition(hidden, next_tokens)
            info = {}
            if self.drafters is None:
                plan = self._plan
                if context is not None and prefix + plan.max_depth >= context:
                    plan = self._root_plan
                tokens = plan.tokens
                tokens[0] = next_tokens[-1]
                confidences = heads_drafter.draft(plan, tokens, trace is not None)
                if trace is not None:
                    info["draft_confidences"] = confidences
                draft = None
            else:
                plan, tokens, draft = self._draft_merged(committed, prefix, context)
                if trace is not None and draft is not None:
                    info.update(draft_confidences=list(draft.confidences[1:]),
                                draft_sources=[list(s) for s in draft.sources[1:]])
            drafted = time.perf_counter()
            draft_seconds += drafted - step_start
            nodes, new_tokens, rejected, verified = self._verify(plan, tokens, cache, prefix, capacity)
            if draft is not None:
                self.calibrator.observe(draft, nodes)
            if self.drafters is not None:
                for drafter in self.drafters:
                    drafter.update(new_tokens)
                committed.extend(new_tokens)
            last = nodes[-1]
            eagle = heads_drafter is not None and heads_drafter.reads_every_position
            hidden = verified[nodes] if eagle else verified[last:last + 1]
            next_tokens = new_tokens
            forward_passes += 1
            prefix += len(nodes)
            taken = output.push(new_tokens)
            accepted_lengths.append(taken)
            if trace is not None:
                info.update(draft_tokens=tokens.tolist(), draft_parents=plan.tree.parents.tolist(),
                            accepted_nodes=nodes, accepted_length=len(new_tokens), rejected_node=rejected,
                            step=forward_passes - 1, prefix_length=prefix - len(nodes), committed=taken,
                            draft_seconds=drafted - step_start, seconds=time.perf_counter() - step_start)
                trace(info)
        decode = time.perf_counter() - start - prefill
        return output.result(forward_passes, accepted_lengths, prefill, decode, draft_seconds)

    # -------------------------------------------------------------- one step

    def _draft_merged(self, committed: list[int], prefix: int, context: int | None):
        """Every drafter's candidates, merged, cut to the context's end and to the tree worth verifying: (plan,
        tokens, DraftTree or None when the context's end leaves room for the root alone)."""
        started = time.perf_counter()
        proposals = [drafter.propose(committed, self.max_nodes - 1) for drafter in self.drafters]
        trie = merge_candidates(proposals, self.calibrator)
        room = None if context is None else context - 1 - prefix  # a node at depth d sits at position prefix + d
        if room is not None and room < 1:
            plan = self._root_plan
            plan.tokens[0] = committed[-1]
            return plan, plan.tokens, None
        if room is not None:
            trie = cut_depth(trie, room)
        if self.chains_only:
            trie = best_path(trie)
        draft = select_tree(trie, committed[-1], self.cost, self.draft_cost, self.max_nodes)
        plan = _Plan(draft.tree, self.backbone.device, None, self.windows, self._masks)
        elapsed = time.perf_counter() - started
        self.draft_cost += DRAFT_COST_SMOOTHING * (elapsed - self.draft_cost)
        return plan, draft.tokens.to(self.backbone.device), draft

    def _verify(self, plan: _Plan, tokens: torch.Tensor, cache, prefix: int, capacity: int):
        """One base forward over the tree, acceptance, and the accepted path's KV kept: (accepted nodes, new
        tokens, rejected node or None, the tree's features as the heads read them)."""
        positions = (plan.offsets + prefix).unsqueeze(0)
        outputs = self.backbone.hidden(tokens.unsqueeze(0), past_key_values=cache, position_ids=positions,
                                       attention_mask=plan.mask(prefix, capacity, self.backbone.dtype),
                                       use_cache=True, **self.heads.feature_kwargs)
        logits = self.backbone.logits(outputs.last_hidden_state[0])
        verified = self.heads.features(outputs)[0]
        if self.sampling and not self.typical:
            nodes, new_tokens, rejected = self._accept_sampling(plan, tokens, logits)
        else:
            nodes, new_tokens, rejected = self._accept_longest(plan, tokens, logits)
        for observer in self._verification_observers:
            observer.observe_verification(tokens, logits)
        self._keep_path(cache, plan, nodes, prefix)
        return nodes, new_tokens, rejected, verified

    def _accept_longest(self, plan: _Plan, tokens: torch.Tensor, logits: torch.Tensor):
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

    def _accept_sampling(self, plan: _Plan, tokens: torch.Tensor, logits: torch.Tensor):
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

    # -------------------------------------------------------------- helpers

    def _keep_path(self, cache, plan: _Plan, nodes: list[int], prefix: int) -> None:
        """Keep the KV entries of the accepted nodes, drop the rest of the tree's."""
        keep = len(nodes)
        if nodes != list(range(keep)):
            source = torch.tensor(nodes, device=self.backbone.device) + prefix
            for layer in cache.layers:
                if layer.keys is None:
                    continue  # a layer without its own KV (it reads another layer's)
                layer.keys[:, :, prefix:prefix + keep] = layer.keys.index_select(2, source)
                layer.values[:, :, prefix:prefix + keep] = layer.values.index_select(2, source)
        if plan.num_nodes > keep:
            cache.crop(keep - plan.num_nodes)

    def _target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def _sample(self, distribution: torch.Tensor) -> int:
        return torch.multinomial(distribution, 1, generator=self._generator).item()

    def _next_token(self, logits: torch.Tensor) -> int:
        if not self.sampling:
            return logits.argmax(-1).item()
        return self._sample(self._target_probs(logits))


def _source_names(drafters) -> list[str]:
    return list(dict.fromkeys(drafter.name for drafter in drafters))


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
