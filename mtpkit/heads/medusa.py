"""``medusa``: head k is L residual blocks ``x + SiLU(W x + b)`` on the base's last hidden state h, every head
independent of the others (Medusa). Fresh blocks are zero-initialised, so a fresh head reproduces the base."""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.heads.style import HeadStyle, place_drafts


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


class MedusaStyle(HeadStyle):
    name = "medusa"

    def modules(self, config, backbone):
        # separate instances: each head owns its parameters
        return [MedusaHead(config.hidden_size, config.num_layers) for _ in range(config.num_heads)]

    def draft(self, heads, plan, draft_state, root, tokens, tracing):
        if heads.config.own_lm_head or not plan.max_depth:
            return super().draft(heads, plan, draft_state, root, tokens, tracing)
        # the heads all read h and share the base's output layer: score them in one product
        confidences = [] if tracing else None
        shared, columns = heads.draft_logits(1, torch.cat([heads.state(dp["depth"], root) for dp in plan.depth_plans]))
        for dp in plan.depth_plans:
            d = dp["depth"]
            place_drafts(dp, shared[d - 1:d], columns, tokens, confidences)
        return confidences

    def draft_level(self, heads, plan, dp, draft_state, root, states, tokens):
        return heads.state(dp["depth"], root)
