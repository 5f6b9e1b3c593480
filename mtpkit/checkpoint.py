"""Reading and writing a heads directory: ``mtp_config.json`` + ``heads.safetensors``.

Adapter-style: the base weights are never written. Every write is atomic (a temporary file
in the same directory, then a rename), so an interrupted save never damages what was there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtpkit.backbone import Backbone, load_backbone, wrap_model
from mtpkit.config import CONFIG_NAME, LORA_DIR, WEIGHTS_NAME, HeadsConfig
from mtpkit.errors import MtpkitError
from mtpkit.files import atomic_write, atomic_write_text
from mtpkit.heads import DraftHeads, build_heads, draft_vocab_from_d2t


def prepare_out_dir(out: Path, force: bool) -> Path:
    """Create ``out`` (refusing a non-empty one unless ``force``) and check it is writable."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MtpkitError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MtpkitError(f"--out {out} is not empty; pass --force to overwrite the heads in it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise MtpkitError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return out


# int64 token ids the heads draft from; absent: the full vocabulary (eagle3 also keeps d2t / t2d, EAGLE-3's view)
DRAFT_VOCAB_KEY = "draft_vocab"


def heads_state_dict(heads: DraftHeads) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in heads.state_dict().items()}
    if heads.draft_vocab is not None:  # eagle3: its d2t is the truth (a resumed run loads it, not draft_vocab)
        vocab = heads.draft_columns() if heads.has_draft_head else heads.draft_vocab
        state[DRAFT_VOCAB_KEY] = vocab.detach().cpu().long().contiguous()
    return state


def save_heads(heads: DraftHeads, out: Path) -> list[Path]:
    """Write the config and the head weights (never the base's) into ``out``; return the files."""
    out = Path(out)
    weights, config = out / WEIGHTS_NAME, out / CONFIG_NAME
    state = heads_state_dict(heads)
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "library": "mtpkit"}))
    atomic_write_text(config, heads.config.to_json())
    return [config, weights]


def check_compatible(config: HeadsConfig, backbone: Backbone) -> None:
    """Fail with one line naming what differs between the heads' base and this one."""
    checks = [("hidden size", config.hidden_size, backbone.hidden_size),
              ("vocab size", config.vocab_size, backbone.vocab_size),
              ("fingerprint", config.base_fingerprint, backbone.fingerprint)]
    for what, expected, actual in checks:
        if expected != actual:
            raise MtpkitError(f"these heads were made for {config.base_model!r} and do not fit "
                              f"{backbone.reference!r}: {what} {expected} != {actual}")


def load_heads(heads_dir: Path, backbone: Backbone) -> DraftHeads:
    """Load the heads of ``heads_dir`` onto ``backbone`` (which must be the base they were made for)."""
    config = HeadsConfig.read(Path(heads_dir))
    check_compatible(config, backbone)
    return _load_weights(Path(heads_dir), build_heads(config, backbone))


def open_heads(heads_dir: Path, model: str | None = None, dtype: str = "float32",
               trust_remote_code: bool = False, device: str | torch.device | None = None) -> DraftHeads:
    """Load the base named in the heads' config (or ``model``), its LoRA adapter if any, and the heads, on
    ``device`` (default: cuda when available, else cpu) in ``dtype``.

    The base's own hub code runs when the caller asks (``trust_remote_code``) or the heads config records
    that the base needs it (attach wrote it).
    """
    heads_dir = Path(heads_dir)
    config = HeadsConfig.read(heads_dir)
    backbone = load_backbone(model or config.base_model, dtype=dtype, device=device,
                             trust_remote_code=trust_remote_code or config.trust_remote_code)
    check_compatible(config, backbone)
    if config.lora:  # base plus adapter is the model; its fingerprint was checked before merging
        backbone = merge_lora(backbone, heads_dir / LORA_DIR)
    return _load_weights(heads_dir, build_heads(config, backbone))


def merge_lora(backbone: Backbone, adapter_dir: Path) -> Backbone:
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise MtpkitError(f"the heads use a LoRA adapter but {adapter_dir} holds none")
    merged = PeftModel.from_pretrained(backbone.model, adapter_dir).merge_and_unload()
    return wrap_model(merged, backbone.tokenizer, backbone.reference, check=False)


def _load_weights(heads_dir: Path, heads: DraftHeads) -> DraftHeads:
    path = heads_dir / WEIGHTS_NAME
    if not path.is_file():
        raise MtpkitError(f"{heads_dir} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(path), device=str(heads.backbone.device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MtpkitError(f"{path} is corrupt or not a safetensors file: {str(exc)[:200]}") from None
    draft_vocab = state.pop(DRAFT_VOCAB_KEY, None)
    if draft_vocab is not None and (draft_vocab.ndim != 1 or not draft_vocab.numel()
                                    or int(draft_vocab.min()) < 0 or int(draft_vocab.max()) >= heads.config.vocab_size):
        raise MtpkitError(f"{path}: {DRAFT_VOCAB_KEY} holds token ids outside the vocabulary of {heads.config.vocab_size}")
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MtpkitError(f"{path} does not match {CONFIG_NAME}: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    if draft_vocab is None and heads.has_draft_head:  # EAGLE-3's own format keeps only d2t / t2d
        draft_vocab = draft_vocab_from_d2t(heads.heads[0].d2t, heads.heads[0].t2d)
    heads.set_draft_vocab(draft_vocab)
    return heads
