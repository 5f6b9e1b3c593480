"""Kernel layouts give stock results (values, argmax, gradients), switch on and off cleanly, and are chosen on
whole forwards: the fastest measured layout per size, and plain decoding's token padded when two rows are cheaper."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.conftest import make_model
from mtpkit import kernels
from mtpkit.backbone import wrap_model
from mtpkit.kernels import (MAX_FAST_ROWS, STOCK, FastLinear, KernelMeasurement, KernelPlan, _ForwardTimer,
                            choose_kernels, compare_logits, disable_fast_kernels, enable_fast_kernels, fast_linear,
                            kernel_measurement, kernel_plan, linear_for, measure_forward_cost, pick_fastest,
                            plan_from_seconds, relative_cost, use_measured_kernels)


@pytest.fixture
def llama(tiny_tokenizer):
    return wrap_model(make_model("llama", len(tiny_tokenizer)), tiny_tokenizer, "tiny-llama")


PLANS = {layout: KernelPlan.everywhere(layout) for layout in ("stock", "column", "pair", "packed")}
needs_packed = pytest.mark.skipif(not kernels.packed_available(), reason="this torch build has no oneDNN packed product")


@pytest.mark.parametrize("layout", list(PLANS))
@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_layout_gives_stock_values(layout, rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(384, 64), torch.randn(1, rows, 64)
    bias = torch.randn(384) if with_bias else None
    expected, got = F.linear(x, weight, bias), fast_linear(x, weight, bias, PLANS[layout])
    assert got.shape == (1, rows, 384) and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_each_row_count_runs_its_planned_layout(monkeypatch):
    calls = []
    real_cat, real_mm = torch.cat, torch.mm
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append("cat") or real_cat(*a, **k))
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(("mm", a[1].shape[1])) or real_mm(*a))
    weight = torch.randn(8, 4)
    plan = KernelPlan("pair", ((2, "column"), (4, "stock"), (8, "column")))
    for rows, expected in [(1, ["cat", ("mm", 2)]), (2, [("mm", 2)]), (3, [("mm", 3)]), (4, []), (7, []),
                           (8, [("mm", 8)]), (MAX_FAST_ROWS, [("mm", MAX_FAST_ROWS)]), (MAX_FAST_ROWS + 1, [])]:
        calls.clear()
        x = torch.randn(rows, 4)
        torch.testing.assert_close(fast_linear(x, weight, None, plan), F.linear(x, weight))
        assert calls == expected, rows
    calls.clear()
    fast_linear(torch.randn(3, 4, dtype=torch.float64), weight.double(), None, plan)  # not float32: stock
    assert calls == []


def test_plan_layouts_and_description():
    plan = KernelPlan("pair", ((2, "column"), (3, "column"), (12, "stock"), (16, "column")), padded_token=True)
    assert [plan.layout(n) for n in (1, 2, 3, 11, 12, 15, 16, 64, 65)] == \
        ["pair", "column", "column", "column", "stock", "stock", "column", "column", "stock"]
    assert plan.describe() == "1 row pair, 2-11 rows column, 12-15 rows stock, 16-64 rows column, token padded to 2"
    assert KernelPlan.from_dict(plan.to_dict()) == plan
    assert KernelPlan.everywhere("pair") == KernelPlan("pair", ((2, "column"),))
    assert STOCK.layout(1) == STOCK.layout(5) == "stock" and not STOCK.padded_token
    with pytest.raises(ValueError, match="unknown layout"):
        KernelPlan.everywhere("diagonal")


@needs_packed
def test_packed_copy_follows_the_weight():
    """The packed layout reads a copy of the weight: changed in place, the weight is packed again (the values
    follow it); an inference tensor is packed once; the copy goes with the weight."""
    import gc

    plan = PLANS["packed"]
    torch.manual_seed(0)
    weight, x = torch.randn(48, 16), torch.randn(3, 16)
    before = fast_linear(x, weight, None, plan)
    torch.testing.assert_close(before, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer step, a weight loaded over it
    torch.testing.assert_close(fast_linear(x, weight, None, plan), 2 * before, atol=1e-5, rtol=1e-5)
    assert id(weight) in kernels._PACKED
    key = id(weight)
    del weight
    gc.collect()
    assert key not in kernels._PACKED
    with torch.inference_mode():
        frozen = torch.randn(48, 16)
        torch.testing.assert_close(fast_linear(x, frozen, None, plan), F.linear(x, frozen), atol=1e-5, rtol=1e-5)


@needs_packed
def test_packed_layout_is_one_oneDNN_call_and_never_under_a_gradient(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(kernels, "packed_weight", lambda w, real_pack=kernels.packed_weight: calls.append(
        tuple(w.shape)) or real_pack(w))
    weight = torch.randn(24, 8, requires_grad=True)
    x = torch.randn(4, 8)
    with torch.no_grad():
        fast_linear(x, weight, None, PLANS["packed"])
    assert calls == [(24, 8)]
    fast_linear(x, weight, None, PLANS["packed"]).sum().backward()  # needs a gradient: column, not oneDNN
    assert calls == [(24, 8)] and weight.grad is not None and real is torch.ops.mkldnn._linear_pointwise


@needs_packed
def test_packed_is_measured_only_where_a_second_copy_fits(monkeypatch, llama):
    assert kernels.available_layouts(kernels.FEW_ROW_LAYOUTS, llama.model) == ("stock", "column", "packed")
    weights = sum(m.weight.numel() * 4 for m in llama.model.modules() if isinstance(m, nn.Linear))
    pages = {"SC_AVPHYS_PAGES": weights // 4096, "SC_PAGE_SIZE": 4096}  # free memory: one copy, not two
    monkeypatch.setattr(kernels.os, "sysconf", lambda name: pages[name])
    assert kernels.available_layouts(kernels.FEW_ROW_LAYOUTS, llama.model) == ("stock", "column")
    measurement = choose_kernels(llama, sizes=(1, 2), context=4, repeats=1)
    assert "packed" not in measurement.seconds and set(measurement.seconds) == {"stock", "column", "pair"}


@needs_packed
def test_packed_copies_stay_only_where_the_plan_runs_packed(monkeypatch, llama):
    weights = {id(m.weight) for m in llama.model.modules() if isinstance(m, nn.Linear)}
    monkeypatch.setattr(kernels, "plan_from_seconds", lambda seconds: PLANS["column"])
    choose_kernels(llama, sizes=(1, 2), context=4, repeats=1)
    assert not weights & set(kernels._PACKED)  # timed on packed, not chosen: copies freed
    monkeypatch.setattr(kernels, "plan_from_seconds", lambda seconds: PLANS["packed"])
    choose_kernels(llama, sizes=(1, 2), context=4, repeats=1)
    assert weights <= set(kernels._PACKED)
    assert PLANS["packed"].layouts() == {"packed"} and PLANS["pair"].layouts() == {"pair", "column"}


def test_pick_fastest_needs_a_margin_to_leave_the_earlier_layout():
    forms = ("stock", "column", "pair")
    assert pick_fastest({"stock": 1.0, "column": 0.95, "pair": 0.5}, forms) == "pair"
    assert pick_fastest({"stock": 1.0, "column": 0.99, "pair": 0.98}, forms) == "stock"  # within 3%: noise
    assert pick_fastest({"stock": 1.0, "column": 0.8, "pair": 0.79}, forms) == "column"
    assert pick_fastest({"stock": 1.0, "column": 2.0, "pair": 1.5}, forms) == "stock"


def test_plan_from_whole_forward_seconds():
    seconds = {"stock": {1: 0.055, 2: 0.089, 4: 0.077, 8: 0.075},
               "column": {1: 0.056, 2: 0.051, 4: 0.052, 8: 0.080},
               "pair": {1: 0.034}}
    plan = plan_from_seconds(seconds)
    assert plan == KernelPlan("pair", ((2, "column"), (4, "column"), (8, "stock")), padded_token=False)
    # two rows measured cheaper than the fastest one-row forward: plain decoding's token goes in padded
    seconds["column"][2] = 0.030
    padded = plan_from_seconds(seconds)
    assert padded.padded_token and padded.layout(2) == "column"
    measurement = KernelMeasurement(seconds, padded)
    assert measurement.token_seconds() == 0.030 and measurement.forward_cost() == {1: 0.030, 2: 0.030, 4: 0.052,
                                                                                   8: 0.075}
    assert KernelMeasurement.from_dict(measurement.to_dict()).forward_cost() == measurement.forward_cost()
    # the packed layout wins the sizes where it is measured clearly faster, and only those
    seconds["packed"] = {1: 0.047, 2: 0.053, 4: 0.044, 8: 0.074}
    assert plan_from_seconds(seconds) == KernelPlan("pair", ((2, "column"), (4, "packed"), (8, "stock")), True)


def test_chooser_picks_the_layout_that_is_clearly_faster(monkeypatch, llama):
    """Every product on 'column' is slowed down: whole forwards must show it, and the plan avoids column."""
    slow_column = kernels.FORMS["column"]

    def column_with_a_stall(flat, weight, bias):
        time.sleep(3e-3)
        return slow_column(flat, weight, bias)

    monkeypatch.setitem(kernels.FORMS, "column", column_with_a_stall)
    monkeypatch.setitem(kernels.FORMS, "pair", lambda flat, weight, bias: column_with_a_stall(
        torch.cat((flat, flat)), weight, bias)[:1])
    monkeypatch.setitem(kernels.FORMS, "packed", column_with_a_stall)
    measurement = choose_kernels(llama, sizes=(1, 2, 4), context=8, repeats=5)
    assert measurement.plan.one_row == "stock" and measurement.plan.few_rows == ((2, "stock"), (4, "stock"))
    assert all(measurement.seconds["column"][n] > measurement.seconds["stock"][n] for n in (1, 2, 4))
    assert set(measurement.seconds["pair"]) == {1}  # pair is a one-row layout
    assert not kernels.uses_fast_kernels(llama.model)  # left as found

    # and the other way round: a stalled stock product makes column win at every size
    monkeypatch.undo()
    real_linear = F.linear

    def stock_with_a_stall(x, weight, bias=None):
        time.sleep(3e-3)
        return real_linear(x, weight, bias)

    monkeypatch.setitem(kernels.FORMS, "stock", stock_with_a_stall)
    monkeypatch.setitem(kernels.FORMS, "packed", stock_with_a_stall)
    monkeypatch.setattr(kernels.F, "linear", stock_with_a_stall)
    enable_fast_kernels(llama.model, PLANS["pair"])
    measurement = choose_kernels(llama, sizes=(1, 2, 4), context=8, repeats=5)
    assert measurement.plan.one_row in ("column", "pair") and {l for _, l in measurement.plan.few_rows} == {"column"}
    assert kernel_plan(llama.model) == PLANS["pair"]  # left as found
    disable_fast_kernels(llama.model)


@pytest.mark.parametrize("layout", list(PLANS))
def test_greedy_on_every_layout_is_plain_greedy(llama, layout):
    from mtpkit.decoding import greedy_generate

    prompt = torch.randint(0, llama.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    stock = greedy_generate(llama, prompt, 24).tokens
    enable_fast_kernels(llama.model, PLANS[layout])
    forced = greedy_generate(llama, prompt, 24).tokens
    disable_fast_kernels(llama.model)
    assert forced == stock and len(stock) == 24


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_padded_token_decodes_plain_greedy(tiny_tokenizer, family):
    """Where a fake cost table makes two rows cheaper than one, plain decoding feeds each token twice (every
    forward after the prefill has two rows) and its tokens equal the stock loop's."""
    from mtpkit.decoding import greedy_generate
    from tests.test_cache_kinds import WINDOW, make_sliding_model

    build = make_sliding_model if family == "gemma3" else make_model  # Gemma-3: sliding layers, prompt past the window
    backbone = wrap_model(build(family, len(tiny_tokenizer)), tiny_tokenizer, family)
    assert family != "gemma3" or WINDOW < 40
    seconds = {"stock": {1: 0.05, 2: 0.06}, "column": {1: 0.05, 2: 0.03}, "pair": {1: 0.04}}
    plan = plan_from_seconds(seconds)
    assert plan.padded_token
    prompt = torch.randint(0, backbone.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    stock = greedy_generate(backbone, prompt, 30)
    rows = []
    hook = backbone.model.base_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    enable_fast_kernels(backbone.model, plan)
    try:
        padded = greedy_generate(backbone, prompt, 30)
    finally:
        hook.remove()
        disable_fast_kernels(backbone.model)
    assert padded.tokens == stock.tokens and len(stock.tokens) == 30
    assert rows == [40] + [2] * 29 and padded.forward_passes == 30


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fast_linear_matches_stock_on_2d(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(384, 64), torch.randn(rows, 64)
    bias = torch.randn(384) if with_bias else None
    expected, got = F.linear(x, weight, bias), fast_linear(x, weight, bias, PLANS["pair"])
    assert got.dtype == torch.float32 and got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 7, 64), (2, 32, 64), (3, 1, 5, 64)])
