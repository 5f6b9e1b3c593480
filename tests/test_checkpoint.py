"""The heads directory: round trip, compatibility checks, base weights untouched and never written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mtpkit.backbone import fingerprint, wrap_model
from mtpkit.checkpoint import load_heads, save_heads
from mtpkit.config import CONFIG_NAME, WEIGHTS_NAME, HeadsConfig
from mtpkit.errors import MtpkitError
from mtpkit.heads import build_heads
from tests.conftest import make_model
from tests.test_heads import make_config


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_save_load_round_trip_is_allclose(tiny_backbone, tmp_path, style):
    heads = build_heads(make_config(tiny_backbone, style=style, own_lm_head=True), tiny_backbone)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_heads(heads, tmp_path)
    loaded = load_heads(tmp_path, tiny_backbone)
    for (name, a), (name_b, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.config == heads.config


def test_heads_file_holds_no_base_weights(tiny_backbone, tmp_path):
    base_before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    heads = build_heads(make_config(tiny_backbone), tiny_backbone)
    save_heads(heads, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    head_params = sum(t.numel() for t in saved.values())
    assert head_params == heads.trainable_parameters()
    assert all(k.startswith("heads.") for k in saved)
    for key, value in tiny_backbone.model.state_dict().items():
        assert torch.equal(value, base_before[key])


def test_config_json_is_sorted_and_indented(tiny_backbone, tmp_path):
    save_heads(build_heads(make_config(tiny_backbone), tiny_backbone), tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert text.startswith('{\n  "')
    assert data["base_fingerprint"] == tiny_backbone.fingerprint and data["style"] == "medusa"


def test_other_base_of_same_shape_is_refused(tiny_backbone, tiny_tokenizer, tmp_path, family):
    save_heads(build_heads(make_config(tiny_backbone), tiny_backbone), tmp_path)
    other = wrap_model(make_model(family, len(tiny_tokenizer), seed=123), tiny_tokenizer, "other")
    assert other.hidden_size == tiny_backbone.hidden_size
    with pytest.raises(MtpkitError, match="fingerprint"):
        load_heads(tmp_path, other)


def test_fingerprint_ignores_dtype_but_sees_weights(tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer))
    fp32 = fingerprint(model)
    assert fingerprint(make_model("llama", len(tiny_tokenizer)).to(torch.bfloat16)) == fp32
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    assert fingerprint(model) != fp32


def test_corrupt_weights_file_is_one_clear_error(tiny_backbone, tmp_path):
    save_heads(build_heads(make_config(tiny_backbone), tiny_backbone), tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file at all")
    with pytest.raises(MtpkitError, match="corrupt"):
        load_heads(tmp_path, tiny_backbone)


def test_missing_config_is_one_clear_error(tiny_backbone, tmp_path):
    with pytest.raises(MtpkitError, match="not a heads directory"):
        load_heads(tmp_path, tiny_backbone)
    with pytest.raises(MtpkitError, match="not a heads directory"):
        HeadsConfig.read(tmp_path / "nope")
