"""Whether a model's cache can roll back to a verified prefix, and the 4-D masks that verify a tree in one forward
(sliding windows per layer type), checked once per model against plain forwards of the tree's paths."""

from __future__ import annotations

import warnings
import weakref

import torch

from mtpkit.backbone import Backbone
from mtpkit.kv_cache import GrowingLayer, decoder_cache
from mtpkit.tree import build_tree



_TREE_PROBLEMS: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()
_TREE_LAYER_TYPES = ("full_attention", "sliding_attention")  # the layer types ``tree_mask`` knows


def warn_once(message: str) -> None:
    """Warn once per process per message (a fallback is said once, not at every decoder)."""
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