def test_fast_linear_matches_stock_on_batched_inputs(shape):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(*shape)
    got = fast_linear(x, weight, bias, PLANS["column"])
    assert got.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("layout", ["column", "pair", "packed"])
def test_gradients_match_stock_on_the_fast_path(rows, layout):
    torch.manual_seed(0)
    weight, bias, x = (torch.randn(*s, requires_grad=True) for s in ((32, 16), (32,), (1, rows, 16)))
    fast_linear(x, weight, bias, PLANS[layout]).square().sum().backward()
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

    assert enable_fast_kernels(model, PLANS["pair"]) == len(linears)
    assert enable_fast_kernels(model, PLANS["column"]) == len(linears)  # again: only the plan changes
    assert kernel_plan(model) == PLANS["column"]
    for name, module in model.named_modules():
        assert type(module) is not nn.Linear
        if name in linears:
            assert module is linears[name] and type(module) is FastLinear and module.kernel_plan == PLANS["column"]
            assert module.weight.data_ptr() == weights[name]  # no copies
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    applied = linear_for(model.lm_head)
    assert applied.func is fast_linear and applied.keywords == {"plan": PLANS["column"]}

    assert disable_fast_kernels(model) == len(linears)
    assert disable_fast_kernels(model) == 0
    assert all(type(module) is nn.Linear for module in linears.values())
    assert not any(isinstance(module, FastLinear) for module in model.modules())
    assert linear_for(model.lm_head) is F.linear and kernel_plan(model) is STOCK


