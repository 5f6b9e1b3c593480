"""``mtpkit generate``: decode prompts with the heads of a heads directory, streaming text to stdout."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mtpkit.cli.common import console, friendly_errors
from mtpkit.drafting.registry import check_draft, draft_help
from mtpkit.errors import MtpkitError


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompts to decode: ``--prompt`` or every prompt of ``--prompts-file`` (.txt or .jsonl)."""
    if (prompt is None) == (prompts_file is None):
        raise MtpkitError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if prompt is not None:
        if not prompt.strip():
            raise MtpkitError("--prompt is empty")
        return [prompt]
    if not prompts_file.is_file():
        raise MtpkitError(f"prompts file not found: {prompts_file}")
    lines = prompts_file.read_text(encoding="utf-8").splitlines()
    if prompts_file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MtpkitError(f"{prompts_file}:{number} is not valid JSON: {exc.msg}") from None
            text = _record_prompt(record) if isinstance(record, dict) else None
            if not text:
                raise MtpkitError(f"{prompts_file}:{number} has no \"prompt\", \"turns\" or \"text\" string")
            prompts.append(text)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise MtpkitError(f"{prompts_file} holds no prompts")
    return prompts


def check_numbers(temperature: float, top_p: float, seed: int | None) -> None:
    """NaN and infinity pass every comparison test wrongly: refuse them (and a seed torch cannot take) in one line."""
    for option, value in (("--temperature", temperature), ("--top-p", top_p)):
        if not math.isfinite(value):
            raise MtpkitError(f"{option} must be a finite number (got {value})")
    if seed is not None and not -2**63 <= seed < 2**64:  # the range torch.Generator.manual_seed takes
        raise MtpkitError(f"--seed must fit in 64 bits (got {seed})")


def _record_prompt(record: dict) -> str | None:
    """A jsonl record's prompt: "prompt", else the first of "turns", else "text"."""
    turns = record.get("turns")
    for value in (record.get("prompt"), turns[0] if isinstance(turns, list) and turns else None, record.get("text")):
        if isinstance(value, str) and value.strip():
            return value
    return None


