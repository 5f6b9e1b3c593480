"""Fast few-row kernels give stock results (values, argmax, gradients) and switch on and off cleanly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.conftest import make_model
from mtpkit import kernels
from mtpkit.backbone import wrap_model
from mtpkit.kernels import (MAX_FAST_ROWS, STOCK, FastLinear, KernelChoice, _ForwardTimer, compare_kernels,
                            compare_logits, disable_fast_kernels, enable_fast_kernels, fast_linear, kernel_choice,
                            kernel_choices, linear_for, measure_forward_cost, pick_fastest, relative_cost,
                            remember_choice)


@pytest.fixture(autouse=True)
def _own_choices(monkeypatch):
    """Choices a test forces stay in that test: the process-wide cache is swapped for an empty one."""
    monkeypatch.setattr(kernels, "_CHOICES", {})


@pytest.fixture
def llama(tiny_tokenizer):
    return wrap_model(make_model("llama", len(tiny_tokenizer)), tiny_tokenizer, "tiny-llama")


LAYOUTS = [KernelChoice("stock", "stock"), KernelChoice("column", "column"), KernelChoice("pair", "column")]


def force_everywhere(monkeypatch, choice: KernelChoice) -> None:
    """Every float32 CPU shape runs on ``choice``, without measuring."""
    monkeypatch.setattr(kernels, "kernel_choice", lambda weight, bias=None: choice)


@pytest.mark.parametrize("choice", LAYOUTS, ids=lambda c: c.one_row)
@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_layout_gives_stock_values(monkeypatch, choice, rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(384, 64), torch.randn(1, rows, 64)
    bias = torch.randn(384) if with_bias else None
    force_everywhere(monkeypatch, choice)
    expected, got = F.linear(x, weight, bias), fast_linear(x, weight, bias)
    assert got.shape == (1, rows, 384) and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_one_row_runs_the_chosen_layout(monkeypatch):
    calls = []
    real_cat, real_mm = torch.cat, torch.mm
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append("cat") or real_cat(*a, **k))
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(("mm", a[1].shape[1])) or real_mm(*a))
    weight, x = torch.randn(8, 4), torch.randn(1, 4)
    for one_row, expected in [("pair", ["cat", ("mm", 2)]), ("column", [("mm", 1)]), ("stock", [])]:
        calls.clear()
        remember_choice(weight, None, KernelChoice(one_row, "stock"))
        torch.testing.assert_close(fast_linear(x, weight), F.linear(x, weight))
        assert calls == expected, one_row
    calls.clear()
    fast_linear(torch.randn(3, 4), weight)  # the few-row choice is stock here
    assert calls == []


def test_pick_fastest_needs_a_margin_to_leave_the_earlier_layout():
    forms = ("stock", "column", "pair")
    assert pick_fastest({"stock": 1.0, "column": 0.95, "pair": 0.5}, forms) == "pair"
    assert pick_fastest({"stock": 1.0, "column": 0.95, "pair": 0.93}, forms) == "stock"  # within 10%: noise
    assert pick_fastest({"stock": 1.0, "column": 0.8, "pair": 0.75}, forms) == "column"
    assert pick_fastest({"stock": 1.0, "column": 2.0, "pair": 1.5}, forms) == "stock"
    assert pick_fastest({"stock": 1.0, "column": 0.5}, ("stock", "column")) == "column"


def test_kernel_choice_is_measured_once_per_shape_and_thread_count(monkeypatch):
    measured = []

    def fake_timings(weight, bias, rows, forms, repeats=5):
        measured.append((tuple(weight.shape), rows))
        return {"stock": 3.0, "column": 2.0, "pair": 1.0} if rows == 1 else {"stock": 1.0, "column": 2.0}

    monkeypatch.setattr(kernels, "time_forms", fake_timings)
    weight = torch.randn(16, 8)
    # one row is measured per layer; 2..64 rows take the layout measured on whole forwards
    assert kernel_choice(weight) == KernelChoice("pair", kernels.FEW_ROWS_LAYOUT) == KernelChoice("pair", "column")
    assert kernel_choice(torch.randn(16, 8)) == KernelChoice("pair", "column")  # same key: cached
    assert measured == [((16, 8), 1)]
    kernel_choice(torch.randn(16, 4))
    assert len(measured) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        kernel_choice(weight)  # another thread count is another machine
    finally:
        torch.set_num_threads(threads)
    assert len(measured) == 3
    assert kernel_choice(weight.to(torch.bfloat16)) is STOCK and len(measured) == 3  # never measured: stock


def test_real_measurement_returns_known_layouts():
    choice = kernel_choice(torch.randn(256, 32))
    assert choice.one_row in kernels.ONE_ROW_FORMS and choice.few_rows in kernels.FEW_ROW_FORMS
    assert kernel_choice(torch.randn(256, 32)) is choice


def test_enable_measures_each_shape_once_outside_the_forward(monkeypatch, llama):
    seen = []
    monkeypatch.setattr(kernels, "time_forms",
                        lambda weight, bias, rows, forms, repeats=5: seen.append(tuple(weight.shape)) or
                        {form: 1.0 for form in forms})
    enable_fast_kernels(llama.model)
    shapes = {tuple(m.weight.shape) for m in llama.model.modules() if isinstance(m, nn.Linear)}
    assert len(seen) == len(shapes) and set(seen) == shapes  # one row, once per shape
    llama.model(torch.randint(0, llama.vocab_size, (1, 3)))
    assert len(seen) == len(shapes)  # the forward measured nothing new
    assert set(kernel_choices(llama.model).values()) == {"stock/column"}
    disable_fast_kernels(llama.model)
    assert kernel_choices(llama.model) == {}


@pytest.mark.parametrize("choice", LAYOUTS[1:], ids=lambda c: c.one_row)
def test_greedy_on_fast_kernels_is_plain_greedy(monkeypatch, llama, choice):
    from mtpkit.decoding import greedy_generate

    prompt = torch.randint(0, llama.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    stock = greedy_generate(llama, prompt, 24).tokens
    force_everywhere(monkeypatch, choice)
    enable_fast_kernels(llama.model)
    fast = greedy_generate(llama, prompt, 24).tokens
    disable_fast_kernels(llama.model)
    assert fast == stock and len(stock) == 24


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
    force_everywhere(monkeypatch, KernelChoice("column", "column"))
    calls = []
    monkeypatch.setattr(torch, "mm", lambda *args: calls.append("mm") or torch.matmul(*args))
    weight = torch.randn(8, 4)
    fast_linear(torch.randn(MAX_FAST_ROWS, 4), weight)
    assert calls == ["mm"]
    fast_linear(torch.randn(MAX_FAST_ROWS + 1, 4), weight)  # above the threshold: stock F.linear
    fast_linear(torch.randn(3, 4, dtype=torch.float64), weight.double())  # not float32: stock
    assert calls == ["mm"]


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("choice", LAYOUTS[1:], ids=lambda c: c.one_row)
def test_gradients_match_stock_on_the_fast_path(monkeypatch, rows, choice):
    force_everywhere(monkeypatch, choice)
    torch.manual_seed(0)
    weight, bias, x = (torch.randn(*s, requires_grad=True) for s in ((32, 16), (32,), (1, rows, 16)))
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
@pytest.mark.parametrize("choice", LAYOUTS[1:], ids=lambda c: c.one_row)
def test_model_with_fast_kernels_gives_stock_logits_over_a_kv_cache(monkeypatch, llama, n, choice):
    force_everywhere(monkeypatch, choice)
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


def test_compare_logits_reports_agreement_and_restores_kernels(monkeypatch, llama):
    force_everywhere(monkeypatch, KernelChoice("pair", "column"))
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


def test_calibration_key_follows_the_measured_layouts(monkeypatch, llama):
    from mtpkit.calibrate import calibration_key
    from mtpkit.heads import build_heads
    from tests.test_heads import make_config

    heads = build_heads(make_config(llama), llama)
    stock = calibration_key(heads)
    force_everywhere(monkeypatch, KernelChoice("column", "column"))
    enable_fast_kernels(llama.model)
    try:
        column = calibration_key(heads)
        force_everywhere(monkeypatch, KernelChoice("pair", "column"))
        pair = calibration_key(heads)
    finally:
        disable_fast_kernels(llama.model)
    assert len({stock, column, pair}) == 3 and calibration_key(heads) == stock


def test_layer_report_times_every_layout_and_fits_80_columns():
    from io import StringIO

    from rich.console import Console

    rows = kernels.layer_report([(96, 32), (8, 16)], repeats=1)
    assert [(r["out"], r["in"]) for r in rows] == [(96, 32), (8, 16)]
    for row in rows:
        assert set(row["one_row_ms"]) == {"stock", "column", "pair"} and set(row["few_rows_ms"]) == {"stock", "column"}
        assert all(ms > 0 for ms in [*row["one_row_ms"].values(), *row["few_rows_ms"].values()])
        assert row["choice"]["one_row"] == pick_fastest(row["one_row_ms"], kernels.ONE_ROW_FORMS)
    out = StringIO()
    Console(file=out, width=80).print(kernels._layer_table(rows))
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80 and "96x32" in out.getvalue()
    wide = {"one_row_ms": {"stock": 0.0123, "column": 0.0456, "pair": 0.0789}, "choice": {"one_row": "stock",
            "few_rows": "stock"}, "few_rows_ms": {"stock": 0.0321, "column": 0.0654}, "out": 49152, "in": 576}
    out = StringIO()
    Console(file=out, width=80).print(kernels._layer_table([wide]))
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80
    assert "49152x576 0.0123 0.0456 0.0789 1.00x 0.0321 0.0654 stock/stock" in " ".join(out.getvalue().split())
    assert "shape 1:stock 1:col 1:pair gain 8:stock 8:col chosen" in " ".join(out.getvalue().split())
