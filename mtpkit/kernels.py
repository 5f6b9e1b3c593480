"""Few-row linear kernels for CPU decoding and verification, chosen by timing whole forwards.

Self-speculative decoding verifies n drafted tokens in one base forward, and plain decoding pays a
one-row product per layer per token. How fast a product over few rows runs depends on the machine, the
BLAS and the shape, so the layout is chosen by measuring, never by assumption:

- ``stock``: ``F.linear`` (``x @ W.T``);
- ``column``: ``(W @ x.T).T``, which on some CPUs keeps 2-64 rows near one row's cost;
- ``pair`` (one row only): the row doubled, ``W @ [x; x].T``, one column kept: where the BLAS runs a
  one-column product single-threaded and a two-column one on every thread, this is much faster;
- ``packed``: oneDNN's inner product on a copy of the weight reordered once into its blocked layout (the
  kernels torch's own CPU compiler uses). Where MKL's product over 2-16 rows costs 2-4x its one-row cost, this
  one stays near it: on a Zen 4 EPYC a 1536x576 layer took 54 us over 4 rows against 121 (column), the
  49152-row output layer 3.7 ms over 8 rows against 7.8. It holds a second copy of every weight it runs (the
  copy follows the weight: made again when the weight changes) and has no gradient, so it serves inference only:
  anything that needs a gradient runs ``column``.

A layer timed alone misleads (on an AVX-512 EPYC with MKL each small layer looked as fast stock, while whole
forwards with every layer on ``pair`` were 1.6x faster), so ``choose_kernels`` times *whole forwards* (decoder
plus logits) with every layer on each layout, for one new token and for each verification size, interleaved
and repeated, and keeps the fastest per size (``KernelPlan``). When a forward over two tokens measures
cheaper than the fastest one-token forward, plain decoding runs its token padded to two
(``KernelPlan.padded_token``): mtpkit's plain greedy is then the fastest plain decoding it can do here, and
the baseline every speculation gain is measured against. The measurement is cached per machine and model
(``kernel_measurement``). Only float32 on a CPU is measured; anything else (GPU, bfloat16) stays stock.

``enable_fast_kernels`` switches a loaded model's ``nn.Linear`` modules to ``FastLinear`` in place (same
parameters, no weight copies) on a plan; ``linear_for`` gives the matching function for code that applies a
layer's weight itself, such as ``Backbone.logits``.

Measure it (timings to stderr)::

    python -m mtpkit.kernels --model smollm2-135m --json kernels.json    # whole forwards, every layout
    python -m mtpkit.kernels --layer 49152x576                           # one layer alone, no model
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional

import torch
import typer
from torch import nn
from torch.nn import functional as F

from mtpkit.files import atomic_write_text, cache_root

DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)  # every size decoding verifies, roughly
MAX_FAST_ROWS = 64  # above this MKL's x @ W.T is as fast (prefill, training batches): keep it stock
ONE_ROW_LAYOUTS = ("stock", "column", "pair", "packed")  # in order of preference: a later one must beat the
FEW_ROW_LAYOUTS = ("stock", "column", "packed")  # earlier by MARGIN
MARGIN = 0.03  # on whole forwards a layout replaces the one before it only if at least 3% faster
CHOICE_REPEATS = 5  # timed rounds of whole forwards per layout and size (after one warm-up round)
FORMAT_VERSION = 3  # of the cached whole-forward measurement (2: ``python -m mtpkit.kernels`` no longer times the
# output layer stock; 3: the ``packed`` layout is measured too; what it cached before is measured again)


def _stock(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(flat, weight, bias)


def _column(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t()


def _pair(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _column(torch.cat((flat, flat)), weight, bias)[:1]


def _packed(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not packed_available() or torch.is_grad_enabled() and (
            flat.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _column(flat, weight, bias)  # oneDNN's packed product has no gradient
    return torch.ops.mkldnn._linear_pointwise(flat, packed_weight(weight), bias, "none", [], "")


FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "stock": _stock, "column": _column, "pair": _pair, "packed": _packed}

_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(weight) -> (weight, its version, packed copy)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered into oneDNN's blocked layout for its inner product: made on first use and again
    whenever the weight was changed in place (its version counter moved; a tensor made under
    ``torch.inference_mode`` has none, and is packed once); dropped with the weight."""
    key, version = id(weight), -1 if weight.is_inference() else weight._version
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == version:
        return entry[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _PACKED[key] = (weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None)), version, packed)
    return packed


