"""Few-row linear kernels for CPU decoding and verification, and what a forward over n new tokens costs.

Self-speculative decoding verifies n drafted tokens in one base forward, so on a CPU the speed-up
is bounded by cost(n) / cost(1), and plain greedy decoding pays a one-row product per layer per
token. How fast a product over few rows runs depends on the machine, the BLAS and the layer's
shape, so each layout is chosen by measuring it, never by assumption:

- ``stock``: ``F.linear`` (``x @ W.T``);
- ``column``: ``(W @ x.T).T``, which on some CPUs keeps 2-64 rows near one row's cost;
- ``pair`` (one row only): the row doubled, ``W @ [x; x].T``, one column kept: where the BLAS runs
  a one-column product single-threaded and a two-column one on every thread, this is faster.

``kernel_choice`` times them once per (out, in, dtype, threads, bias) in this process, interleaved,
and keeps a new layout only when it beats the one before it by ``MARGIN``; the answer is cached.
Only float32 on a CPU is measured; anything else (GPU, bfloat16) stays stock. ``enable_fast_kernels``
switches a loaded model's ``nn.Linear`` modules to ``fast_linear`` in place (same parameters, no
weight copies) and measures their shapes there, outside any timed region; ``linear_for`` gives the
matching function for code that applies a layer's weight itself, such as ``Backbone.logits``.

Measure it (timings to stderr, stock and fast interleaved)::

    python -m mtpkit.kernels --layer 49152x576            # one layer, every layout, no model
    python -m mtpkit.kernels --model smollm2-135m --json kernels.json
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional

import torch
import typer
from torch import nn
from torch.nn import functional as F

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MAX_FAST_ROWS = 64  # above this MKL's x @ W.T is as fast (prefill, training batches): keep it stock
ONE_ROW_FORMS = ("stock", "column", "pair")  # in order of preference: a later one must beat the earlier by MARGIN
FEW_ROW_FORMS = ("stock", "column")
FEW_ROWS_PROBE = 8  # the row count at which 2..MAX_FAST_ROWS rows are measured (a typical verification)
MARGIN = 0.10  # a layout replaces the one before it only if at least 10% faster: noise never flips a choice
CHOICE_REPEATS = 7
SAMPLE_SECONDS = 2e-3  # each timing sample lasts about this long (many calls of a small layer)


def _stock(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(flat, weight, bias)


def _column(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t()


def _pair(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _column(torch.cat((flat, flat)), weight, bias)[:1]


FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "stock": _stock, "column": _column, "pair": _pair}


@dataclass(frozen=True)
class KernelChoice:
    """The measured-fastest layout of one layer shape: for one row, and for 2..MAX_FAST_ROWS rows."""

    one_row: str = "stock"
    few_rows: str = "stock"


STOCK = KernelChoice()
FEW_ROWS_LAYOUT = "column"  # measured on whole forwards, not per layer (see kernel_choice)
_CHOICES: dict[tuple, KernelChoice] = {}


def kernel_key(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What a layout's speed depends on: shape, dtype, layout of the weight, bias, thread count."""
    return weight.shape, weight.dtype, weight.is_contiguous(), bias is None, torch.get_num_threads()


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


@torch.no_grad()
def time_forms(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, forms: Iterable[str],
               repeats: int = CHOICE_REPEATS) -> dict[str, float]:
    """Median seconds of one call of each layout on ``rows`` random rows, interleaved sample by sample after a
    warm-up. A sample times enough calls to last ``SAMPLE_SECONDS``: one call of a small layer lasts tens of
    microseconds, about what waking the threads costs, so single calls would choose by noise."""
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


