"""``eagle3`` (EAGLE-3's draft, as vLLM's ``LlamaForCausalLMEagle3`` and speculators' ``Eagle3Speculator``
define it): ``fc`` fuses three of the base's layers' hidden states (low, middle, high), one decoder layer attends
over [token embedding; state], and its own ``lm_head`` scores a draft vocabulary whose EAGLE-3 view is ``d2t``
(target id = draft id + d2t[draft id]) and ``t2d`` (which target ids are drafted). Trained with the
training-time test on the token loss only; drafts like ``eagle`` on a draft KV cache."""

from __future__ import annotations

import torch
from torch import nn

from mtpkit.backbone import Backbone
from mtpkit.draft_layer import DraftAttention, Segment, attention_heads_for, rotary
from mtpkit.errors import MtpkitError
from mtpkit.heads.eagle import EagleHead, EagleStyle


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


class Eagle3Style(EagleStyle):
    name = "eagle3"
    own_vocabulary = True

    def check(self, config):
        # the vocabulary and layer options are checked against the base (``check_base``): they depend on its sizes
        if config.num_layers != 1:  # vLLM's later layers read the state alone, a layout not built here
            raise MtpkitError(f"eagle3 has EAGLE-3's one decoder layer: --layers must be 1 (got {config.num_layers})")

    def defaults(self, backbone, draft_vocab_size, aux_layers):
        return draft_vocab_size or backbone.vocab_size, aux_layers or default_aux_layer_ids(backbone.num_layers)

    def check_base(self, config, backbone):
        config.check_base(backbone.vocab_size, backbone.num_layers)

    def modules(self, config, backbone):
        return [Eagle3Head(config.hidden_size, config.draft_vocab_size, backbone.vocab_size,
                           intermediate_size_of(backbone), config.num_layers)]

    def feature_layers(self, config):
        return config.eagle_aux_hidden_state_layer_ids

    def output_layers(self, heads):
        weight = heads.heads[0].lm_head.weight
        return [weight.view_as(weight)]

    def output_layer_of(self, k):
        return 0  # one output layer, every depth

    def loss_targets(self, heads, labels, valid, vocab):
        """Draft ids of the targets; a target outside the draft vocabulary has no row (it can never be drafted).
        The training vocabulary plays no part: the draft vocabulary is the softmax's."""
        drafted = heads.draft_index()[labels]
        return drafted, valid & (drafted >= 0)

    def scores(self, heads, k, states, vocab, weight):
        return nn.functional.linear(states, heads.heads[0].lm_head.weight if weight is None else weight)

    def training_problem(self, options):
        if options.loss != "ce" or options.feature_loss or options.lora:
            return ("eagle3 heads train on the token loss only, over their draft vocabulary: use --loss ce, "
                    "--feature-loss 0 and no --lora")
        return None

    def describe(self, config):
        return (f"eagle3 (EAGLE-3), one draft model of {config.num_layers} decoder layer(s) reading base layers "
                f"{config.eagle_aux_hidden_state_layer_ids}, with its own output layer over "
                f"{config.draft_vocab_size:,} draft tokens, run {config.num_heads} times per step")
