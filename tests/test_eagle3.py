"""The eagle3 head style (EAGLE-3's draft): its layout, training-time test = drafting, greedy identity on Llama,
Qwen2 and sliding-window Gemma-3, the d2t / t2d view of the draft vocabulary, and attach's refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from mtpkit import targets
from mtpkit.backbone import wrap_model
from mtpkit.checkpoint import DRAFT_VOCAB_KEY, load_heads, save_heads
from mtpkit.cli.app import app
from mtpkit.config import CONFIG_NAME, WEIGHTS_NAME, HeadsConfig
from mtpkit.decoding import SpeculativeDecoder, greedy_generate
from mtpkit.draft_layer import append_keys
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads, build_heads, d2t_t2d, default_aux_layer_ids, draft_vocab_from_d2t
from tests.test_cache_kinds import WINDOW, long_prompt, make_sliding_model
from tests.test_train import text_data  # noqa: F401 (a fixture)

TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]]
PROMPT = "The quick brown fox"
DRAFT_VOCAB = 100

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def eagle3_config(backbone, num_heads: int = 4, draft_vocab_size: int = DRAFT_VOCAB) -> HeadsConfig:
    return HeadsConfig(style="eagle3", num_heads=num_heads, num_layers=1, hidden_size=backbone.hidden_size,
                       vocab_size=backbone.vocab_size, base_model=backbone.reference,
                       base_fingerprint=backbone.fingerprint, draft_vocab_size=draft_vocab_size,
                       eagle_aux_hidden_state_layer_ids=default_aux_layer_ids(backbone.num_layers))


def randomise(heads: DraftHeads, seed: int = 1) -> DraftHeads:
    """Random weights everywhere (norms included), so no part of the layer can be skipped unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if param.ndim == 1 else 0.0))
    return heads


def random_heads(backbone, draft_vocab: list[int] | None = None, **kw) -> DraftHeads:
    heads = build_heads(eagle3_config(backbone, draft_vocab_size=len(draft_vocab) if draft_vocab else DRAFT_VOCAB,
                                      **kw), backbone)
    if draft_vocab:
        heads.set_draft_vocab(torch.tensor(draft_vocab))
    return randomise(heads)


class OracleEagle3(DraftHeads):
    """eagle3 heads whose output layer knows the future: at a drafting state of position p (``commit``: the last
    committed one; ``draft_step``: its ``position``) the top draft is the base's greedy token p + 2, when the
    draft vocabulary holds it. Everything else (draft cache, tree, d2t) runs as for real heads."""

    def __init__(self, backbone, sequence: list[int], draft_vocab: list[int]):
        super().__init__(eagle3_config(backbone, draft_vocab_size=len(draft_vocab)), backbone)
        self.set_draft_vocab(torch.tensor(draft_vocab))
        self.sequence, self.position = sequence, 0
        self.noise = torch.randn(len(sequence) + 8, len(draft_vocab), generator=torch.Generator().manual_seed(0))

    def commit(self, cache, features, next_tokens):
        state = super().commit(cache, features, next_tokens)
        self.position = cache.length - 1
        return state

    def draft_step(self, cache, prev_states, tokens, position, nodes, visible):
        self.position = position
        return super().draft_step(cache, prev_states, tokens, position, nodes, visible)

    def draft_logits(self, k, state):
        logits, columns = super().draft_logits(k, state)
        row = self.noise[self.position].clone()
        if self.position + 2 < len(self.sequence):
            hits = (columns == self.sequence[self.position + 2]).nonzero()
            if hits.numel():
                row[hits[0, 0]] = 10.0
        return row.expand_as(logits).to(logits.dtype), columns


def test_parameter_names_and_shapes_follow_the_eagle3_layout(tiny_tokenizer):
    from tests.conftest import make_model

    backbone = wrap_model(make_model("llama", len(tiny_tokenizer)), tiny_tokenizer, "tiny-llama")
    H, V, N, I = 64, backbone.vocab_size, DRAFT_VOCAB, 128  # noqa: E741 (the tiny Llama's MLP width)
    expected = {
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
        "lm_head.weight": (N, H),
        "d2t": (N,),
        "t2d": (V,),
    }
    heads = build_heads(eagle3_config(backbone), backbone)
    state = heads.state_dict()
    assert {name.removeprefix("heads.0."): tuple(t.shape) for name, t in state.items()} == expected
    assert state["heads.0.d2t"].dtype == torch.int64 and state["heads.0.t2d"].dtype == torch.bool
    assert heads.config.eagle_aux_hidden_state_layer_ids == [1, 1, 0]  # [2, L // 2, L - 3] inside 2 layers
    assert default_aux_layer_ids(32) == [2, 16, 29]
    # a fresh head drafts from the first ids, scored by the base's own rows of them
    assert torch.equal(state["heads.0.lm_head.weight"], backbone.model.get_output_embeddings().weight[:N])


