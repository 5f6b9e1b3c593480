"""``mtpkit attach``: write a heads directory with K fresh draft heads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtpkit.cli.common import console, friendly_errors
from mtpkit.config import DEFAULT_MODEL


@friendly_errors
def attach(
    out: Annotated[Path, typer.Option("--out", help="Heads directory to write.")],
    model: Annotated[str, typer.Option(help="Base model: alias (smollm2-135m), hub id, local dir, .gguf file or PEFT adapter dir.")] = DEFAULT_MODEL,
    style: Annotated[str, typer.Option(help="Head style: medusa (independent heads), sequential (Hydra / DeepSeek MTP), eagle (a draft decoder layer with its own attention, EAGLE) or eagle3 (EAGLE-3: three base layers fused, own output layer over a draft vocabulary).")] = "medusa",
    heads: Annotated[int, typer.Option("--heads", help="Number of draft heads K (eagle: draft depth).")] = 4,
    layers: Annotated[int, typer.Option(help="Residual blocks per head (eagle: draft decoder layers).")] = 1,
    draft_vocab_size: Annotated[int, typer.Option("--draft-vocab-size", help="eagle3: tokens its output layer drafts from (finetune picks the most frequent; 0: the whole vocabulary).")] = 0,
    aux_layer: Annotated[list[int] | None, typer.Option("--aux-layer", help="eagle3: a base layer whose input hidden state it reads; give three (default: EAGLE-3's low, middle, high).")] = None,
    own_lm_head: Annotated[bool, typer.Option("--own-lm-head", help="Give each head a trainable copy of the output layer instead of sharing the frozen one.")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub (off by default).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the heads in a non-empty --out.")] = False,
) -> None:
    """Put K draft heads on a frozen base model and write the heads directory."""
    from mtpkit.attach import attach as attach_heads

    with console.status("loading the base model"):
        result = attach_heads(model, style, heads, layers, out, force=force, own_lm_head=own_lm_head,
                              dtype=dtype, trust_remote_code=trust_remote_code,
                              draft_vocab_size=draft_vocab_size, aux_layers=aux_layer)
    config = result.heads.config
    table = Table(title=f"mtpkit attach: {config.style} x{config.num_heads}", show_header=False)
    table.add_row("base model", config.base_model)
    table.add_row("base fingerprint", config.base_fingerprint)
    table.add_row("base parameters", f"{result.base_parameters:,}")
    table.add_row("trainable head parameters", f"{result.head_parameters:,}")
    table.add_row("overhead", f"{100 * result.overhead:.2f}% of the base")
    for path in result.files:
        table.add_row("wrote", f"{path} ({path.stat().st_size / 1e6:.2f} MB)")
    console.print(table)
