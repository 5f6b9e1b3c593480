"""What a finished run leaves for people: the training plot and the model card."""

from __future__ import annotations

from pathlib import Path

from mtpkit.config import HeadsConfig
from mtpkit.errors import MtpkitError
from mtpkit.files import atomic_write, atomic_write_text
from mtpkit.heads import style_of

PLOT_NAME = "training.png"


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Training loss against the step, and per-head held-out top-1 accuracy against the training tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval" in r]
    if not train:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="weighted head loss", title="training loss")
    by_tokens = bool(evals) and all("tokens" in r for r in evals)
    if evals:
        where = [r["tokens"] if by_tokens else r["step"] for r in evals]
        for k in range(len(evals[0]["eval"]["head_top1"])):
            right.plot(where, [r["eval"]["head_top1"][k] for r in evals], marker="o", label=f"head {k + 1}")
        right.legend()
    right.set(xlabel="training tokens seen" if by_tokens else "step", ylabel="held-out top-1 accuracy",
              title="learning curve", ylim=(0, 1))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def learning_curve(history: list[dict]) -> list[dict]:
    """Held-out top-1 per head (and the tokens a chain of them accepts) at each evaluation, against the training
    tokens seen by then."""
    return [{"step": r["step"], "tokens": r["tokens"], "head_top1": r["eval"]["head_top1"],
             **({"chain_accepted": r["eval"]["chain_accepted"]} if "chain_accepted" in r["eval"] else {})}
            for r in history if "eval" in r and "tokens" in r]


def compare_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """Several runs' learning curves in one PNG: a panel per depth (head k), held-out top-1 against the training
    tokens seen, a line per run (``curves``: run name -> ``learning_curve`` records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    depths = max((len(p["head_top1"]) for curve in curves.values() for p in curve), default=0)
    if not depths:
        raise MtpkitError("no learning curve to draw: the runs recorded no held-out evaluation")
    fig, axes = plt.subplots(1, depths, figsize=(3.2 * depths, 3.4), sharey=True, squeeze=False)
    for k, axis in enumerate(axes[0]):
        for name, curve in curves.items():
            points = [p for p in curve if len(p["head_top1"]) > k]
            axis.plot([p["tokens"] for p in points], [p["head_top1"][k] for p in points], marker="o", label=name)
        axis.set(title=f"depth {k + 1}", xlabel="training tokens seen", ylim=(0, 1))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        axis.locator_params(axis="x", nbins=4)
    axes[0][0].set(ylabel="held-out top-1")
    axes[0][0].legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def curves_table(curves: dict[str, list[dict]]) -> str:
    """The same curves as one Markdown table: a row per (run, evaluation), with the tokens per step a greedy chain
    of the heads accepts where the run recorded it."""
    depths = max((len(p["head_top1"]) for curve in curves.values() for p in curve), default=0)
    chain = any("chain_accepted" in p for curve in curves.values() for p in curve)  # recorded since 2026-11-30
    header = "| run | training tokens | " + " | ".join(f"depth {k} top-1" for k in range(1, depths + 1)) + " |" + \
        (" chain accepts |" if chain else "")
    rows = [f"| {name} | {p['tokens']:,} | " + " | ".join(f"{a:.3f}" for a in p["head_top1"]) + " |" +
            (f" {p['chain_accepted']:.3f} |" if "chain_accepted" in p else " n/a |" if chain else "")
            for name, curve in curves.items() for p in curve]
    return "\n".join([header, "|---|---|" + "---|" * (depths + chain), *rows]) + "\n"


def main(heads_dirs: list[Path], png: Path, markdown: Path | None = None) -> None:
    """``python -m mtpkit.train.card HEADS_DIR... --png F [--markdown F]``: the runs' learning curves side by side,
    each run named by its style."""
    curves = {}
    for heads_dir in heads_dirs:
        config = HeadsConfig.read(heads_dir)
        curves[f"{config.style} ({Path(heads_dir).name})"] = config.training.get("learning_curve", [])
    compare_curves(curves, png)
    if markdown is not None:
        atomic_write_text(markdown, curves_table(curves))


def _curve_rows(curve: list[dict]) -> str:
    return "\n".join(f"| {p['tokens']:,} | {p['step']} | " + " | ".join(f"{a:.3f}" for a in p["head_top1"]) + " |"
                     for p in curve)


def _output_layer(config: HeadsConfig) -> str:
    if style_of(config.style).own_vocabulary:
        return ""  # its description names its own output layer
    return ", own output layers" if config.own_lm_head else ", sharing the base's output layer"


def _shape(config: HeadsConfig) -> str:
    return style_of(config.style).describe(config)


def _curve_section(curve: list[dict], num_heads: int) -> str:
    if not curve:
        return ""
    heads = " | ".join(f"head {k} top-1" for k in range(1, num_heads + 1))
    return f"""