def drop_packed(model: nn.Module) -> None:
    """Free the packed copies of ``model``'s linear weights (made again if a packed product runs later)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _PACKED.pop(id(module.weight), None)


@functools.cache
def packed_available() -> bool:
    """Whether this torch build runs oneDNN's packed inner product (and gives ``F.linear``'s values with it)."""
    try:
        generator = torch.Generator().manual_seed(0)  # the caller's random state untouched
        weight, x = torch.randn(8, 4, generator=generator), torch.randn(3, 4, generator=generator)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(weight), None, "none",
                                                 [], "")
        return bool(torch.allclose(got, F.linear(x, weight), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def available_layouts(layouts: Iterable[str], model: nn.Module | None = None) -> tuple[str, ...]:
    """``layouts`` less those this torch build cannot run, and less ``packed`` where a second copy of ``model``'s
    linear weights would take more than half the memory still available."""
    room = model is None or _room_for_copies(model)
    return tuple(layout for layout in layouts if layout != "packed" or (packed_available() and room))


def _room_for_copies(model: nn.Module) -> bool:
    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True  # no way to tell here: measure it
    return weights <= available / 2


@dataclass(frozen=True)
class KernelPlan:
    """The layout every linear layer runs for a product over n rows, and how plain decoding feeds its token.

    ``few_rows``: (rows, layout) per measured verification size, ascending; a size in between runs the layout of
    the nearest measured size below it. Over ``MAX_FAST_ROWS`` rows (prefill, training) everything is stock.
    """

    one_row: str = "stock"
    few_rows: tuple[tuple[int, str], ...] = ()
    padded_token: bool = False  # plain decoding runs its token as a forward over two (the token, repeated)

    def layout(self, rows: int) -> str:
        if rows == 1:
            return self.one_row
        chosen = "stock"
        if rows <= MAX_FAST_ROWS:
            for size, layout in self.few_rows:
                if size > rows:
                    break
                chosen = layout
        return chosen

    @classmethod
    def everywhere(cls, layout: str) -> "KernelPlan":
        """Every layer on ``layout`` for every row count it applies to (``pair``: one row; column above)."""
        if layout not in FORMS:
            raise ValueError(f"unknown layout {layout!r}: choose from {', '.join(FORMS)}")
        return cls(layout, ((2, "column" if layout == "pair" else layout),))

    def layouts(self) -> set[str]:
        """Every layout this plan runs for some row count."""
        return {self.one_row, *(layout for _, layout in self.few_rows)}

    def describe(self) -> str:
        """One line: '1 row pair, 2-64 rows column, token padded to 2'."""
        spans, sizes = [], list(self.few_rows)
        for index, (size, layout) in enumerate(sizes):
            if spans and spans[-1][2] == layout:
                spans[-1][1] = size
                continue
            spans.append([size, size, layout])
        for span, following in zip(spans, spans[1:] + [None]):
            span[1] = following[0] - 1 if following else MAX_FAST_ROWS
        parts = [f"1 row {self.one_row}"] + [f"{a}-{b} rows {layout}" if a < b else f"{a} rows {layout}"
                                               for a, b, layout in spans]
        if self.padded_token:
            parts.append("token padded to 2")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"one_row": self.one_row, "few_rows": [list(pair) for pair in self.few_rows],
                "padded_token": self.padded_token}

    @classmethod
    def from_dict(cls, data: dict) -> "KernelPlan":
        return cls(str(data["one_row"]), tuple((int(n), str(layout)) for n, layout in data["few_rows"]),
                   bool(data["padded_token"]))


STOCK = KernelPlan()


def measurable(weight: torch.Tensor) -> bool:
    """Only float32 on a CPU has few-row layouts worth measuring; everything else runs stock."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2


