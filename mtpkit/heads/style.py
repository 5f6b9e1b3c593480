"""What a head style is: the one interface through which the heads, drafting, training and the card ask about it.

A style answers how its heads condition on the base and draft a tree (``start``, ``condition``, ``draft``: the
decoder never asks which style it runs), how its heads condition (``sequential``: on the parent draft's token and state; ``attends``: one
draft model over the sequence with its own KV cache, ``DraftHeads.commit`` / ``draft_step``), what they read of
the base (``feature_layers``), what they score with (``own_vocabulary``), which options fit it (``check``,
``check_base``, ``training_problem``) and how it describes itself (``describe``, the model card's line).
"""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.config import HeadsConfig
from mtpkit.errors import MtpkitError


def place_drafts(dp: dict, logits: torch.Tensor, columns: torch.Tensor | None, tokens: torch.Tensor,
                 confidences: list[float] | None) -> None:
    """Write one depth's drafts (each expanding node's top-k, in node order) into ``tokens``, ``columns`` giving
    the token id of each logit column (None: the column is the id); when tracing, append the drafting head's
    probability of each to ``confidences``. ``dp`` is one depth of ``mtpkit.decoding.TreePlan.depth_plans``."""
    top = torch.topk(logits, dp["top_k"], dim=-1)
    picked = top.indices.reshape(-1).index_select(0, dp["flat"])
    tokens[dp["start"]:dp["stop"]] = picked if columns is None else columns.index_select(0, picked)
    if confidences is not None:
        probs = (top.values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
        confidences.extend(probs.reshape(-1).index_select(0, dp["flat"]).tolist())


class HeadStyle:
    """The base of every style; a new style is one module with one subclass, and one line in ``registry``."""

    name = ""
    sequential = False  # depth d's drafts read the parent draft's token and state
    attends = False  # one draft model with its own attention over the sequence and a draft KV cache
    own_vocabulary = False  # scores with its own output layer over a draft vocabulary (d2t / t2d)

    def check(self, config: HeadsConfig) -> None:
        """Refuse options this style has no use for (one line, before the base loads)."""
        if config.draft_vocab_size or config.eagle_aux_hidden_state_layer_ids:
            raise MtpkitError(f"--draft-vocab-size and --aux-layer are eagle3 options ({config.style} heads were "
                              "asked for)")

    def defaults(self, backbone, draft_vocab_size: int, aux_layers: list[int]) -> tuple[int, list[int]]:
        """The style's options as attach records them, unset ones filled in for this base."""
        return draft_vocab_size, aux_layers

    def check_base(self, config: HeadsConfig, backbone) -> None:
        """Refuse options that do not fit this base."""

    def modules(self, config: HeadsConfig, backbone) -> list[nn.Module]:
        """The modules ``DraftHeads.heads`` holds (fresh)."""
        raise NotImplementedError

    def feature_layers(self, config: HeadsConfig) -> list[int] | None:
        """The base layers whose input hidden states the heads read; None: the base's final hidden state."""
        return None

    def training_problem(self, options) -> str | None:
        """Why these finetune options cannot train this style, or None."""
        return None

    # ---------------------------------------------------------------- drafting (``mtpkit.decoding.HeadsDrafter``)

    def start(self, heads):
        """Per-prompt drafting state (eagle: an empty draft KV cache); None where the heads keep no context."""
        return None

    def condition(self, heads, draft_state, hidden: torch.Tensor, next_tokens: list[int]) -> torch.Tensor:
        """The root's state from the base's features of the positions committed last [n, F] and the token after
        each (the last: the root); these heads read the last position only."""
        return hidden[-1:]

    def draft(self, heads, plan, draft_state, root: torch.Tensor, tokens: torch.Tensor,
              tracing: bool) -> list[float] | None:
        """Fill ``tokens[1:]`` with drafts along ``plan`` (``mtpkit.decoding.TreePlan``), depth by depth; return
        each draft's confidence when ``tracing``."""
        confidences = [] if tracing else None
        states = None
        for dp in plan.depth_plans:
            states = self.draft_level(heads, plan, dp, draft_state, root, states, tokens)
            place_drafts(dp, *heads.draft_logits(dp["depth"], heads.readout(states)), tokens, confidences)
        return confidences

    def draft_level(self, heads, plan, dp: dict, draft_state, root: torch.Tensor, states: torch.Tensor | None,
                    tokens: torch.Tensor) -> torch.Tensor:
        """The states [n, H] of one depth's expanding nodes (``dp``), from the parent depth's ``states``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- training (``mtpkit.train.losses``)

    def output_layers(self, heads) -> list[torch.Tensor]:
        """The heads' own output layers as the trained module returns them (views: DDP sees them used in its
        forward; the losses run on detached copies)."""
        return [w.view_as(w) for w in heads.lm_heads] if heads.config.own_lm_head else []

    def output_layer_of(self, k: int) -> int:
        """Which of ``output_layers`` head k scores with."""
        return k - 1

    def loss_targets(self, heads, labels: torch.Tensor, valid: torch.Tensor,
                     vocab) -> tuple[torch.Tensor, torch.Tensor]:
        """Head k's targets [B, T] as columns of ``scores`` (of the training vocabulary ``vocab`` when given),
        and where they count."""
        return (labels if vocab is None else vocab.position[labels]), valid

    def scores(self, heads, k: int, states: torch.Tensor, vocab, weight: torch.Tensor | None) -> torch.Tensor:
        """Head k's training logits over the full vocabulary or only ``vocab`` (a ``TrainVocab``); ``weight``
        stands in for its own output layer (a detached copy whose gradient is collected)."""
        layer, bias = heads.output_layer(k)
        layer = layer if weight is None else weight
        if vocab is not None:
            layer, bias = layer[vocab.ids], None if bias is None else bias[vocab.ids]
        return heads.backbone.logits(states, layer, bias)

    def describe(self, config: HeadsConfig) -> str:
        return f"{config.style}, {config.num_heads} heads x {config.num_layers} layer(s)"
