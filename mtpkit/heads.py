"""Draft heads: two styles behind one interface.

``medusa``: head k is L residual blocks ``x + SiLU(W x + b)`` on the base's last hidden
state h. ``sequential`` (Hydra / DeepSeek-V3 MTP): head k first fuses head k-1's state
(h for k = 1) with the normed input embedding of the token it is conditioned on, then runs
its own residual blocks, so later heads know the earlier drafts. ``eagle`` (EAGLE): one small draft
model with its own attention over the sequence (``mtpkit.draft_layer``), run once per draft depth on
its previous output and the token drafted before, with a KV cache of its own at decode time. ``eagle3``
(EAGLE-3): like eagle, but its first step reads three of the base's layers' hidden states (low, middle, high;
``features``) fused by ``fc``, its one decoder layer attends over [token; state], and it scores with its own
output layer over a draft vocabulary (``d2t``/``t2d``, ``draft_vocab_from_d2t``).

Every head scores its state with the base's frozen output layer unless ``own_lm_head`` is
set. Fresh heads are zero-initialised so they reproduce the base's next-token distribution.
Which token each head predicts is defined in ``mtpkit.targets``.
"""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.backbone import Backbone
from mtpkit.config import HeadsConfig
from mtpkit.draft_layer import DraftCache, Eagle3Head, EagleHead, RMSNorm, identity_fuse
from mtpkit.errors import MtpkitError

EAGLE_STYLES = ("eagle", "eagle3")  # one draft model with its own attention and a draft KV cache


def d2t_t2d(draft_vocab: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's view of a draft vocabulary (target ids, sorted): ``d2t`` [N] int64 offsets (target id = draft
    id + d2t[draft id]) and ``t2d`` [V] bool (whether a target id is in the draft vocabulary)."""
    draft_vocab = torch.as_tensor(draft_vocab).long()
    d2t = draft_vocab - torch.arange(draft_vocab.numel(), device=draft_vocab.device)
    t2d = torch.zeros(vocab_size, dtype=torch.bool, device=draft_vocab.device)
    t2d[draft_vocab] = True
    return d2t, t2d


def draft_vocab_from_d2t(d2t: torch.Tensor, t2d: torch.Tensor | None = None) -> torch.Tensor:
    """The target id of each draft id (``d2t_t2d``'s inverse); checks ``t2d`` agrees when given."""
    draft_vocab = torch.arange(d2t.numel(), device=d2t.device) + d2t.long()
    if t2d is not None and (int(t2d.sum()) != draft_vocab.numel() or not bool(t2d[draft_vocab].all())):
        raise MtpkitError("d2t and t2d describe different draft vocabularies")
    return draft_vocab


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers (speculators' default ``[2, L // 2, L - 3]``), kept inside a
    small base's ``num_layers``."""
    return [min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)]


def intermediate_size_of(backbone: Backbone) -> int:
    """The MLP width of the eagle3 layer: the base's own (as EAGLE-3's drafts have), else 8H/3 rounded."""
    cfg = backbone.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    size = getattr(cfg, "intermediate_size", None)
    return size if isinstance(size, int) and size > 0 else 64 * max(1, round(8 * backbone.hidden_size / 3 / 64))


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
        elif config.style == "eagle3":
            config.check_base(backbone.vocab_size, backbone.num_layers)
            self.heads = nn.ModuleList([Eagle3Head(hidden, config.draft_vocab_size, backbone.vocab_size,
                                                   intermediate_size_of(backbone), layers)])
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
        if self.has_draft_head:  # until training chooses the most frequent tokens: the first ids
            self.set_draft_vocab(torch.arange(config.draft_vocab_size), init_output=True)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def is_sequential(self) -> bool:
        """Whether each depth's drafts depend on the parent draft's token and state (sequential and eagle)."""
        return self.config.style == "sequential" or self.is_eagle

    @property
    def is_eagle(self) -> bool:
        """Whether one draft model with its own attention drafts every depth on a draft KV cache."""
        return self.config.style in EAGLE_STYLES

    @property
    def has_draft_head(self) -> bool:
        """Whether the heads score with their own output layer over the draft vocabulary (eagle3's ``lm_head``)."""
        return self.config.style == "eagle3"

    # ------------------------------------------------------------------ what the heads read of the base

    @property
    def feature_layers(self) -> list[int] | None:
        """The base layers whose input hidden states the heads read (eagle3), None: the final hidden state."""
        return self.config.eagle_aux_hidden_state_layer_ids if self.config.style == "eagle3" else None

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


def features_of(outputs, layer_ids: list[int] | None) -> torch.Tensor:
    """The final hidden state of a base forward's ``outputs``, or its layers' ``layer_ids`` input hidden states
    concatenated along the last dimension."""
    if not layer_ids:
        return outputs.last_hidden_state
    return torch.cat([outputs.hidden_states[i] for i in layer_ids], dim=-1)


def build_heads(config: HeadsConfig, backbone: Backbone) -> DraftHeads:
    return DraftHeads(config, backbone)
