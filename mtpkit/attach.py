"""``attach``: put K fresh draft heads on a frozen base and write the heads directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtpkit import __version__
from mtpkit.backbone import load_backbone
from mtpkit.checkpoint import prepare_out_dir, save_heads
from mtpkit.config import HeadsConfig
from mtpkit.heads import DraftHeads, build_heads, style_of


@dataclass
class AttachResult:
    heads: DraftHeads
    base_parameters: int
    head_parameters: int
    files: list[Path]

    @property
    def overhead(self) -> float:
        return self.head_parameters / self.base_parameters


def attach(model: str, style: str, num_heads: int, num_layers: int, out: Path, *, force: bool = False,
           own_lm_head: bool = False, dtype: str = "float32", trust_remote_code: bool = False,
           draft_vocab_size: int = 0, aux_layers: list[int] | None = None) -> AttachResult:
    """eagle3 heads draft from ``draft_vocab_size`` tokens (0: all) and read the base layers ``aux_layers``
    (default: EAGLE-3's low, middle and high ones)."""
    # validate everything cheap before the model loads
    asked = HeadsConfig(style=style, num_heads=num_heads, num_layers=num_layers, hidden_size=1, vocab_size=1,
                        base_model=model, base_fingerprint="", draft_vocab_size=draft_vocab_size,
                        eagle_aux_hidden_state_layer_ids=list(aux_layers or []))
    style_of(style).check(asked)
    out = prepare_out_dir(out, force)
    backbone = load_backbone(model, dtype=dtype, trust_remote_code=trust_remote_code)
    draft_vocab_size, aux_layers = style_of(style).defaults(backbone, draft_vocab_size, list(aux_layers or []))
    config = HeadsConfig(style=style, num_heads=num_heads, num_layers=num_layers,
                         hidden_size=backbone.hidden_size, vocab_size=backbone.vocab_size,
                         base_model=backbone.reference, base_fingerprint=backbone.fingerprint,
                         base_architecture=backbone.architecture, own_lm_head=own_lm_head,
                         trust_remote_code=trust_remote_code, mtpkit_version=__version__,
                         draft_vocab_size=draft_vocab_size, eagle_aux_hidden_state_layer_ids=aux_layers)
    heads = build_heads(config, backbone)
    files = save_heads(heads, out)
    base_params = sum(p.numel() for p in backbone.model.parameters())
    return AttachResult(heads=heads, base_parameters=base_params,
                        head_parameters=heads.trainable_parameters(), files=files)