def pick_fastest(seconds: dict[str, float], forms: Iterable[str], margin: float = MARGIN) -> str:
    """The first of ``forms`` unless a later one is faster than the best so far by ``margin``."""
    forms = [form for form in forms if form in seconds]
    best = forms[0]
    for form in forms[1:]:
        if seconds[form] < (1 - margin) * seconds[best]:
            best = form
    return best


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                plan: KernelPlan = STOCK) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on ``plan``'s layout for x's row count.

    Only float32 CPU inputs are ever routed elsewhere; anything else is passed to ``F.linear``. The result
    is contiguous and equal to stock up to summation order (about 1e-5); autograd works on every layout.
    """
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if not (0 < rows <= MAX_FAST_ROWS) or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    form = plan.layout(rows)
    if form == "stock":
        return F.linear(x, weight, bias)
    out = FORMS[form](x.reshape(rows, features), weight, bias)
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``fast_linear`` on its plan: same parameters and state, other layout."""

    kernel_plan: KernelPlan = STOCK

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fast_linear(input, self.weight, self.bias, self.kernel_plan)


def enable_fast_kernels(model: nn.Module, plan: KernelPlan) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to ``FastLinear`` on ``plan``; returns how many run on it.

    The switch changes each module's class in place, so parameters (tied ones included), hooks, state-dict keys
    and optimizer references are untouched and nothing is copied. Subclasses of ``nn.Linear`` (LoRA layers,
    quantized layers) are left alone. Calling it again only changes the plan. Layers whose weights are not float32
    on a CPU run stock whatever the plan says (``fast_linear``).
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
        if type(module) is FastLinear:
            module.kernel_plan = plan
            count += 1
    return count


def disable_fast_kernels(model: nn.Module) -> int:
    """Put every ``FastLinear`` of ``model`` back to ``nn.Linear``; returns how many were switched back."""
    count = 0
    for module in model.modules():
        if type(module) is FastLinear:
            module.__class__ = nn.Linear
            del module.kernel_plan
            count += 1
    return count


def kernel_plan(model: nn.Module) -> KernelPlan:
    """The plan ``model``'s fast layers run on (``STOCK`` when none was switched)."""
    return next((module.kernel_plan for module in model.modules() if type(module) is FastLinear), STOCK)


def linear_for(layer: nn.Module) -> Callable[..., torch.Tensor]:
    """The function that applies ``layer``'s kind of kernel to any weight: ``fast_linear`` on its plan, or ``F.linear``."""
    if type(layer) is FastLinear:
        return functools.partial(fast_linear, plan=layer.kernel_plan)
    return F.linear


def relative_cost(costs: dict[int, float]) -> dict[int, float]:
    """cost[n] / cost[1]: what verifying n tokens costs in one-token forwards."""
    return {n: seconds / costs[1] for n, seconds in costs.items()}


