"""``mtpkit calibrate``: measure the acceptance prior a heads directory ships (``mtpkit.priors``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mtpkit.cli.common import console, friendly_errors, progress_display
from mtpkit.errors import MtpkitError


@friendly_errors
def calibrate(
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory (trained by finetune); the prior is written into it.")],
    prompts: Annotated[int, typer.Option(help="How many prompts to decode.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 128,
    data: Annotated[Optional[list[str]], typer.Option(help="Prompts the heads never trained on (as finetune's --data; never a benchmark set). Default: the held-out split of the heads' own training data.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all CPUs).")] = None,
) -> None:
    """Measure how often each draft source's proposals are accepted, per depth and confidence, by greedy hybrid
    decoding of prompts the heads never trained on; write it into HEADS_DIR (acceptance_prior.json), where every
    greedy decoder that chooses its tree per step starts from it."""
    import torch

    from mtpkit.checkpoint import open_heads
    from mtpkit.kernels import use_measured_kernels
    from mtpkit.priors import PRIOR_TRIALS, heldout_prompts, measure_prior, write_prior

    if prompts < 1 or max_new_tokens < 1:
        raise MtpkitError("--prompts and --max-new-tokens must be at least 1")
    if threads is not None:
        torch.set_num_threads(threads)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_display(*columns, transient=True) as bar:
        task = bar.add_task("loading the base model and heads", total=None)
        heads = open_heads(heads_dir)
        use_measured_kernels(heads.backbone, heads)
        bar.update(task, description="reading prompts")
        ids = heldout_prompts(heads, heads_dir, prompts, data)
        bar.update(task, description="calibrate: decoding", completed=0, total=len(ids))
        calibrator = measure_prior(heads, heads_dir, ids, max_new_tokens,
                                   lambda done, total: bar.update(task, completed=done, total=total))
    path = write_prior(heads_dir, calibrator)
    table = Table(title="mtpkit calibrate: accepted / tried, depth 1 (all bins)", show_header=True)
    for column in ("sources", "tried", "accepted", "rate"):
        table.add_column(column, justify="right" if column != "sources" else "left")
    state = calibrator.state_dict()
    for key in sorted(k for k in state["tried"] if k.endswith("@1")):
        tried, accepted = sum(state["tried"][key]), sum(state["accepted"][key])
        table.add_row(key[:-2], str(tried), str(accepted), f"{accepted / tried:.2f}" if tried else "-")
    console.print(table)
    console.print(f"wrote {path} ({len(ids)} prompts, {max_new_tokens} new tokens each; weighed as at most "
                  f"{PRIOR_TRIALS} trials per bin)", highlight=False)
