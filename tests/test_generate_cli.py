"""`mtpkit generate` through the CLI: streamed text on stdout, summary on stderr, one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from mtpkit.cli.app import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output


@pytest.fixture(scope="module")
def reference(heads_dir):
    """What plain greedy decoding writes for the two test prompts."""
    from mtpkit.checkpoint import open_heads
    from mtpkit.decoding import encode_prompt, greedy_generate

    backbone = open_heads(heads_dir).backbone
    return {prompt: greedy_generate(backbone, encode_prompt(backbone.tokenizer, prompt, chat=True), 12).text
            for prompt in ("The quick brown fox", "def add(a, b):")}


def test_generate_streams_greedy_text_and_summarises(heads_dir, reference, tmp_path):
    trace = tmp_path / "trace.jsonl"
    result = run("generate", heads_dir, "--prompt", "The quick brown fox", "--max-new-tokens", 12,
                 "--tree", "chain", "--trace", trace)
    assert result.exit_code == 0, result.output
    assert result.stdout == reference["The quick brown fox"] + "\n"
    for column in ("new tokens", "base forward passes", "mean accepted tokens", "tokens/s"):
        assert column in result.stderr
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert steps and {"draft_tokens", "draft_confidences", "accepted_length", "rejected_node"} <= set(steps[0])
    assert sum(step["committed"] for step in steps) + 1 <= 12


def test_generate_prompts_file_and_tree_file(heads_dir, reference, tmp_path):
    prompts = list(reference)
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps([[0], [1], [0, 0], [0, 0, 0]]))
    for name, text in [("prompts.txt", "\n".join(prompts) + "\n\n"),
                       ("prompts.jsonl", "\n".join(json.dumps({"turns": [p, "more"]}) for p in prompts))]:
        path = tmp_path / name
        path.write_text(text)
        result = run("generate", heads_dir, "--prompts-file", path, "--max-new-tokens", 12, "--tree", tree)
        assert result.exit_code == 0, result.output
        assert result.stdout == "".join(reference[p] + "\n" for p in prompts)
        assert "all" in result.stderr


def test_draft_none_decodes_plainly_on_the_measured_kernels(heads_dir, reference, monkeypatch):
    """--draft none: plain decoding (one token a forward, 1.00 accepted per step), greedy text unchanged, on the
    kernel plan measured for the machine, padded token included."""
    from mtpkit import kernels

    plan = kernels.KernelPlan("pair", ((2, "column"),), padded_token=True)
    measurement = kernels.KernelMeasurement({"stock": {1: 1.0, 2: 1.0}, "column": {1: 1.0, 2: 0.5},
                                             "pair": {1: 0.8}}, plan)
    monkeypatch.setattr(kernels, "kernel_measurement", lambda backbone, refresh=False: measurement)
    rows = []
    real = kernels.fast_linear
    monkeypatch.setattr(kernels, "fast_linear", lambda x, *a, **k: rows.append(x.numel() // x.shape[-1]) or real(x, *a, **k))
    result = run("generate", heads_dir, "--prompt", "The quick brown fox", "--max-new-tokens", 12, "--draft", "none")
    assert result.exit_code == 0, result.output
    assert result.stdout == reference["The quick brown fox"] + "\n"
    assert "1.00" in result.stderr and "plain decoding" in result.stderr
    assert 2 in rows  # the padded token's forward


def test_plain_sampling_with_seed_is_reproducible_and_refuses_typical(heads_dir):
    args = ("generate", heads_dir, "--prompt", "hello", "--max-new-tokens", 8, "--draft", "none",
            "--temperature", 0.9, "--top-k", 20, "--seed", 4)
    first, second = run(*args), run(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout and first.stdout.strip()
    refused = run("generate", heads_dir, "--prompt", "hello", "--draft", "none", "--temperature", 0.9, "--typical")
    assert refused.exit_code != 0 and "Traceback" not in refused.output and "--typical" in refused.stderr


def test_generate_sampling_with_seed_is_reproducible(heads_dir):
    args = ("generate", heads_dir, "--prompt", "hello", "--max-new-tokens", 8, "--tree", "chain",
            "--temperature", 0.9, "--top-k", 20, "--seed", 4)
    first, second = run(*args), run(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout


def test_generate_auto_tree(heads_dir, reference):
    result = run("generate", heads_dir, "--prompt", "def add(a, b):", "--max-new-tokens", 12)
    assert result.exit_code == 0, result.output
    assert result.stdout == reference["def add(a, b):"] + "\n"


def test_generate_bad_inputs(heads_dir, tmp_path):
    assert_one_line_error(run("generate", tmp_path / "nope", "--prompt", "hi"), "mtp_config.json is missing")
    assert_one_line_error(run("generate", heads_dir), "exactly one of --prompt")
    missing = tmp_path / "missing.txt"
    assert_one_line_error(run("generate", heads_dir, "--prompt", "hi", "--prompts-file", missing),
                          "exactly one of --prompt")
    assert_one_line_error(run("generate", heads_dir, "--prompts-file", missing), "prompts file not found")
    bad_tree = tmp_path / "bad.json"
    bad_tree.write_text("[[0], [0, 0, 1")
    assert_one_line_error(run("generate", heads_dir, "--prompt", "hi", "--tree", bad_tree), "not valid JSON")
    orphan = tmp_path / "orphan.json"
    orphan.write_text("[[0, 0]]")
    assert_one_line_error(run("generate", heads_dir, "--prompt", "hi", "--tree", orphan), "no parent path")
    deep = tmp_path / "deep.json"
    deep.write_text("[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]")
    assert_one_line_error(run("generate", heads_dir, "--prompt", "hi", "--tree", deep), "only 3 heads")
    assert_one_line_error(run("generate", heads_dir, "--prompt", "hi", "--temperature", -1), "--temperature")
    assert_one_line_error(run("generate", heads_dir, "--prompt", "hi", "--typical"), "--typical needs")
    assert_one_line_error(run("generate", heads_dir, "--prompt", "hi", "--max-new-tokens", 0), "--max-new-tokens")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"question": "no prompt key"}\n')
    assert_one_line_error(run("generate", heads_dir, "--prompts-file", bad_jsonl), "has no \"prompt\"")
    long_prompt = " ".join(["fox"] * 700)
    assert_one_line_error(run("generate", heads_dir, "--prompt", long_prompt, "--tree", "chain", "--no-chat"),
                          "context")


@pytest.mark.parametrize("draft", ["hybrid", "heads", "lookup", "suffix"])
def test_generate_each_draft_source_is_greedy_and_traced(heads_dir, reference, tmp_path, draft):
    trace = tmp_path / "trace.jsonl"
    prompt = "The quick brown fox"
    result = run("generate", heads_dir, "--prompt", prompt, "--max-new-tokens", 12, "--draft", draft,
                 "--trace", trace)
    assert result.exit_code == 0, result.output
    assert result.stdout == reference[prompt] + "\n"
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert steps and all(step["draft_seconds"] >= 0 for step in steps)
    if draft == "heads":
        assert "draft_sources" not in steps[0]  # one source: nothing to record
    else:
        expected = {"hybrid": {"heads", "lookup", "suffix"}, "lookup": {"lookup"}, "suffix": {"suffix"}}[draft]
        for step in steps:
            assert len(step["draft_sources"]) == len(step["draft_tokens"]) - 1
            assert all(sources and set(sources) <= expected for sources in step["draft_sources"])
    assert_one_line_error(run("generate", heads_dir, "--prompt", prompt, "--draft", "everything"), "--draft")


class _Oracle:
    """Proposes the next tokens of plain greedy's answer with confidence 1: every step tries (and accepts) drafts."""

    name = "oracle"

    def __init__(self, answer: list[int]):
        self.answer, self.prompt_length = answer, 0

    def start(self, prompt_ids):
        self.prompt_length = len(prompt_ids)

    def update(self, accepted_ids):
        pass

    def propose(self, context_ids, budget):
        from mtpkit.drafting.base import Candidates

        done = len(context_ids) - self.prompt_length
        tokens = tuple(self.answer[done:done + min(budget, 4)])
        return Candidates(tokens, tuple(range(-1, len(tokens) - 1)), (1.0,) * len(tokens), ("oracle",) * len(tokens))