def test_training_time_test_states_equal_drafting_states(tiny_backbone):
    """Step k of the training-time test at position t computes exactly the state drafting computes for depth k
    after committing positions 0..t, the true tokens drafted before it."""
    heads = random_heads(tiny_backbone, num_heads=4)
    ids = torch.randint(3, tiny_backbone.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = heads.features(tiny_backbone.hidden(ids, **heads.feature_kwargs))
        assert features.shape == (1, 14, 3 * tiny_backbone.hidden_size)
        conditioning = [targets.conditioning_tokens(ids, k) for k in range(1, 5)]
        trained = heads.teacher_forced_states(features, conditioning)
        checked = 0
        for t in (0, 3, 8):
            cache = heads.new_draft_cache()
            state = heads.commit(cache, features[0, : t + 1], ids[0, 1: t + 2])
            torch.testing.assert_close(heads.readout(state)[0], trained[0][0, t], atol=1e-4, rtol=1e-4)
            drafted = None
            for k in range(2, 5):
                visible = None if drafted is None else torch.ones(1, drafted[0][0].shape[2], dtype=torch.bool)
                state, own = heads.draft_step(cache, state, ids[0, t + k: t + k + 1], t + k - 1, drafted, visible)
                drafted = append_keys(drafted, own)
                torch.testing.assert_close(heads.readout(state)[0], trained[k - 1][0, t], atol=1e-4, rtol=1e-4)
                checked += 1
        assert checked == 9
        # the layers matter: another layer's features give other states
        assert not torch.allclose(trained[1], heads.teacher_forced_states(features.flip(-1), conditioning)[1])


def _check_greedy_identity(backbone, ids, new_tokens: int, trees):
    reference = greedy_generate(backbone, ids, new_tokens)
    sequence = ids[0].tolist() + reference.tokens
    said = sorted(set(reference.tokens))
    # a draft vocabulary missing some of what the base says: those tokens are never drafted
    missing = set(said[::3])
    partial = sorted((set(sequence) | set(range(3, 3 + DRAFT_VOCAB))) - missing)
    candidates = {
        "random": (random_heads(backbone), None),
        "random-partial": (random_heads(backbone, partial), set(partial)),
        "oracle": (OracleEagle3(backbone, sequence, sorted(set(sequence) | set(range(DRAFT_VOCAB)))), None),
        "oracle-partial": (OracleEagle3(backbone, sequence, partial), set(partial)),
    }
    for tree in trees:
        for name, (heads, vocab) in candidates.items():
            steps = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a base that cannot verify trees falls back to chains
                result = SpeculativeDecoder(heads, tree).generate(ids, new_tokens, trace=steps.append)
            assert result.tokens == reference.tokens, (name, tree)
            drafted = [t for step in steps for t in step["draft_tokens"][1:]]
            if vocab is not None:
                assert set(drafted) <= vocab and not set(drafted) & missing, name
            if name == "oracle":
                assert result.mean_accepted_tokens > 3.0, (name, tree)  # 4 deep, all right
            if name == "oracle-partial":
                assert result.mean_accepted_tokens > 1.5, (name, tree)
    return candidates


@pytest.mark.parametrize("tree", ["chain", TREE], ids=["chain", "tree"])
def test_speculative_greedy_equals_plain_greedy(tiny_backbone, tree):
    ids = tiny_backbone.tokenizer(PROMPT, return_tensors="pt").input_ids
    _check_greedy_identity(tiny_backbone, ids, 40, [tree])


def test_speculative_greedy_equals_plain_greedy_on_gemma3_past_its_window(tiny_tokenizer):
    backbone = wrap_model(make_sliding_model("gemma3", len(tiny_tokenizer)), tiny_tokenizer, "tiny-gemma3")
    ids = long_prompt(backbone.vocab_size)
    assert ids.shape[1] > WINDOW
    _check_greedy_identity(backbone, ids, 30, ["chain", TREE])


def test_drafts_map_through_d2t(tiny_backbone):
    heads = random_heads(tiny_backbone, list(range(50, 50 + DRAFT_VOCAB)))
    state = torch.randn(3, tiny_backbone.hidden_size)
    logits, columns = heads.draft_logits(1, state)
    assert logits.shape == (3, DRAFT_VOCAB)
    assert columns.tolist() == list(range(50, 50 + DRAFT_VOCAB))
    full = heads.logits(1, state)
    assert torch.equal(full.argmax(-1), columns[logits.argmax(-1)])  # the full view drafts the same token
    assert torch.equal(full[:, 50: 50 + DRAFT_VOCAB], logits)


def test_d2t_t2d_round_trip_on_a_made_up_vocabulary(tiny_backbone, tmp_path):
    d2t, t2d = d2t_t2d(torch.tensor([1, 4, 5, 9]), 10)
    assert d2t.tolist() == [1, 3, 3, 6] and d2t.dtype == torch.int64
    assert t2d.tolist() == [False, True, False, False, True, True, False, False, False, True]
    assert draft_vocab_from_d2t(d2t, t2d).tolist() == [1, 4, 5, 9]
    with pytest.raises(MtpkitError, match="different draft vocabularies"):
        draft_vocab_from_d2t(d2t, torch.roll(t2d, 1))

    # saved and loaded, also from EAGLE-3's own keys alone (no draft_vocab)
    vocab = sorted(torch.randperm(tiny_backbone.vocab_size, generator=torch.Generator().manual_seed(3))[:DRAFT_VOCAB]
                   .tolist())
    heads = random_heads(tiny_backbone, vocab)
    (tmp_path / CONFIG_NAME).write_text(heads.config.to_json())
    save_heads(heads, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / WEIGHTS_NAME))
    assert state["heads.0.d2t"].tolist() == [v - i for i, v in enumerate(vocab)]
    del state[DRAFT_VOCAB_KEY]
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    loaded = load_heads(tmp_path, tiny_backbone)
    assert loaded.draft_vocab.tolist() == vocab
    state = torch.randn(2, tiny_backbone.hidden_size)
    torch.testing.assert_close(loaded.draft_logits(1, state)[0], heads.draft_logits(1, state)[0])


