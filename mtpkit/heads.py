"""Draft heads: two styles behind one interface.

``medusa``: head k is L residual blocks ``x + SiLU(W x + b)`` on the base's last hidden
state h. ``sequential`` (Hydra / DeepSeek-V3 MTP): head k first fuses head k-1's state
(h for k = 1) with the normed input embedding of the token it is conditioned on, then runs
its own residual blocks, so later heads know the earlier drafts. ``eagle`` (EAGLE): one small draft
model with its own attention over the sequence (``mtpkit.draft_layer``), run once per draft depth on
its previous output and the token drafted before, with a KV cache of its own at decode time.

Every head scores its state with the base's frozen output layer unless ``own_lm_head`` is
set. Fresh heads are zero-initialised so they reproduce the base's next-token distribution.
Which token each head predicts is defined in ``mtpkit.targets``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.backbone import Backbone
from mtpkit.config import HeadsConfig
from mtpkit.draft_layer import DraftCache, EagleHead, RMSNorm, identity_fuse


class ResidualBlock(nn.Module):
    """``x + SiLU(W x + b)``, zero-initialised so a fresh block is the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        # separate instances: each layer owns its parameters
        self.blocks = nn.ModuleList(ResidualBlock(hidden_size) for _ in range(num_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class SequentialHead(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.token_norm = RMSNorm(hidden_size)
        self.fuse = identity_fuse(hidden_size)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_size) for _ in range(num_layers))

    def forward(self, prev_state: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        state = self.fuse(torch.cat([prev_state, self.token_norm(token_embedding)], dim=-1))
        for block in self.blocks:
            state = block(state)
        return state


class DraftHeads(nn.Module):
    """K draft heads bound to a frozen backbone (which is referenced, never owned or saved)."""

    def __init__(self, config: HeadsConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone = backbone  # a plain dataclass, so its weights are not registered here
        hidden, layers = config.hidden_size, config.num_layers
        if config.style == "eagle":  # one draft model, run once per depth
            self.heads = nn.ModuleList([EagleHead(hidden, layers)])
        else:
            make = (lambda: MedusaHead(hidden, layers)) if config.style == "medusa" else (lambda: SequentialHead(hidden, layers))
            self.heads = nn.ModuleList(make() for _ in range(config.num_heads))
        if config.own_lm_head:
            base_weight = backbone.model.get_output_embeddings().weight.detach()
            self.lm_heads = nn.ParameterList(
                nn.Parameter(base_weight.clone().float()) for _ in range(config.num_heads))
        self.to(device=backbone.device, dtype=backbone.dtype)
        self.draft_vocab: torch.Tensor | None = None  # token ids drafts are drawn from (None: all)
        self._draft_layers: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def is_sequential(self) -> bool:
        """Whether each depth's drafts depend on the parent draft's token and state (sequential and eagle)."""
        return self.config.style in ("sequential", "eagle")

    @property
    def is_eagle(self) -> bool:
        return self.config.style == "eagle"

    def state(self, k: int, hidden: torch.Tensor, prev_state: torch.Tensor | None = None,
              token: torch.Tensor | None = None) -> torch.Tensor:
        """State of head k (1-based) from the base hidden state h.

        Sequential heads also take head k-1's state (h itself for k = 1) and the id of the token
        they are conditioned on (``mtpkit.targets.conditioning_offset``); Medusa heads ignore both.
        """
        if self.is_eagle:
            raise TypeError("eagle heads attend over the sequence: use teacher_forced_states or the draft cache")
        head = self.heads[k - 1]
        if not self.is_sequential:
            return head(hidden)
        prev = hidden if prev_state is None else prev_state
        return head(prev, self.backbone.embed(token))

    def output_layer(self, k: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias of head k's vocabulary projection (the base's unless ``own_lm_head``), optionally
        only the output ``rows`` (token ids) given."""
        base = self.backbone.model.get_output_embeddings()
        weight, bias = (self.lm_heads[k - 1] if self.config.own_lm_head else base.weight), base.bias
        if rows is not None:
            weight, bias = weight[rows], None if bias is None else bias[rows]
        return weight, bias

    def logits(self, k: int, state: torch.Tensor) -> torch.Tensor:
        """Head k's logits over the full vocabulary."""
        return self.backbone.logits(state, *self.output_layer(k))

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        """Draft only from these token ids (EAGLE-3's sub-vocabulary): K small output products per step
        instead of K full-vocabulary ones. Verification still scores the full vocabulary, so a token outside
        it is only never drafted; the output does not change."""
        self.draft_vocab = None if token_ids is None else torch.as_tensor(token_ids).long().to(self.backbone.device)
        self._draft_layers = {}

    def draft_logits(self, k: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head k's logits over the draft vocabulary, and the token id of each column (None: the full vocabulary)."""
        if self.draft_vocab is None:
            return self.logits(k, state), None
        key = k if self.config.own_lm_head else 0
        if key not in self._draft_layers:  # a contiguous copy of the rows, made once
            weight, bias = self.output_layer(k, self.draft_vocab)
            self._draft_layers[key] = (weight.detach().contiguous(), None if bias is None else bias.detach())
        return self.backbone.logits(state, *self._draft_layers[key]), self.draft_vocab

    def teacher_forced_states(self, hidden: torch.Tensor, conditioning: list[torch.Tensor]) -> list[torch.Tensor]:
        """All K heads' states at every position, sequential heads fed the true tokens.

        ``conditioning[k - 1]`` holds the token ids head k is conditioned on at each position
        (``mtpkit.targets.conditioning_tokens``); Medusa heads ignore it.
        """
        if self.is_eagle:
            return self.heads[0].teacher_forced(hidden, [self.backbone.embed(tokens) for tokens in conditioning])
        states, prev = [], hidden
        for k in range(1, self.num_heads + 1):
            prev = self.state(k, hidden, prev, conditioning[k - 1] if self.is_sequential else None)
            states.append(prev)
        return states

    # ------------------------------------------------------------------ eagle: drafting on a KV cache

    def new_draft_cache(self) -> DraftCache | None:
        """An empty KV cache for the eagle draft model (None for the other styles, which keep no context)."""
        return DraftCache(len(self.heads[0].layers)) if self.is_eagle else None

    def commit(self, cache: DraftCache, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed committed positions to the eagle draft model: the base's features h_t [n, H] with tokens t + 1
        [n]; their keys join ``cache``. Returns the state at the last one [1, H] (its drafts are depth 1)."""
        head = self.heads[0]
        positions = torch.arange(cache.length, cache.length + features.shape[0], device=features.device)
        past = [cache.segments(layer) for layer in range(len(head.layers))]
        states, own = head(features.unsqueeze(0), self.backbone.embed(next_tokens).unsqueeze(0), positions, past, "causal")
        for layer, (keys, values) in enumerate(own):
            cache.append(layer, keys, values)
        return states[0, -1:]

    def draft_step(self, cache: DraftCache, prev_states: torch.Tensor, tokens: torch.Tensor, position: int,
                   nodes: list[tuple[torch.Tensor, torch.Tensor]] | None, visible: torch.Tensor | None):
        """Eagle states [n, H] of n draft-tree nodes at one depth (``position``), from their parents' states and
        their own tokens [n]. They see the cache, their ancestors among the earlier drafted ``nodes`` (per layer:
        keys and values [1, h, m, d]; ``visible`` [n, m]) and themselves. Returns the states and their keys."""
        head = self.heads[0]
        past = [cache.segments(layer) + ([] if nodes is None else [(*nodes[layer], visible)])
                for layer in range(len(head.layers))]
        positions = torch.full((tokens.shape[0],), position, device=tokens.device)
        states, own = head(prev_states.unsqueeze(0), self.backbone.embed(tokens).unsqueeze(0), positions, past, "diagonal")
        return states[0], own

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_heads(config: HeadsConfig, backbone: Backbone) -> DraftHeads:
    return DraftHeads(config, backbone)