def test_lora_style_subclasses_are_left_alone():
    class Adapted(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Adapted(4, 4))
    assert enable_fast_kernels(model, PLANS["pair"]) == 1
    assert type(model[1]) is Adapted


@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("layout", ["column", "pair", "packed"])
def test_model_on_each_layout_gives_stock_logits_over_a_kv_cache(llama, n, layout):
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
    enable_fast_kernels(model, PLANS[layout])
    fast = forward()
    disable_fast_kernels(model)
    torch.testing.assert_close(fast, stock, atol=1e-4, rtol=1e-5)
    assert torch.equal(fast.argmax(-1), stock.argmax(-1))


def test_model_gradients_flow_through_fast_kernels(llama):
    model = llama.model
    ids = torch.randint(0, llama.vocab_size, (1, 6))
    enable_fast_kernels(model, PLANS["column"])
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
    numerics = compare_logits(llama, ids, PLANS["pair"])
    assert numerics["positions"] == 70 and numerics["argmax_agreement"] == 1.0
    assert 0 <= numerics["max_abs_diff"] < 1e-4
    assert not any(isinstance(module, FastLinear) for module in llama.model.modules())


def test_forward_timer_crops_the_cache_and_costs_are_relative(llama):
    timer = _ForwardTimer(llama, context=8, max_new=5)
    assert timer(5) > 0 and timer.cache.get_seq_length() == 8
    cost = measure_forward_cost(llama, sizes=(1, 3), context=8, repeats=1)
    assert list(cost) == [1, 3] and relative_cost(cost)[1] == 1.0
    assert relative_cost({1: 2.0, 4: 3.0}) == {1: 1.0, 4: 1.5}


