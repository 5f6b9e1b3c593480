"""``mtpkit bench``: self-speculative decoding vs plain greedy and transformers' modes, side by side."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mtpkit.cli.common import console, friendly_errors

DEFAULT_METHODS = "hf-greedy,greedy,hf-pld,mtp-chain,mtp-tree"


@friendly_errors
def bench(
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory (from attach or finetune).")],
    prompts: Annotated[str, typer.Option(help="'builtin' (held-out built-in prompts) or a .jsonl/.jsonl.gz/.txt file.")] = "builtin",
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts (categories interleaved).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 128,
    methods: Annotated[str, typer.Option(help=f"Comma-separated methods among {DEFAULT_METHODS}.")] = DEFAULT_METHODS,
    tree: Annotated[str, typer.Option(help="Tree for mtp-tree: auto, chain or a JSON file of choices.")] = "auto",
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap prompts in the chat template.")] = True,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all CPUs).")] = None,
    fast_kernels: Annotated[bool, typer.Option("--fast-kernels/--stock-kernels", help="mtpkit's methods on mtpkit's small-row kernels.")] = True,
    model: Annotated[Optional[str], typer.Option(help="Override the base model named in the heads config.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON.")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write the summary as Markdown.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: speed-up by category, accepted lengths.")] = None,
) -> None:
    """Measure self-speculative decoding against plain greedy decoding on the same prompts, in one run."""
    from mtpkit.bench import BenchSettings, run_bench
    from mtpkit.report import category_rows, method_rows, setup_line, write_json, write_markdown, write_plot
    from mtpkit.report import COLUMNS

    if max_new_tokens < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--max-new-tokens")
    settings = BenchSettings(prompts=prompts, limit=limit, max_new_tokens=max_new_tokens,
                             methods=tuple(m.strip() for m in methods.split(",") if m.strip()), tree=tree,
                             chat=chat, threads=threads, fast_kernels=fast_kernels)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=f"bench {label}", completed=done, total=total)

        report = run_bench(heads_dir, settings, model=model, progress=progress)

    table = Table(title="mtpkit bench", caption=setup_line(report), caption_justify="left")
    for column in ("method", *COLUMNS):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in method_rows(report):
        table.add_row(*row)
    console.print(table)
    rows = category_rows(report)
    if rows:
        by_category = Table(title="by category")
        for column in ("category", "method", "speed-up", "accepted tokens/step", "identical"):
            by_category.add_column(column)
        for row in rows:
            by_category.add_row(*row)
        console.print(by_category)
    for method, prompt_id in report["first_difference_vs_hf_greedy"].items():
        console.print(f"[yellow]warning:[/] {method} output differs from hf-greedy, first on prompt {prompt_id}")
    command = "mtpkit " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("mtpkit") else ""
    if json_path:
        write_json(report, json_path)
    if markdown:
        write_markdown(report, markdown, command)
    if plot:
        write_plot(report, plot)
    for path in (json_path, markdown, plot):
        if path:
            console.print(f"wrote {path}")
