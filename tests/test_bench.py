"""bench: prompt files, summaries and reports (the end-to-end run is in test_bench_cli.py)."""

import gzip
import json
import math
import statistics

import pytest

from mtpkit.bench import BenchSettings, bootstrap_interval, geometric_mean, load_bench_prompts, rotated, summarize
from mtpkit.bench_methods import DEFAULT_METHODS, all_methods

METHODS = all_methods()
from mtpkit.errors import MtpkitError
from mtpkit.prompts import CATEGORIES


def test_builtin_prompts_are_held_out_and_interleaved():
    prompts = load_bench_prompts("builtin")
    assert len(prompts) == 96
    assert [p.category for p in prompts[:8]] == list(CATEGORIES)
    limited = load_bench_prompts("builtin", limit=16)
    assert {p.category for p in limited} == set(CATEGORIES)
    from mtpkit.prompts import load_builtin
    train = {r["prompt"] for r in load_builtin("train")}
    assert not train & {p.text for p in prompts}


def test_prompt_file_shapes(tmp_path):
    mt = tmp_path / "mt.jsonl"
    mt.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["first", "second"]}) + "\n"
                  + json.dumps({"id": "x", "prompt": "p2"}) + "\n" + json.dumps({"text": "t3"}) + "\n")
    prompts = load_bench_prompts(str(mt))
    assert [(p.id, p.category, p.text) for p in prompts] == [("81", "writing", "first"), ("x", "prompts", "p2"),
                                                              ("3", "prompts", "t3")]
    he = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(he, "wt") as handle:
        handle.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n"}) + "\n")
    assert [(p.id, p.text) for p in load_bench_prompts(str(he))] == [("HumanEval/0", "def f():\n")]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert [p.text for p in load_bench_prompts(str(txt), limit=1)] == ["one"]


