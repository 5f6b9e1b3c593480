"""``mtpkit finetune``: train the draft heads of a heads directory (the base stays frozen)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mtpkit.cli.common import console, fail, friendly_errors
from mtpkit.errors import MtpkitError

# the options a recipe may set: every option of this command except --recipe itself
RECIPE_KEYS = ("data", "epochs", "max_steps", "lr", "batch_size", "grad_accum", "max_length", "max_examples",
               "eval_fraction", "eval_every", "save_every", "head_weights", "loss", "train_vocab", "self_distill",
               "distill_max_new_tokens", "feature_loss", "lora", "mixed_precision", "dtype", "resume", "seed")


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
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
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


@friendly_errors
def finetune(
    ctx: typer.Context,
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory written by `mtpkit attach`; rewritten with the trained heads.")],
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Training data (repeatable): .jsonl/.json/.parquet/.csv/.txt file, hub dataset name, or builtin:prompts.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML file of these options; options given on the command line win.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 2,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup then cosine decay).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch (per process).")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_length: Annotated[int, typer.Option(help="Longest training sequence in tokens (longer ones are cut).")] = 512,
    max_examples: Annotated[Optional[int], typer.Option(help="Use at most this many records (a seeded random subset).")] = None,
    eval_fraction: Annotated[float, typer.Option(help="Fraction of the records held out for evaluation.")] = 0.1,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0: only at the end).")] = 50,
    save_every: Annotated[int, typer.Option(help="Write a resumable checkpoint every N steps (0: only on Ctrl-C).")] = 50,
    head_weights: Annotated[str, typer.Option(help="Per-head loss weights: uniform, linear, exponential (0.8^k), primary-aux, or K numbers like 1,0.5,0.3.")] = "exponential",
    loss: Annotated[str, typer.Option(help="distill (KL to the base's own distribution at the target position, Hydra's teacher loss) or ce (cross-entropy on the data's tokens).")] = "distill",
    train_vocab: Annotated[str, typer.Option(help="data (softmax over the tokens that occur in the training data: several times faster on a CPU) or full.")] = "data",
    self_distill: Annotated[Optional[bool], typer.Option("--self-distill/--no-self-distill", help="Let the base write the responses itself (default: on for prompt-only data).")] = None,
    distill_max_new_tokens: Annotated[int, typer.Option(help="Longest self-distilled response in tokens.")] = 128,
    feature_loss: Annotated[float, typer.Option(help="Weight of the feature-regression term (EAGLE): each head's state is pulled towards the base's hidden state at its target position (0: off).")] = 0.0,
    lora: Annotated[bool, typer.Option("--lora", help="Also train a LoRA adapter on the base (Medusa-2); changes the base's outputs.")] = False,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (passed to accelerate).")] = "no",
    dtype: Annotated[str, typer.Option(help="dtype of the frozen base: float32, bfloat16 or float16 (not float32 needs --mixed-precision).")] = "float32",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in HEADS_DIR/checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the data split and order.")] = 0,
) -> None:
    """Train the draft heads of HEADS_DIR on a frozen base model.

    Multi-GPU or multi-node: accelerate launch -m mtpkit finetune HEADS_DIR ...
    """
    arguments = dict(locals())
    given = {key: arguments[key] for key in RECIPE_KEYS}
    from mtpkit.train import Callbacks, FinetuneOptions, TrainingInterrupted
    from mtpkit.train import finetune as run_finetune

    settings = merge_recipe(ctx, given, read_recipe(recipe)) if recipe else given
    settings["data"] = list(settings["data"] or [])
    if not settings["data"]:
        raise MtpkitError("no training data: pass --data (a file, a hub dataset or builtin:prompts) or a --recipe")
    if settings["lora"]:
        console.print("[yellow]warning:[/] --lora tunes the base itself: its outputs change, so these heads need "
                      "the adapter saved with them, and hidden states cannot be cached (slower)", highlight=False)
    options = FinetuneOptions(**settings)
    bar = RichProgress()
    try:
        with bar.progress:
            result = run_finetune(heads_dir, options, callbacks=Callbacks(progress=bar.update, message=bar.message))
    except TrainingInterrupted as exc:
        fail(str(exc), code=130)
    render(result)


def render(result) -> None:
    config = result.config
    summary = Table(title=f"mtpkit finetune: {config.style} x{config.num_heads} on {config.base_model}", show_header=False)
    shapes = ", ".join(f"{n} {shape}" for shape, n in sorted(result.dataset.shapes.items()))
    summary.add_row("data", f"{', '.join(config.training['data'])} ({shapes})")
    summary.add_row("sequences", f"{result.train_sequences} train, {result.eval_sequences} held out")
    if result.distill is not None:
        summary.add_row("self-distillation", f"{result.distill.generated} generated, {result.distill.cached} from cache")
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
        table.caption = f"expected tokens per step for a chain of {len(result.eval['head_top1'])} heads: " \
                        f"{result.eval['expected_chain_tokens']:.2f}"
        console.print(table)
