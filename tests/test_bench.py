"""bench: prompt files, summaries and reports (the end-to-end run is in test_bench_cli.py)."""

import gzip
import json
import math

import pytest

from mtpkit.bench import geometric_mean, load_bench_prompts, summarize
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