def test_generate_remembers_what_the_calibrator_learned(heads_dir, tmp_path, monkeypatch):
    """A later run starts from the earlier runs' acceptance counts (kept under the cache) and adds its own; the
    heads' static tree keeps none, and a damaged file is learned anew."""
    import shutil

    from mtpkit import draft_sources
    from mtpkit.files import cache_root
    from mtpkit.checkpoint import open_heads
    from mtpkit.decoding import encode_prompt, greedy_generate

    backbone = open_heads(heads_dir).backbone
    answer = greedy_generate(backbone, encode_prompt(backbone.tokenizer, "hello", chat=True), 12).tokens
    monkeypatch.setattr(draft_sources, "make_drafters", lambda *args, **kwargs: [_Oracle(answer)])
    folder = cache_root() / "acceptance"
    shutil.rmtree(folder, ignore_errors=True)

    def kept():
        return sorted(p.name.split("-", 1)[1] for p in folder.glob("*.json"))

    def tried():
        state = json.loads(next(folder.glob("*-hybrid-greedy.json")).read_text())
        return sum(sum(bins) for bins in state["tried"].values())

    assert run("generate", heads_dir, "--prompt", "hello", "--max-new-tokens", 12).exit_code == 0
    first = tried()
    assert first > 0 and kept() == ["hybrid-greedy.json"]
    # one new token is the prefill's own: no step, nothing tried; the kept counts come back unchanged (a
    # calibrator that started afresh would keep zeros)
    assert run("generate", heads_dir, "--prompt", "hello", "--max-new-tokens", 1).exit_code == 0
    assert tried() == first
    assert run("generate", heads_dir, "--prompt", "hello", "--max-new-tokens", 12).exit_code == 0
    assert tried() > first  # the same greedy steps again, on top of the first run's
    assert run("generate", heads_dir, "--prompt", "hi", "--max-new-tokens", 4, "--draft", "heads").exit_code == 0
    assert kept() == ["hybrid-greedy.json"]  # the heads' static tree has no calibrator
    next(folder.glob("*.json")).write_text("{broken")
    assert run("generate", heads_dir, "--prompt", "hello", "--max-new-tokens", 12).exit_code == 0
    assert 0 < tried() < 2 * first  # learned anew (one run's counts) and kept
