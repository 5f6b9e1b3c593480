"""The acceptance prior a heads directory ships: counts weighed as a few trials, measured by greedy hybrid decoding
of prompts the heads never trained on, and where every greedy decoder that chooses its tree per step starts (bench
resets to it)."""

import json

import pytest
from typer.testing import CliRunner

from mtpkit.cli.app import app
from mtpkit.config import PRIOR_NAME
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.errors import MtpkitError

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
runner = CliRunner()
PROMPTS = ["The quick brown fox", "def add(a, b):", "Name three colours.", "Count to five."]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_weighed_as_caps_the_trials_per_bin_and_keeps_each_rate():
    calibrator = ConfidenceCalibrator(num_bins=2)
    for accepted in [True] * 40 + [False] * 60:
        calibrator.record("heads", 0.9, accepted)
    for _ in range(3):
        calibrator.record("heads", 0.1, True)
    calibrator.record("lookup", 1.0, False, depth=2)
    prior = calibrator.weighed_as(10).state_dict()
    assert prior["tried"] == {"heads@1": [3, 10], "lookup@2": [0, 1]}
    assert prior["accepted"] == {"heads@1": [3, 4], "lookup@2": [0, 0]}
    weighed = ConfidenceCalibrator.from_state_dict(prior)
    assert weighed.calibrate("heads", 0.9) == pytest.approx((4 + 4 * 0.9) / (10 + 4))
    assert calibrator.state_dict()["tried"]["heads@1"] == [3, 100]  # the original is untouched
    with pytest.raises(MtpkitError):
        calibrator.weighed_as(0)


def test_greedy_decoders_that_choose_their_tree_start_from_the_shipped_prior(heads_dir, tmp_path):
    from mtpkit.checkpoint import open_heads
    from mtpkit.draft_sources import build_decoder
    from mtpkit.priors import write_prior

    prior = ConfidenceCalibrator()
    for _ in range(40):
        prior.record("lookup", 1.0, False)
    write_prior(heads_dir, prior, trials=16)
    try:
        heads = open_heads(heads_dir)
        hybrid = build_decoder(heads, heads_dir, "hybrid")
        assert hybrid.calibrator.state_dict()["tried"] == {"lookup@1": [0] * 9 + [16]}
        assert hybrid.calibrator.calibrate("lookup", 1.0) == pytest.approx(4 / 20)  # not the raw 1.0
        hybrid.calibrator.record("heads", 0.5, True)
        hybrid.reset()
        assert hybrid.calibrator.state_dict()["tried"] == {"lookup@1": [0] * 9 + [16]}  # bench's reset: the prior
        assert build_decoder(heads, heads_dir, "lookup").calibrator.state_dict()["tried"]["lookup@1"][-1] == 16
        assert build_decoder(heads, heads_dir, "hybrid", prior=False).calibrator.state_dict()["tried"] == {}
        sampling = build_decoder(heads, heads_dir, "hybrid", temperature=0.8, seed=0)
        assert sampling.calibrator.state_dict()["tried"] == {}  # measured greedy: sampling accepts otherwise
        assert build_decoder(heads, tmp_path, "hybrid").calibrator.state_dict()["tried"] == {}  # none shipped
    finally:
        (heads_dir / PRIOR_NAME).unlink()


def test_reset_keeping_the_calibrator_forgets_only_what_the_drafters_learned(heads_dir):
    from mtpkit.checkpoint import open_heads
    from mtpkit.decoding import encode_prompt
    from mtpkit.draft_sources import build_decoder

    heads = open_heads(heads_dir)
    decoder = build_decoder(heads, heads_dir, "hybrid", prior=False)
    decoder.generate(encode_prompt(heads.backbone.tokenizer, PROMPTS[0], chat=True), 16)
    learned = decoder.calibrator.state_dict()
    assert sum(map(sum, learned["tried"].values())) > 0
    def own_outputs():  # what the suffix drafter indexed of this decoder's own outputs
        return sum(len(d.index._text) for d in decoder.proposer.drafters if getattr(d, "learn", False))

    assert own_outputs() > 0
    decoder.reset(keep_calibrator=True)
    assert decoder.calibrator.state_dict() == learned and own_outputs() == 0
    decoder.reset()
    assert decoder.calibrator.state_dict()["tried"] == {}


def test_heldout_prompts_are_the_split_finetune_held_out(heads_dir, prompts_file):
    from mtpkit.checkpoint import open_heads
    from mtpkit.data import load_data, prompt_ids
    from mtpkit.priors import heldout_prompts

    heads = open_heads(heads_dir)
    tokenizer = heads.backbone.tokenizer
    held_out = [prompt_ids(tokenizer, e) for e in load_data([str(prompts_file)], eval_fraction=0.5, seed=3).eval]
    heads.config.training = {"data": [str(prompts_file)], "eval_fraction": 0.5, "seed": 3}
    assert heldout_prompts(heads, heads_dir, 10) == held_out and len(held_out) == 2
    # heads trained before the fraction was recorded: the held-out share of the records gives the same split
    heads.config.training = {"data": [str(prompts_file)], "eval_sequences": 2, "data_shapes": {"prompt": 4}, "seed": 3}
    assert heldout_prompts(heads, heads_dir, 10) == held_out
    assert heldout_prompts(heads, heads_dir, 1) == held_out[:1]
    every = [prompt_ids(tokenizer, e) for e in load_data([str(prompts_file)], eval_fraction=0.0, seed=0).train]
    assert heldout_prompts(heads, heads_dir, 10, data=[str(prompts_file)]) == every
    heads.config.training = {}
    with pytest.raises(MtpkitError, match="no held-out split"):
        heldout_prompts(heads, heads_dir, 10)
    # the suffix corpus holds the training data's responses, the held-out ones among them: refused
    heads.config.training = {"data": [str(prompts_file)], "eval_fraction": 0.5, "seed": 3}
    heads.config.corpus = str(prompts_file)
    with pytest.raises(MtpkitError, match="suffix corpus"):
        heldout_prompts(heads, heads_dir, 10)
    assert heldout_prompts(heads, heads_dir, 10, data=[str(prompts_file)]) == every  # other prompts: fine


def test_calibrate_writes_the_prior_into_the_heads_directory(heads_dir, prompts_file):
    from mtpkit.priors import PRIOR_TRIALS

    result = run("calibrate", heads_dir, "--data", prompts_file, "--prompts", 3, "--max-new-tokens", 24)
    try:
        assert result.exit_code == 0, result.output
        state = json.loads((heads_dir / PRIOR_NAME).read_text())
        trials = [t for bins in state["tried"].values() for t in bins]
        assert sum(trials) > 0 and max(trials) <= PRIOR_TRIALS
        assert all(a <= t for key in state["tried"] for a, t in zip(state["accepted"][key], state["tried"][key]))
        assert "wrote" in result.stderr and result.stdout == ""
    finally:
        (heads_dir / PRIOR_NAME).unlink(missing_ok=True)


@pytest.mark.parametrize("args, fragment", [
    (["--prompts", "0"], "--prompts and --max-new-tokens"),
    ([], "no held-out split"),  # attached, never trained: nothing recorded, and no --data
])
def test_calibrate_bad_input_is_one_line(heads_dir, args, fragment):
    result = run("calibrate", heads_dir, *args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert not (heads_dir / PRIOR_NAME).exists()


def test_calibrate_missing_heads_directory_is_one_line(tmp_path):
    result = run("calibrate", tmp_path / "nowhere")
    assert result.exit_code != 0 and "Traceback" not in result.output and "error:" in result.stderr