def test_measurement_is_cached_per_machine_and_model(monkeypatch, tmp_path, llama):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path))
    calls = []
    fake = KernelMeasurement({"stock": {1: 1.0, 2: 1.5}, "column": {1: 1.0, 2: 0.9}, "pair": {1: 0.5}},
                             KernelPlan("pair", ((2, "column"),)))
    monkeypatch.setattr(kernels, "choose_kernels", lambda backbone: calls.append(1) or fake)
    first = use_measured_kernels(llama)
    again = kernel_measurement(llama)
    assert len(calls) == 1 and again.plan == first.plan == fake.plan and again.seconds == fake.seconds
    assert kernel_plan(llama.model) == fake.plan
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # another thread count is another machine
    kernel_measurement(llama)
    assert len(calls) == 2
    disable_fast_kernels(llama.model)
    half = wrap_model(make_model("llama", llama.vocab_size).to(torch.bfloat16), llama.tokenizer, "half")
    assert kernel_measurement(half).plan is STOCK and len(calls) == 2  # outside float32 nothing is measured


def test_calibration_key_follows_the_kernel_plan(llama):
    from mtpkit.calibrate import calibration_key
    from mtpkit.heads import build_heads
    from tests.test_heads import make_config

    heads = build_heads(make_config(llama), llama)
    stock = calibration_key(heads)
    try:
        enable_fast_kernels(llama.model, PLANS["column"])
        column = calibration_key(heads)
        enable_fast_kernels(llama.model, PLANS["pair"])
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
        assert set(row["one_row_ms"]) == {"stock", "column", "pair", "packed"}
        assert set(row["few_rows_ms"]) == {"stock", "column", "packed"}
        assert all(ms > 0 for ms in [*row["one_row_ms"].values(), *row["few_rows_ms"].values()])
    out = StringIO()
    Console(file=out, width=80).print(kernels._layer_table(rows))
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80 and "96x32" in out.getvalue()


