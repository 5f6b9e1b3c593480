"""Rendering a bench report (the dict ``mtpkit.bench.run_bench`` returns) as files a user keeps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mtpkit.checkpoint import atomic_write, atomic_write_text
from mtpkit.errors import MtpkitError

# (long header for Markdown, short header for an 80-column terminal); same order as method_rows' figures
FIGURES = (("tokens/s (median)", "tokens/s"),
           ("speed-up over hf-greedy (geo-mean)", "vs hf-greedy (geo)"),
           ("speed-up over hf-greedy (median)", "vs hf-greedy (med)"),
           ("speculation gain over greedy (geo-mean)", "vs greedy (geo)"),
           ("speculation gain over greedy (median)", "vs greedy (med)"),
           ("accepted tokens/step", "accepted/step"),
           ("predicted", "predicted"),
           ("identical vs hf-greedy", "same as hf-greedy"),
           ("identical vs greedy", "same as greedy"),
           ("drafting ms/step (median)", "draft ms/step"),
           ("peak MB", "peak MB"))
COLUMNS = tuple(long for long, _ in FIGURES)
CATEGORY_FIGURES = (("speed-up over hf-greedy", "vs hf-greedy"), ("speculation gain over greedy", "vs greedy"),
                    ("accepted tokens/step", "accepted"), ("identical vs hf-greedy", "same"))
CATEGORY_COLUMNS = tuple(long for long, _ in CATEGORY_FIGURES)


def _times(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f}%"


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def method_rows(report: dict) -> list[tuple[str, ...]]:
    """One row of strings per method: its name, then its figures in FIGURES order (Rich and Markdown share it)."""
    rows = []
    for method, m in report["methods"].items():
        predicted = report.get("predicted_mean_accepted_tokens", {}).get(method)
        rows.append((method, f"{m['tokens_per_s']:.1f}", _times(m["speedup"]), _times(m["speedup_median"]),
                     _times(m.get("speculation_gain")), _times(m.get("speculation_gain_median")),
                     f"{m['mean_accepted_tokens']:.2f}", "-" if predicted is None else f"{predicted:.2f}",
                     _percent(m["identical_rate"]), _percent(m.get("identical_rate_vs_greedy")),
                     _milliseconds(m.get("draft_seconds_per_step")), f"{m.get('peak_memory_mb', 0):.0f}"))
    return rows


def category_rows(report: dict) -> list[tuple[str, ...]]:
    """(category, method, then CATEGORY_FIGURES) for every method but hf-greedy, whose speed-up is 1 by definition."""
    rows = []
    for category, methods in report.get("by_category", {}).items():
        for method, m in methods.items():
            if method == "hf-greedy":
                continue
            rows.append((category, method, _times(m["speedup"]), _times(m.get("speculation_gain")),
                         f"{m['mean_accepted_tokens']:.2f}", _percent(m["identical_rate"])))
    return rows


def check_output_paths(paths: dict[str, Path | None]) -> None:
    """Refuse, in one line, an output path (``{"--json": path}``) that cannot be written: before a long run."""
    for option, path in paths.items():
        if path is None:
            continue
        path = Path(path).expanduser()
        if path.is_dir():
            raise MtpkitError(f"{option} {path} is a directory: give a file name")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:  # the directory is created at write time
            folder = folder.parent
        if not folder.is_dir():
            raise MtpkitError(f"{option} {path}: cannot create its directory, {folder} is a file")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise MtpkitError(f"{option} {path}: permission denied to write in {folder}")


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
    lines += ["Speed-up is over transformers' greedy `generate` (hf-greedy); speculation gain is over mtpkit's "
              "own greedy loop on the same kernels (greedy). Both are per-prompt tokens/s ratios (geometric mean "
              "and median); per prompt and for the geometric means, a method's speed-up = greedy's speed-up x "
              "its speculation gain.", ""]
    lines += ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in method_rows(report)]
    rows = category_rows(report)
    if rows:
        lines += ["", "## By category", "", "| category | method | " + " | ".join(CATEGORY_COLUMNS) + " |",
                  "|---" * (len(CATEGORY_COLUMNS) + 2) + "|"]
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