def kernel_choice(weight: torch.Tensor, bias: torch.Tensor | None = None) -> KernelChoice:
    """This layer shape's fastest layouts on this machine: measured on first use, then cached."""
    if not measurable(weight):
        return STOCK
    key = kernel_key(weight, bias)
    choice = _CHOICES.get(key)
    if choice is None:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        one_row = pick_fastest(time_forms(weight, bias, 1, ONE_ROW_FORMS), ONE_ROW_FORMS)
        # 2..64 rows: a layer timed alone misleads (small layers looked as fast stock), while whole forwards
        # over 2-16 tokens were 1.1-1.4x faster with every layer on the column layout (python -m mtpkit.kernels)
        choice = _CHOICES[key] = KernelChoice(one_row, FEW_ROWS_LAYOUT)
    return choice


def remember_choice(weight: torch.Tensor, bias: torch.Tensor | None, choice: KernelChoice) -> None:
    """Set a layer shape's layouts without measuring (tests, or a choice measured elsewhere)."""
    _CHOICES[kernel_key(weight, bias)] = choice


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                max_rows: int = MAX_FAST_ROWS) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the layout measured fastest for this shape when x has at most
    ``max_rows`` rows (``kernel_choice``).

    Only float32 CPU inputs are ever routed elsewhere; anything else is passed to ``F.linear``. The result
    is contiguous and equal to stock up to summation order (about 1e-5); autograd works on every layout.
    """
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if not (0 < rows <= max_rows) or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    choice = _CHOICES.get(kernel_key(weight, bias)) or kernel_choice(weight, bias)  # a dict hit on the hot path
    form = choice.one_row if rows == 1 else choice.few_rows
    if form == "stock":
        return F.linear(x, weight, bias)
    out = FORMS[form](x.reshape(rows, features), weight, bias)
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``fast_linear``: same parameters and state, other matmul layout."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fast_linear(input, self.weight, self.bias)


def enable_fast_kernels(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to ``FastLinear``; returns how many now run fast.

    The switch changes each module's class in place, so parameters (tied ones included), hooks,
    state-dict keys and optimizer references are untouched and nothing is copied. Subclasses of
    ``nn.Linear`` (LoRA layers, quantized layers) are left alone. Calling it twice is harmless. Each
    new layer shape is measured here (``kernel_choice``), so no timed forward pays for it later.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
        if type(module) is FastLinear:
            count += 1
            kernel_choice(module.weight, module.bias)
    return count


def disable_fast_kernels(model: nn.Module) -> int:
    """Put every ``FastLinear`` of ``model`` back to ``nn.Linear``; returns how many were switched back."""
    count = 0
    for module in model.modules():
        if type(module) is FastLinear:
            module.__class__ = nn.Linear
            count += 1
    return count


def uses_fast_kernels(model: nn.Module) -> bool:
    """Whether ``enable_fast_kernels`` switched (some of) this model's linear layers."""
    return any(type(module) is FastLinear for module in model.modules())


def kernel_choices(model: nn.Module) -> dict[str, str]:
    """The layouts a model's fast layers run on, by shape ("576x576": "column/stock"); empty on stock kernels."""
    choices = {}
    for module in model.modules():
        if type(module) is FastLinear:
            choice = kernel_choice(module.weight, module.bias)
            choices["x".join(map(str, module.weight.shape))] = f"{choice.one_row}/{choice.few_rows}"
    return dict(sorted(choices.items()))


def linear_for(layer: nn.Module) -> Callable[..., torch.Tensor]:
    """The function that applies ``layer``'s kind of kernel to any weight: ``fast_linear`` or ``F.linear``."""
    return fast_linear if isinstance(layer, FastLinear) else F.linear


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
def compare_kernels(backbone, sizes: Iterable[int] = DEFAULT_SIZES, context: int = 128, repeats: int = 7,
                    modes: Iterable[str] = ("stock", "fast")) -> dict[str, dict[int, float]]:
    """Median seconds of one base forward (decoder + logits at all n positions) per kernel mode and n.

    Modes are interleaved call by call (n, then stock, then fast) so that load from other processes
    falls on all of them alike; one warm-up call per mode and n precedes the timed ones. The model is
    left on the kernels it had before.
    """
    sizes, modes = sorted(set(sizes)), tuple(modes)
    model = backbone.model
    was_fast = uses_fast_kernels(model)
    switch = {"stock": disable_fast_kernels, "fast": enable_fast_kernels}
    timer = _ForwardTimer(backbone, context, max(sizes))
    samples: dict[str, dict[int, list[float]]] = {mode: {n: [] for n in sizes} for mode in modes}
    try:
        for round_index in range(repeats + 1):
            for n in sizes:
                for mode in modes:
                    switch[mode](model)
                    elapsed = timer(n)
                    if round_index > 0:  # round 0 is the warm-up
                        samples[mode][n].append(elapsed)
    finally:
        (enable_fast_kernels if was_fast else disable_fast_kernels)(model)
    return {mode: {n: statistics.median(times) for n, times in by_n.items()} for mode, by_n in samples.items()}