def _attach(*args):
    return CliRunner().invoke(app, [str(a) for a in ("attach", *args)])


def _assert_one_line_error(result, fragment):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and fragment in " ".join(lines), result.output


def test_attach_writes_eagle3_heads(tiny_model_dirs, tmp_path):
    out = tmp_path / "heads"
    result = _attach("--model", tiny_model_dirs["llama"], "--style", "eagle3", "--heads", 3,
                     "--draft-vocab-size", 120, "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["style"] == "eagle3" and config["draft_vocab_size"] == 120
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 1, 0]


@pytest.mark.parametrize("args, fragment", [
    (("--style", "eagle4"), "unknown head style 'eagle4'"),
    (("--style", "eagle3", "--heads", 0), "--heads must be at least 1"),
    (("--style", "eagle3", "--draft-vocab-size", 100000), "--draft-vocab-size 100000 is larger than the base's"),
    (("--style", "eagle3", "--aux-layer", 0, "--aux-layer", 1, "--aux-layer", 5), "--aux-layer 5 is outside"),
    (("--style", "eagle3", "--aux-layer", 0), "three of the base's layers"),
    (("--style", "medusa", "--draft-vocab-size", 10), "eagle3 options"),
    (("--style", "eagle3", "--layers", 2), "--layers must be 1"),
])
def test_attach_refuses_bad_eagle3_input(tiny_model_dirs, tmp_path, args, fragment):
    out = tmp_path / "heads"
    _assert_one_line_error(_attach("--model", tiny_model_dirs["llama"], *args, "--out", out), fragment)
    assert not (out / CONFIG_NAME).exists()


def eagle3_heads(tiny_model_dirs, tmp_path, num_heads: int):
    """Fresh eagle3 heads on the tiny Llama, drafting from 40 tokens."""
    from mtpkit.attach import attach

    heads_dir = tmp_path / "heads"
    attach(str(tiny_model_dirs["llama"]), "eagle3", num_heads, 1, heads_dir, draft_vocab_size=40)
    return heads_dir


