"""``medusa``: head k is L residual blocks ``x + SiLU(W x + b)`` on the base's last hidden state h, every head
independent of the others (Medusa). Fresh blocks are zero-initialised, so a fresh head reproduces the base."""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.heads.style import HeadStyle


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
