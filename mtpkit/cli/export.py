"""``mtpkit export``: write a heads directory in a serving engine's format (vLLM's medusa today)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mtpkit.cli.common import console, friendly_errors


@friendly_errors
def export(
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory (trained by finetune).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (config.json + model.safetensors).")],
    fmt: Annotated[str, typer.Option("--format", help="Serving format: vllm-medusa (medusa heads, for vLLM's medusa speculator).")] = "vllm-medusa",
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
    config = result.config
    loader = config["mtpkit_export"]["loader"]
    table = Table(title=f"mtpkit export: {fmt}", show_header=False)
    table.add_row("heads", f"{config['num_heads']} x {config['num_hidden_layers']} residual block(s), hidden {config['hidden_size']}")
    table.add_row("output layers", config["mtpkit_export"]["lm_heads"])
    table.add_row("checked against", f"{loader['repo']} {loader['model']} @ {loader['model_commit'][:12]}")
    for path in result.files:
        table.add_row("wrote", f"{path} ({path.stat().st_size / 1e6:.2f} MB)")
    console.print(table)
