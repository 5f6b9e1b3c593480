"""What a finished run leaves for people: the training plot and the model card."""

from __future__ import annotations

from pathlib import Path

from mtpkit.files import atomic_write
from mtpkit.config import HeadsConfig
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
    """Held-out top-1 per head at each evaluation, against the training tokens seen by then."""
    return [{"step": r["step"], "tokens": r["tokens"], "head_top1": r["eval"]["head_top1"]}
            for r in history if "eval" in r and "tokens" in r]


def _curve_rows(curve: list[dict]) -> str:
    return "\n".join(f"| {p['tokens']:,} | {p['step']} | " + " | ".join(f"{a:.3f}" for a in p["head_top1"]) + " |"
                     for p in curve)


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

- style: {_shape(config)}, {"own output layers" if config.own_lm_head else "sharing the base's output layer"}
- LoRA on the base: {"yes (Medusa-2 style; the base's outputs change, adapter in `lora/`)" if config.lora else "no (the base is untouched)"}
- data: {", ".join(t.get("data", []))} ({t.get("train_sequences")} training sequences{", responses self-distilled from the base" if t.get("self_distill") else ""})
- training: {t.get("steps")} steps ({t.get("epochs")} epochs), lr {t.get("lr")}, batch {t.get("batch_size")} x {t.get("grad_accum")}, loss `{t.get("loss")}`{f' + feature regression x{t["feature_loss"]}' if t.get("feature_loss") else ''}{f', teacher forcing {t["teacher_forcing"]}' if t.get("teacher_forcing", 1.0) != 1.0 else ''}, head weights `{t.get("head_weights")}`
- wall time: {t.get("wall_seconds")} s; mtpkit {config.mtpkit_version}

## Held-out accuracy ({evaluation.get("examples", 0)} sequences)

| head | top-1 | top-5 |
|---|---|---|
{rows}

Expected tokens per step for a chain of all heads: {evaluation.get("expected_chain_tokens", "n/a")}
{_curve_section(t.get("learning_curve", []), config.num_heads)}
## Use

```bash
mtpkit generate <this directory> --prompt "Your prompt"
mtpkit bench <this directory> --prompts builtin
```

`metrics.jsonl` holds the training log and `training.png` its plot.
"""
