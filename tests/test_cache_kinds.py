"""Every cache kind decodes at any length: sliding-window layers (Gemma-3, Mistral) past their window, GPT-2's
plain cache, and a refusal, up front, of caches that cannot roll back (linear-attention hybrids)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mtpkit.decoding.masks as masks
from mtpkit.backbone import wrap_model
from mtpkit.decoding import (SpeculativeDecoder, TreePlan, attention_windows, decoder_cache, greedy_generate,
                             rollback_problem, supports_tree_attention, tree_attention_problem, tree_mask, verify_mask)
from mtpkit.errors import MtpkitError
from mtpkit.tree import build_tree
from tests.conftest import make_model
from tests.test_decoding import TREE, OracleHeads, random_heads

WINDOW = 16
PROMPT_LENGTH = 2 * WINDOW + 8
NEW_TOKENS = 40

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_sliding_model(family: str, vocab_size: int, window: int = WINDOW):
    """A tiny random model with sliding-window attention: Gemma-3 (sliding and full layers) or Mistral (all
    sliding). The init scales give varied greedy text that changes when the window does."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, sliding_window=window, eos_token_id=2,
                  pad_token_id=0, bos_token_id=1)
    if family == "gemma3":
        config = Gemma3TextConfig(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, initializer_range=0.02,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common)
        model = Gemma3ForCausalLM(config)
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(num_hidden_layers=2, initializer_range=0.1, **common))
    else:
        raise ValueError(family)
    return model.float().eval()


