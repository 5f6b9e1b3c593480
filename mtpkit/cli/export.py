"""``mtpkit export``: write a heads directory in a serving engine's format (``mtpkit.config.EXPORT_FORMATS``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mtpkit.cli.common import console, friendly_errors
from mtpkit.config import EXPORT_FORMATS

FORMAT_HELP = "Serving format (default: the one that carries the heads' style): " + ", ".join(
    f"{name} ({'/'.join(styles)} heads)" for name, styles in EXPORT_FORMATS.items()) + "."


@friendly_errors
def export(
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory (trained by finetune).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (config.json + model.safetensors).")],
    fmt: Annotated[Optional[str], typer.Option("--format", help=FORMAT_HELP)] = None,
    verifier: Annotated[Optional[str], typer.Option(help="The base the heads will be served beside (default: the one named in the heads config); heads made for another base are refused.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    allow_untrained: Annotated[bool, typer.Option("--allow-untrained", help="Export heads that finetune has not trained.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the base's own code from the hub (also on when the heads config records it).")] = False,
) -> None:
    """Export draft heads for a serving engine; the export is checked against the engine's loader before it lands."""
    from mtpkit.export import export_heads

    with console.status("loading the base model and heads"):
        result = export_heads(heads_dir, out, fmt, verifier=verifier, force=force,
                              allow_untrained=allow_untrained, trust_remote_code=trust_remote_code)
    table = Table(title=f"mtpkit export: {result.config['mtpkit_export']['format']}", show_header=False)
    for name, value in result.summary:
        table.add_row(name, value)
    for path in result.files:
        table.add_row("wrote", f"{path} ({path.stat().st_size / 1e6:.2f} MB)")
    console.print(table)