@pytest.mark.parametrize("content, message", [
    ("{not json}\n", "not valid JSON"),
    (json.dumps({"answer": 1}) + "\n", "none of the keys"),
    ("", "no prompts"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MtpkitError, match=message):
        load_bench_prompts(str(path))
    with pytest.raises(MtpkitError, match="not found"):
        load_bench_prompts(str(tmp_path / "missing.jsonl"))


def test_mt_bench_is_built_in_with_its_first_turns():
    prompts = load_bench_prompts("mt-bench")
    assert len(prompts) == 80 and len({p.id for p in prompts}) == 80
    assert [p.category for p in prompts[:8]] == ["writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                                 "stem", "humanities"]
    assert prompts[0].id == "81" and prompts[0].text.startswith("Compose an engaging travel blog post")
    from mtpkit.prompts import load_mt_bench
    assert all(set(r) == {"question_id", "category", "turns"} for r in load_mt_bench())  # questions only


def test_summary_figures():
    rows = [dict(tokens_per_s=10.0, speedup=2.0, new_tokens=100, forward_passes=40, identical_to_hf_greedy=True,
                 identical_to_greedy=True),
            dict(tokens_per_s=30.0, speedup=0.5, new_tokens=50, forward_passes=35, identical_to_hf_greedy=False,
                 identical_to_greedy=True)]
    s = summarize(rows, peak_mb=123.0)
    assert s["tokens_per_s"] == 20.0
    assert math.isclose(s["speedup"], 1.0) and s["speedup_median"] == 1.25
    assert math.isclose(s["mean_accepted_tokens"], 150 / 75) and math.isclose(s["accepted_median"], (2.5 + 50 / 35) / 2)
    assert s["identical_rate"] == 0.5 and s["identical_rate_vs_greedy"] == 1.0 and s["peak_memory_mb"] == 123.0
    assert s["speedup_interval"] == [0.5, 2.0]  # two prompts: every resample's median lies between them
    assert math.isclose(geometric_mean([1.0, 4.0]), 2.0)


def test_bootstrap_interval_is_a_reproducible_95_percent_interval_of_the_median():
    import random

    rng = random.Random(1)
    values = [rng.gauss(1.3, 0.2) for _ in range(80)]
    low, high = bootstrap_interval(values)
    assert low < statistics.median(values) < high and bootstrap_interval(values) == (low, high)
    assert 0.03 < high - low < 0.2  # about 2 x 1.96 x 1.25 x 0.2 / sqrt(80) for a median
    assert bootstrap_interval([1.5] * 10) == (1.5, 1.5)
    wide = bootstrap_interval([0.8, 1.4, 0.9, 1.6, 1.0, 1.2])
    assert wide[0] < 1.0 < wide[1]
    narrow = bootstrap_interval(values[:10])
    assert narrow[1] - narrow[0] > high - low  # fewer prompts, wider interval


def test_method_order_rotates_per_prompt_and_round():
    methods = ("a", "b", "c")
    assert [rotated(methods, shift) for shift in range(4)] == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"),
                                                               ("a", "b", "c")]
    firsts = {rotated(methods, prompt + round_)[0] for prompt in range(3) for round_ in range(2)}
    assert firsts == set(methods)  # every method runs first somewhere


def test_summary_speculation_gain_is_over_greedy_per_prompt():
    rows = [dict(tokens_per_s=20.0, speedup=2.0, speculation_gain=1.6, new_tokens=10, forward_passes=5,
                 identical_to_hf_greedy=True, identical_to_greedy=True),
            dict(tokens_per_s=10.0, speedup=1.0, speculation_gain=0.9, new_tokens=10, forward_passes=5,
                 identical_to_hf_greedy=True, identical_to_greedy=True),
            dict(tokens_per_s=40.0, speedup=4.0, speculation_gain=2.5, new_tokens=10, forward_passes=5,
                 identical_to_hf_greedy=True, identical_to_greedy=True)]
    s = summarize(rows)
    assert math.isclose(s["speculation_gain"], (1.6 * 0.9 * 2.5) ** (1 / 3))
    assert s["speculation_gain_median"] == 1.6 and s["speculation_gain_interval"][0] <= 1.6 <= s["speculation_gain_interval"][1]
    assert math.isclose(s["speedup"], 2.0) and s["speedup_median"] == 2.0
    without = summarize([{**r, "speculation_gain": None, "identical_to_greedy": None} for r in rows])
    assert without["speculation_gain"] is None and without["speculation_gain_median"] is None
    assert without["speculation_gain_interval"] is None


def test_settings_always_run_both_controls_first():
    assert BenchSettings(methods=("mtp-chain",)).methods == ("hf-greedy", "greedy", "mtp-chain")
    assert {"pld", "greedy", "hf-greedy"} <= set(DEFAULT_METHODS)  # make demo runs prompt lookup too
    assert BenchSettings(methods=("mtp-tree", "greedy", "mtp-tree")).methods == ("hf-greedy", "mtp-tree", "greedy")
    assert BenchSettings().methods == DEFAULT_METHODS and set(DEFAULT_METHODS) <= set(METHODS)


@pytest.mark.parametrize("field, value, option", [
    ("limit", 0, "--limit"), ("limit", -3, "--limit"), ("max_new_tokens", 0, "--max-new-tokens"),
    ("threads", -1, "--threads"), ("pld_tokens", 0, "--pld-tokens"), ("methods", ("warp",), "warp"),
    ("repeats", 0, "--repeats"),
])
def test_settings_refuse_numbers_that_make_no_sense(field, value, option):
    with pytest.raises(MtpkitError, match=option):
        BenchSettings(**{field: value})


def fake_report(methods=METHODS, categories=("code", "chat")) -> dict:
    figures = lambda i: dict(tokens_per_s=12.3 + i, speedup=1.0 + 0.25 * i, speedup_median=1.0 + 0.2 * i,
                             speedup_interval=[0.9 + 0.2 * i, 1.1 + 0.2 * i],
                             speculation_gain=0.94 + 0.25 * i, speculation_gain_median=0.9 + 0.2 * i,
                             speculation_gain_interval=[0.8 + 0.1 * i, 0.99 + 0.25 * i],
                             mean_accepted_tokens=1.0 + 0.3 * i, accepted_median=1.0 + 0.25 * i,
                             accepted_interval=[1.0 + 0.2 * i, 1.0 + 0.3 * i], identical_rate=1.0,
                             identical_rate_vs_greedy=1.0, prompts=2, peak_memory_mb=12.0 + i,
                             draft_seconds_per_step=0.0042 + 0.001 * i)
    per_method = {m: figures(i) for i, m in enumerate(methods)}
    return {"methods": per_method, "by_category": {c: per_method for c in categories},
            "first_difference_vs_hf_greedy": {}, "prompts": [],
            "setup": dict(cpu="AMD EPYC 7B13 64-Core Processor", cpu_count=2, torch_threads=2, gpu=None,
                          torch="2.13.0", transformers="5.23.0", mtpkit="0.1.0", base_model="smollm2-135m",
                          dtype="float32", style="sequential", num_heads=4, num_prompts=8, prompts="builtin",
                          prompt_set="the built-in development set", repeats=2, max_new_tokens=128,
                          kernel_plan="1 row pair, 2-64 rows column", memory_prompt="chat-07")}


def test_terminal_tables_fit_80_columns_and_carry_every_figure():
    from io import StringIO

    from rich.console import Console

    from mtpkit.cli.bench import summary_tables

    out = StringIO()
    console = Console(file=out, width=80)
    for table in summary_tables(fake_report()):
        console.print(table)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    lines = text.splitlines()
    count = len(METHODS)
    gain_rows = [line.split()[2:] for line in lines if line.strip().startswith("vs greedy")]
    gains = [g for row in gain_rows for g in row]
    # an interval including 1.00 is marked (hf-greedy's excludes it; greedy is the control, never marked)
    assert gains[:4] == ["0.90x", "1.10x", "1.30x\u2020", "1.50x"] and len(gains) == count
    interval_rows = [line.split()[1:] for line in lines if line.strip().startswith("95%")]
    assert ["0.80-0.99x", "0.90-1.24x", "1.00-1.49x"] == interval_rows[0][:3]
    assert any(row[:3] == ["1.00-1.00", "1.20-1.30", "1.40-1.60"] for row in interval_rows)  # accepted/step
    for method in METHODS:
        assert method in text
    for value in ("12.3", "draft ms/step", "peak +MB", "same as greedy", "1 row pair, 2-64 rows column"):
        assert value in " ".join(text.split())
    category_lines = [line.split() for line in lines if line.strip().startswith(("code", "chat"))]
    tree = METHODS.index("mtp-tree")
    assert ["code", "mtp-tree", f"{0.9 + 0.2 * tree:.2f}x", f"{1.0 + 0.2 * tree:.2f}x", f"{1.0 + 0.25 * tree:.2f}",
            "100%"] in category_lines
    assert len(category_lines) == 2 * (count - 1)  # hf-greedy is 1.00x by definition: left out


def test_markdown_has_medians_with_intervals():
    from mtpkit.report import to_markdown

    markdown = to_markdown(fake_report())
    header = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    assert header.split(" | ")[1:4] == ["tokens/s (median)", "speculation gain over greedy", "speed-up over hf-greedy"]
    tree = METHODS.index("mtp-tree")
    row = next(line for line in markdown.splitlines() if line.startswith("| mtp-tree |")).split(" | ")
    assert row[2] == f"{0.9 + 0.2 * tree:.2f}x [{0.8 + 0.1 * tree:.2f}-{0.99 + 0.25 * tree:.2f}x]"
    assert row[4] == f"{1.0 + 0.25 * tree:.2f} [{1.0 + 0.2 * tree:.2f}-{1.0 + 0.3 * tree:.2f}]"
    assert "95% bootstrap intervals" in markdown and "the 95% interval includes 1.00x" in markdown
    assert "| code | mtp-tree |" in markdown


def test_output_paths_are_checked_before_a_run(tmp_path):
    from mtpkit.report import check_output_paths

    check_output_paths({"--json": tmp_path / "new" / "deeper" / "bench.json", "--plot": None,
                        "--markdown": tmp_path / "bench.md"})
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(MtpkitError, match="--json .* is a directory"):
        check_output_paths({"--json": tmp_path})
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(MtpkitError, match="--markdown .*file.txt is a file"):
        check_output_paths({"--markdown": blocker / "sub" / "bench.md"})
