"""Rendering a bench report (the dict ``mtpkit.bench.run_bench`` returns) as files a user keeps."""

from __future__ import annotations

import json
from pathlib import Path

from mtpkit.checkpoint import atomic_write, atomic_write_text

COLUMNS = ("tokens/s (median)", "speed-up (geo-mean)", "speed-up (median)", "accepted tokens/step",
           "predicted", "identical vs hf-greedy", "identical vs greedy", "peak MB")


def method_rows(report: dict) -> list[tuple[str, ...]]:
    """One row of strings per method, in COLUMNS order (shared by the Rich table and Markdown)."""
    rows = []
    for method, m in report["methods"].items():
        predicted = report.get("predicted_mean_accepted_tokens", {}).get(method)
        vs_greedy = m.get("identical_rate_vs_greedy")
        rows.append((method, f"{m['tokens_per_s']:.1f}", f"{m['speedup']:.2f}x", f"{m['speedup_median']:.2f}x",
                     f"{m['mean_accepted_tokens']:.2f}", "-" if predicted is None else f"{predicted:.2f}",
                     f"{100 * m['identical_rate']:.0f}%", "-" if vs_greedy is None else f"{100 * vs_greedy:.0f}%",
                     f"{m.get('peak_memory_mb', 0):.0f}"))
    return rows


def category_rows(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for category, methods in report.get("by_category", {}).items():
        for method, m in methods.items():
            if method == "hf-greedy":
                continue
            rows.append((category, method, f"{m['speedup']:.2f}x", f"{m['mean_accepted_tokens']:.2f}",
                         f"{100 * m['identical_rate']:.0f}%"))
    return rows


def setup_line(report: dict) -> str:
    s = report["setup"]
    return (f"{s['cpu']} ({s['cpu_count']} CPUs, {s['torch_threads']} torch threads{', ' + s['gpu'] if s.get('gpu') else ''}), "
            f"torch {s['torch']}, transformers {s['transformers']}, mtpkit {s['mtpkit']}; {s['base_model']} "
            f"{s['dtype']}, {s['style']} x{s['num_heads']} heads, {s['num_prompts']} prompts from {s['prompts']}, "
            f"{s['max_new_tokens']} new tokens, greedy, batch 1")


def to_markdown(report: dict, command: str = "") -> str:
    lines = ["# mtpkit bench", "", f"Setup: {setup_line(report)}.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in method_rows(report)]
    rows = category_rows(report)
    if rows:
        lines += ["", "## By category", "", "| category | method | speed-up | accepted tokens/step | identical |",
                  "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    differences = report.get("first_difference_vs_hf_greedy", {})
    if differences:
        lines += ["", "## Output differences", ""]
        lines += [f"- `{method}` first differs from hf-greedy on prompt `{pid}`" for method, pid in differences.items()]
    return "\n".join(lines) + "\n"


def write_json(report: dict, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_markdown(report: dict, path: Path, command: str = "") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), to_markdown(report, command))


def write_plot(report: dict, path: Path) -> None:
    """Speed-up over hf-greedy by category, and the distribution of accepted lengths per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in report["methods"] if m != "hf-greedy"]
    groups = report.get("by_category") or {"all": report["methods"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(groups))]
        left.bar(xs, [groups[c][method]["speedup"] for c in groups], width, label=method)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(groups))], list(groups), rotation=30)
    left.set_ylabel("speed-up over hf-greedy (geo-mean)")
    left.set_title("Speed-up by category")
    left.legend(fontsize=8)
    for method in methods:
        lengths = [n for row in report["prompts"] for n in row["methods"][method]["accepted_lengths"]]
        if lengths:
            top = max(lengths)
            right.hist(lengths, bins=range(1, top + 2), alpha=0.5, label=method, align="left", density=True)
    right.set_xlabel("tokens committed per verification step")
    right.set_ylabel("fraction of steps")
    right.set_title("Accepted lengths")
    right.legend(fontsize=8)
    fig.suptitle(setup_line(report)[:160], fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
