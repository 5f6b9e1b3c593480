"""`mtpkit export`: vLLM's medusa layout, the export's own check, and refusals that leave nothing behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mtpkit.export.vllm_medusa as medusa_format
from tests.conftest import assert_one_line_error
from mtpkit.attach import attach
from mtpkit.checkpoint import open_heads, save_heads
from mtpkit.cli.app import app
from mtpkit.errors import MtpkitError
from mtpkit.export import VLLM_MEDUSA_LOADER, check_vllm_medusa, export_heads

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, LAYERS, HIDDEN = 3, 2, 64

# What vLLM's medusa loader reads (vllm/model_executor/models/medusa.py at VLLM_MEDUSA_LOADER["model_commit"]):
# Medusa.blocks = ModuleList(ResidualBlock per head), ResidualBlock.layers = ModuleList(Linear(H, H, bias=
# config.medusa_fc_bias) per layer), Medusa.lm_heads = ModuleList(ParallelLMHead(vocab, H) per head), no bias.
VLLM_NAMES_AND_SHAPES = (
    [(f"blocks.{h}.layers.{l}.weight", (HIDDEN, HIDDEN)) for h in range(HEADS) for l in range(LAYERS)]
    + [(f"blocks.{h}.layers.{l}.bias", (HIDDEN,)) for h in range(HEADS) for l in range(LAYERS)]
    + [(f"lm_heads.{h}.weight", ("vocab", HIDDEN)) for h in range(HEADS)]
)


def make_heads_dir(path, model_dir, style="medusa", trained=True):
    attach(str(model_dir), style, HEADS, LAYERS, path)
    heads = open_heads(path, device="cpu")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    if trained:
        heads.config.training = {"steps": 7, "epochs": 1.0}
    save_heads(heads, path)
    return path


@pytest.fixture(scope="module")
def medusa_dir(tiny_model_dirs, tmp_path_factory):
    return make_heads_dir(tmp_path_factory.mktemp("medusa"), tiny_model_dirs["llama"])


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_medusa_export_has_vllm_names_shapes_and_config(medusa_dir, tmp_path):
    out = tmp_path / "vllm"
    result = export_heads(medusa_dir, out)
    heads = open_heads(medusa_dir, device="cpu")
    vocab = heads.config.vocab_size
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        found = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    expected = {name: tuple(vocab if d == "vocab" else d for d in shape) for name, shape in VLLM_NAMES_AND_SHAPES}
    assert found == expected
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "num_heads", "num_hidden_layers", "hidden_size", "vocab_size",
                                   "medusa_fc_bias", "original_lm_head")} == {
        "model_type": "medusa", "num_heads": HEADS, "num_hidden_layers": LAYERS, "hidden_size": HIDDEN,
        "vocab_size": vocab, "medusa_fc_bias": True, "original_lm_head": False}
    # vLLM's config loader renames every key holding "num" and "heads"/"layers": only its own two may exist
    assert [k for k in config if "num" in k] == ["num_heads", "num_hidden_layers"]
    assert config["mtpkit_export"]["loader"] == VLLM_MEDUSA_LOADER and len(VLLM_MEDUSA_LOADER["model_commit"]) == 40
    assert "copy of the base's output layer" in config["mtpkit_export"]["lm_heads"]
    assert ("output layers", config["mtpkit_export"]["lm_heads"]) in result.summary
    assert check_vllm_medusa(out) == []


def test_medusa_export_computes_what_the_heads_compute(medusa_dir, tmp_path):
    """vLLM's forward on the exported tensors (x + SiLU(W x + b) per layer, then lm_heads.h) equals the heads'."""
    out = tmp_path / "vllm"
    export_heads(medusa_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    heads = open_heads(medusa_dir, device="cpu")
    hidden = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    base_weight = heads.backbone.model.get_output_embeddings().weight
    for h in range(HEADS):
        x = hidden
        for l in range(LAYERS):
            x = x + torch.nn.functional.silu(x @ weights[f"blocks.{h}.layers.{l}.weight"].T
                                             + weights[f"blocks.{h}.layers.{l}.bias"])
        served = x @ weights[f"lm_heads.{h}.weight"].T
        with torch.no_grad():
            own = heads.logits(h + 1, heads.state(h + 1, hidden))
        assert torch.allclose(served, own, atol=1e-5)
        assert torch.equal(weights[f"lm_heads.{h}.weight"], base_weight)


def test_self_check_catches_a_misnamed_tensor(medusa_dir, tmp_path):
    out = tmp_path / "vllm"
    export_heads(medusa_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["blocks.1.layer.0.weight"] = weights.pop("blocks.1.layers.0.weight")
    save_file(weights, str(out / "model.safetensors"))
    problems = check_vllm_medusa(out)
    assert any("missing blocks.1.layers.0.weight" in p for p in problems), problems
    assert any("blocks.1.layer.0.weight would be left unread" in p for p in problems), problems
    assert len(problems) == 2


def test_a_misnamed_export_fails_and_leaves_nothing(medusa_dir, tmp_path, monkeypatch):
    tensors = medusa_format.vllm_medusa_tensors

    def misnamed(heads):
        state, shared = tensors(heads)
        state["lm_head.0.weight"] = state.pop("lm_heads.0.weight")
        return state, shared

    monkeypatch.setattr(medusa_format, "vllm_medusa_tensors", misnamed)
    with pytest.raises(MtpkitError, match="failed its own check.*missing lm_heads.0.weight") as caught:
        export_heads(medusa_dir, tmp_path / "vllm")
    assert "\n" not in str(caught.value)
    assert listing(tmp_path) == []


runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["export", *(str(a) for a in args)])


def test_cli_exports_and_force_replaces(medusa_dir, tmp_path):
    out = tmp_path / "vllm"
    result = run(medusa_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert "checked against" in result.output and check_vllm_medusa(out) == []
    (out / "stale.txt").write_text("old")
    assert_one_line_error(run(medusa_dir, "--out", out), "is not empty")
    assert (out / "stale.txt").exists()
    result = run(medusa_dir, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert listing(tmp_path) == ["vllm", "vllm/config.json", "vllm/model.safetensors"]  # no staging left


def test_untrained_heads_are_refused_unless_allowed(tiny_model_dirs, tmp_path):
    heads_dir = make_heads_dir(tmp_path / "heads", tiny_model_dirs["llama"], trained=False)
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(run(heads_dir, "--out", work / "vllm"), "untrained heads")
    assert listing(work) == []
    result = run(heads_dir, "--out", work / "vllm", "--allow-untrained")
    assert result.exit_code == 0, result.output
    assert check_vllm_medusa(work / "vllm") == []


def test_styles_without_a_serving_format_are_refused(tiny_model_dirs, tmp_path):
    heads_dir = make_heads_dir(tmp_path / "heads", tiny_model_dirs["llama"], style="sequential")
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(run(heads_dir, "--out", work / "vllm"), "sequential heads have no serving format")
    assert "medusa heads (vllm-medusa)" in run(heads_dir, "--out", work / "vllm").output
    assert listing(work) == []


def test_another_verifier_is_refused(medusa_dir, tiny_model_dirs, tmp_path):
    assert_one_line_error(run(medusa_dir, "--out", tmp_path / "vllm", "--verifier", tiny_model_dirs["qwen2"]),
                   "do not fit")
    assert listing(tmp_path) == []


def test_unknown_format_is_refused(medusa_dir, tmp_path):
    assert_one_line_error(run(medusa_dir, "--out", tmp_path / "vllm", "--format", "tensorrt"), "unknown --format")
    assert listing(tmp_path) == []


def test_the_export_command_imports_no_torch():
    code = ("import sys; from mtpkit.cli.app import app; import mtpkit.cli.export; "
            "assert 'torch' not in sys.modules and 'mtpkit.export' not in sys.modules")
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
