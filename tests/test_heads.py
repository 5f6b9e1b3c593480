"""Heads: own parameters per layer, fresh heads reproduce the base, the shift definition."""

import pytest
import torch

from mtpkit import targets
from mtpkit.config import HeadsConfig
from mtpkit.draft_layer import append_keys
from mtpkit.errors import MtpkitError
from mtpkit.heads import build_heads


def make_config(backbone, style="medusa", num_heads=3, num_layers=2, **kw):
    return HeadsConfig(style=style, num_heads=num_heads, num_layers=num_layers, hidden_size=backbone.hidden_size,
                       vocab_size=backbone.vocab_size, base_model=backbone.reference,
                       base_fingerprint=backbone.fingerprint, **kw)


@pytest.mark.parametrize("style", ["medusa", "sequential"])
def test_every_layer_has_its_own_parameters(tiny_backbone, style):
    heads = build_heads(make_config(tiny_backbone, style=style, num_heads=3, num_layers=2), tiny_backbone)
    params = list(heads.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    blocks = [b for head in heads.heads for b in head.blocks]
    assert len(blocks) == 6 and len({id(b.linear) for b in blocks}) == 6
    # no base weights are registered inside the heads
    assert not any(name.startswith("backbone") for name, _ in heads.named_parameters())


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_fresh_head_reproduces_base_next_token_logits(tiny_backbone, style):
    heads = build_heads(make_config(tiny_backbone, style=style), tiny_backbone)
    ids = torch.randint(0, tiny_backbone.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tiny_backbone.hidden(ids).last_hidden_state
        base_logits = tiny_backbone.model(input_ids=ids).logits
        conditioning = [targets.conditioning_tokens(ids, k) for k in range(1, heads.num_heads + 1)]
        states = heads.teacher_forced_states(hidden, conditioning)
        for k, state in enumerate(states, start=1):
            torch.testing.assert_close(heads.logits(k, state), base_logits, atol=1e-5, rtol=1e-5)


def test_sequential_heads_see_the_previous_token():
    """Once trained (non-zero fuse weights), a sequential head's state depends on its conditioning token."""
    from tests.conftest import make_model, make_tokenizer
    from mtpkit.backbone import wrap_model

    tok = make_tokenizer()
    backbone = wrap_model(make_model("llama", len(tok)), tok, "tiny")
    heads = build_heads(make_config(backbone, style="sequential", num_heads=2, num_layers=1), backbone)
    torch.nn.init.normal_(heads.heads[1].fuse.weight, std=0.1)
    hidden = torch.randn(1, 4, backbone.hidden_size)
    a = heads.state(2, hidden, hidden, torch.tensor([[1, 2, 3, 4]]))
    b = heads.state(2, hidden, hidden, torch.tensor([[5, 6, 7, 8]]))
    assert not torch.allclose(a, b)


def test_eagle_has_one_draft_model_with_its_own_layers(tiny_backbone):
    heads = build_heads(make_config(tiny_backbone, style="eagle", num_heads=4, num_layers=2), tiny_backbone)
    assert len(heads.heads) == 1 and len(heads.heads[0].layers) == 2  # run once per depth, not one per head
    params = list(heads.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    with pytest.raises(TypeError, match="draft cache"):
        heads.state(1, torch.zeros(1, tiny_backbone.hidden_size))


def _randomise(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_eagle_training_states_equal_the_drafting_states(tiny_backbone, num_layers):
    """What training sees (all positions, K steps at once) is what decoding computes on its draft cache:
    step k at position t from committed features h_0..h_t with tokens 1..t+1, then tokens t+2..t+k drafted."""
    heads = build_heads(make_config(tiny_backbone, style="eagle", num_heads=3, num_layers=num_layers), tiny_backbone)
    _randomise(heads)
    ids = torch.randint(0, tiny_backbone.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = tiny_backbone.hidden(ids).last_hidden_state
        conditioning = [targets.conditioning_tokens(ids, k) for k in range(1, heads.num_heads + 1)]
        trained = heads.teacher_forced_states(hidden, conditioning)
        for t in (0, 4, 8):
            cache = heads.new_draft_cache()
            for start, stop in ((0, t // 2), (t // 2, t)):  # committed in pieces, as decoding steps do
                if stop > start:
                    heads.commit(cache, hidden[0, start:stop], ids[0, start + 1:stop + 1])
            state = heads.commit(cache, hidden[0, t:t + 1], ids[0, t + 1:t + 2])
            torch.testing.assert_close(state[0], trained[0][0, t], atol=1e-4, rtol=1e-4)
            nodes, steps = None, [state]
            for k in range(2, heads.num_heads + 1):
                visible = None if nodes is None else torch.ones(1, nodes[0][0].shape[2], dtype=torch.bool)
                state, own = heads.draft_step(cache, steps[-1], ids[0, t + k:t + k + 1], cache.length - 1 + k - 1,
                                              nodes, visible)
                torch.testing.assert_close(state[0], trained[k - 1][0, t], atol=1e-4, rtol=1e-4)
                nodes = append_keys(nodes, own)
                steps.append(state)


def test_own_lm_head_starts_as_a_trainable_copy(tiny_backbone):
    heads = build_heads(make_config(tiny_backbone, num_heads=2, own_lm_head=True), tiny_backbone)
    base_weight = tiny_backbone.model.get_output_embeddings().weight
    assert len(heads.lm_heads) == 2
    for weight in heads.lm_heads:
        assert torch.equal(weight, base_weight) and weight.data_ptr() != base_weight.data_ptr()
        assert weight.requires_grad


def test_head_k_predicts_token_t_plus_k_plus_1():
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    tgt, valid = targets.head_targets(ids, 1)
    assert tgt[0, :3].tolist() == [12, 13, 14] and valid[0].tolist() == [True, True, True, False, False]
    tgt, valid = targets.head_targets(ids, 3)
    assert tgt[0, :1].tolist() == [14] and valid[0].tolist() == [True, False, False, False, False]
    assert targets.conditioning_tokens(ids, 1)[0, :4].tolist() == [11, 12, 13, 14]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    _, valid = targets.head_targets(ids, 1, mask)
    assert valid[0].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("kw, message", [
    (dict(style="hydra"), "unknown head style"),
    (dict(num_heads=0), "at least 1"),
    (dict(num_layers=0), "at least 1"),
])
def test_config_rejects_bad_values(kw, message):
    base = dict(style="medusa", num_heads=2, num_layers=1, hidden_size=8, vocab_size=8, base_model="m",
                base_fingerprint="f")
    with pytest.raises(MtpkitError, match=message):
        HeadsConfig(**{**base, **kw})


def test_config_drops_unknown_keys_on_load():
    cfg = HeadsConfig.from_dict(dict(style="medusa", num_heads=2, num_layers=1, hidden_size=8, vocab_size=8,
                                     base_model="m", base_fingerprint="f", from_the_future=True))
    assert cfg.num_heads == 2 and not hasattr(cfg, "from_the_future")
