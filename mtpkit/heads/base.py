"""``DraftHeads``: K draft heads of one style (``mtpkit.heads.registry``) bound to a frozen base, behind the one
interface that drafting (``mtpkit.decoding``), training (``mtpkit.train``) and the checkpoint use.

Every head scores its state with the base's frozen output layer unless ``own_lm_head`` is set or the style has
its own output layer (eagle3). Fresh heads of the older styles reproduce the base's next-token distribution.
Which token each head predicts is defined in ``mtpkit.targets``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.backbone import Backbone, features_of
from mtpkit.config import HeadsConfig
from mtpkit.draft_layer import DraftCache
from mtpkit.errors import MtpkitError
from mtpkit.heads.eagle3 import d2t_t2d
from mtpkit.heads.registry import style_of


class DraftHeads(nn.Module):
    """K draft heads bound to a frozen backbone (which is referenced, never owned or saved)."""

    def __init__(self, config: HeadsConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone = backbone  # a plain dataclass, so its weights are not registered here
        self.style = style_of(config.style)  # chosen once: nothing below asks for a style by name
        self.style.check(config)
        self.style.check_base(config, backbone)
        self.heads = nn.ModuleList(self.style.modules(config, backbone))
        if config.own_lm_head:
            base_weight = backbone.model.get_output_embeddings().weight.detach()
            self.lm_heads = nn.ParameterList(
                nn.Parameter(base_weight.clone().float()) for _ in range(config.num_heads))
        self.to(device=backbone.device, dtype=backbone.dtype)
        self.draft_vocab: torch.Tensor | None = None  # token ids drafts are drawn from (None: all)
        self._draft_layers: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if self.has_draft_head:  # until training chooses the most frequent tokens: the first ids
            self.set_draft_vocab(torch.arange(config.draft_vocab_size), init_output=True)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def is_sequential(self) -> bool:
        """Whether each depth's drafts depend on the parent draft's token and state (sequential and eagle)."""
        return self.style.sequential

    @property
    def is_eagle(self) -> bool:
        """Whether one draft model with its own attention drafts every depth on a draft KV cache."""
        return self.style.attends

    @property
    def has_draft_head(self) -> bool:
        """Whether the heads score with their own output layer over the draft vocabulary (eagle3's ``lm_head``)."""
        return self.style.own_vocabulary

    # ------------------------------------------------------------------ what the heads read of the base

    @property
    def feature_layers(self) -> list[int] | None:
        """The base layers whose input hidden states the heads read (eagle3), None: the final hidden state."""
        return self.style.feature_layers(self.config)

    @property
    def feature_size(self) -> int:
        layers = self.feature_layers
        return self.config.hidden_size * (len(layers) if layers else 1)

    @property
    def feature_kwargs(self) -> dict:
        """What the base's forward must be asked for so that ``features`` can read its output."""
        return {"output_hidden_states": True} if self.feature_layers else {}

    def features(self, outputs) -> torch.Tensor:
        """The heads' input [B, T, feature_size] from the base's forward ``outputs`` (run with
        ``feature_kwargs``): its final hidden state, or (eagle3) the input hidden states of ``feature_layers``
        side by side (``hidden_states[i]`` is layer i's input, as vLLM's aux hidden states)."""
        return features_of(outputs, self.feature_layers)

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
        """Head k's logits over the full vocabulary (eagle3: its draft vocabulary's, the other tokens at the
        lowest finite value, so they are never ranked above a drafted one)."""
        if self.has_draft_head:
            head = self.heads[0]
            draft = head.lm_head(state)
            full = draft.new_full((*state.shape[:-1], self.config.vocab_size), torch.finfo(draft.dtype).min)
            return full.index_copy(-1, self.draft_columns(), draft)
        return self.backbone.logits(state, *self.output_layer(k))

    def draft_index(self) -> torch.Tensor:
        """eagle3: the draft id of each target id [V], -1 outside the draft vocabulary (from ``t2d``)."""
        t2d = self.heads[0].t2d
        return torch.where(t2d, torch.cumsum(t2d.long(), 0) - 1, -1)

    def draft_columns(self) -> torch.Tensor:
        """eagle3: the target token id of each draft id, through ``d2t``."""
        d2t = self.heads[0].d2t
        return torch.arange(d2t.numel(), device=d2t.device) + d2t

    def set_draft_vocab(self, token_ids: torch.Tensor | None, init_output: bool = False) -> None:
        """Draft only from these token ids (EAGLE-3's sub-vocabulary): K small output products per step
        instead of K full-vocabulary ones. Verification still scores the full vocabulary, so a token outside
        it is only never drafted; the output does not change.

        eagle3 heads own their output layer over exactly ``draft_vocab_size`` sorted ids: this sets ``d2t`` and
        ``t2d``, and with ``init_output`` copies the base's output rows of these ids into ``lm_head``."""
        self.draft_vocab = None if token_ids is None else torch.as_tensor(token_ids).long().to(self.backbone.device)
        self._draft_layers = {}
        if self.has_draft_head:
            vocab = self.draft_vocab
            if vocab is None or vocab.numel() != self.config.draft_vocab_size or bool((vocab.diff() <= 0).any()):
                raise MtpkitError(f"eagle3 heads draft from exactly {self.config.draft_vocab_size} sorted, distinct "
                                  "token ids")
            head = self.heads[0]
            d2t, t2d = d2t_t2d(vocab, self.config.vocab_size)
            head.d2t.copy_(d2t)
            head.t2d.copy_(t2d)
            if init_output:
                with torch.no_grad():
                    head.lm_head.weight.copy_(self.backbone.model.get_output_embeddings().weight[vocab])

    def draft_logits(self, k: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head k's logits over the draft vocabulary, and the token id of each column (None: the full vocabulary)."""
        if self.has_draft_head:
            return self.heads[0].lm_head(state), self.draft_columns()
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
        if self.is_eagle:  # eagle3: ``hidden`` are the aux ``features``
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
        """Feed committed positions to the eagle draft model: the base's features h_t [n, feature_size] with
        tokens t + 1 [n]; their keys join ``cache``. Returns the state at the last one [1, H] (its drafts are
        depth 1; ``readout`` gives what the output layer scores)."""
        head = self.heads[0]
        positions = torch.arange(cache.length, cache.length + features.shape[0], device=features.device)
        past = [cache.segments(layer) for layer in range(len(head.layers))]
        states, own = head(head.condition(features).unsqueeze(0), self.backbone.embed(next_tokens).unsqueeze(0), positions, past, "causal")
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

    def readout(self, states: torch.Tensor) -> torch.Tensor:
        """What the output layer scores of drafting states (``commit``, ``draft_step``): eagle3 applies its final
        norm; the other styles score the state itself. ``teacher_forced_states`` already return read-out states."""
        return self.heads[0].readout(states) if self.is_eagle else states

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_heads(config: HeadsConfig, backbone: Backbone) -> DraftHeads:
    return DraftHeads(config, backbone)
