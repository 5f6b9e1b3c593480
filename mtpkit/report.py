"""Rendering a bench report (the dict ``mtpkit.bench.run_bench`` returns) as files a user keeps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mtpkit.files import atomic_write, atomic_write_text
from mtpkit.errors import MtpkitError

# (long header for Markdown, short header for an 80-column terminal, key in a method's summary); medians over prompts,
# each with its 95% bootstrap interval where the summary has one (``<key>_interval``)
FIGURES = (("tokens/s (median)", "tokens/s", "tokens_per_s"),
           ("speculation gain over greedy", "vs greedy", "speculation_gain_median"),
           ("speed-up over hf-greedy", "vs hf-greedy", "speedup_median"),
           ("accepted tokens/step", "accepted/step", "accepted_median"),
           ("identical vs greedy", "same as greedy", "identical_rate_vs_greedy"),
           ("identical vs hf-greedy", "same as hf-greedy", "identical_rate"),
           ("drafting ms/step (median)", "draft ms/step", "draft_seconds_per_step"),
           ("peak MB above the model", "peak +MB", "peak_memory_mb"))
INTERVALS = {"speculation_gain_median": "speculation_gain_interval", "speedup_median": "speedup_interval",
             "accepted_median": "accepted_interval"}
COLUMNS = tuple(long for long, _, _ in FIGURES)
CATEGORY_FIGURES = (("speculation gain over greedy (median)", "vs greedy"),
                    ("speed-up over hf-greedy (median)", "vs hf-greedy"),
                    ("accepted tokens/step (median)", "accepted"), ("identical vs greedy", "same"))
CATEGORY_COLUMNS = tuple(long for long, _ in CATEGORY_FIGURES)
NO_GAIN_MARK = "\u2020"  # a gain whose 95% interval includes 1.00x
NO_GAIN_NOTE = f"{NO_GAIN_MARK}: the 95% interval includes 1.00x, so no gain is measured"


def _times(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f}%"


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _interval(bounds, ratio: bool) -> str:
    if not bounds or any(b is None or not math.isfinite(b) for b in bounds):
        return "-"
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}" + ("x" if ratio else "")


def includes_one(summary: dict, key: str = "speculation_gain_interval") -> bool:
    bounds = summary.get(key)
    return bool(bounds) and bounds[0] <= 1.0 <= bounds[1]


def _figure(method: str, summary: dict, key: str) -> str:
    value = summary.get(key)
    if key == "tokens_per_s":
        return f"{value:.1f}"
    if key in ("speculation_gain_median", "speedup_median"):
        marked = key == "speculation_gain_median" and method != "greedy" and includes_one(summary)
        return _times(value) + (NO_GAIN_MARK if marked else "")
    if key == "accepted_median":
        return f"{value:.2f}"
    if key.startswith("identical"):
        return _percent(value)
    if key == "draft_seconds_per_step":
        return _milliseconds(value)
    return "-" if value is None else f"{value:.0f}"


def method_rows(report: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """Per method: its name and, in FIGURES order, (figure, its interval or "") as strings; Rich and Markdown
    share them."""
    rows = []
    for method, summary in report["methods"].items():
        cells = []
        for _, _, key in FIGURES:
            interval = INTERVALS.get(key)
            cells.append((_figure(method, summary, key),
                          _interval(summary.get(interval), key != "accepted_median") if interval else ""))
        rows.append((method, cells))
    return rows


def category_rows(report: dict) -> list[tuple[str, ...]]:
    """(category, method, then CATEGORY_FIGURES) for every method but hf-greedy, whose speed-up is 1 by definition."""
    rows = []
    for category, methods in report.get("by_category", {}).items():
        for method, m in methods.items():
            if method == "hf-greedy":
                continue
            rows.append((category, method, _times(m.get("speculation_gain_median")), _times(m["speedup_median"]),
                         f"{m['accepted_median']:.2f}", _percent(m.get("identical_rate_vs_greedy"))))
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
    plan = f"; greedy's kernels: {s['kernel_plan']}" if s.get("kernel_plan") else ""
    return (f"{s['cpu']} ({s['cpu_count']} CPUs, {s['torch_threads']} torch threads{', ' + s['gpu'] if s.get('gpu') else ''}), "
            f"torch {s['torch']}, transformers {s['transformers']}, mtpkit {s['mtpkit']}; {s['base_model']} "
            f"{s['dtype']}, {s['style']} x{s['num_heads']} heads, {s['num_prompts']} prompts from "
            f"{s.get('prompt_set', s['prompts'])}, {s.get('repeats', 1)} round(s), {s['max_new_tokens']} new tokens, "
            f"greedy, batch 1{plan}")


def to_markdown(report: dict, command: str = "") -> str:
    lines = ["# mtpkit bench", "", f"Setup: {setup_line(report)}.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["Speculation gain is over mtpkit's plain greedy decoding on the kernel plan measured fastest on whole "
              "forwards on this machine (greedy: the fastest plain decoding mtpkit knows here); speed-up is over "
              "transformers' greedy `generate` (hf-greedy). Figures are medians over prompts of per-prompt "
              "figures, with 95% bootstrap intervals in brackets; " + NO_GAIN_NOTE + ". Peak memory: what one "
              f"run of the method on the longest prompt ({report['setup'].get('memory_prompt')}) added above the "
              "resident model.", ""]
    lines += ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method, cells in method_rows(report):
        lines.append("| " + " | ".join([method] + [f"{value} [{interval}]" if interval and interval != "-" else value
                                                   for value, interval in cells]) + " |")
    rows = category_rows(report)
    if rows:
        lines += ["", "## By category (medians, no intervals: few prompts each)", "",
                  "| category | method | " + " | ".join(CATEGORY_COLUMNS) + " |",
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

    methods = [m for m in report["methods"] if m not in ("hf-greedy", "greedy")]
    groups = report.get("by_category") or {"all": report["methods"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(groups))]
        left.bar(xs, [groups[c][method]["speculation_gain_median"] or 0.0 for c in groups], width, label=method)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(groups))], list(groups), rotation=30)
    left.set_ylabel("speculation gain over greedy (median)")
    left.set_title("Gain over the fastest plain greedy, by category")
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