def test_training_chooses_the_draft_vocabulary_lowers_the_loss_and_moves_only_the_heads(tiny_model_dirs, tmp_path,
                                                                                        text_data):
    from mtpkit import train
    from mtpkit.checkpoint import open_heads
    from mtpkit.train.batches import draft_vocab, target_rows

    heads_dir = eagle3_heads(tiny_model_dirs, tmp_path, 3)
    settings = dict(data=[str(text_data)], lr=1e-2, batch_size=4, eval_fraction=0.2, eval_every=0, save_every=0,
                    max_steps=15, seed=0)
    with pytest.raises(MtpkitError, match="token loss only"):
        train.setup(heads_dir, train.FinetuneOptions(**settings))  # distill is the default loss
    run = train.setup(heads_dir, train.FinetuneOptions(loss="ce", **settings))
    assert run.data.train_store.hidden_size == 3 * 64  # three layers' hidden states per token
    chosen = draft_vocab(run.data.train_examples, 40)
    assert run.heads.draft_vocab.tolist() == chosen.tolist()  # the 40 most frequent training targets
    # the loss counts only targets inside the draft vocabulary, in its normalisation too
    everything = list(range(len(run.data.train_examples)))
    counted = target_rows(run.data.train_examples, everything, 3, False, run.heads)
    assert all(0 < c < n for c, n in zip(counted, target_rows(run.data.train_examples, everything, 3, False)))
    base_before = {k: v.clone() for k, v in run.heads.backbone.model.state_dict().items()}
    heads_before = {k: v.clone() for k, v in run.heads.state_dict().items()}
    before = train.evaluate(run.heads, run.data.eval_examples, run.data.eval_store, 4, torch.device("cpu"))
    train.train(run)
    after = run.final_eval
    assert all(a < b - 0.1 for a, b in zip(after["head_loss"], before["head_loss"])), (before, after)
    assert all(torch.equal(v, run.heads.backbone.model.state_dict()[k]) for k, v in base_before.items())
    moved = {k for k, v in run.heads.state_dict().items() if not torch.equal(heads_before[k], v)}
    assert {"heads.0.fc.weight", "heads.0.lm_head.weight", "heads.0.layers.0.self_attn.q_proj.weight"} <= moved
    assert "heads.0.d2t" not in moved
    train.save(run, 1.0)
    loaded = open_heads(heads_dir)
    assert loaded.draft_vocab.tolist() == chosen.tolist()
    assert loaded.config.training["draft_vocab"] == 40


def test_every_style_is_one_module_in_the_registry():
    import importlib

    from mtpkit.config import STYLES as STYLE_NAMES
    from mtpkit.heads import STYLES, style_of

    assert tuple(STYLES) == STYLE_NAMES
    for name, style in STYLES.items():
        assert type(style).__module__ == f"mtpkit.heads.{name}"
        assert importlib.import_module(f"mtpkit.heads.{name}")
    assert style_of("eagle3").own_vocabulary and style_of("eagle3").attends and not style_of("medusa").sequential
    with pytest.raises(MtpkitError, match="unknown head style 'hydra'"):
        style_of("hydra")


def test_a_resumed_run_keeps_the_draft_vocabulary_it_chose(tiny_model_dirs, tmp_path, text_data):
    from mtpkit import train
    from mtpkit.checkpoint import open_heads

    heads_dir = eagle3_heads(tiny_model_dirs, tmp_path, 2)
    settings = dict(data=[str(text_data)], lr=1e-2, batch_size=8, eval_fraction=0.2, eval_every=0, save_every=2,
                    max_steps=4, seed=0, loss="ce")

    def stop_at_3(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(train.TrainingInterrupted):
        train.finetune(heads_dir, train.FinetuneOptions(**settings), callbacks=train.Callbacks(after_step=stop_at_3))
    train.finetune(heads_dir, train.FinetuneOptions(resume=True, **settings))
    loaded = open_heads(heads_dir)
    assert loaded.draft_vocab.tolist() != list(range(40))  # the chosen one, not attach's first ids
    assert loaded.draft_vocab.tolist() == loaded.draft_columns().tolist()
