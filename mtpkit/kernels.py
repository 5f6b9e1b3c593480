"""Few-row linear kernels for CPU verification, and what a forward over n new tokens costs.

Self-speculative decoding verifies n drafted tokens in one base forward, so on a CPU the speed-up
is bounded by cost(n) / cost(1). With stock kernels a linear layer on 2-64 rows goes through MKL's
``x @ W.T`` matrix-matrix path, which on the 49k-row output layer costs 2-4x the one-row
matrix-vector path; computing the same product as ``(W @ x.T).T`` keeps it near one row's cost.
``enable_fast_kernels`` switches a loaded model's ``nn.Linear`` modules to that formulation in
place (same parameters, no weight copies); ``linear_for`` gives the matching function for code
that applies a layer's weight itself, such as ``Backbone.logits``.

Measure it (timings to stderr, stock and fast interleaved)::

    python -m mtpkit.kernels --model smollm2-135m --json kernels.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional

import torch
import typer
from torch import nn
from torch.nn import functional as F

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MAX_FAST_ROWS = 64  # above this MKL's x @ W.T is as fast (prefill, training batches): keep it stock


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                max_rows: int = MAX_FAST_ROWS) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x.T).T`` when x has at most ``max_rows`` rows.

    Only float32 CPU inputs take the new path; anything else is passed to ``F.linear``. The result is
    contiguous, float32 and equal to stock up to summation order (about 1e-5); autograd works on both paths.
    """
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if not (0 < rows <= max_rows) or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, features)
    if bias is None:
        out = torch.mm(weight, flat.t())
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``fast_linear``: same parameters and state, other matmul layout."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fast_linear(input, self.weight, self.bias)


def enable_fast_kernels(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to ``FastLinear``; returns how many now run fast.

    The switch changes each module's class in place, so parameters (tied ones included), hooks,
    state-dict keys and optimizer references are untouched and nothing is copied. Subclasses of
    ``nn.Linear`` (LoRA layers, quantized layers) are left alone. Calling it twice is harmless.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
        count += type(module) is FastLinear
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
        _synchronize(self.backbone.device)
        start = time.perf_counter()
        hidden = self.backbone.hidden(input_ids=self.tokens[:, self.context:self.context + n],
                                      past_key_values=self.cache, position_ids=positions, use_cache=True)
        self.backbone.logits(hidden.last_hidden_state)  # verification needs logits at every position
        _synchronize(self.backbone.device)
        elapsed = time.perf_counter() - start
        self.cache.crop(-n)  # a negative count removes the n new tokens in every transformers 5.x
        return elapsed


def _synchronize(device: torch.device) -> None:
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


def main(
    model: Annotated[str, typer.Option(help="Base model: alias, local directory, .gguf file or hub id.")] = "smollm2-135m",
    sizes: Annotated[str, typer.Option(help="Comma-separated numbers of new tokens per forward.")] = ",".join(map(str, DEFAULT_SIZES)),
    context: Annotated[int, typer.Option(help="Tokens already in the KV cache.")] = 128,
    repeats: Annotated[int, typer.Option(help="Timed calls per size and kernel mode (the median is reported).")] = 7,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the measurements as JSON to this file.")] = None,
) -> dict:
    """Measure the cost of an n-token forward relative to a 1-token one, stock vs fast kernels."""
    from rich.console import Console
    from rich.table import Table

    from mtpkit.backbone import load_backbone
    from mtpkit.prompts import load_builtin

    console = Console(stderr=True)
    torch.set_num_threads(threads)
    size_list = sorted({int(s) for s in sizes.split(",") if s.strip()} | {1})
    with console.status(f"loading {model}"):
        backbone = load_backbone(model)
    text = " ".join(record["prompt"] for record in load_builtin()[:40])
    real_ids = backbone.tokenizer(text, return_tensors="pt").input_ids[:, :4 * MAX_FAST_ROWS]
    with console.status("comparing logits"):
        numerics = compare_logits(backbone, real_ids)
    with console.status(f"timing {len(size_list)} sizes x 2 kernels x {repeats + 1} calls"):
        costs = compare_kernels(backbone, size_list, context=context, repeats=repeats)
    relative = {mode: relative_cost(by_n) for mode, by_n in costs.items()}

    table = Table(title=f"forward over n new tokens ({backbone.reference}, {context} cached, {threads} threads)",
                  caption=f"logits fast vs stock on {numerics['positions']} real tokens: max |diff| "
                          f"{numerics['max_abs_diff']:.1e}, argmax agreement {numerics['argmax_agreement']:.1%}",
                  caption_justify="left")
    for column in ("n", "stock ms", "fast ms", "stock cost(n)/cost(1)", "fast cost(n)/cost(1)", "fast speed-up"):
        table.add_column(column, justify="right")
    for n in size_list:
        stock, fast = costs["stock"][n], costs["fast"][n]
        table.add_row(str(n), f"{stock * 1e3:.1f}", f"{fast * 1e3:.1f}", f"{relative['stock'][n]:.2f}",
                      f"{relative['fast'][n]:.2f}", f"{stock / fast:.2f}x")
    console.print(table)

    report = {"model": backbone.reference, "context": context, "repeats": repeats, "threads": threads,
              "torch": torch.__version__, "max_fast_rows": MAX_FAST_ROWS, "numerics": numerics,
              "seconds": {mode: {str(n): s for n, s in by_n.items()} for mode, by_n in costs.items()},
              "relative": {mode: {str(n): r for n, r in by_n.items()} for mode, by_n in relative.items()}}
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {json_path}")
    return report


if __name__ == "__main__":
    typer.run(main)
