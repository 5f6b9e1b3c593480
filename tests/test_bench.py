"""bench: prompt files, summaries and reports (the end-to-end run is in test_bench_cli.py)."""

import gzip
import json
import math

import pytest

from mtpkit.bench import DEFAULT_METHODS, METHODS, BenchSettings, geometric_mean, load_bench_prompts, summarize
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


def test_summary_figures():
    rows = [dict(tokens_per_s=10.0, speedup=2.0, new_tokens=100, forward_passes=40, identical_to_hf_greedy=True,
                 identical_to_greedy=True),
            dict(tokens_per_s=30.0, speedup=0.5, new_tokens=50, forward_passes=35, identical_to_hf_greedy=False,
                 identical_to_greedy=True)]
    s = summarize(rows, peak_mb=123.0)
    assert s["tokens_per_s"] == 20.0
    assert math.isclose(s["speedup"], 1.0) and s["speedup_median"] == 1.25
    assert math.isclose(s["mean_accepted_tokens"], 150 / 75)
    assert s["identical_rate"] == 0.5 and s["identical_rate_vs_greedy"] == 1.0 and s["peak_memory_mb"] == 123.0
    assert math.isclose(geometric_mean([1.0, 4.0]), 2.0)


def test_summary_speculation_gain_is_over_greedy_per_prompt():
    rows = [dict(tokens_per_s=20.0, speedup=2.0, speculation_gain=1.6, new_tokens=10, forward_passes=5,
                 identical_to_hf_greedy=True, identical_to_greedy=True),
            dict(tokens_per_s=10.0, speedup=1.0, speculation_gain=0.9, new_tokens=10, forward_passes=5,
                 identical_to_hf_greedy=True, identical_to_greedy=True),
            dict(tokens_per_s=40.0, speedup=4.0, speculation_gain=2.5, new_tokens=10, forward_passes=5,
                 identical_to_hf_greedy=True, identical_to_greedy=True)]
    s = summarize(rows)
    assert math.isclose(s["speculation_gain"], (1.6 * 0.9 * 2.5) ** (1 / 3))
    assert s["speculation_gain_median"] == 1.6
    assert math.isclose(s["speedup"], 2.0) and s["speedup_median"] == 2.0
    without = summarize([{**r, "speculation_gain": None, "identical_to_greedy": None} for r in rows])
    assert without["speculation_gain"] is None and without["speculation_gain_median"] is None


def test_settings_always_run_both_controls_first():
    assert BenchSettings(methods=("mtp-chain",)).methods == ("hf-greedy", "greedy", "mtp-chain")
    assert BenchSettings(methods=("mtp-tree", "greedy", "mtp-tree")).methods == ("hf-greedy", "mtp-tree", "greedy")
    assert BenchSettings().methods == DEFAULT_METHODS and set(DEFAULT_METHODS) <= set(METHODS)


@pytest.mark.parametrize("field, value, option", [
    ("limit", 0, "--limit"), ("limit", -3, "--limit"), ("max_new_tokens", 0, "--max-new-tokens"),
    ("threads", -1, "--threads"), ("pld_tokens", 0, "--pld-tokens"), ("methods", ("warp",), "warp"),
])
def test_settings_refuse_numbers_that_make_no_sense(field, value, option):
    with pytest.raises(MtpkitError, match=option):
        BenchSettings(**{field: value})


def fake_report(methods=METHODS, categories=("code", "chat")) -> dict:
    figures = lambda i: dict(tokens_per_s=12.3 + i, speedup=1.0 + 0.25 * i, speedup_median=1.0 + 0.2 * i,
                             speculation_gain=0.94 + 0.25 * i, speculation_gain_median=0.9 + 0.2 * i,
                             mean_accepted_tokens=1.0 + 0.3 * i, identical_rate=1.0, identical_rate_vs_greedy=1.0,
                             prompts=2, peak_memory_mb=1234.0, draft_seconds_per_step=0.0042 + 0.001 * i)
    per_method = {m: figures(i) for i, m in enumerate(methods)}
    return {"methods": per_method, "by_category": {c: per_method for c in categories},
            "predicted_mean_accepted_tokens": {"mtp-chain": 1.54, "mtp-tree": 1.61},
            "first_difference_vs_hf_greedy": {}, "prompts": [],
            "setup": dict(cpu="AMD EPYC 7B13 64-Core Processor", cpu_count=2, torch_threads=2, gpu=None,
                          torch="2.13.0", transformers="5.23.0", mtpkit="0.1.0", base_model="smollm2-135m",
                          dtype="float32", style="sequential", num_heads=4, num_prompts=8, prompts="builtin",
                          max_new_tokens=128)}


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
    gain_row = next(line for line in lines if line.strip().startswith("vs greedy (geo)"))
    assert gain_row.split()[3:] == ["0.94x", "1.19x", "1.44x", "1.69x", "1.94x"]  # 9 methods: tables of 5 and 4
    speed_row = next(line for line in lines if line.strip().startswith("vs hf-greedy (med)"))
    assert speed_row.split()[3:] == ["1.00x", "1.20x", "1.40x", "1.60x", "1.80x"]
    gain_rows = [line.split()[3:] for line in lines if line.strip().startswith("vs greedy (geo)")]
    assert gain_rows[1] == ["2.19x", "2.44x", "2.69x", "2.94x"]
    for method in METHODS:
        assert method in text
    for value in ("12.3", "19.3", "1.54", "1.61", "100%", "1234"):
        assert value in text
    category_lines = [line.split() for line in lines if line.strip().startswith(("code", "chat"))]
    assert ["code", "mtp-tree", "2.50x", "2.44x", "2.80", "100%"] in category_lines
    assert len(category_lines) == 2 * (len(METHODS) - 1)  # hf-greedy is 1.00x by definition: left out


def test_markdown_has_both_ratios_side_by_side():
    from mtpkit.report import to_markdown

    markdown = to_markdown(fake_report())
    header = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    assert "speed-up over hf-greedy (geo-mean)" in header and "speculation gain over greedy (geo-mean)" in header
    tree = next(line for line in markdown.splitlines() if line.startswith("| mtp-tree |")).split(" | ")
    assert tree[2:6] == ["2.50x", "2.20x", "2.44x", "2.10x"]  # mtp-tree is the 7th of METHODS
    assert "drafting ms/step (median)" in header and tree[-2] == "10.2"  # 4.2 ms + 1 ms per method before it
    assert "| code | mtp-tree | 2.50x | 2.44x | 2.80 | 100% |" in markdown


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