def make_linear_attention_model(vocab_size: int):
    """A tiny Qwen3-Next: a gated-delta-net (linear attention, recurrent state) layer and a full attention layer."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = Qwen3NextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                             linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    return Qwen3NextForCausalLM(config).float().eval()


def long_prompt(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))


def transformers_greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate``, on its own caches and masks (EOS off: the whole budget)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=["gemma3", "mistral"])
def sliding(request, tiny_tokenizer):
    """A tiny sliding-window backbone, a prompt 2.5 windows long, and the greedy text of plain decoding."""
    family = request.param
    backbone = wrap_model(make_sliding_model(family, len(tiny_tokenizer)), tiny_tokenizer, f"tiny-{family}")
    backbone.model.generation_config.eos_token_id = None  # decode the whole budget, well past the window
    ids = long_prompt(backbone.vocab_size)
    return family, backbone, ids, greedy_generate(backbone, ids, NEW_TOKENS)


def test_greedy_past_the_window_equals_transformers(sliding):
    family, backbone, ids, reference = sliding
    assert ids.shape[1] >= 2 * WINDOW and attention_windows(backbone)["sliding_attention"] == WINDOW
    assert len(reference.tokens) == NEW_TOKENS
    assert reference.tokens == transformers_greedy(backbone.model, ids, NEW_TOKENS)
    # the window matters here: the same weights with a window longer than the text decode differently
    unwindowed = make_sliding_model(family, backbone.vocab_size, window=10 ** 6)
    unwindowed.load_state_dict(backbone.model.state_dict())
    assert transformers_greedy(unwindowed, ids, NEW_TOKENS) != reference.tokens


@pytest.mark.parametrize("tree", ["chain", TREE], ids=["chain", "tree"])
def test_speculative_greedy_past_the_window_equals_plain_greedy(sliding, tree):
    _, backbone, ids, reference = sliding
    sequence = ids[0].tolist() + reference.tokens
    candidates = {"random": random_heads(backbone, "medusa"),
                  "oracle": OracleHeads(backbone, "sequential", sequence),
                  "oracle-rank1": OracleHeads(backbone, "medusa", sequence, ranks={2: 1})}
    for name, heads in candidates.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to chains: the tree is verified as a tree
            decoder = SpeculativeDecoder(heads, tree)
        assert decoder.tree.is_chain == (tree == "chain")
        steps = []
        result = decoder.generate(ids, NEW_TOKENS, trace=steps.append)
        assert result.tokens == reference.tokens, name
        assert result.forward_passes == len(result.accepted_lengths) + 1
        if name.startswith("oracle"):  # long acceptances, each one a rollback of the cache past the window
            assert result.mean_accepted_tokens > (3.0 if name == "oracle" or tree == TREE else 1.5), name
        if name == "oracle-rank1" and tree == TREE:  # the path root, [0], [0, 1], [0, 1, 0]: KV index-selected
            assert any(step["accepted_nodes"] == [0, 1, 5, 8] for step in steps)


def test_gpt2_speculative_equals_plain_greedy_and_transformers(tiny_tokenizer):
    backbone = wrap_model(make_model("gpt2", len(tiny_tokenizer)), tiny_tokenizer, "tiny-gpt2")
    backbone.model.generation_config.eos_token_id = None
    ids = long_prompt(backbone.vocab_size)
    reference = greedy_generate(backbone, ids, NEW_TOKENS)
    assert attention_windows(backbone) == {"full_attention": None}
    assert reference.tokens == transformers_greedy(backbone.model, ids, NEW_TOKENS)
    sequence = ids[0].tolist() + reference.tokens
    for heads in (random_heads(backbone, "medusa"), OracleHeads(backbone, "medusa", sequence, ranks={1: 1})):
        decoder = SpeculativeDecoder(heads, TREE)
        assert not decoder.tree.is_chain
        result = decoder.generate(ids, NEW_TOKENS)
        assert result.tokens == reference.tokens
    # the oracle's path, root, [1], [1, 0], leaves the top-1 chain (its KV index-selected): 3 tokens a step
    assert result.mean_accepted_tokens > 2.5


# ----------------------------------------------------------------------------- masks


def test_sliding_tree_mask_values():
    # nodes: root (depth 0), [0] and [1] (depth 1), [0, 0] (depth 2) after 4 cached tokens, window 3
    tree = build_tree([[0], [1], [0, 0]])
    mask = tree_mask(tree.ancestor_mask, 4, torch.float32, depths=tree.position_offsets, window=3)
    visible = (mask[0, 0] == 0).int().tolist()
    assert visible == [
        # cache 0 1 2 3 | root [0] [1] [0,0]      position of the node: keys less than 3 positions back
        [0, 0, 1, 1, 1, 0, 0, 0],  # root at 4 sees 2, 3
        [0, 0, 0, 1, 1, 1, 0, 0],  # [0] at 5 sees 3, root
        [0, 0, 0, 1, 1, 0, 1, 0],  # [1] at 5 sees 3, root, not its sibling
        [0, 0, 0, 0, 1, 1, 0, 1],  # [0, 0] at 6 sees root, [0]
    ]
    assert mask.shape == (1, 1, 4, 8) and mask.min() == torch.finfo(torch.float32).min
    # without a window it is the full-attention mask
    assert torch.equal(tree_mask(tree.ancestor_mask, 4, torch.float32, depths=tree.position_offsets),
                       tree_mask(tree.ancestor_mask, 4, torch.float32))


def test_plan_mask_views_equal_masks_built_for_the_prefix():
    windows = {"full_attention": None, "sliding_attention": 5}
    tree = build_tree(TREE)
    plan = TreePlan(tree, torch.device("cpu"), sequential=False, windows=windows)
    for prefix in (0, 3, 9, 30):
        views = plan.mask(prefix, capacity=40, dtype=torch.float32)
        built = verify_mask(windows, tree.ancestor_mask, tree.position_offsets, prefix, torch.float32)
        assert views.keys() == built.keys() == set(windows)
        for kind in windows:
            assert torch.equal(views[kind], built[kind]), (kind, prefix)
    single = TreePlan(tree, torch.device("cpu"), sequential=False, windows={"sliding_attention": 5})
    assert isinstance(single.mask(9, capacity=40, dtype=torch.float32), torch.Tensor)  # all layers alike: a tensor


# ----------------------------------------------------------------------------- the tree probe and its fallback


def _hide_dict_masks(model, how: str):
    """Make ``model``'s decoder refuse (raise) or silently ignore (build its own) a dict ``attention_mask``."""
    decoder = model.base_model
    forward = decoder.forward

    def patched(*args, attention_mask=None, **kwargs):
        if isinstance(attention_mask, dict):
            if how == "refuse":
                raise TypeError("attention_mask must be a tensor")
            attention_mask = None
        return forward(*args, attention_mask=attention_mask, **kwargs)

    decoder.forward = patched