class _ForwardTimer:
    """Times a base forward over n new tokens on top of a fixed KV cache of ``context`` tokens."""

    def __init__(self, backbone, context: int, max_new: int, seed: int = 0):
        if context < 1:
            raise ValueError("context must be at least 1 token")
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, backbone.vocab_size, (1, context + max_new), generator=generator)
        self.backbone, self.context = backbone, context
        self.tokens = tokens.to(backbone.device)
        self.cache = backbone.hidden(input_ids=self.tokens[:, :context], use_cache=True).past_key_values

    def __call__(self, n: int) -> float:
        positions = torch.arange(self.context, self.context + n, device=self.backbone.device).unsqueeze(0)
        synchronize(self.backbone.device)
        start = time.perf_counter()
        hidden = self.backbone.hidden(input_ids=self.tokens[:, self.context:self.context + n],
                                      past_key_values=self.cache, position_ids=positions, use_cache=True)
        self.backbone.logits(hidden.last_hidden_state)  # verification needs logits at every position
        synchronize(self.backbone.device)
        elapsed = time.perf_counter() - start
        self.cache.crop(-n)  # a negative count removes the n new tokens in every transformers 5.x
        return elapsed


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer around it measures the work (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_forward_cost(backbone, sizes: Iterable[int] = DEFAULT_SIZES, context: int = 128,
                         repeats: int = CHOICE_REPEATS) -> dict[int, float]:
    """Median seconds of one base forward over n new tokens after ``context`` cached ones, on the model's current
    kernels (as they are: no layout is tried): decoder plus logits at all n positions, cache cropped back after
    each call."""
    sizes = sorted(set(sizes))
    if backbone.max_context is not None:
        context = max(1, min(context, backbone.max_context - max(sizes) - 1))
    timer = _ForwardTimer(backbone, context, max(sizes))
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for round_index in range(repeats + 1):
        for n in sizes:
            elapsed = timer(n)
            if round_index > 0:
                samples[n].append(elapsed)
    return {n: statistics.median(times) for n, times in samples.items()}


@dataclass
class KernelMeasurement:
    """Whole-forward seconds per layout and size on this machine, and the plan chosen from them."""

    seconds: dict[str, dict[int, float]]  # layout -> new tokens n -> median seconds (decoder + logits at n rows)
    plan: KernelPlan
    context: int = 128
    repeats: int = CHOICE_REPEATS
    machine: dict = field(default_factory=dict)

    def token_seconds(self) -> float:
        """What plain decoding's token costs on the plan: one row, or two when padded."""
        return self.seconds_on_plan(2 if self.plan.padded_token else 1)

    def seconds_on_plan(self, n: int) -> float:
        return self.seconds[self.plan.layout(n)][n]

    def forward_cost(self) -> dict[int, float]:
        """Seconds of a forward over n tokens as decoding runs it: n = 1 is plain decoding's token."""
        cost = {n: self.seconds_on_plan(n) for n in sorted(self.seconds["stock"]) if n > 1}
        return {1: self.token_seconds(), **cost}

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "plan": self.plan.to_dict(), "plan_text": self.plan.describe(),
                "context": self.context, "repeats": self.repeats, "machine": self.machine,
                "seconds": {layout: {str(n): s for n, s in by_n.items()} for layout, by_n in self.seconds.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "KernelMeasurement":
        if data.get("format") != FORMAT_VERSION:
            raise ValueError("another format")
        seconds = {layout: {int(n): float(s) for n, s in by_n.items()} for layout, by_n in data["seconds"].items()}
        return cls(seconds, KernelPlan.from_dict(data["plan"]), int(data["context"]), int(data["repeats"]),
                   dict(data.get("machine", {})))


def plan_from_seconds(seconds: dict[str, dict[int, float]], margin: float = MARGIN) -> KernelPlan:
    """The fastest layout per size (a later layout must win by ``margin``), and whether plain decoding's token
    runs cheaper padded to two rows than alone."""
    sizes = sorted(seconds["stock"])
    one = {layout: by_n[1] for layout, by_n in seconds.items() if 1 in by_n and layout in ONE_ROW_LAYOUTS}
    one_row = pick_fastest(one, ONE_ROW_LAYOUTS, margin)
    few_rows = tuple((n, pick_fastest({layout: seconds[layout][n] for layout in FEW_ROW_LAYOUTS if n in seconds.get(layout, {})},
                                      FEW_ROW_LAYOUTS, margin)) for n in sizes if n > 1)
    plan = KernelPlan(one_row, few_rows)
    padded = 2 in seconds["stock"] and seconds[plan.layout(2)][2] < (1 - margin) * one[one_row]
    return KernelPlan(one_row, few_rows, padded)


@torch.no_grad()
def choose_kernels(backbone, sizes: Iterable[int] = DEFAULT_SIZES, context: int = 128,
                   repeats: int = CHOICE_REPEATS) -> KernelMeasurement:
    """Time whole base forwards over n new tokens with every layer on each layout, and choose per size.

    Layouts are interleaved call by call, their order rotating each round, so that load from other processes
    falls on all of them alike; round 0 is a warm-up. One token is timed on stock, column, pair and packed, every
    other size on stock, column and packed (packed only where this torch build runs it). The model is left on the
    kernels it had before.
    """
    sizes = sorted(set(sizes) | {1, 2})
    model = backbone.model
    before = kernel_plan(model) if uses_fast_kernels(model) else None
    if backbone.max_context is not None:
        context = max(1, min(context, backbone.max_context - max(sizes) - 1))
    timer = _ForwardTimer(backbone, context, max(sizes))
    one_row, few_rows = available_layouts(ONE_ROW_LAYOUTS, model), available_layouts(FEW_ROW_LAYOUTS, model)
    samples: dict[str, dict[int, list[float]]] = {layout: {} for layout in one_row}
    try:
        for round_index in range(repeats + 1):
            for n in sizes:
                layouts = one_row if n == 1 else few_rows
                shift = round_index % len(layouts)
                for layout in layouts[shift:] + layouts[:shift]:
                    enable_fast_kernels(model, KernelPlan.everywhere(layout))
                    elapsed = timer(n)
                    if round_index > 0:
                        samples[layout].setdefault(n, []).append(elapsed)
    finally:
        if before is None:
            disable_fast_kernels(model)
        else:
            enable_fast_kernels(model, before)
    seconds = {layout: {n: statistics.median(times) for n, times in by_n.items()} for layout, by_n in samples.items()}
    plan = plan_from_seconds(seconds)
    if "packed" not in plan.layouts():
        drop_packed(model)  # timed, not chosen: no second copy of the weights stays behind
    return KernelMeasurement(seconds, plan, context, repeats, machine_key(backbone))


def uses_fast_kernels(model: nn.Module) -> bool:
    """Whether ``enable_fast_kernels`` switched (some of) this model's linear layers."""
    return any(type(module) is FastLinear for module in model.modules())


def machine_key(backbone) -> dict:
    """What a layout's speed depends on besides the model: processor, threads, torch, device and dtype."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = ""
    try:
        words = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        flags = " ".join(sorted(w for w in words if w.startswith(("avx", "amx"))))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(backbone.device), "dtype": str(backbone.dtype)}


def kernel_measurement(backbone, refresh: bool = False) -> KernelMeasurement:
    """This model's whole-forward measurement on this machine: from the cache (``cache_root() / "kernels"``,
    keyed by the model's fingerprint and ``machine_key``), else measured now and cached. Outside float32 on a
    CPU nothing is measured: everything runs stock."""
    if not measurable(backbone.model.get_input_embeddings().weight):
        return KernelMeasurement({"stock": {}}, STOCK, 0, 0, machine_key(backbone))
    cached = None if refresh else cached_measurement(backbone)
    if cached is not None:
        return cached
    measurement = choose_kernels(backbone)
    path = _measurement_path(backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(measurement.to_dict(), indent=2, sort_keys=True) + "\n")
    return measurement


def cached_measurement(backbone) -> KernelMeasurement | None:
    """The measurement cached for this model and machine, None when there is none (nothing is measured)."""
    path = _measurement_path(backbone)
    try:
        return KernelMeasurement.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, damaged or of an older format: measured again when asked for


def _measurement_path(backbone) -> Path:
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, backbone.fingerprint, machine_key(backbone)],
                                    sort_keys=True).encode())
    return cache_root() / "kernels" / f"{key.hexdigest()[:24]}.json"


def use_measured_kernels(backbone, *modules: nn.Module) -> KernelMeasurement:
    """Put ``backbone``'s model and ``modules`` (the draft heads) on the plan measured for it; return the
    measurement (its costs feed the tree chooser)."""
    measurement = kernel_measurement(backbone)
    for module in (backbone.model, *modules):
        enable_fast_kernels(module, measurement.plan)
    return measurement


@torch.no_grad()
def compare_logits(backbone, input_ids: torch.Tensor, plan: KernelPlan) -> dict[str, float]:
    """Stock vs ``plan`` logits on the same inputs: largest absolute difference and argmax agreement.

    ``input_ids`` is fed one token at a time for the first 32 (the one-row layout) and then in pieces of growing
    size, so every layout of the plan is exercised.
    """
    model = backbone.model
    before = kernel_plan(model) if uses_fast_kernels(model) else None
    ids = input_ids.to(backbone.device)
    outputs = {}
    try:
        for mode in ("stock", "plan"):
            disable_fast_kernels(model) if mode == "stock" else enable_fast_kernels(model, plan)
            cache, pieces, start, size = None, [], 0, 1
            while start < ids.shape[1]:
                piece = ids[:, start:start + size]
                out = backbone.hidden(piece, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                pieces.append(backbone.logits(out.last_hidden_state))
                start += piece.shape[1]
                size = 1 if start < 32 else min(2 * size, MAX_FAST_ROWS) if size > 1 else 2
            outputs[mode] = torch.cat(pieces, 1)
    finally:
        disable_fast_kernels(model) if before is None else enable_fast_kernels(model, before)
    stock, fast = outputs["stock"], outputs["plan"]
    return {"max_abs_diff": (stock - fast).abs().max().item(),
            "argmax_agreement": (stock.argmax(-1) == fast.argmax(-1)).float().mean().item(),
            "positions": stock.shape[0] * stock.shape[1]}


# --------------------------------------------------------------------------- diagnostics: one layer alone


SAMPLE_SECONDS = 2e-3  # each timing sample of one layer lasts about this long (many calls of a small layer)


@torch.no_grad()
def time_forms(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, forms: Iterable[str],
               repeats: int = 7) -> dict[str, float]:
    """Median seconds of one call of each layout of one layer on ``rows`` random rows, interleaved. A diagnostic:
    layouts are chosen on whole forwards (``choose_kernels``), since layers timed alone rank them otherwise."""
    forms = tuple(forms)
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    for form in forms:
        FORMS[form](x, weight, bias).contiguous()
    start = time.perf_counter()
    FORMS[forms[0]](x, weight, bias).contiguous()
    calls = max(1, min(200, round(SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-7))))
    samples: dict[str, list[float]] = {form: [] for form in forms}
    for _ in range(repeats):
        for form in forms:
            start = time.perf_counter()
            for _ in range(calls):
                FORMS[form](x, weight, bias).contiguous()
            samples[form].append((time.perf_counter() - start) / calls)
    return {form: statistics.median(times) for form, times in samples.items()}


def layer_report(shapes: Iterable[tuple[int, int]], repeats: int = 9, rows: int = 8) -> list[dict]:
    """Every layout of each (out, in) float32 layer alone on 1 and ``rows`` rows: median ms."""
    report = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features) / in_features ** 0.5
        one = time_forms(weight, None, 1, available_layouts(ONE_ROW_LAYOUTS), repeats)
        few = time_forms(weight, None, rows, available_layouts(FEW_ROW_LAYOUTS), repeats)
        report.append({"out": out_features, "in": in_features, "threads": torch.get_num_threads(),
                       "one_row_ms": {form: s * 1e3 for form, s in one.items()},
                       "few_rows_ms": {form: s * 1e3 for form, s in few.items()}, "few_rows": rows})
    return report


def model_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of a model's linear layers, largest first."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    return sorted(shapes, key=lambda s: -s[0] * s[1])


def _layer_table(rows: list[dict]):
    from rich import box
    from rich.table import Table

    few = rows[0]["few_rows"] if rows else 8
    one_forms = list(rows[0]["one_row_ms"]) if rows else []
    few_forms = list(rows[0]["few_rows_ms"]) if rows else []
    short = {"stock": "stock", "column": "col", "pair": "pair", "packed": "pack"}
    table = Table(title=f"one float32 linear layer alone, {torch.get_num_threads()} threads: median ms",
                  caption=f"1: / {few}: one row / {few} rows; col: (W @ x.T).T; pair: the row doubled, one column "
                          "kept; pack: oneDNN on a packed copy. A diagnostic: layouts are chosen on whole forwards",
                  caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("shape", *(f"1:{short[f]}" for f in one_forms), *(f"{few}:{short[f]}" for f in few_forms)):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        one, many = row["one_row_ms"], row["few_rows_ms"]
        table.add_row(f"{row['out']}x{row['in']}", *(f"{one[f]:.3g}" for f in one_forms),
                      *(f"{many[f]:.3g}" for f in few_forms))
    return table


def forward_table(measurement: KernelMeasurement, title: str):
    """Whole-forward milliseconds per layout and size, the chosen layout, and cost(n) / plain token's cost."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, caption=f"chosen: {measurement.plan.describe()}. n/token: a forward over n tokens "
                                       "on the chosen layouts over plain decoding's token",
                  caption_justify="left", box=box.SIMPLE_HEAD)
    layouts = [layout for layout in ONE_ROW_LAYOUTS if layout in measurement.seconds]
    for column in ("n", *(f"{layout} ms" for layout in layouts), "chosen", "n/token"):
        table.add_column(column, justify="right")
    token = measurement.token_seconds()
    for n in sorted(measurement.seconds["stock"]):
        cells = [f"{measurement.seconds[layout][n] * 1e3:.1f}" if n in measurement.seconds.get(layout, {}) else "-"
                 for layout in layouts]
        table.add_row(str(n), *cells, measurement.plan.layout(n), f"{measurement.seconds_on_plan(n) / token:.2f}")
    return table


def _parse_layer(text: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not OUTxIN, e.g. 49152x576", param_hint="--layer") from None
    if out_features < 1 or in_features < 1:
        raise typer.BadParameter(f"{text!r}: both sizes must be at least 1", param_hint="--layer")
    return out_features, in_features


def main(
    model: Annotated[str, typer.Option(help="Base model: alias, local directory, .gguf file or hub id.")] = "smollm2-135m",
    sizes: Annotated[str, typer.Option(help="Comma-separated numbers of new tokens per forward.")] = ",".join(map(str, DEFAULT_SIZES)),
    context: Annotated[int, typer.Option(help="Tokens already in the KV cache.")] = 128,
    repeats: Annotated[int, typer.Option(help="Timed rounds per size and layout (the median is reported).")] = CHOICE_REPEATS,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    layer: Annotated[Optional[list[str]], typer.Option(help="Only time one linear layer of this OUTxIN shape alone (e.g. 49152x576; repeatable): every layout on 1 and 8 rows, no model loaded.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the measurements as JSON to this file.")] = None,
) -> dict:
    """Time whole forwards over n new tokens with every layer on each layout, and the plan chosen from them."""
    from rich.console import Console

    console = Console(stderr=True)
    if repeats < 1 or threads < 1:
        raise typer.BadParameter("--repeats and --threads must be at least 1")
    torch.set_num_threads(threads)
    if layer:
        shapes = [_parse_layer(text) for text in layer]
        with console.status(f"timing {len(shapes)} layer shapes"):
            layers = layer_report(shapes, repeats)
        console.print(_layer_table(layers))
        report = {"threads": threads, "torch": torch.__version__, "repeats": repeats, "layers": layers}
        _write_report(report, json_path, console)
        return report

    from mtpkit.backbone import load_backbone
    from mtpkit.prompts import load_builtin

    size_list = sorted({int(s) for s in sizes.split(",") if s.strip()} | {1, 2})
    with console.status(f"loading {model}"):
        backbone = load_backbone(model)
    with console.status(f"timing whole forwards: {len(size_list)} sizes x every layout x {repeats + 1} rounds"):
        if (size_list, context, repeats) == (list(DEFAULT_SIZES), 128, CHOICE_REPEATS):
            measurement = kernel_measurement(backbone, refresh=True)  # what decoding measures: cache it for it
        else:
            measurement = choose_kernels(backbone, size_list, context=context, repeats=repeats)
    console.print(forward_table(measurement, f"forward over n new tokens ({backbone.reference}, {context} cached, "
                                             f"{threads} threads): median ms"))
    text = " ".join(record["prompt"] for record in load_builtin()[:40])
    real_ids = backbone.tokenizer(text, return_tensors="pt").input_ids[:, :4 * MAX_FAST_ROWS]
    with console.status("comparing logits"):
        numerics = compare_logits(backbone, real_ids, measurement.plan)
    console.print(f"logits on the chosen plan vs stock on {numerics['positions']} real tokens: max |diff| "
                  f"{numerics['max_abs_diff']:.1e}, argmax agreement {numerics['argmax_agreement']:.1%}")
    report = {"model": backbone.reference, **measurement.to_dict(), "numerics": numerics}
    _write_report(report, json_path, console)
    return report


def _write_report(report: dict, json_path: Path | None, console) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {json_path}")


if __name__ == "__main__":
    # ``python -m mtpkit.kernels`` runs this file as ``__main__``, a second copy of the module whose ``FastLinear``
    # the rest of mtpkit (``linear_for``: the output layer) does not recognise: that copy's measurements ran the
    # output layer stock and were cached for decoding. The CLI runs the imported module's code instead.
    import mtpkit.kernels

    typer.run(mtpkit.kernels.main)
