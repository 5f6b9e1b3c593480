"""``eagle`` (EAGLE): one small draft model with its own attention over the sequence (``mtpkit.draft_layer``), run
once per draft depth on its previous output and the token drafted before, with a KV cache of its own at decode
time. Kept beside ``eagle3``: nothing has yet shown that eagle3 loses nothing against it."""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.draft_layer import (DraftDecoderLayer, RMSNorm, Segment, append_keys, attention_heads_for, identity_fuse,
                                rotary)
from mtpkit.heads.style import HeadStyle, place_drafts


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


class EagleStyle(HeadStyle):
    name = "eagle"
    sequential = True
    attends = True

    def modules(self, config, backbone):
        return [EagleHead(config.hidden_size, config.num_layers)]  # one draft model, run once per depth

    def start(self, heads):
        return heads.new_draft_cache()

    def condition(self, heads, draft_state, hidden, next_tokens):
        """Commit every newly verified position to the draft cache; the root's state is the last one's."""
        return heads.commit(draft_state, hidden, torch.tensor(next_tokens, device=hidden.device))

    def draft(self, heads, plan, draft_state, root, tokens, tracing):
        """The draft model runs once per depth over that depth's expanding nodes; each node attends to the
        draft cache and to its own ancestors drafted before it (the tree's ancestor mask)."""
        confidences = [] if tracing else None
        anchor = draft_state.length - 1  # the root's own position in the draft cache
        states, drafted, drafted_ids = root, None, None
        for dp in plan.depth_plans:
            d = dp["depth"]
            if d > 1:
                parents = dp["expanding"]
                visible = None if drafted_ids is None else \
                    plan.ancestor_mask.index_select(0, parents).index_select(1, drafted_ids)
                states, own = heads.draft_step(draft_state, states.index_select(0, dp["parent_slots"]),
                                               tokens.index_select(0, parents), anchor + d - 1, drafted, visible)
                drafted = append_keys(drafted, own)
                drafted_ids = parents if drafted_ids is None else torch.cat([drafted_ids, parents])
            place_drafts(dp, *heads.draft_logits(d, heads.readout(states)), tokens, confidences)
        return confidences

    def describe(self, config):
        return (f"eagle, one draft model of {config.num_layers} decoder layer(s) with its own attention, "
                f"run {config.num_heads} times per step (one per draft depth)")
