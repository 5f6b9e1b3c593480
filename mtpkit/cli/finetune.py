"""``mtpkit finetune``: train the draft heads of a heads directory (the base stays frozen).

Its options are the fields of ``mtpkit.train.options.FinetuneOptions``: the signature below, the recipe keys
and the ``--help`` text are all derived from that one declaration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mtpkit.cli.common import console, fail, friendly_errors, progress_display
from mtpkit.errors import MtpkitError
from mtpkit.train.options import RECIPE_KEYS, FinetuneOptions


def read_recipe(path: Path) -> dict[str, Any]:
    """A recipe's settings, keys spelled like the options (``max-steps`` or ``max_steps``)."""
    import yaml

    if not path.is_file():
        raise MtpkitError(f"--recipe {path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MtpkitError(f"--recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise MtpkitError(f"--recipe {path} must be a mapping of finetune options")
    recipe = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise MtpkitError(f"--recipe {path}: unknown option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(RECIPE_KEYS)}")
    if isinstance(recipe.get("data"), str):
        recipe["data"] = [recipe["data"]]
    return recipe


def merge_recipe(ctx: typer.Context, given: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """Recipe values fill the options not given on the command line."""
    merged = dict(given)
    for key, value in recipe.items():
        source = ctx.get_parameter_source(key)  # compared by name: typer may bring its own click
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = value
    return merged


class RichProgress:
    """A Rich progress bar per stage (self-distilling, caching hidden states, training) on stderr."""

    def __init__(self):
        self.progress = progress_display(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        self.tasks: dict[str, int] = {}

    def update(self, stage: str, done: int, total: int, info: dict) -> None:
        if stage == "evaluating":
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, info="")
        text = f"loss {info['loss']:.4f}" if "loss" in info else ""
        self.progress.update(self.tasks[stage], completed=done, total=total, info=text)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)


def _option_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per ``FinetuneOptions`` field: its type, default, flag spelling and help."""
    hints = typing.get_type_hints(FinetuneOptions)
    parameters = []
    for option in dataclasses.fields(FinetuneOptions):
        kind, default = hints[option.name], option.default
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None, as typer spells it
            kind = Optional[next(arg for arg in typing.get_args(kind) if arg is not type(None))]
        if option.name == "data":  # no default on the command line: --data or a --recipe names the data
            kind, default = Optional[kind], None
        flags = [option.metadata["flag"]] if option.metadata["flag"] else []
        annotation = Annotated[kind, typer.Option(*flags, help=option.metadata["help"])]
        parameters.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    return parameters


@friendly_errors
def finetune(
    ctx: typer.Context,
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory written by `mtpkit attach`; rewritten with the trained heads.")],
    recipe: Annotated[Optional[Path], typer.Option(help="YAML file of these options; options given on the command line win.")] = None,
    **given: Any,
) -> None:
    """Train the draft heads of HEADS_DIR on a frozen base model.

    Several processes (GPUs, nodes, or CPU processes), each training on its share of the data:
    accelerate launch -m mtpkit finetune HEADS_DIR ...  or  torchrun --nproc_per_node N -m mtpkit finetune HEADS_DIR ...
    """
    from mtpkit.train import Callbacks, TrainingInterrupted, is_main_process
    from mtpkit.train import finetune as run_finetune

    settings = merge_recipe(ctx, given, read_recipe(recipe)) if recipe else dict(given)
    settings["data"] = list(settings["data"] or [])
    if not settings["data"]:
        raise MtpkitError("no training data: pass --data (a file, a hub dataset or builtin:prompts) or a --recipe")
    options = FinetuneOptions(**settings)  # validates: a bad number is one line, before any process group or model
    reporting = is_main_process()  # in a multi-process run, only the main process prints
    if options.lora and reporting:
        console.print("[yellow]warning:[/] --lora tunes the base itself: its outputs change, so these heads need "
                      "the adapter saved with them, and hidden states cannot be cached (slower)", highlight=False)
    bar = RichProgress()
    try:
        with bar.progress if reporting else contextlib.nullcontext():
            result = run_finetune(heads_dir, options, callbacks=Callbacks(progress=bar.update, message=bar.message))
    except TrainingInterrupted as exc:
        fail(str(exc), code=130)
    if result.main_process:
        render(result)


_fixed = list(inspect.signature(finetune, eval_str=True).parameters.values())[:3]  # ctx, heads_dir, --recipe
finetune.__signature__ = inspect.Signature(_fixed + _option_parameters())


def render(result) -> None:
    config = result.config
    summary = Table(title=f"mtpkit finetune: {config.style} x{config.num_heads} on {config.base_model}", show_header=False)
    shapes = ", ".join(f"{n:,} {shape} records" for shape, n in sorted(result.dataset.shapes.items()))
    summary.add_row("data", f"{', '.join(config.training['data'])} ({shapes})")
    summary.add_row("sequences", f"{result.train_sequences} train, {result.eval_sequences} held out")
    if result.distill is not None:
        summary.add_row("self-distillation", f"{result.distill.generated} generated, {result.distill.cached} from cache")
    hidden = config.training.get("hidden_states") or {}
    if hidden.get("from_generation"):
        summary.add_row("hidden states", f"{hidden['from_generation']} kept from generation, "
                                         f"{hidden['computed']} computed")
    summary.add_row("steps", f"{result.steps} ({result.epochs} epochs)")
    timings = ", ".join(f"{name[:-2]} {seconds:.0f}s" for name, seconds in result.timings.items())
    summary.add_row("wall time", timings)
    if result.peak_step_rss_mb is not None:
        summary.add_row("peak RSS in a step", f"{result.peak_step_rss_mb:,.0f} MiB")
    if result.peak_step_gpu_mb is not None:
        summary.add_row("peak GPU memory", f"{result.peak_step_gpu_mb:,.0f} MiB")
    summary.add_row("heads", str(result.heads_dir))
    console.print(summary)
    if result.eval:
        table = Table(title=f"held-out accuracy ({result.eval['examples']} sequences, {result.eval['tokens']} targets)")
        for column in ("head", "top-1", "top-5", "top-10", "loss"):
            table.add_column(column, justify="right")
        for k, (top1, top5, topk, head_loss) in enumerate(zip(result.eval["head_top1"], result.eval["head_top5"],
                                                              result.eval["head_topk_accuracy"], result.eval["head_loss"]), 1):
            table.add_row(str(k), f"{top1:.3f}", f"{top5:.3f}", f"{topk[-1]:.3f}", f"{head_loss:.3f}")
        table.caption = f"tokens per step a greedy chain of {len(result.eval['head_top1'])} heads accepts: " \
                        f"{result.eval['chain_accepted']:.2f}"
        console.print(table)