## Learning curve (held-out top-1 against the training tokens seen, in this run)

| tokens | step | {heads} |
|---|---|{"---|" * num_heads}
{_curve_rows(curve)}
"""


def model_card(config: HeadsConfig) -> str:
    t = config.training
    evaluation = t.get("eval", {})
    rows = "\n".join(f"| {k} | {a:.3f} | {b:.3f} |" for k, (a, b) in
                     enumerate(zip(evaluation.get("head_top1", []), evaluation.get("head_top5", [])), start=1))
    return f"""---
library_name: mtpkit
base_model: {config.base_model}
tags: [mtpkit, speculative-decoding, medusa, multi-token-prediction]
---

# {config.num_heads} {config.style} draft heads for {config.base_model}

Multi-token-prediction draft heads trained with mtpkit on the frozen base
`{config.base_model}` (architecture `{config.base_architecture}`, fingerprint `{config.base_fingerprint}`).
Head k predicts the token k + 1 positions ahead; the base verifies every draft, so greedy output
is identical to the base's own.

- style: {_shape(config)}{_output_layer(config)}
- LoRA on the base: {"yes (Medusa-2 style; the base's outputs change, adapter in `lora/`)" if config.lora else "no (the base is untouched)"}
- data: {", ".join(t.get("data", []))} ({t.get("train_sequences")} training sequences{", responses self-distilled from the base" if t.get("self_distill") else ""})
- training: {t.get("steps")} steps ({t.get("epochs")} epochs), lr {t.get("lr")}, batch {t.get("batch_size")} x {t.get("grad_accum")}, loss `{t.get("loss")}`{f' + feature regression x{t["feature_loss"]}' if t.get("feature_loss") else ''}{f', teacher forcing {t["teacher_forcing"]}' if t.get("teacher_forcing", 1.0) != 1.0 else ''}, head weights `{t.get("head_weights")}`
- wall time: {t.get("wall_seconds")} s; mtpkit {config.mtpkit_version}

## Held-out accuracy ({evaluation.get("examples", 0)} sequences)

| head | top-1 | top-5 |
|---|---|---|
{rows}

Tokens per step a greedy chain of all heads accepts on them: {evaluation.get("chain_accepted", "n/a")} (the heads'
top-1 multiplied as if independent: {evaluation.get("expected_chain_tokens", "n/a")})
{_curve_section(t.get("learning_curve", []), config.num_heads)}
## Use

```bash
mtpkit generate <this directory> --prompt "Your prompt"
mtpkit bench <this directory> --prompts builtin
```

`metrics.jsonl` holds the training log and `training.png` its plot.
"""


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mtpkit.train.card", description=main.__doc__)
    parser.add_argument("heads_dirs", nargs="+", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    arguments = parser.parse_args()
    try:
        main(arguments.heads_dirs, arguments.png, arguments.markdown)
    except MtpkitError as error:
        raise SystemExit(f"error: {error}") from None
