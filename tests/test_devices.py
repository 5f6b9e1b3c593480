"""Devices, dtypes and trust_remote_code reach the model, the heads, the KV cache and the masks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from mtpkit import kernels
from mtpkit.backbone import resolve_device, resolve_placement
from mtpkit.checkpoint import open_heads
from mtpkit.cli.app import app
from mtpkit.config import CONFIG_NAME
from mtpkit.errors import MtpkitError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def recorded_loads(monkeypatch):
    """Every load_backbone call's keyword arguments; the real loader still runs."""
    import mtpkit.checkpoint

    calls, real = [], mtpkit.checkpoint.load_backbone

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mtpkit.checkpoint, "load_backbone", recording)
    return calls


def test_device_default_and_refusals():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(MtpkitError, match="unknown device 'warp'"):
        resolve_device("warp")
    if not torch.cuda.is_available():
        with pytest.raises(MtpkitError, match="not available"):
            resolve_device("cuda")
    with pytest.raises(MtpkitError, match="unknown dtype 'float8'"):
        resolve_placement("cpu", "float8")
    assert resolve_placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bfloat16_reaches_model_heads_cache_and_masks(heads_dir, recorded_loads, monkeypatch, device):
    from mtpkit.decoding import SpeculativeDecoder, greedy_generate

    heads = open_heads(heads_dir, dtype="bfloat16", device=device)
    assert recorded_loads[-1]["dtype"] == "bfloat16" and recorded_loads[-1]["device"] == device
    backbone = heads.backbone
    assert backbone.dtype == torch.bfloat16 and backbone.device.type == device
    assert {(p.dtype, p.device.type) for p in backbone.model.parameters()} == {(torch.bfloat16, device)}
    assert {(p.dtype, p.device.type) for p in heads.parameters()} == {(torch.bfloat16, device)}

    measured = []
    monkeypatch.setattr(kernels, "choose_kernels", lambda *a, **k: measured.append(a))
    measurement = kernels.use_measured_kernels(backbone, heads)
    assert measured == [] and measurement.plan is kernels.STOCK  # never measured outside float32: stock
    assert kernels.kernel_plan(backbone.model) is kernels.STOCK

    seen = []

    def capture(module, args, kwargs):
        cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
        keys = [layer.keys for layer in getattr(cache, "layers", []) if getattr(layer, "keys", None) is not None]
        seen.append((mask, keys))

    hook = backbone.model.base_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        decoder = SpeculativeDecoder(heads, tree=[[0], [1], [0, 0]])
        prompt = torch.tensor([[5, 6, 7, 8, 9]])
        result = decoder.generate(prompt, 8)
        plain = greedy_generate(backbone, prompt, 8)
    finally:
        hook.remove()
        kernels.disable_fast_kernels(backbone.model)
        kernels.disable_fast_kernels(heads)
    masks = [mask for mask, _ in seen if isinstance(mask, torch.Tensor) and mask.dim() == 4]
    assert masks and {mask.dtype for mask in masks} == {torch.bfloat16}
    assert {mask.device.type for mask in masks} == {device}
    cached = [key for _, keys in seen for key in keys]
    assert cached and {(key.dtype, key.device.type) for key in cached} == {(torch.bfloat16, device)}
    assert len(result.tokens) == 8 and len(plain.tokens) == 8  # identity in bf16 is measured by bench, not assumed


def test_load_backbone_moves_the_model_to_the_resolved_device(tiny_model_dirs, monkeypatch):
    import mtpkit.backbone

    targets, real = [], mtpkit.backbone.resolve_device
    monkeypatch.setattr(mtpkit.backbone, "resolve_device", lambda name=None: targets.append(name) or real(name))
    moved, real_to = [], torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a[0] if a else None) or real_to(self, *a, **k))
    backbone = mtpkit.backbone.load_backbone(str(tiny_model_dirs["llama"]), device="cpu", check=False)
    assert targets == ["cpu"] and torch.device("cpu") in moved and backbone.device.type == "cpu"


def test_trust_remote_code_comes_from_the_flag_or_the_config(heads_dir, tmp_path, recorded_loads):
    open_heads(heads_dir, device="cpu")
    open_heads(heads_dir, device="cpu", trust_remote_code=True)
    recorded = tmp_path / "recorded"
    shutil.copytree(heads_dir, recorded)
    config = json.loads((recorded / CONFIG_NAME).read_text())
    assert config["trust_remote_code"] is False
    (recorded / CONFIG_NAME).write_text(json.dumps({**config, "trust_remote_code": True}))
    open_heads(recorded, device="cpu")
    assert [call["trust_remote_code"] for call in recorded_loads] == [False, True, True]


def test_generate_passes_device_dtype_and_trust_to_the_loader(heads_dir, recorded_loads):
    result = runner.invoke(app, ["generate", str(heads_dir), "--prompt", "hello", "--max-new-tokens", "4",
                                 "--tree", "chain", "--device", "cpu", "--dtype", "bfloat16", "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert [(c["device"], c["dtype"], c["trust_remote_code"]) for c in recorded_loads] == [("cpu", "bfloat16", True)]


def test_bench_in_bfloat16_reports_identity_as_a_rate(heads_dir, tmp_path, recorded_loads):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b):\nThe quick brown fox\n")
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(heads_dir), "--prompts", str(prompts), "--max-new-tokens", "6",
                                 "--methods", "mtp-chain", "--threads", "1", "--device", "cpu", "--dtype", "bfloat16",
                                 "--trust-remote-code", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [(c["device"], c["dtype"], c["trust_remote_code"]) for c in recorded_loads] == [("cpu", "bfloat16", True)]
    report = json.loads(out.read_text())
    assert report["setup"]["dtype"] == "bfloat16" and report["setup"]["device"] == "cpu"
    assert report["setup"]["kernel_plan"] == "1 row stock"  # never measured outside float32
    for figures in report["methods"].values():
        assert 0.0 <= figures["identical_rate"] <= 1.0 and figures["identical_rate"] * 2 in (0.0, 1.0, 2.0)


@pytest.mark.parametrize("args, fragment", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--seed", str(2**64)], "--seed"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "device"),
    (["--dtype", "int8"], "dtype"),
])
def test_generate_refuses_nonsense_numbers_in_one_line(heads_dir, monkeypatch, args, fragment):
    def no_loading(*a, **k):
        raise AssertionError("loaded before the options were checked")

    monkeypatch.setattr("mtpkit.checkpoint.load_backbone", no_loading)
    result = runner.invoke(app, ["generate", str(heads_dir), "--prompt", "hi", *args])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output
