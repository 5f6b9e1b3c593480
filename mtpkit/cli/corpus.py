"""``mtpkit corpus``: grow a self-distilled corpus (Parquet) of prompts and the base's own responses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mtpkit.cli.common import console, friendly_errors, progress_display
from mtpkit.config import DEFAULT_MODEL
from mtpkit.errors import MtpkitError

DEFAULT_DATA = ["builtin:prompts"]


@friendly_errors
def corpus(
    out: Annotated[Path, typer.Argument(help="The corpus file (.parquet) to create or extend.")],
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Prompt source (repeatable): a file, a hub dataset, builtin:prompts, builtin:gsm8k, builtin:gpteacher, or self:N (N prompts the base writes itself).")] = None,
    model: Annotated[str, typer.Option(help="Base model: alias, hub id, local directory or .gguf file.")] = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens of each response.")] = 256,
    batch_size: Annotated[Optional[int], typer.Option(help="Prompts generated together (default: measured best for the device).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub (off by default).")] = False,
) -> None:
    """Distill every prompt not yet in OUT and keep OUT up to date after every batch (resumable)."""
    from mtpkit.backbone import load_backbone
    from mtpkit.corpus import build_corpus, estimate_seconds

    if out.suffix != ".parquet":
        raise MtpkitError(f"the corpus is a Parquet file: name it *.parquet (got {out})")
    if out.exists() and not out.is_file():
        raise MtpkitError(f"{out} exists and is not a file")
    if max_new_tokens < 1:
        raise MtpkitError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if batch_size is not None and batch_size < 1:
        raise MtpkitError(f"--batch-size must be at least 1 (got {batch_size})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with console.status(f"loading {model}"):
        backbone = load_backbone(model, dtype=dtype, trust_remote_code=trust_remote_code)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with progress_display(*columns) as bar:
        task = bar.add_task("prompts", total=None, info="")

        def on_start(todo: int, already: int, prompts: list[list[int]], size: int) -> None:
            if todo:
                seconds = estimate_seconds(backbone, prompts, max_new_tokens, size)
                bar.console.print(f"{already} prompts already in {out}; {todo} to distill, expected about "
                                  f"{seconds / 60:.0f} min on this machine (measured on one batch)", highlight=False)
            bar.update(task, description="self-distilling", total=todo, completed=0)

        def on_batch(done: int, total: int, tokens: int) -> None:
            bar.update(task, completed=done, info=f"{tokens:,} tokens")

        report = build_corpus(backbone, data or DEFAULT_DATA, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              on_start=on_start, on_batch=on_batch,
                              on_prompts=lambda done, total: bar.update(task, description="writing prompts",
                                                                          completed=done, total=total))

    table = Table(title=f"mtpkit corpus: {out}", show_header=False)
    table.add_row("rows (prompts)", f"{report.rows:,}")
    table.add_row("response tokens", f"{report.response_tokens:,}")
    table.add_row("prompt tokens", f"{report.prompt_tokens:,}")
    for source, count in report.sources.items():
        table.add_row(f"from {source}", f"{count:,}")
    for line in report.notes:
        table.add_row("note", line)
    if report.generated_rows:
        table.add_row("this run", f"{report.generated_rows:,} prompts, {report.generated_tokens:,} tokens in "
                                  f"{report.seconds / 60:.1f} min ({report.tokens_per_second:.0f} tokens/s)")
    degenerate = report.degeneracy
    table.add_row("empty / looping responses", f"{degenerate['empty_rate']:.1%} / {degenerate['looping_rate']:.1%}")
    console.print(table)
    if report.warning:
        console.print(f"[yellow]warning:[/] {report.warning}", highlight=False)
