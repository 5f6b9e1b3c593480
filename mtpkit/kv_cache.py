"""A KV cache that appends in place: transformers' ``DynamicCache`` with each layer's keys and values kept
as views of a buffer that has room to grow.

transformers' ``DynamicLayer`` concatenates every new token onto its keys and values, so each decoding step
copies the whole cache into freshly allocated memory: with 64 rows of a few hundred tokens that copy
(``aten::cat``) took more CPU time than every matrix product of the step together, measured with
``torch.profiler`` on batched self-distillation. ``GrowingLayer`` writes the new positions into spare room
and grows its buffer geometrically (by ``GROWTH``), so a token costs a write of its own keys and values;
``crop`` and ``batch_select_indices`` keep their meaning (a selection copies once, then appending goes on in
a new buffer). The model's forward, masks and attention are untouched: they see tensors of the same shape
and values as before, only strided.

Batched generation (``mtpkit.generation``) and every decoding path (``decoder_cache``: plain greedy and
speculative decoding, whose rollback writes the accepted path in place and crops) run on it; transformers'
own methods in ``mtpkit bench`` (hf-greedy, hf-pld) keep transformers' cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

GROWTH = 1.5  # a full buffer is replaced by one this much longer (plus MIN_ROOM): amortised O(1) per token
MIN_ROOM = 64


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views ``[:, :, :length]`` of buffers with spare room."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._fits(key_states, end):
            self._grow(key_states, value_states, length, end)
        key_buffer, value_buffer = self._buffers
        key_buffer[:, :, length:end] = key_states
        value_buffer[:, :, length:end] = value_states
        self.keys, self.values = key_buffer[:, :, :end], value_buffer[:, :, :end]
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, end: int) -> bool:
        """Whether the buffers still back ``keys`` (a selection or repeat replaces them) and have room to ``end``."""
        if self._buffers is None:
            return False
        key_buffer = self._buffers[0]
        backed = self.keys.numel() == 0 or self.keys.data_ptr() == key_buffer.data_ptr()
        return (backed and key_buffer.shape[0] == key_states.shape[0] and key_buffer.shape[1] == key_states.shape[1]
                and end <= key_buffer.shape[2])

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
        room = max(end, int(end * GROWTH) + MIN_ROOM)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            batch, heads, _, dim = new.shape
            buffer = torch.empty((batch, heads, room, dim), dtype=new.dtype, device=new.device)
            if length:
                buffer[:, :, :length] = old
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])

    def reset(self) -> None:
        super().reset()
        self._buffers = None


def growing_cache() -> DynamicCache:
    """A ``DynamicCache`` whose layers (created as the model first writes to them) are ``GrowingLayer``s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def decoder_cache(backbone) -> DynamicCache:
    """The KV cache every decoding path runs on: transformers' ``DynamicCache`` for the model, with a full
    ``GrowingLayer`` in place of each attention layer (sliding-window ones included), so any attention layer
    can be cropped and index-selected at any length and appends in place. The model still applies its window,
    through its own mask (ours for trees); the price is memory: a sliding layer then keeps every position, not
    just its window. Other layer kinds (recurrent states) stay as the model made them."""
    cache = DynamicCache(config=backbone.config)
    # a sliding layer keeps only its last window - 1 positions and refuses to roll back once it is full
    cache.layers = [GrowingLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache
