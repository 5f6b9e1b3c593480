"""Fast few-row kernels give stock results (values, argmax, gradients) and switch on and off cleanly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.conftest import make_model
from mtpkit.backbone import wrap_model
from mtpkit.kernels import (MAX_FAST_ROWS, FastLinear, _ForwardTimer, compare_kernels, compare_logits, disable_fast_kernels,
                            enable_fast_kernels, fast_linear, linear_for, measure_forward_cost, relative_cost)


@pytest.fixture
def llama(tiny_tokenizer):
    return wrap_model(make_model("llama", len(tiny_tokenizer)), tiny_tokenizer, "tiny-llama")


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fast_linear_matches_stock_on_2d(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(384, 64), torch.randn(rows, 64)
    bias = torch.randn(384) if with_bias else None
    expected, got = F.linear(x, weight, bias), fast_linear(x, weight, bias)
    assert got.dtype == torch.float32 and got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 7, 64), (2, 32, 64), (3, 1, 5, 64)])
def test_fast_linear_matches_stock_on_batched_inputs(shape):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(*shape)
    got = fast_linear(x, weight, bias)
    assert got.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def test_fast_linear_takes_the_new_path_only_for_few_float32_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "mm", lambda *args: calls.append("mm") or torch.matmul(*args))
    weight = torch.randn(8, 4)
    fast_linear(torch.randn(MAX_FAST_ROWS, 4), weight)
    assert calls == ["mm"]
    fast_linear(torch.randn(MAX_FAST_ROWS + 1, 4), weight)  # above the threshold: stock F.linear
    fast_linear(torch.randn(3, 4, dtype=torch.float64), weight.double())  # not float32: stock
    assert calls == ["mm"]


def test_gradients_match_stock_on_the_fast_path():
    torch.manual_seed(0)
    weight, bias, x = (torch.randn(*s, requires_grad=True) for s in ((32, 16), (32,), (1, 5, 16)))
    fast_linear(x, weight, bias).square().sum().backward()
    fast_grads = [t.grad.clone() for t in (weight, bias, x)]
    for t in (weight, bias, x):
        t.grad = None
    F.linear(x, weight, bias).square().sum().backward()
    for fast, stock in zip(fast_grads, (weight.grad, bias.grad, x.grad)):
        torch.testing.assert_close(fast, stock, atol=1e-4, rtol=1e-5)


def test_enable_switches_every_plain_linear_in_place_and_disable_restores_it(llama):
    model = llama.model
    linears = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    weights = {name: module.weight.data_ptr() for name, module in linears.items()}
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output layer

    assert enable_fast_kernels(model) == len(linears)
    assert enable_fast_kernels(model) == len(linears)  # idempotent
    for name, module in model.named_modules():
        assert type(module) is not nn.Linear
        if name in linears:
            assert module is linears[name] and type(module) is FastLinear
            assert module.weight.data_ptr() == weights[name]  # no copies
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert linear_for(model.lm_head) is fast_linear

    assert disable_fast_kernels(model) == len(linears)
    assert disable_fast_kernels(model) == 0
    assert all(type(module) is nn.Linear for module in linears.values())
    assert not any(isinstance(module, FastLinear) for module in model.modules())
    assert linear_for(model.lm_head) is F.linear


def test_lora_style_subclasses_are_left_alone():
    class Adapted(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Adapted(4, 4))
    assert enable_fast_kernels(model) == 1
    assert type(model[1]) is Adapted


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_model_with_fast_kernels_gives_stock_logits_over_a_kv_cache(llama, n):
    model = llama.model
    torch.manual_seed(n)
    prompt = torch.randint(0, llama.vocab_size, (1, 20))
    new = torch.randint(0, llama.vocab_size, (1, n))

    def forward():
        with torch.no_grad():
            cache = model(prompt, use_cache=True).past_key_values
            positions = torch.arange(20, 20 + n).unsqueeze(0)
            return model(new, past_key_values=cache, position_ids=positions).logits

    stock = forward()
    enable_fast_kernels(model)
    fast = forward()
    disable_fast_kernels(model)
    torch.testing.assert_close(fast, stock, atol=1e-4, rtol=1e-5)
    assert torch.equal(fast.argmax(-1), stock.argmax(-1))


def test_model_gradients_flow_through_fast_kernels(llama):
    model = llama.model
    ids = torch.randint(0, llama.vocab_size, (1, 6))
    enable_fast_kernels(model)
    model.requires_grad_(True)
    try:
        model(ids).logits.logsumexp(-1).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
    finally:
        model.requires_grad_(False)
        disable_fast_kernels(model)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_compare_logits_reports_agreement_and_restores_kernels(llama):
    ids = torch.randint(0, llama.vocab_size, (1, 70))
    numerics = compare_logits(llama, ids)
    assert numerics["positions"] == 70 and numerics["argmax_agreement"] == 1.0
    assert 0 <= numerics["max_abs_diff"] < 1e-4
    assert not any(isinstance(module, FastLinear) for module in llama.model.modules())


def test_forward_cost_measurement_crops_the_cache_and_leaves_kernels_as_found(llama):
    enable_fast_kernels(llama.model)
    costs = compare_kernels(llama, sizes=(2, 1, 4), context=8, repeats=2)
    assert set(costs) == {"stock", "fast"} and all(list(c) == [1, 2, 4] and min(c.values()) > 0 for c in costs.values())
    assert all(isinstance(module, FastLinear) for module in llama.model.modules() if isinstance(module, nn.Linear))
    disable_fast_kernels(llama.model)

    timer = _ForwardTimer(llama, context=8, max_new=5)
    assert timer(5) > 0 and timer.cache.get_seq_length() == 8

    cost = measure_forward_cost(llama, sizes=(1, 3), context=8, repeats=1)
    assert list(cost) == [1, 3] and relative_cost(cost)[1] == 1.0
    assert relative_cost({1: 2.0, 4: 3.0}) == {1: 1.0, 4: 1.5}
