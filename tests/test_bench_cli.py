"""`mtpkit bench` end to end on a tiny model: every method, every output file, identity and figures."""

import json

import pytest
from typer.testing import CliRunner

from mtpkit.cli.app import app

runner = CliRunner()
METHODS = ["hf-greedy", "greedy", "hf-pld", "mtp-chain", "mtp-tree"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def heads_dir(tiny_model_dirs, tmp_path_factory):
    from mtpkit.attach import attach

    out = tmp_path_factory.mktemp("heads")
    attach(str(tiny_model_dirs["llama"]), "medusa", 3, 1, out)
    return out


@pytest.fixture(scope="module")
def bench_run(heads_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    prompts = out / "prompts.jsonl"
    records = [{"id": "a", "category": "code", "prompt": "def add(a, b):"},
               {"id": "b", "category": "chat", "turns": ["The quick brown fox", "and then?"]},
               {"id": "c", "category": "code", "prompt": "for i in range(10):"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = runner.invoke(app, ["bench", str(heads_dir), "--prompts", str(prompts), "--max-new-tokens", "16",
                                 "--tree", "auto", "--threads", "1", "--json", str(out / "bench.json"),
                                 "--markdown", str(out / "bench.md"), "--plot", str(out / "bench.png")])
    return result, out


def test_bench_writes_a_complete_report(bench_run):
    result, out = bench_run
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # tables go to stderr: stdout stays pipeable
    assert "mtpkit bench" in result.stderr and "mtp-tree" in result.stderr
    report = json.loads((out / "bench.json").read_text())
    assert list(report["methods"]) == METHODS
    for method, figures in report["methods"].items():
        for key in ("tokens_per_s", "speedup", "speedup_median", "mean_accepted_tokens", "identical_rate",
                    "peak_memory_mb"):
            assert isinstance(figures[key], float) and figures[key] > 0 or key == "identical_rate", (method, key)
    assert report["methods"]["hf-greedy"]["speedup"] == pytest.approx(1.0)
    assert report["methods"]["hf-greedy"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert report["methods"]["greedy"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert [row["id"] for row in report["prompts"]] == ["a", "b", "c"]
    assert set(report["by_category"]) == {"code", "chat"}
    assert report["setup"]["torch_threads"] == 1 and report["setup"]["max_new_tokens"] == 16
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "bench.md").read_text()
    assert "| mtp-tree |" in markdown and "hf-pld" in markdown


def test_every_method_reproduces_greedy_output(bench_run):
    result, out = bench_run
    report = json.loads((out / "bench.json").read_text())
    for method, figures in report["methods"].items():
        assert figures["identical_rate"] == 1.0, method
    for row in report["prompts"]:
        counts = {m: row["methods"][m]["new_tokens"] for m in METHODS}
        assert len(set(counts.values())) == 1 and 0 < counts["greedy"] <= 16, counts
        for method in ("mtp-chain", "mtp-tree"):
            figures = row["methods"][method]
            assert figures["forward_passes"] == len(figures["accepted_lengths"]) + 1
            assert figures["mean_accepted_tokens"] == pytest.approx(figures["new_tokens"] / figures["forward_passes"])
    assert "differs" not in result.stderr


def test_bench_refuses_bad_input(heads_dir, tmp_path):
    result = runner.invoke(app, ["bench", str(heads_dir), "--methods", "greedy,warp-drive"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "warp-drive" in result.stderr
    result = runner.invoke(app, ["bench", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    result = runner.invoke(app, ["bench", str(heads_dir), "--prompts", str(tmp_path / "none.jsonl")])
    assert result.exit_code != 0 and "none.jsonl" in result.stderr
