"""``mtpkit bench``: self-speculative decoding vs plain greedy and transformers' modes, side by side."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mtpkit.bench_methods import DEFAULT_METHODS, methods_help
from mtpkit.cli.common import console, friendly_errors, progress_display

METHODS_PER_TABLE = 4  # with their intervals, four method columns and the labels fit 80 columns


@friendly_errors
def bench(
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory (from attach or finetune).")],
    prompts: Annotated[str, typer.Option(help="'builtin' (the 96 held-out built-in prompts: a development set, several design choices were tuned on them), 'mt-bench' (MT-Bench's 80 first turns) or a .jsonl/.jsonl.gz/.txt file.")] = "builtin",
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts (categories interleaved).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 128,
    methods: Annotated[str, typer.Option(help=methods_help())] = ",".join(DEFAULT_METHODS),
    repeats: Annotated[int, typer.Option(help="Rounds over the prompts: each (prompt, method) is timed this often, the method order rotating per prompt and round; its median time counts.")] = 1,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="After the timed rounds, measure each method's peak memory above the model on the longest prompt.")] = True,
    tree: Annotated[str, typer.Option(help="The heads' tree for mtp-tree and mtp-hybrid: auto, chain or a JSON file of choices.")] = "auto",
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap prompts in the chat template.")] = True,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all CPUs).")] = None,
    pld_tokens: Annotated[int, typer.Option(help="Draft length of hf-pld (transformers' prompt_lookup_num_tokens).")] = 10,
    fast_kernels: Annotated[bool, typer.Option("--fast-kernels/--stock-kernels", help="mtpkit's methods on the kernel layouts measured fastest on whole forwards (float32 on a CPU; measured once, then cached).")] = True,
    model: Annotated[Optional[str], typer.Option(help="Override the base model named in the heads config.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (outside float32 the identical-output rate is measured, not promised).")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the base's own code from the hub (also on when the heads config records it).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON.")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write the summary as Markdown.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: speed-up by category, accepted lengths.")] = None,
) -> None:
    """Measure self-speculative decoding against plain greedy decoding on the same prompts, in one run."""
    from mtpkit.bench import BenchSettings, run_bench
    from mtpkit.report import check_output_paths, write_json, write_markdown, write_plot

    # everything cheap is checked before the model loads
    settings = BenchSettings(prompts=prompts, limit=limit, max_new_tokens=max_new_tokens,
                             methods=tuple(m.strip() for m in methods.split(",") if m.strip()), tree=tree,
                             chat=chat, threads=threads, pld_tokens=pld_tokens, repeats=repeats, memory=memory,
                             fast_kernels=fast_kernels,
                             device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    check_output_paths({"--json": json_path, "--markdown": markdown, "--plot": plot})
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_display(*columns, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=f"bench {label}", completed=done, total=total)

        report = run_bench(heads_dir, settings, model=model, progress=progress)

    for table in summary_tables(report):
        console.print(table)
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


def summary_tables(report: dict) -> list[Table]:
    """The report for a terminal: a figure per row (its 95% interval on the row below) and a method per column,
    so it fits 80 columns."""
    from mtpkit.report import CATEGORY_FIGURES, FIGURES, NO_GAIN_NOTE, category_rows, method_rows, setup_line

    rows = method_rows(report)
    # at most METHODS_PER_TABLE method columns fit 80 columns: more methods make more tables, evenly filled
    count = -(-len(rows) // METHODS_PER_TABLE)
    size = -(-len(rows) // count)
    tables = []
    for start in range(0, len(rows), size):
        last = start + size >= len(rows)
        caption = (f"{setup_line(report)}. Medians over prompts; 95%: bootstrap interval. vs greedy: speculation "
                   "gain over mtpkit's plain greedy on the kernels measured fastest here; vs hf-greedy: speed-up "
                   f"over transformers' greedy. {NO_GAIN_NOTE}")
        table = Table(title="mtpkit bench" if not start else None, caption=caption if last else None,
                      caption_justify="left", box=box.SIMPLE_HEAD)
        table.add_column("", no_wrap=True)
        chunk = rows[start:start + size]
        for method, _ in chunk:
            table.add_column(method, justify="right", no_wrap=True)
        for index, (_, short, _) in enumerate(FIGURES):
            table.add_row(short, *(cells[index][0] for _, cells in chunk))
            if any(cells[index][1] for _, cells in chunk):
                table.add_row("  95%", *(cells[index][1] for _, cells in chunk))
        tables.append(table)
    by_category = category_rows(report)
    if by_category:
        table = Table(title="by category (medians)", box=box.SIMPLE_HEAD)
        for column in ("category", "method", *(short for _, short in CATEGORY_FIGURES)):
            table.add_column(column, justify="left" if column in ("category", "method") else "right")
        for row in by_category:
            table.add_row(*row)
        tables.append(table)
    return tables