@pytest.mark.parametrize("how", ["refuse", "ignore"])
def test_tree_falls_back_to_a_chain_with_the_reason(tiny_tokenizer, monkeypatch, how):
    monkeypatch.setattr(masks, "_WARNED", set())
    backbone = wrap_model(make_sliding_model("gemma3", len(tiny_tokenizer)), tiny_tokenizer, "tiny-gemma3")
    backbone.model.generation_config.eos_token_id = None
    ids = long_prompt(backbone.vocab_size)
    reference = greedy_generate(backbone, ids, NEW_TOKENS)
    _hide_dict_masks(backbone.model, how)
    reason = {"refuse": "its forward refuses a dict of 4-D masks by layer type (TypeError: attention_mask must be",
              "ignore": "a probe tree's hidden states differ from plain forwards of its paths by"}[how]
    heads = OracleHeads(backbone, "medusa", ids[0].tolist() + reference.tokens)
    with pytest.warns(UserWarning, match="falling back to chain drafts") as caught:
        decoder = SpeculativeDecoder(heads, TREE)
    assert str(caught[0].message).startswith(f"Gemma3ForCausalLM cannot verify a tree ({reason}")
    assert decoder.tree.is_chain and decoder.tree.max_depth == build_tree(TREE).max_depth
    result = decoder.generate(ids, NEW_TOKENS)
    assert result.tokens == reference.tokens
    assert result.mean_accepted_tokens > 3.0  # the chain still accepts the oracle's drafts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tree_probe_holds_in_half_precision(tiny_tokenizer, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # 8 layers: bf16 rounding alone moves a node's hidden state by ~2e-2
    deep = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, initializer_range=0.2))
    for model in (make_sliding_model("gemma3", len(tiny_tokenizer)), deep):
        backbone = wrap_model(model.eval().to(dtype), tiny_tokenizer, "tiny", check=False)
        assert tree_attention_problem(backbone) is None
        assert supports_tree_attention(backbone)


def test_tree_probe_catches_a_wrong_mask_in_bf16(tiny_tokenizer, monkeypatch):
    """The half-precision tolerance still tells a wrong mask: siblings visible, or the sliding window dropped."""
    right = masks.tree_mask
    for name, wrong in [("siblings", lambda a, p, d, **kw: right(torch.tril(torch.ones_like(a)), p, d, **kw)),
                        ("no window", lambda a, p, d, **kw: right(a, p, d))]:
        monkeypatch.setattr(masks, "tree_mask", wrong)
        model = make_sliding_model("gemma3", len(tiny_tokenizer)).to(torch.bfloat16)
        backbone = wrap_model(model, tiny_tokenizer, "tiny-gemma3", check=False)
        assert "differ from plain forwards" in (tree_attention_problem(backbone) or ""), name


# ----------------------------------------------------------------------------- caches that cannot roll back


def test_linear_attention_cache_is_refused_up_front(tiny_tokenizer):
    backbone = wrap_model(make_linear_attention_model(len(tiny_tokenizer)), tiny_tokenizer, "tiny-qwen3-next")
    heads = random_heads(backbone, "medusa", num_heads=2)
    with pytest.raises(MtpkitError) as refused:
        SpeculativeDecoder(heads, "chain")
    message = str(refused.value)
    assert message == ("Qwen3NextForCausalLM cannot decode speculatively: its LinearAttentionLayer cache layers "
                       "cannot be rolled back to a verified prefix (rejected drafts would leave a trace)")
    # plain greedy decoding never rolls back: it still runs, and equals transformers'
    backbone.model.generation_config.eos_token_id = None
    ids = long_prompt(backbone.vocab_size)[:, :20]
    assert greedy_generate(backbone, ids, 8).tokens == transformers_greedy(backbone.model, ids, 8)


def test_rollback_problem_on_cache_objects(tiny_tokenizer):
    from transformers import DynamicCache

    gemma = wrap_model(make_sliding_model("gemma3", len(tiny_tokenizer)), tiny_tokenizer, "tiny-gemma3")
    stock = DynamicCache(config=gemma.config)  # sliding layers that refuse to crop once full
    assert rollback_problem(stock) == ("its DynamicSlidingWindowLayer cache layers cannot be rolled back to a "
                                       "verified prefix")
    ours = decoder_cache(gemma)
    assert rollback_problem(ours) is None
    assert [type(layer).__name__ for layer in ours.layers] == ["GrowingLayer"] * 3
    assert rollback_problem(DynamicCache(config=make_model("llama", len(tiny_tokenizer)).config)) is None