def test_forward_table_fits_80_columns():
    from io import StringIO

    from rich.console import Console

    seconds = {"stock": {1: 0.0546, 2: 0.0891, 64: 0.2}, "column": {1: 0.0556, 2: 0.0509, 64: 0.19},
               "pair": {1: 0.0377}}
    measurement = KernelMeasurement(seconds, plan_from_seconds(seconds))
    out = StringIO()
    Console(file=out, width=80).print(kernels.forward_table(measurement, "forward over n new tokens"))
    text = " ".join(out.getvalue().split())
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80
    assert "1 54.6 55.6 37.7 pair 1.00" in text and "2 89.1 50.9 - column 1.35" in text


SPY_CLI = """
import json, runpy, sys
import mtpkit.kernels as kernels
seen, real = [], kernels.fast_linear
def spy(x, weight, bias=None, plan=kernels.STOCK):
    seen.append(list(weight.shape))
    return real(x, weight, bias, plan)
kernels.fast_linear = spy
sys.argv = ["mtpkit.kernels", "--model", sys.argv[1], "--sizes", "1,2", "--repeats", "1"]
try:
    runpy.run_module("mtpkit.kernels", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    assert not exit.code, exit.code
print(json.dumps(seen))
"""


def test_the_kernels_command_times_every_layer_and_the_output_layer_on_the_layout(tmp_path, tiny_model_dirs):
    """``python -m mtpkit.kernels`` runs the module as ``__main__``, a second copy: its layers and the output layer
    (``linear_for``) must be the imported module's, or it times (and caches for decoding) the output layer stock."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoConfig

    model_dir = tiny_model_dirs["llama"]
    config = AutoConfig.from_pretrained(model_dir)
    env = {**os.environ, "MTPKIT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SPY_CLI, str(model_dir)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shapes = json.loads(done.stdout.strip().splitlines()[-1])
    assert [config.vocab_size, config.hidden_size] in shapes  # the output layer ran through the plan's kernels
    assert [config.intermediate_size, config.hidden_size] in shapes


def test_calibration_key_follows_the_measured_costs(monkeypatch, tmp_path, llama):
    """A new measurement with the same plan is a new calibration: the tree chooser reads its costs."""
    from mtpkit.calibrate import calibration_key
    from mtpkit.heads import build_heads
    from tests.test_heads import make_config

    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path))
    heads = build_heads(make_config(llama), llama)
    plan = KernelPlan("pair", ((2, "column"),))
    measured = iter([KernelMeasurement({"stock": {1: 1.0, 2: 1.5}, "column": {1: 1.0, 2: 0.9}, "pair": {1: 0.5}}, plan),
                     KernelMeasurement({"stock": {1: 1.0, 2: 1.5}, "column": {1: 1.0, 2: 0.6}, "pair": {1: 0.5}}, plan)])
    monkeypatch.setattr(kernels, "choose_kernels", lambda backbone: next(measured))
    try:
        use_measured_kernels(llama)
        first = calibration_key(heads)
        assert calibration_key(heads) == first
        kernel_measurement(llama, refresh=True)
        assert kernel_plan(llama.model) == plan and calibration_key(heads) != first
    finally:
        disable_fast_kernels(llama.model)
