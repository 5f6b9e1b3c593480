"""The ``eagle`` head style's draft model: small decoder layers that attend over the sequence.

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


class EagleHead(nn.Module):
    """The draft model of the ``eagle`` style: fuse (previous state, next token), then decoder layers.

    Step 1 at position t reads the base's feature h_t and the token t + 1 and predicts the feature at
    t + 1 (scored by the base's output layer, it predicts token t + 2); step k reads step k-1's output and
    token t + k. The same layers run every step, as in EAGLE.
    """

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.token_norm = RMSNorm(hidden_size)
        self.fuse = identity_fuse(hidden_size)
        heads = attention_heads_for(hidden_size)
        self.head_dim = hidden_size // heads
        self.layers = nn.ModuleList(DraftDecoderLayer(hidden_size, heads) for _ in range(num_layers))

    def condition(self, features: torch.Tensor) -> torch.Tensor:
        """The first step's input state from the base's features (eagle reads the last hidden state as it is)."""
        return features

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        """What the output layer scores, from a step's output state (eagle: the state itself)."""
        return state

    def forward(self, prev_state: torch.Tensor, token_embedding: torch.Tensor, positions: torch.Tensor,
                past: list[list[Segment]], own_mask) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """States [B, T, H] at ``positions`` [T]; ``past[layer]`` are the key segments each layer attends to
        besides the new positions' own keys (seen through ``own_mask``). Also returns each layer's own keys."""
        x = self.fuse(torch.cat([prev_state, self.token_norm(token_embedding)], dim=-1))
        cos, sin = rotary(positions, self.head_dim, x.dtype)
        own = []
        for layer, segments in zip(self.layers, past):
            x, kv = layer(x, cos, sin, segments, own_mask)
            own.append(kv)
        return x, own

    def teacher_forced(self, hidden: torch.Tensor, embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
        """K steps at every position at once (EAGLE-3's training-time test): step k at position t reads step
        k-1's output and token t + k, and attends to step 1's keys at positions <= t and to its own earlier
        steps' keys at t — exactly what it sees when drafting at decode time."""
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device)
        first, own = self(self.condition(hidden), embeddings[0], positions, [[] for _ in self.layers], "causal")
        states, past = [first], [[(k, v, "causal")] for k, v in own]
        for step in range(1, len(embeddings)):
            state, own = self(states[-1], embeddings[step], positions + step, past, "diagonal")
            states.append(state)
            past = [segments + [(k, v, "diagonal")] for segments, (k, v) in zip(past, own)]
        return [self.readout(state) for state in states]


# --------------------------------------------------------------------------- eagle3: EAGLE-3's draft model


class Eagle3Attention(DraftAttention):
    """``DraftAttention`` with EAGLE-3's projections: q/k/v read the 2H-wide [token; hidden] input."""

    def __init__(self, hidden_size: int, num_heads: int):
        nn.Module.__init__(self)
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def project(self, x):
        batch, length, _ = x.shape
        return [proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)]

    def output(self, mixed):
        return self.o_proj(mixed)


class Eagle3DecoderLayer(nn.Module):
    """EAGLE-3's one decoder layer (vLLM's ``LlamaDecoderLayer`` of ``llama_eagle3``, speculators' ``Eagle3``):
    attention over [input_layernorm(token embedding); hidden_norm(state)], the state as the residual, then a
    Llama MLP (transformers' ``LlamaMLP``)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        self.input_layernorm = LlamaRMSNorm(hidden_size, eps=1e-6)
        self.hidden_norm = LlamaRMSNorm(hidden_size, eps=1e-6)
        self.self_attn = Eagle3Attention(hidden_size, num_heads)
        self.post_attention_layernorm = LlamaRMSNorm(hidden_size, eps=1e-6)
        self.mlp = LlamaMLP(LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                        hidden_act="silu", mlp_bias=False))

    def forward(self, state, token_embedding, cos, sin, past: list[Segment], own_mask):
        fused = torch.cat([self.input_layernorm(token_embedding), self.hidden_norm(state)], dim=-1)
        attended, own = self.self_attn(fused, cos, sin, past, own_mask)
        x = state + attended
        return x + self.mlp(self.post_attention_layernorm(x)), own


class Eagle3Head(EagleHead):
    """The draft model of the ``eagle3`` style (EAGLE-3): ``fc`` fuses three of the base's layers' hidden
    states [3H] into one state, one decoder layer reads it with the next token, ``norm`` then ``lm_head`` (over
    the draft vocabulary, ``draft_vocab_size`` rows) score it.

    A step's output state before ``norm`` (vLLM's ``hidden_prenorm``) is what the next step reads as its
    "hidden" input, in training-time test and in drafting alike. ``d2t`` (target id = draft id + d2t[draft id])
    and ``t2d`` (which target ids are drafted) are EAGLE-3's view of the draft vocabulary, kept as buffers.
    Unlike vLLM's, attention has as many key/value heads as query heads and rotary theta 10000 (as ``eagle``).
    """

    def __init__(self, hidden_size: int, draft_vocab_size: int, vocab_size: int, intermediate_size: int,
                 num_layers: int = 1):
        nn.Module.__init__(self)
        heads = attention_heads_for(hidden_size)
        self.head_dim = hidden_size // heads
        self.fc = nn.Linear(3 * hidden_size, hidden_size, bias=False)
        self.layers = nn.ModuleList(Eagle3DecoderLayer(hidden_size, heads, intermediate_size)
                                    for _ in range(num_layers))
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(hidden_size, eps=1e-6)
        self.lm_head = nn.Linear(hidden_size, draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(vocab_size) < draft_vocab_size)

    def condition(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return self.norm(state)

    def forward(self, prev_state, token_embedding, positions, past, own_mask):
        cos, sin = rotary(positions, self.head_dim, prev_state.dtype)
        x, own = prev_state, []
        for layer, segments in zip(self.layers, past):
            x, kv = layer(x, token_embedding, cos, sin, segments, own_mask)
            own.append(kv)
        return x, own
