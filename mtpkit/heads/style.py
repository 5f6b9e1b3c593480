"""What a head style is: the one interface through which the heads, drafting, training and the card ask about it.

A style answers how its heads condition (``sequential``: on the parent draft's token and state; ``attends``: one
draft model over the sequence with its own KV cache, ``DraftHeads.commit`` / ``draft_step``), what they read of
the base (``feature_layers``), what they score with (``own_vocabulary``), which options fit it (``check``,
``check_base``, ``training_problem``) and how it describes itself (``describe``, the model card's line).
"""

from __future__ import annotations

from torch import nn

from mtpkit.config import HeadsConfig
from mtpkit.errors import MtpkitError


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

    def describe(self, config: HeadsConfig) -> str:
        return f"{config.style}, {config.num_heads} heads x {config.num_layers} layer(s)"
