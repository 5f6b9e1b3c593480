"""``mtpkit export``: write a heads directory in a serving engine's format, then check what was written.

One module per format, each read from its loaders: ``vllm_medusa`` (medusa heads, vLLM's medusa draft model) and
``speculators_eagle3`` (eagle3 heads, speculators' eagle3 draft, which vLLM serves). A style's default format is
the one that carries it (``mtpkit.config.EXPORT_FORMATS``).

An export is written into a staging directory beside ``out``, checked there against the loader's names and
shapes (the format's ``check``: every tensor it reads, present with its shape, and nothing it would leave unread),
and only then renamed onto ``out``: a refused or failed export leaves nothing behind. Safetensors and JSON only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mtpkit.config import EXPORT_FORMATS, HeadsConfig
from mtpkit.errors import MtpkitError
from mtpkit.export.format import CONFIG_FILE, WEIGHTS_FILE, Exported, ExportFormat
from mtpkit.export.speculators_eagle3 import SPECULATORS_EAGLE3, SPECULATORS_EAGLE3_LOADERS, check_speculators_eagle3
from mtpkit.export.vllm_medusa import VLLM_MEDUSA, VLLM_MEDUSA_LOADER, check_vllm_medusa

FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (VLLM_MEDUSA, SPECULATORS_EAGLE3)}
assert {name: fmt.styles for name, fmt in FORMATS.items()} == EXPORT_FORMATS, "mtpkit.config names the formats"

__all__ = ["FORMATS", "ExportResult", "export_heads", "default_format", "check_vllm_medusa", "check_speculators_eagle3",
           "VLLM_MEDUSA_LOADER", "SPECULATORS_EAGLE3_LOADERS"]


@dataclass
class ExportResult:
    out: Path
    files: list[Path]
    config: dict
    summary: list[tuple[str, str]]  # what the format wrote, as rows for the CLI


def default_format(style: str) -> str:
    """The format that carries ``style``'s heads; refused with one line naming what exports."""
    for name, styles in EXPORT_FORMATS.items():
        if style in styles:
            return name
    raise MtpkitError(f"{style} heads have no serving format yet: mtpkit export writes {_exportable()}")


def _exportable() -> str:
    return ", ".join(f"{'/'.join(styles)} heads ({name})" for name, styles in EXPORT_FORMATS.items())


def export_heads(heads_dir: Path, out: Path, fmt: str | None = None, *, verifier: str | None = None,
                 force: bool = False, allow_untrained: bool = False, trust_remote_code: bool = False) -> ExportResult:
    """Export the heads of ``heads_dir`` to ``out`` in ``fmt`` (default: their style's format), for serving beside
    ``verifier`` (default: the base the heads were made for, which it must be). Refused with one line, before
    anything is written: an unknown format, a style the format cannot carry, untrained heads (unless
    ``allow_untrained``), a non-empty ``out`` (unless ``force``), another base, heads trained with a LoRA adapter on
    the base, and what a format itself cannot carry."""
    heads_dir, out = Path(heads_dir), Path(out).expanduser()
    config = HeadsConfig.read(heads_dir)
    if fmt is not None and fmt not in FORMATS:
        raise MtpkitError(f"unknown --format {fmt!r}: choose from {', '.join(FORMATS)}")
    fmt = fmt or default_format(config.style)
    if config.style not in FORMATS[fmt].styles:
        raise MtpkitError(f"{fmt} carries {'/'.join(FORMATS[fmt].styles)} heads, not {config.style}: mtpkit export "
                          f"writes {_exportable()}")
    if not is_trained(config) and not allow_untrained:
        raise MtpkitError(f"{heads_dir} holds untrained heads (no finetune recorded in its config): train them with "
                          "mtpkit finetune, or pass --allow-untrained")
    if out.exists() and not out.is_dir():
        raise MtpkitError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MtpkitError(f"--out {out} is not empty; pass --force to replace it")
    if config.lora:
        raise MtpkitError("these heads were trained with a LoRA adapter on the base (Medusa-2): the served base "
                          "would not be the one they draft for")

    from mtpkit.checkpoint import open_heads

    heads = open_heads(heads_dir, model=verifier or config.base_model, trust_remote_code=trust_remote_code)
    exported = FORMATS[fmt].build(heads, heads_dir, verifier)
    return _write_checked(out, exported, FORMATS[fmt])


def is_trained(config: HeadsConfig) -> bool:
    """Whether finetune has trained these heads (it records its steps in the config's ``training``)."""
    return bool(config.training) and int(config.training.get("steps") or 0) > 0


def _write_checked(out: Path, exported: Exported, fmt: ExportFormat) -> ExportResult:
    """Write into a staging directory beside ``out``, check it, then put it in ``out``'s place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(exported.config, indent=2, sort_keys=True) + "\n")
        save_file(exported.tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "library": "mtpkit"})
        problems = fmt.check(staging)
        if problems:
            raise MtpkitError(f"the export failed its own check ({len(problems)} problems): {'; '.join(problems[:3])}")
        _replace_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportResult(out=out, files=[out / CONFIG_FILE, out / WEIGHTS_FILE], config=exported.config,
                        summary=exported.summary)


def _replace_dir(source: Path, target: Path) -> None:
    """Rename ``source`` onto ``target``, whose old contents (a --force export) are removed only afterwards."""
    if not target.exists():
        source.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(old / target.name)
    source.rename(target)
    shutil.rmtree(old)
