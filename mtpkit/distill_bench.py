"""How fast self-distillation makes training data, side by side (``python -m mtpkit.distill_bench``).

Training on self-distilled data needs, per sequence, the base's response and the base's hidden states of
prompt + response. The loop before the data engine produced them in two passes: batched generation (64
rows) on transformers' concatenating KV cache, then a second forward over every finished sequence
(``mtpkit.train.compute_hidden``). The data engine keeps the states as generation computes them and
appends to its KV cache in place (``mtpkit.kv_cache``); the middle configuration shows the first gain alone. Every configuration runs the same code the product
runs (``mtpkit.generation.generate``, ``mtpkit.train.compute_hidden``), interleaved round by round on the same
prompts, so load from other processes falls on all of them alike; only ratios measured in one run count.

bfloat16 is measured only where the processor computes it natively (``native_bfloat16``); elsewhere it
is emulated and slower, and the report says so instead of timing it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from mtpkit.backbone import Backbone
from mtpkit.generation import generate

TODAY_BATCH = 64  # the loop before the data engine: 64 rows, then a second pass for hidden states


@dataclass(frozen=True)
class Config:
    name: str
    batch_size: int
    keep_hidden: bool  # states from generation; False: a second forward over the finished sequences
    in_place: bool  # the KV cache appends in place; False: transformers' concatenating cache


def native_bfloat16(device: torch.device) -> tuple[bool, str]:
    """Whether bfloat16 matrix products run natively here, and the evidence (CPU flags or the GPU's answer)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device)
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False, "no /proc/cpuinfo"
    found = sorted({f for f in flags.split(":", 1)[1].split() if f in ("avx512_bf16", "amx_bf16", "avx_ne_convert")})
    return bool(found), ", ".join(found) or "no avx512_bf16 / amx_bf16 flag"


def _run(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int, config: Config) -> tuple[float, int]:
    """Seconds to have every prompt's response and hidden states, and the response tokens made."""
    from mtpkit.data import TokenizedExample
    from mtpkit.train import compute_hidden

    start, tokens = time.perf_counter(), 0
    for first in range(0, len(prompts), config.batch_size):
        batch = prompts[first:first + config.batch_size]
        made = generate(backbone, batch, max_new_tokens, keep_hidden=config.keep_hidden, in_place=config.in_place)
        tokens += sum(len(r) for r in made.responses)
        if not config.keep_hidden:
            sequences = [TokenizedExample(p + r, len(p)) for p, r in zip(batch, made.responses)]
            compute_hidden(backbone, sequences, budget_bytes=float("inf"))
    return time.perf_counter() - start, tokens


def compare(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int, configs: list[Config],
            rounds: int = 2) -> dict:
    """Tokens per second of ready training data for each configuration, interleaved ``rounds`` times."""
    samples: dict[str, list[float]] = {c.name: [] for c in configs}
    for _ in range(rounds):
        for config in configs:
            seconds, tokens = _run(backbone, prompts, max_new_tokens, config)
            samples[config.name].append(tokens / seconds)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians[configs[0].name]
    return {"tokens_per_second": medians, "samples": samples,
            "speedup": {name: value / baseline for name, value in medians.items()}}


def main(
    model: Annotated[str, typer.Option(help="Base model: alias, local directory, .gguf file or hub id.")] = "smollm2-135m",
    prompts: Annotated[int, typer.Option(help="Built-in training prompts to distill.")] = 128,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens of each response.")] = 128,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes for the data engine's loop.")] = "64,128",
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (the median is reported).")] = 2,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the measurements as JSON.")] = None,
) -> dict:
    """Self-distillation throughput: today's two-pass loop against the data engine's, side by side."""
    from rich.console import Console
    from rich.table import Table

    from mtpkit.backbone import load_backbone
    from mtpkit.data import Example, prompt_ids
    from mtpkit.prompts import load_builtin

    console = Console(stderr=True)
    torch.set_num_threads(threads)
    with console.status(f"loading {model}"):
        backbone = load_backbone(model)
    records = load_builtin("train")[:prompts]
    ids = sorted((prompt_ids(backbone.tokenizer, Example("prompt", [{"role": "user", "content": r["prompt"]}]))
                  for r in records), key=len, reverse=True)
    configs = [Config(f"two passes, batch {TODAY_BATCH}", TODAY_BATCH, False, False),
               Config(f"states kept, batch {TODAY_BATCH}, concatenating cache", TODAY_BATCH, True, False)]
    configs += [Config(f"states kept, batch {b}, in-place cache", b, True, True)
                for b in sorted({int(x) for x in batch_sizes.split(",")})]
    bf16, evidence = native_bfloat16(backbone.device)
    with console.status(f"{len(configs)} configurations x {rounds} rounds on {len(ids)} prompts"):
        result = compare(backbone, ids, max_new_tokens, configs, rounds)
    table = Table(title=f"self-distillation: ready training tokens/s ({len(ids)} prompts, {max_new_tokens} "
                        f"new tokens, {threads} threads)", caption=f"bfloat16: {'native' if bf16 else 'not native'} "
                        f"here ({evidence}){'' if bf16 else ', so it is not timed: float32 is used'}",
                  caption_justify="left")
    for column in ("configuration", "tokens/s", "vs two passes"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for config in configs:
        table.add_row(config.name, f"{result['tokens_per_second'][config.name]:.1f}",
                      f"{result['speedup'][config.name]:.2f}x")
    console.print(table)
    report = {"model": backbone.reference, "prompts": len(ids), "max_new_tokens": max_new_tokens, "threads": threads,
              "rounds": rounds, "torch": torch.__version__, "bfloat16_native": bf16, "bfloat16_evidence": evidence,
              **result}
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


if __name__ == "__main__":
    typer.run(main)
