"""Draft heads: one module per style behind one interface (``style.HeadStyle``), a registry, and ``DraftHeads``.

``medusa`` (independent heads on the last hidden state), ``sequential`` (Hydra / DeepSeek-V3 MTP: each head reads
the previous one's state and token), ``eagle`` (EAGLE: one draft model with its own attention) and ``eagle3``
(EAGLE-3: three base layers fused, its own output layer over a draft vocabulary).
"""

from mtpkit.heads.base import DraftHeads, build_heads
from mtpkit.heads.eagle3 import d2t_t2d, default_aux_layer_ids, draft_vocab_from_d2t
from mtpkit.heads.medusa import ResidualBlock
from mtpkit.heads.registry import STYLES, style_of

__all__ = ["DraftHeads", "ResidualBlock", "STYLES", "build_heads", "d2t_t2d", "default_aux_layer_ids",
           "draft_vocab_from_d2t", "style_of"]
