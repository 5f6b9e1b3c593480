"""`mtpkit bench` end to end on a tiny model: every method, every output file, identity and figures."""

import json

import pytest
from typer.testing import CliRunner

from mtpkit.cli.app import app
from mtpkit.errors import MtpkitError
from tests.conftest import assert_one_line_error

runner = CliRunner()
METHODS = ["hf-greedy", "greedy", "greedy-pair", "hf-pld", "pld", "mtp-chain", "mtp-tree", "mtp-hybrid"]


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
                                 "--methods", ",".join(METHODS), "--repeats", "2",
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
        for key in ("tokens_per_s", "speedup", "speedup_median", "mean_accepted_tokens", "accepted_median",
                    "identical_rate"):
            assert isinstance(figures[key], float) and figures[key] > 0 or key == "identical_rate", (method, key)
        for key in ("speedup_interval", "speculation_gain_interval", "accepted_interval"):
            low, high = figures[key]
            assert low <= figures[key.replace("interval", "median")] <= high, (method, key)
        assert isinstance(figures["peak_memory_mb"], float) and figures["peak_memory_mb"] >= 0, method
    for row in report["prompts"]:  # two rounds, each (prompt, method) timed twice; the same tokens both times
        for method, figures in row["methods"].items():
            assert len(figures["seconds_per_round"]) == 2 and figures["same_in_every_round"], method
    assert report["setup"]["repeats"] == 2 and report["setup"]["kernel_plan"].startswith("1 row ")
    assert set(report["setup"]["kernel_forward_seconds"]) == {"stock", "column", "pair", "packed"}
    assert report["methods"]["hf-greedy"]["speedup"] == pytest.approx(1.0)
    assert report["methods"]["hf-greedy"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert report["methods"]["greedy"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert [row["id"] for row in report["prompts"]] == ["a", "b", "c"]
    assert set(report["by_category"]) == {"code", "chat"}
    assert report["setup"]["torch_threads"] == 1 and report["setup"]["max_new_tokens"] == 16
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "bench.md").read_text()
    assert "| mtp-tree |" in markdown and "hf-pld" in markdown and "speculation gain over greedy" in markdown
    assert report["setup"]["device"] == "cpu" and report["setup"]["dtype"] == "float32"
    assert max(len(line) for line in result.stderr.splitlines()) <= 80  # stderr is no terminal here: 80 columns
    assert "vs greedy" in result.stderr and "vs hf-greedy" in result.stderr and "95%" in result.stderr
    # no terminal here: progress comes as log lines, one per prompt and round
    assert "bench round 1/2 a: 1/6" in result.stderr and "bench round 2/2 c: 6/6" in result.stderr


def test_speed_up_splits_into_kernels_times_speculation(bench_run):
    _, out = bench_run
    report = json.loads((out / "bench.json").read_text())
    assert report["methods"]["greedy"]["speculation_gain"] == pytest.approx(1.0)
    for row in report["prompts"]:
        greedy = row["methods"]["greedy"]
        for method, figures in row["methods"].items():
            assert figures["speculation_gain"] == pytest.approx(figures["tokens_per_s"] / greedy["tokens_per_s"])
            assert figures["speedup"] == pytest.approx(greedy["speedup"] * figures["speculation_gain"])
    for method, figures in report["methods"].items():
        gains = [row["methods"][method]["speculation_gain"] for row in report["prompts"]]
        assert figures["speculation_gain_median"] == pytest.approx(sorted(gains)[1])
        assert figures["speculation_gain"] == pytest.approx((gains[0] * gains[1] * gains[2]) ** (1 / 3))
    for category in ("code", "chat"):
        assert report["by_category"][category]["mtp-tree"]["speculation_gain"] > 0


def test_every_method_reproduces_greedy_output(bench_run):
    result, out = bench_run
    report = json.loads((out / "bench.json").read_text())
    for method, figures in report["methods"].items():
        assert figures["identical_rate"] == 1.0, method
    for row in report["prompts"]:
        counts = {m: row["methods"][m]["new_tokens"] for m in METHODS}
        assert len(set(counts.values())) == 1 and 0 < counts["greedy"] <= 16, counts
        for method in ("mtp-chain", "mtp-tree", "mtp-hybrid"):
            figures = row["methods"][method]
            assert figures["forward_passes"] == len(figures["accepted_lengths"]) + 1
            assert figures["mean_accepted_tokens"] == pytest.approx(figures["new_tokens"] / figures["forward_passes"])
    assert "differs" not in result.stderr


def test_controls_run_even_when_not_asked_for(heads_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b):\n")
    result = runner.invoke(app, ["bench", str(heads_dir), "--prompts", str(prompts), "--max-new-tokens", "4",
                                 "--methods", "mtp-chain", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert list(report["methods"]) == ["hf-greedy", "greedy", "mtp-chain"]


def test_report_paths_are_refused_before_the_model_loads(heads_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr("mtpkit.checkpoint.load_backbone", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for option, path, fragment in [("--json", tmp_path, "is a directory"),
                                   ("--markdown", blocker / "out" / "bench.md", "is a file"),
                                   ("--plot", blocker / "bench.png", "is a file")]:
        result = runner.invoke(app, ["bench", str(heads_dir), option, str(path)])
        assert_one_line_error(result, option)
        assert fragment in result.stderr
    for args, fragment in [(["--limit", "-1"], "--limit"), (["--threads", "0"], "--threads"),
                           (["--max-new-tokens", "0"], "--max-new-tokens"), (["--pld-tokens", "-2"], "--pld-tokens"),
                           (["--dtype", "float8"], "dtype"), (["--device", "warp:0"], "device")]:
        assert_one_line_error(runner.invoke(app, ["bench", str(heads_dir), *args]), fragment)


def test_bench_refuses_bad_input(heads_dir, tmp_path):
    result = runner.invoke(app, ["bench", str(heads_dir), "--methods", "greedy,warp-drive"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "warp-drive" in result.stderr
    result = runner.invoke(app, ["bench", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    result = runner.invoke(app, ["bench", str(heads_dir), "--prompts", str(tmp_path / "none.jsonl")])
    assert result.exit_code != 0 and "none.jsonl" in result.stderr


def echo_drafters(context):
    """A draft source made up for the registry test: prompt lookup under another name."""
    from mtpkit.drafting.lookup import PromptLookup

    return [PromptLookup(name="echo")]


def test_a_new_source_is_one_registry_line(heads_dir, tmp_path, monkeypatch):
    """Registering a source makes it a --draft choice (help and errors too) and a bench method, with no other edit."""
    from mtpkit.bench import BenchSettings, run_bench
    from mtpkit.bench_methods import all_methods, methods_help
    from mtpkit.drafting import registry

    assert "echo" not in registry.draft_sets() and "echo-pld" not in all_methods()
    monkeypatch.setitem(registry.SOURCES, "echo", registry.DraftSource(
        "echo", "prompt lookup again, to test the registry", "tests.test_bench_cli:echo_drafters", "echo-pld"))
    assert registry.draft_sets()["echo"] == ("echo",) and "echo" in registry.draft_sets()["hybrid"]
    assert "echo-pld" in all_methods() and "echo-pld: prompt lookup again" in methods_help()
    with pytest.raises(MtpkitError, match="choose from .*echo"):
        registry.check_draft("warp")
    assert "echo (prompt lookup again" in registry.draft_help()  # the text --draft's help is made of
    result = runner.invoke(app, ["generate", str(heads_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "8",
                                 "--draft", "echo"])
    assert result.exit_code == 0, result.output
    (tmp_path / "p.txt").write_text("def add(a, b):\n")
    report = run_bench(heads_dir, BenchSettings(prompts=str(tmp_path / "p.txt"), max_new_tokens=8,
                                                methods=("echo-pld",), threads=1, memory=False))
    assert list(report["methods"]) == ["hf-greedy", "greedy", "echo-pld"]
    assert report["methods"]["echo-pld"]["identical_rate"] == 1.0


def test_drafter_methods_draft_from_the_heads_directory_corpus(heads_dir, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtpkit.checkpoint import open_heads
    from mtpkit.decoding import encode_prompt, greedy_generate

    own = tmp_path / "heads"
    shutil.copytree(heads_dir, own)
    backbone = open_heads(own).backbone
    prompt = "def add(a, b):"
    said = greedy_generate(backbone, encode_prompt(backbone.tokenizer, prompt, chat=True), 16).tokens
    pq.write_table(pa.table({"prompt_ids": [[1]], "response_ids": [said]}), own / "corpus.parquet")
    (tmp_path / "p.txt").write_text(prompt + "\n")
    result = runner.invoke(app, ["bench", str(own), "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "16",
                                 "--methods", "pld,suffix,mtp-hybrid", "--threads", "1",
                                 "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert list(report["methods"]) == ["hf-greedy", "greedy", "pld", "suffix", "mtp-hybrid"]
    assert report["setup"]["suffix_corpus"] == str((own / "corpus.parquet").resolve()) or \
        report["setup"]["suffix_corpus"] == str(own / "corpus.parquet")
    for method in ("pld", "suffix", "mtp-hybrid"):
        figures = report["methods"][method]
        assert figures["identical_rate"] == 1.0 and figures["speculation_gain"] > 0, method
        assert figures["draft_seconds_per_step"] > 0, method
    # the corpus holds this very output: the suffix index drafts it whole
    assert report["methods"]["suffix"]["mean_accepted_tokens"] > 3.0
    assert report["methods"]["mtp-hybrid"]["mean_accepted_tokens"] > 3.0


def test_a_prompts_figures_do_not_depend_on_the_prompts_before_it(heads_dir, tmp_path):
    """Calibrator, learned suffix entries and recycled successors start every (prompt, method) run afresh: a prompt
    measured after others accepts exactly what it accepts when measured alone."""
    from mtpkit.bench import BenchSettings, run_bench

    records = [{"id": "first", "category": "code", "prompt": "def add(a, b):"},
               {"id": "second", "category": "code", "prompt": "def add(a, b):"}]  # the same text: much to learn
    for name, chosen in (("both", records), ("alone", records[1:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    methods = ("pld", "recycle", "mtp-hybrid")
    settings = dict(max_new_tokens=24, methods=methods, threads=1, memory=False)
    after = run_bench(heads_dir, BenchSettings(prompts=str(tmp_path / "both.jsonl"), **settings))
    alone = run_bench(heads_dir, BenchSettings(prompts=str(tmp_path / "alone.jsonl"), **settings))
    for method in methods:
        second, only = after["prompts"][1]["methods"][method], alone["prompts"][0]["methods"][method]
        assert second["accepted_lengths"] == only["accepted_lengths"], method
        assert second["identical_to_greedy"] and only["identical_to_greedy"]
