"""The attention of the ``eagle`` and ``eagle3`` draft models (``mtpkit.heads.eagle``, ``mtpkit.heads.eagle3``):
small decoder layers that attend over the sequence, on a draft KV cache.

EAGLE's observation: a draft that sees the base's features of the whole context (not only the last one)
predicts far better than a per-position MLP. The draft model here is ``num_layers`` pre-norm decoder layers
(multi-head self-attention with rotary positions, then a SwiGLU MLP), written for mtpkit and independent of
the base's architecture: it needs only the hidden size, so it works on any causal LM.

Attention is computed over *segments* of keys, each with its own visibility:

- ``None``: every query sees every key (a draft cache of committed positions);
- ``"causal"``: query i sees keys 0..i (the new positions themselves, in order);
- ``"diagonal"``: query i sees key i only (one draft step's own key, in training-time test);
- a bool tensor ``[queries, keys]``: an explicit mask (a draft tree's ancestors).

That one rule serves training (all positions at once, several draft steps deep) and decoding (a KV cache of
committed positions plus the nodes of the tree being drafted). Output projections start at zero, so a fresh
layer is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

ROPE_THETA = 10000.0
HEAD_DIM = 64

Segment = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | str | None"]  # keys, values [B, h, S, d]; visibility


def attention_heads_for(hidden_size: int) -> int:
    """Heads of HEAD_DIM each where the size divides, else the largest divisor of ``hidden_size`` up to that."""
    heads = max(1, hidden_size // HEAD_DIM)
    while hidden_size % heads:
        heads -= 1
    return heads


def rotary(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] of the rotary embedding at ``positions`` [T]."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _visible(mask, queries: int, keys: int, device) -> torch.Tensor | None:
    """A bool [queries, keys] mask (None: all visible) for one full-width segment."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask == "causal":
            return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
        raise ValueError(f"unknown attention mask {mask!r}")
    return mask


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def identity_fuse(hidden_size: int) -> nn.Linear:
    """``[state; token] -> state`` as a linear layer starting at ``[I | 0]``: a fresh head passes the state through."""
    fuse = nn.Linear(2 * hidden_size, hidden_size, bias=False)
    with torch.no_grad():
        fuse.weight.zero_()
        fuse.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
    return fuse


class DraftAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, h, T, d] of ``x`` [B, T, input size]."""
        batch, length, _ = x.shape
        return self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def output(self, mixed: torch.Tensor) -> torch.Tensor:
        return self.out(mixed)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: list[Segment],
                own_mask) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend from ``x`` [B, T, input size] to the ``past`` segments and to its own keys; return (output
        [B, T, H], own keys/values)."""
        batch, length, _ = x.shape
        q, k, v = self.project(x)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q = q * self.head_dim ** -0.5
        scores, values, diagonal = [], [], []
        for keys, vals, mask in [*past, (k, v, own_mask)]:
            if isinstance(mask, str) and mask == "diagonal":
                scores.append((q * keys).sum(-1, keepdim=True))  # [B, h, T, 1]: the same position only
                diagonal.append(True)
            else:
                score = q @ keys.transpose(-1, -2)
                visible = _visible(mask, length, keys.shape[2], x.device)
                if visible is not None:
                    score = score.masked_fill(~visible, torch.finfo(score.dtype).min)
                scores.append(score)
                diagonal.append(False)
            values.append(vals)
        probs = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
        mixed, start = 0, 0
        for score, vals, is_diagonal in zip(scores, values, diagonal):
            part = probs[..., start: start + score.shape[-1]]
            start += score.shape[-1]
            mixed = mixed + (part * vals if is_diagonal else part @ vals)
        mixed = mixed.transpose(1, 2).reshape(batch, length, -1)
        return self.output(mixed), (k, v)


class DraftDecoderLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        intermediate = 64 * max(1, round(8 * hidden_size / 3 / 64))
        self.attention_norm = RMSNorm(hidden_size)
        self.attention = DraftAttention(hidden_size, num_heads)
        self.mlp_norm = RMSNorm(hidden_size)
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden_size, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x, cos, sin, past: list[Segment], own_mask):
        attended, own = self.attention(self.attention_norm(x), cos, sin, past, own_mask)
        x = x + attended
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(nn.functional.silu(gate) * up), own


class DraftCache:
    """Keys and values of the committed positions, per draft layer; grows as decoding commits tokens."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def segments(self, layer: int) -> list[Segment]:
        return [] if self.keys[layer] is None else [(self.keys[layer], self.values[layer], None)]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = keys, values
        else:
            self.keys[layer] = torch.cat([self.keys[layer], keys], dim=2)
            self.values[layer] = torch.cat([self.values[layer], values], dim=2)


def append_keys(drafted: list[tuple[torch.Tensor, torch.Tensor]] | None,
                own: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values of the nodes drafted so far with ``own`` (the newest depth's) appended."""
    if drafted is None:
        return own
    return [(torch.cat([k0, k1], dim=2), torch.cat([v0, v1], dim=2)) for (k0, v0), (k1, v1) in zip(drafted, own)]
