"""`mtpkit export` of eagle3 heads to speculators' eagle3 format: the loaders' names, shapes and config, the exact
conversions (fc's blocks for sorted aux layers, the embedding copy), the export's own check, and refusals that leave
nothing behind. The round trip through speculators itself is `make interop` (it needs a venv of its own)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mtpkit.export.speculators_eagle3 as eagle3_format
from mtpkit.attach import attach
from mtpkit.checkpoint import open_heads, save_heads
from mtpkit.cli.app import app
from mtpkit.errors import MtpkitError
from mtpkit.export import SPECULATORS_EAGLE3_LOADERS, check_speculators_eagle3, export_heads
from tests.conftest import assert_one_line_error
from tests.test_export import make_heads_dir as make_medusa_dir

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, WIDTH, LAYERS = 64, 128, 4  # the base below; mtpkit's draft: one head of 64 (mtpkit.draft_layer.HEAD_DIM)
AUX = [3, 1, 2]  # not increasing on purpose: the export sorts them and permutes fc's blocks
DRAFT_VOCAB = 100


def names_and_shapes(vocab: int, draft_vocab: int = DRAFT_VOCAB) -> dict:
    """What speculators' Eagle3DraftModel (0.9.0: models/eagle3/core.py, model_definitions.py, model.py's
    DraftVocabMixin) and vLLM's Eagle3LlamaForCausalLM (llama_eagle3.py load_weights) read, for the base below:
    embed_tokens [V, H] (read when present), fc [H, 3H] without bias, the first layer's q/k/v over 2H (heads x 64
    each, key/value heads = query heads here), o_proj, the three norms, the Llama MLP, norm, lm_head [N, H], and
    d2t [N] int64 / t2d [V] bool only for a draft vocabulary smaller than V."""
    H, I = HIDDEN, WIDTH  # noqa: E741
    expected = {
        "embed_tokens.weight": (vocab, H),
        "fc.weight": (H, 3 * H),
        "layers.0.input_layernorm.weight": (H,),
        "layers.0.hidden_norm.weight": (H,),
        "layers.0.self_attn.q_proj.weight": (H, 2 * H),
        "layers.0.self_attn.k_proj.weight": (H, 2 * H),
        "layers.0.self_attn.v_proj.weight": (H, 2 * H),
        "layers.0.self_attn.o_proj.weight": (H, H),
        "layers.0.post_attention_layernorm.weight": (H,),
        "layers.0.mlp.gate_proj.weight": (I, H),
        "layers.0.mlp.up_proj.weight": (I, H),
        "layers.0.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,),
        "lm_head.weight": (draft_vocab, H),
    }
    if draft_vocab < vocab:
        expected.update({"d2t": (draft_vocab,), "t2d": (vocab,)})
    return expected


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with four layers: eagle3 reads three distinct ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         vocab_size=len(tiny_tokenizer), initializer_range=0.2, eos_token_id=2, pad_token_id=0,
                         bos_token_id=1)
    path = tmp_path_factory.mktemp("deep-llama")
    LlamaForCausalLM(config).float().eval().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def make_eagle3_dir(path, model_dir, aux=AUX, draft_vocab=DRAFT_VOCAB):
    """Trained-looking eagle3 heads: random weights everywhere, a draft vocabulary that is not the first ids."""
    attach(str(model_dir), "eagle3", 3, 1, path, draft_vocab_size=draft_vocab, aux_layers=aux)
    heads = open_heads(path, device="cpu")
    generator = torch.Generator().manual_seed(5)
    vocab = heads.config.vocab_size
    if draft_vocab:
        heads.set_draft_vocab(torch.randperm(vocab, generator=generator)[:draft_vocab].sort().values)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator) + (parameter.ndim == 1))
    heads.config.training = {"steps": 7, "epochs": 1.0}
    save_heads(heads, path)
    return path


@pytest.fixture(scope="module")
def eagle3_dir(deep_llama, tmp_path_factory):
    return make_eagle3_dir(tmp_path_factory.mktemp("eagle3"), deep_llama)


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def written(out):
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}


def test_eagle3_export_has_the_loaders_names_shapes_and_config(eagle3_dir, deep_llama, tmp_path):
    out = tmp_path / "speculators"
    result = export_heads(eagle3_dir, out)  # the style's default format
    vocab = open_heads(eagle3_dir, device="cpu").config.vocab_size
    assert written(out) == names_and_shapes(vocab)
    weights = load_file(str(out / "model.safetensors"))
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    layer = config["transformer_layer_config"]
    assert {k: layer[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                                  "rms_norm_eps", "rope_theta", "vocab_size", "max_position_embeddings",
                                  "attention_bias", "mlp_bias")} == {
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": WIDTH, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": vocab, "max_position_embeddings": 512,
        "attention_bias": False, "mlp_bias": False}
    assert layer["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert {k: config[k] for k in ("speculators_model_type", "architectures", "speculators_version",
                                   "draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                                   "norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")} == {
        "speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"], "speculators_version": "0.9.0",
        "draft_vocab_size": DRAFT_VOCAB, "target_hidden_size": HIDDEN, "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
        "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False}
    assert config["speculators_config"] == {
        "algorithm": "eagle3", "default_proposal_method": "greedy",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1,
                              "accept_tolerance": 0.0}],
        "verifier": {"name_or_path": str(deep_llama.resolve()), "architectures": ["LlamaForCausalLM"]}}
    assert config["mtpkit_export"]["loader"] == SPECULATORS_EAGLE3_LOADERS
    assert config["mtpkit_export"]["heads_aux_layers"] == AUX
    vllm, speculators = SPECULATORS_EAGLE3_LOADERS["vllm"], SPECULATORS_EAGLE3_LOADERS["speculators"]
    assert len(vllm["model_commit"]) == len(vllm["config_commit"]) == 40 and len(speculators["wheel_sha256"]) == 64
    assert ("reads base layers", "[1, 2, 3] (input hidden states), sorted for vLLM: fc's blocks permuted") \
        in result.summary
    assert check_speculators_eagle3(out) == []


def test_eagle3_export_carries_the_heads_exactly(eagle3_dir, tmp_path):
    """Every tensor is the heads' own, but fc, whose blocks follow the sorted layers: it gives the same state on
    the base's states collected in layer order as the heads' fc on them in the heads' order."""
    out = tmp_path / "speculators"
    export_heads(eagle3_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    heads = open_heads(eagle3_dir, device="cpu")
    head = heads.heads[0]
    own = {name.removeprefix("heads.0."): t for name, t in heads.state_dict().items()}
    for name in names_and_shapes(heads.config.vocab_size):
        if name not in ("fc.weight", "embed_tokens.weight"):
            assert torch.equal(weights[name], own[name]), name
    assert torch.equal(weights["embed_tokens.weight"], heads.backbone.model.get_input_embeddings().weight)
    assert torch.equal(weights["d2t"] + torch.arange(DRAFT_VOCAB), heads.draft_columns())
    states = torch.randn(LAYERS + 1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        served = torch.cat([states[i] for i in (1, 2, 3)], dim=-1) @ weights["fc.weight"].T
        drafted = head.fc(torch.cat([states[i] for i in AUX], dim=-1))
    torch.testing.assert_close(served, drafted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(weights["fc.weight"], head.fc.weight)  # it was permuted


def test_a_full_draft_vocabulary_has_no_vocabulary_maps(deep_llama, tmp_path):
    vocab = open_heads(make_eagle3_dir(tmp_path / "heads", deep_llama, draft_vocab=0), device="cpu").config.vocab_size
    export_heads(tmp_path / "heads", tmp_path / "speculators")
    assert written(tmp_path / "speculators") == names_and_shapes(vocab, draft_vocab=vocab)
    assert check_speculators_eagle3(tmp_path / "speculators") == []


def test_self_check_catches_a_misnamed_tensor(eagle3_dir, tmp_path):
    out = tmp_path / "speculators"
    export_heads(eagle3_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["layers.0.hidden_layernorm.weight"] = weights.pop("layers.0.hidden_norm.weight")
    weights["t2d"] = weights["t2d"].long()
    save_file(weights, str(out / "model.safetensors"))
    problems = check_speculators_eagle3(out)
    assert any("missing layers.0.hidden_norm.weight [64]" in p for p in problems), problems
    assert any("layers.0.hidden_layernorm.weight would be left unread" in p for p in problems), problems
    assert any("t2d is I64, the loader expects BOOL" in p for p in problems), problems
    assert len(problems) == 3


def test_a_misnamed_export_fails_and_leaves_nothing(eagle3_dir, tmp_path, monkeypatch):
    tensors = eagle3_format.speculators_eagle3_tensors

    def misnamed(heads, order):
        state = tensors(heads, order)
        state["model.fc.weight"] = state.pop("fc.weight")
        return state

    monkeypatch.setattr(eagle3_format, "speculators_eagle3_tensors", misnamed)
    with pytest.raises(MtpkitError, match="failed its own check.*missing fc.weight") as caught:
        export_heads(eagle3_dir, tmp_path / "speculators")
    assert "\n" not in str(caught.value)
    assert listing(tmp_path) == []


runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["export", *(str(a) for a in args)])


def test_cli_writes_each_style_in_its_own_format(eagle3_dir, tmp_path):
    result = run(eagle3_dir, "--out", tmp_path / "speculators")
    assert result.exit_code == 0, result.output
    assert "speculators-eagle3" in result.output and "checked against" in result.output
    assert check_speculators_eagle3(tmp_path / "speculators") == []


def test_a_format_that_does_not_carry_the_style_is_refused(eagle3_dir, tiny_model_dirs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(run(eagle3_dir, "--out", work / "out", "--format", "vllm-medusa"),
                          "vllm-medusa carries medusa heads, not eagle3")
    medusa_dir = make_medusa_dir(tmp_path / "medusa", tiny_model_dirs["llama"])
    assert_one_line_error(run(medusa_dir, "--out", work / "out", "--format", "speculators-eagle3"),
                          "speculators-eagle3 carries eagle3 heads, not medusa")
    assert listing(work) == []


def test_repeated_aux_layers_are_refused(deep_llama, tmp_path):
    heads_dir = make_eagle3_dir(tmp_path / "heads", deep_llama, aux=[1, 1, 2])
    work = tmp_path / "work"
    work.mkdir()
    assert_one_line_error(run(heads_dir, "--out", work / "out"), "read base layer(s) [1, 1, 2] with one repeated")
    assert listing(work) == []


def test_a_base_whose_embedding_is_more_than_a_table_is_refused(eagle3_dir, tmp_path, monkeypatch):
    """A scaled embedding (Gemma's) is not what the format's embed_tokens computes: refused, nothing written."""
    import mtpkit.checkpoint

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    opened = mtpkit.checkpoint.open_heads

    def scaled_base(*args, **kwargs):
        heads = opened(*args, **kwargs)
        table = heads.backbone.model.get_input_embeddings()
        scaled = ScaledEmbedding(*table.weight.shape)
        scaled.weight = table.weight
        heads.backbone.model.set_input_embeddings(scaled)
        return heads

    monkeypatch.setattr(mtpkit.checkpoint, "open_heads", scaled_base)
    with pytest.raises(MtpkitError, match="input embedding is a ScaledEmbedding, not a plain table"):
        export_heads(eagle3_dir, tmp_path / "speculators")
    assert listing(tmp_path) == []