@torch.no_grad()
def measure_forward_cost(backbone, sizes: Iterable[int] = DEFAULT_SIZES, context: int = 128,
                         repeats: int = 7) -> dict[int, float]:
    """Median seconds of one base forward over n new tokens after ``context`` cached ones, on the
    model's current kernels: decoder plus logits at all n positions, cache cropped back after each call."""
    sizes = sorted(set(sizes))
    timer = _ForwardTimer(backbone, context, max(sizes))
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for round_index in range(repeats + 1):
        for n in sizes:
            elapsed = timer(n)
            if round_index > 0:
                samples[n].append(elapsed)
    return {n: statistics.median(times) for n, times in samples.items()}


@torch.no_grad()
def compare_logits(backbone, input_ids: torch.Tensor) -> dict[str, float]:
    """Stock vs fast logits on the same inputs: largest absolute difference and argmax agreement.

    ``input_ids`` is cut into pieces of ``MAX_FAST_ROWS`` tokens so every piece takes the fast path.
    """
    model = backbone.model
    was_fast = uses_fast_kernels(model)
    outputs = {}
    try:
        for mode, switch in (("stock", disable_fast_kernels), ("fast", enable_fast_kernels)):
            switch(model)
            pieces = input_ids.to(backbone.device).split(MAX_FAST_ROWS, dim=-1)
            outputs[mode] = torch.cat([backbone.logits(backbone.hidden(piece).last_hidden_state) for piece in pieces], 1)
    finally:
        (enable_fast_kernels if was_fast else disable_fast_kernels)(model)
    stock, fast = outputs["stock"], outputs["fast"]
    return {"max_abs_diff": (stock - fast).abs().max().item(),
            "argmax_agreement": (stock.argmax(-1) == fast.argmax(-1)).float().mean().item(),
            "positions": stock.shape[0] * stock.shape[1]}


def layer_report(shapes: Iterable[tuple[int, int]], repeats: int = 9) -> list[dict]:
    """Every layout of each (out, in) float32 layer on 1 and ``FEW_ROWS_PROBE`` rows: median ms and the choice."""
    rows = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features) / in_features ** 0.5
        one = time_forms(weight, None, 1, ONE_ROW_FORMS, repeats)
        few = time_forms(weight, None, FEW_ROWS_PROBE, FEW_ROW_FORMS, repeats)
        rows.append({"out": out_features, "in": in_features, "threads": torch.get_num_threads(),
                     "one_row_ms": {form: s * 1e3 for form, s in one.items()},
                     "few_rows_ms": {form: s * 1e3 for form, s in few.items()},
                     "choice": asdict(KernelChoice(pick_fastest(one, ONE_ROW_FORMS),
                                                   pick_fastest(few, FEW_ROW_FORMS)))})
    return rows


def model_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of a model's linear layers, largest first."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    return sorted(shapes, key=lambda s: -s[0] * s[1])