@friendly_errors
def generate(
    heads_dir: Annotated[Path, typer.Argument(help="Heads directory (written by attach or finetune).")],
    prompt: Annotated[Optional[str], typer.Option(help="The prompt to complete.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A .txt file (one prompt per line) or .jsonl file (\"prompt\", \"turns\" or \"text\").")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap each prompt in the tokenizer's chat template (when it has one).")] = True,
    max_new_tokens: Annotated[int, typer.Option(help="Most new tokens per prompt.")] = 128,
    draft: Annotated[str, typer.Option(help=draft_help())] = "hybrid",
    tree: Annotated[str, typer.Option(help="The heads' tree: chain (top-1 of each head), auto (calibrated for this machine and these heads) or a JSON file of paths like [[0], [1], [0, 0]].")] = "auto",
    temperature: Annotated[float, typer.Option(help="0 decodes greedily (exactly the base's greedy output); > 0 samples, losslessly.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of tokens with this much probability.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens only (0: all).")] = 0,
    typical: Annotated[bool, typer.Option("--typical", help="Medusa's typical acceptance: accepts more drafts but is NOT lossless (the output no longer follows the base's distribution). Needs --temperature > 0.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when the output contains this text (repeatable).")] = None,
    trace: Annotated[Optional[Path], typer.Option(help="Write one JSON line per decoding step (drafts, their confidences and sources, accepted length, rejected node) to this file.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Load this base instead of the one named in the heads directory (it must be the same model).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (greedy output is identical to plain greedy in float32; in half precision the two may drift).")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the base's own code from the hub (also on when the heads config records it).")] = False,
    fast_kernels: Annotated[bool, typer.Option("--fast-kernels/--stock-kernels", help="Run linear layers on the layouts measured fastest on whole forwards of this model on this machine (float32 on a CPU; measured once, then cached; equal to stock up to rounding).")] = True,
) -> None:
    """Generate text with self-speculative decoding; text streams to stdout, a summary goes to stderr."""
    from mtpkit.backbone import resolve_placement
    from mtpkit.checkpoint import open_heads
    from mtpkit.config import HeadsConfig
    from mtpkit.decoding import TextStream, check_sampling, encode_prompt
    from mtpkit.draft_sources import acceptance_path, build_decoder, remember_calibrator
    from mtpkit.kernels import use_measured_kernels
    from mtpkit.tree import load_tree_file

    # everything cheap is checked before the model loads
    prompts = read_prompts(prompt, prompts_file)
    check_numbers(temperature=temperature, top_p=top_p, seed=seed)
    resolve_placement(device, dtype)
    check_sampling(temperature, top_p, top_k, typical)
    if max_new_tokens < 1:
        raise MtpkitError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    HeadsConfig.read(heads_dir)
    check_draft(draft)
    tree_spec = tree if tree in ("chain", "auto") else load_tree_file(Path(tree))
    trace_file = _open_trace(trace)

    with console.status("loading the base model and heads"):
        heads = open_heads(heads_dir, model=model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if fast_kernels:
        with console.status("choosing kernels for this machine (measured once, then cached)"):
            use_measured_kernels(heads.backbone, heads)  # the draft layers run on few rows too
    with console.status("calibrating for this machine" if tree_spec == "auto" or draft != "heads"
                        else "building the tree"):
        kept = None if draft in ("heads", "none") else acceptance_path(heads, draft, temperature > 0)  # calibrator
        decoder = build_decoder(heads, heads_dir, draft, tree_spec, remember=kept, temperature=temperature,
                                top_p=top_p, top_k=top_k, typical=typical, seed=seed)

    results = []
    try:
        for index, text in enumerate(prompts):
            ids = encode_prompt(heads.backbone.tokenizer, text, chat)
            stream = TextStream(heads.backbone.tokenizer, _write_stdout)
            on_step = None if trace_file is None else _tracer(trace_file, index)
            results.append(decoder.generate(ids, max_new_tokens, stop_strings=tuple(stop or ()), on_tokens=stream,
                                            trace=on_step))
            stream.finish()
            _write_stdout("\n")
    finally:
        if trace_file is not None:
            trace_file.close()
        if kept is not None:  # what this run's acceptances taught the calibrator, for the next run
            remember_calibrator(decoder, kept)
    console.print(_summary(results, f"mtpkit generate: {heads.config.style} x{heads.num_heads}, "
                                    f"{decoder.describe()}"))


SHOWN_PROMPTS = 6


def _summary(results, title: str) -> Table:
    """Metrics as rows; a column per prompt (the first few) and one for all of them."""
    table = Table(title=title)
    table.add_column("")
    columns = [(f"prompt {i + 1}", [r]) for i, r in enumerate(results[:SHOWN_PROMPTS])]
    if len(results) > 1:
        columns.append(("all", results))
    for name, _ in columns:
        table.add_column(name, justify="right")
    rows = [
        ("new tokens", lambda rs: str(sum(len(r.tokens) for r in rs))),
        ("base forward passes", lambda rs: str(sum(r.forward_passes for r in rs))),
        ("mean accepted tokens per step",
         lambda rs: f"{sum(len(r.tokens) for r in rs) / max(1, sum(r.forward_passes for r in rs)):.2f}"),
        ("drafting ms per step",
         lambda rs: f"{1e3 * sum(r.draft_seconds for r in rs) / max(1, sum(r.forward_passes - 1 for r in rs)):.2f}"),
        ("tokens/s", lambda rs: f"{sum(len(r.tokens) for r in rs) / max(1e-9, sum(r.prefill_seconds + r.decode_seconds for r in rs)):.1f}"),
        ("stop", lambda rs: rs[0].stop_reason if len(rs) == 1 else ""),
    ]
    for label, value in rows:
        table.add_row(label, *(value(rs) for _, rs in columns))
    return table


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _open_trace(path: Path | None):
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise MtpkitError(f"cannot write --trace {path}: {exc.strerror or exc}") from None


def _tracer(handle, prompt_index: int):
    def write(step: dict) -> None:
        handle.write(json.dumps({"prompt": prompt_index, **step}) + "\n")

    return write
