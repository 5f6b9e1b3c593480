"""``sequential`` (Hydra / DeepSeek-V3 MTP): head k first fuses head k-1's state (h for k = 1) with the normed
input embedding of the token it is conditioned on, then runs its own residual blocks, so later heads know the
earlier drafts."""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.draft_layer import RMSNorm, identity_fuse
from mtpkit.heads.medusa import ResidualBlock
from mtpkit.heads.style import HeadStyle


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


class SequentialStyle(HeadStyle):
    name = "sequential"
    sequential = True

    def modules(self, config, backbone):
        return [SequentialHead(config.hidden_size, config.num_layers) for _ in range(config.num_heads)]

    def draft_level(self, heads, plan, dp, draft_state, root, states, tokens):
        """Head d on each expanding node: its parent's state (h at depth 1) and its own token."""
        parents = dp["expanding"]
        prev = None if states is None else states.index_select(0, dp["parent_slots"])
        return heads.state(dp["depth"], root.expand(parents.shape[0], -1), prev, tokens.index_select(0, parents))