def _layer_table(rows: list[dict]):
    from rich import box
    from rich.table import Table

    table = Table(title=f"one float32 linear layer, {torch.get_num_threads()} threads: median ms",
                  caption=f"1: / {FEW_ROWS_PROBE}: one row / {FEW_ROWS_PROBE} rows; col: (W @ x.T).T; pair: the row "
                          "doubled, one column kept; gain: 1-row stock over the chosen layout",
                  caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("shape", "1:stock", "1:col", "1:pair", "gain", f"{FEW_ROWS_PROBE}:stock", f"{FEW_ROWS_PROBE}:col",
                   "chosen"):
        table.add_column(column, justify="right", no_wrap=True)
    short = {"stock": "stock", "column": "col", "pair": "pair"}
    for row in rows:
        one, few, choice = row["one_row_ms"], row["few_rows_ms"], row["choice"]
        table.add_row(f"{row['out']}x{row['in']}", *(f"{one[f]:.3g}" for f in ONE_ROW_FORMS),
                      f"{one['stock'] / one[choice['one_row']]:.2f}x",
                      *(f"{few[f]:.3g}" for f in FEW_ROW_FORMS), f"{short[choice['one_row']]}/{short[choice['few_rows']]}")
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
    repeats: Annotated[int, typer.Option(help="Timed calls per size and kernel mode (the median is reported).")] = 7,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    layer: Annotated[Optional[list[str]], typer.Option(help="Only time one linear layer of this OUTxIN shape (e.g. 49152x576; repeatable): every layout on 1 and 8 rows, no model loaded.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the measurements as JSON to this file.")] = None,
) -> dict:
    """Measure the cost of an n-token forward relative to a 1-token one, stock vs fast kernels."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

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

    size_list = sorted({int(s) for s in sizes.split(",") if s.strip()} | {1})
    with console.status(f"loading {model}"):
        backbone = load_backbone(model)
    with console.status("timing every layout of each layer shape"):
        layers = layer_report(model_shapes(backbone.model), repeats)
    console.print(_layer_table(layers))
    text = " ".join(record["prompt"] for record in load_builtin()[:40])
    real_ids = backbone.tokenizer(text, return_tensors="pt").input_ids[:, :4 * MAX_FAST_ROWS]
    with console.status("comparing logits"):
        numerics = compare_logits(backbone, real_ids)
    with console.status(f"timing {len(size_list)} sizes x 2 kernels x {repeats + 1} calls"):
        costs = compare_kernels(backbone, size_list, context=context, repeats=repeats)
    relative = {mode: relative_cost(by_n) for mode, by_n in costs.items()}

    table = Table(title=f"forward over n new tokens ({backbone.reference}, {context} cached, {threads} threads)",
                  caption=f"logits fast vs stock on {numerics['positions']} real tokens: max |diff| "
                          f"{numerics['max_abs_diff']:.1e}, argmax agreement {numerics['argmax_agreement']:.1%}; "
                          f"n/1: cost(n)/cost(1); fast ms at n=1 is mtpkit's greedy step, stock ms transformers'",
                  caption_justify="left", box=box.SIMPLE_HEAD)
    for column in ("n", "stock ms", "fast ms", "stock n/1", "fast n/1", "fast speed-up"):
        table.add_column(column, justify="right")
    for n in size_list:
        stock, fast = costs["stock"][n], costs["fast"][n]
        table.add_row(str(n), f"{stock * 1e3:.1f}", f"{fast * 1e3:.1f}", f"{relative['stock'][n]:.2f}",
                      f"{relative['fast'][n]:.2f}", f"{stock / fast:.2f}x")
    console.print(table)

    report = {"model": backbone.reference, "context": context, "repeats": repeats, "threads": threads,
              "torch": torch.__version__, "max_fast_rows": MAX_FAST_ROWS, "numerics": numerics, "layers": layers,
              "seconds": {mode: {str(n): s for n, s in by_n.items()} for mode, by_n in costs.items()},
              "relative": {mode: {str(n): r for n, r in by_n.items()} for mode, by_n in relative.items()}}
    _write_report(report, json_path, console)
    return report


def _write_report(report: dict, json_path: Path | None, console) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {json_path}")


if __name__ == "__main__":
    typer.run(main)
