"""``bench``: self-speculative decoding against the fastest plain decoding and transformers' own modes.

All methods run in one process, after a warm-up, on the same prompts and thread count. With ``repeats``
rounds each (prompt, method) pair is timed that many times, the method order rotating per prompt and
round, so a slow moment of the machine falls on every method alike; a pair's time is its median. Every
method starts every prompt from the same state (``reset``: calibrator, learned suffix entries, recycled
successors), so no
figure depends on the prompts before it. Per prompt and method it records tokens/s, tokens per base forward
(Spec-Bench's mean accepted tokens: plain decoding scores 1.00) and the output tokens, so the identical-output
rate is measured, not assumed. Summaries are medians over prompts with 95% bootstrap intervals.

The control, ``greedy``, is mtpkit's plain decoding on the kernel plan chosen on whole forwards
(``mtpkit.kernels``): the fastest plain decoding mtpkit knows on this machine, and what every speculation
gain is over. ``greedy-stock``, ``greedy-column``, ``greedy-pair`` and ``greedy-packed`` run the same loop with
every layer on one layout, to show that the control is the fastest of them.
"""

from __future__ import annotations

import ctypes
import gc
import gzip
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mtpkit import __version__
from mtpkit.backbone import resolve_placement
from mtpkit.bench_methods import (BASELINE, CONTROL, DEFAULT_METHODS, HEADS_TREES, PLAIN_LAYOUTS, REQUIRED, all_methods,
                                  drafted_methods)
from mtpkit.checkpoint import open_heads
from mtpkit.decoding import GenerationResult, SpeculativeDecoder, encode_prompt, greedy_generate
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads
from mtpkit.kernels import KernelPlan, disable_fast_kernels, enable_fast_kernels, kernel_measurement, synchronize
from mtpkit.prompts import load_builtin, load_mt_bench

PROMPT_SETS = {"builtin": "the built-in development set (held-out prompts, 8 categories)",
               "mt-bench": "MT-Bench (first turns, 8 categories)"}
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class BenchPrompt:
    id: str
    category: str
    text: str


@dataclass
class BenchSettings:
    prompts: str = "builtin"
    limit: int | None = None
    max_new_tokens: int = 128
    methods: tuple[str, ...] = DEFAULT_METHODS
    tree: str = "auto"
    chat: bool = True
    threads: int | None = None
    pld_tokens: int = 10
    repeats: int = 1
    memory: bool = True  # measure each method's peak memory in a pass of its own after the timed rounds
    fast_kernels: bool = True
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        """Numbers that make no sense are refused here, in one line, before anything loads."""
        for option, value, least in (("--limit", self.limit, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                     ("--threads", self.threads, 1), ("--pld-tokens", self.pld_tokens, 1),
                                     ("--repeats", self.repeats, 1)):
            if value is not None and not value >= least:
                raise MtpkitError(f"{option} must be at least {least} (got {value})")
        known = all_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise MtpkitError(f"unknown bench method {unknown[0]!r}: choose from {', '.join(known)}")
        resolve_placement(self.device, self.dtype)
        missing = tuple(m for m in REQUIRED if m not in self.methods)
        self.methods = tuple(dict.fromkeys((*missing, *self.methods)))  # the controls first, no repeats


@dataclass
class MethodRun:
    """One method on one prompt."""

    tokens: list[int]
    seconds: float
    forward_passes: int
    accepted_lengths: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0  # of ``seconds``, spent drafting and choosing the tree (mtpkit's methods)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return len(self.tokens) / max(1, self.forward_passes)


def load_bench_prompts(source: str, limit: int | None = None) -> list[BenchPrompt]:
    """``builtin`` (the built-in development set: the 96 held-out built-in prompts), ``mt-bench`` (MT-Bench's 80
    first turns), or a JSONL file (``turns``/``prompt``/``text``, MT-Bench, Spec-Bench and HumanEval shapes;
    ``.gz`` allowed) or a text file (one prompt a line). Categories are interleaved, so ``limit`` covers them all."""
    if source == "builtin":
        prompts = [BenchPrompt(r["id"], r["category"], r["prompt"]) for r in load_builtin("heldout")]
        prompts = _interleave_categories(prompts)
    elif source == "mt-bench":
        prompts = [BenchPrompt(str(r["question_id"]), r["category"], r["turns"][0]) for r in load_mt_bench()]
        prompts = _interleave_categories(prompts)
    else:
        prompts = _read_prompt_file(Path(source))
    if not prompts:
        raise MtpkitError(f"no prompts found in {source}")
    return prompts[:limit] if limit else prompts


def _interleave_categories(prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """Round-robin over categories so ``--limit N`` still covers every category."""
    by_category: dict[str, list[BenchPrompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    rounds = max(len(v) for v in by_category.values())
    return [group[i] for i in range(rounds) for group in by_category.values() if i < len(group)]


def _read_prompt_file(path: Path) -> list[BenchPrompt]:
    if not path.is_file():
        raise MtpkitError(f"prompts file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MtpkitError(f"cannot read prompts file {path}: {exc}") from None
    if not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        return [BenchPrompt(f"line-{i}", "prompts", line) for i, line in enumerate(lines, start=1)]
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise MtpkitError(f"{path}:{number} is not valid JSON") from None
        text = _prompt_text(record)
        if text is None:
            raise MtpkitError(f"{path}:{number} has none of the keys turns, prompt or text")
        pid = str(record.get("question_id", record.get("task_id", record.get("id", number))))
        prompts.append(BenchPrompt(pid, str(record.get("category", "prompts")), text))
    return prompts


def _prompt_text(record: dict) -> str | None:
    if isinstance(record.get("turns"), list) and record["turns"]:
        return str(record["turns"][0])
    for key in ("prompt", "text", "question", "instruction"):
        if isinstance(record.get(key), str) and record[key].strip():
            return record[key]
    return None


class PeakMemory:
    """Peak memory (MB) a block of code adds above what was resident when it started: CUDA's own counter on a GPU;
    on Linux the kernel's high-water mark of resident memory, reset at the start (``/proc/self/clear_refs``), with
    glibc told to map every allocation of 64 KiB or more on its own, so that memory freed earlier (by another
    method) is handed back instead of being reused unseen. That setting slows allocation, so it is made only for
    the memory pass, after every timed round. Elsewhere ``peak_mb`` stays None."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, None

    @staticmethod
    def supported(device: torch.device) -> bool:
        return device.type == "cuda" or (sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK))

    @staticmethod
    def map_large_allocations() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None)
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed (glibc stops raising it after frees)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give freed heap tops back too

    def __enter__(self):
        gc.collect()
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).malloc_trim(0)  # hand freed memory back first, or the run could reuse it unseen
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.supported(self.device):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current resident size
            self._start = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self.supported(self.device):
            self.peak_mb = max(0.0, _status_mb("VmHWM") - self._start)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise MtpkitError(f"/proc/self/status has no {key}")


class ForwardCounter:
    """Counts forward passes of a model (for transformers' own generate loops)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.count = model, 0

    def __enter__(self):
        self._hook = self.model.register_forward_pre_hook(self._increment)
        return self

    def _increment(self, *_):
        self.count += 1

    def __exit__(self, *exc):
        self._hook.remove()


class Runner:
    """Runs one method on one prompt: transformers' methods on stock kernels, mtpkit's on the kernel plan measured
    on whole forwards (``greedy-<layout>``: every layer on that layout)."""

    def __init__(self, heads: DraftHeads, settings: BenchSettings, heads_dir: Path | None = None):
        from mtpkit.draft_sources import build_decoder

        self.heads, self.settings = heads, settings
        self.backbone = heads.backbone
        # measured once per machine and model (cached): the control's plan and the tree chooser's forward costs
        self.measurement = kernel_measurement(self.backbone) if settings.fast_kernels else None
        self.decoders: dict[str, SpeculativeDecoder] = {}
        self.kernels("mtp-tree")  # the auto tree and the forward costs are measured on the kernels they run on
        for method, tree in HEADS_TREES.items():
            if method in settings.methods:
                self.decoders[method] = build_decoder(heads, heads_dir, "heads", tree=tree or settings.tree)
        for method, draft in drafted_methods().items():
            if method in settings.methods:
                self.decoders[method] = build_decoder(heads, heads_dir, draft, tree=settings.tree)
        tokenizer, model = self.backbone.tokenizer, self.backbone.model
        eos = model.generation_config.eos_token_id
        self.eos_ids = sorted({*([eos] if isinstance(eos, int) else (eos or [])), *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]

    def reset(self) -> None:
        """Every decoder back to the state it was built in (calibrator, learned suffix entries, drafting-time
        estimate): a timed run never learns from an earlier run, of its own prompt or another."""
        for decoder in self.decoders.values():
            decoder.reset()

    def plan(self, method: str) -> KernelPlan | None:
        """The kernel plan ``method`` runs on (None: stock kernels)."""
        if method.startswith("hf-") or self.measurement is None:
            return None
        if method in PLAIN_LAYOUTS:
            return KernelPlan.everywhere(PLAIN_LAYOUTS[method])
        return self.measurement.plan

    def kernels(self, method: str) -> None:
        plan = self.plan(method)
        for module in (self.backbone.model, self.heads):  # the draft layers run on few rows too
            disable_fast_kernels(module) if plan is None else enable_fast_kernels(module, plan)

    def run(self, method: str, input_ids: torch.Tensor, max_new_tokens: int) -> MethodRun:
        self.kernels(method)
        device = self.backbone.device
        if method.startswith("hf-"):
            kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
                          pad_token_id=self.pad_id, attention_mask=torch.ones_like(input_ids),
                          top_p=None, top_k=None, temperature=None)
            if method == "hf-pld":
                kwargs["prompt_lookup_num_tokens"] = self.settings.pld_tokens
            with ForwardCounter(self.backbone.model) as counter, torch.no_grad():
                synchronize(device)
                start = time.perf_counter()
                output = self.backbone.model.generate(input_ids, **kwargs)
                synchronize(device)
                seconds = time.perf_counter() - start
            tokens = output[0, input_ids.shape[1]:].tolist()
            tokens = _cut_after_eos(tokens, self.eos_ids)
            return MethodRun(tokens, seconds, counter.count)
        if method == CONTROL or method in PLAIN_LAYOUTS:
            result = greedy_generate(self.backbone, input_ids, max_new_tokens)
        elif method in self.decoders:
            result = self.decoders[method].generate(input_ids, max_new_tokens)
        else:
            raise MtpkitError(f"unknown bench method {method!r}: choose from {', '.join(all_methods())}")
        return _from_result(result)


def _from_result(result: GenerationResult) -> MethodRun:
    return MethodRun(list(result.tokens), result.prefill_seconds + result.decode_seconds,
                     result.forward_passes, list(result.accepted_lengths), result.draft_seconds)


def _cut_after_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def geometric_mean(values: list[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def bootstrap_interval(values: list[float], statistic: Callable[[list[float]], float] = statistics.median,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of ``statistic`` over ``values`` (prompts resampled with
    replacement; a fixed seed, so a report is reproducible from its per-prompt figures)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    estimates = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(resamples))
    return estimates[int(0.025 * (resamples - 1))], estimates[int(math.ceil(0.975 * (resamples - 1)))]


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mtpkit": __version__}


def rotated(methods: tuple[str, ...], shift: int) -> tuple[str, ...]:
    shift %= len(methods)
    return methods[shift:] + methods[:shift]


def run_bench(heads_dir: Path, settings: BenchSettings, *, model: str | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run every method on every prompt, ``settings.repeats`` rounds, order rotating; return the report as a
    JSON-ready dict.

    hf-greedy and mtpkit's greedy always run (``REQUIRED``): each method's speed-up over hf-greedy is then
    the product of what mtpkit's plain decoding gains (greedy over hf-greedy) and what speculation gains
    (``speculation_gain``: the method over greedy, per prompt).
    """
    threads = settings.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    prompts = load_bench_prompts(settings.prompts, settings.limit)
    heads = open_heads(heads_dir, model=model, dtype=settings.dtype, device=settings.device,
                       trust_remote_code=settings.trust_remote_code)
    tokenizer = heads.backbone.tokenizer
    if progress:
        progress("choosing kernels", 0, len(prompts) * settings.repeats)
    runner = Runner(heads, settings, heads_dir)
    encoded = [encode_prompt(tokenizer, p.text, settings.chat).to(heads.backbone.device) for p in prompts]

    if progress:
        progress("warm-up", 0, len(prompts) * settings.repeats)
    for method in settings.methods:  # warm-up: kernels, caches, calibration of the auto tree
        runner.run(method, encoded[0], min(16, settings.max_new_tokens))

    methods = settings.methods
    runs: dict[str, list[list[MethodRun]]] = {m: [[] for _ in prompts] for m in methods}
    done = 0
    for round_index in range(settings.repeats):
        for index, ids in enumerate(encoded):
            for method in rotated(methods, index + round_index):
                runner.reset()
                runs[method][index].append(runner.run(method, ids, settings.max_new_tokens))
            done += 1
            if progress:
                progress(f"round {round_index + 1}/{settings.repeats} {prompts[index].id}", done,
                         len(prompts) * settings.repeats)
    peaks: dict[str, float | None] = {m: None for m in methods}
    memory_prompt = max(range(len(prompts)), key=lambda i: encoded[i].shape[1])
    if settings.memory and PeakMemory.supported(heads.backbone.device):
        if progress:
            progress("peak memory", done, len(prompts) * settings.repeats)
        PeakMemory.map_large_allocations()
        for method in methods:  # after every timed round: the allocator setting slows what runs under it
            runner.reset()
            runner.kernels(method)
            with PeakMemory(heads.backbone.device) as memory:
                runner.run(method, encoded[memory_prompt], settings.max_new_tokens)
            peaks[method] = memory.peak_mb
    runner.kernels(BASELINE)  # leave the model on stock kernels
    from mtpkit.draft_sources import corpus_path

    corpus = corpus_path(heads_dir, heads.config) if any(m in drafted_methods() for m in methods) else None
    return build_report(prompts, runs, peaks, settings, heads, threads, heads_dir, runner, corpus,
                        prompts[memory_prompt].id)


def _combined(rounds: list[MethodRun]) -> MethodRun:
    """One (prompt, method) pair over its rounds: the first round's tokens and steps, the median time."""
    first = rounds[0]
    return MethodRun(first.tokens, statistics.median(r.seconds for r in rounds), first.forward_passes,
                     first.accepted_lengths, statistics.median(r.draft_seconds for r in rounds))


def build_report(prompts: list[BenchPrompt], runs: dict[str, list[list[MethodRun]]], peaks: dict[str, float | None],
                 settings: BenchSettings, heads: DraftHeads, threads: int, heads_dir: Path, runner: Runner | None = None,
                 corpus: Path | None = None, memory_prompt: str | None = None) -> dict:
    combined = {method: [_combined(rounds) for rounds in per_prompt] for method, per_prompt in runs.items()}
    baseline, own_greedy = combined[BASELINE], combined.get(CONTROL)
    per_prompt = []
    for i, prompt in enumerate(prompts):
        row = {"id": prompt.id, "category": prompt.category, "methods": {}}
        for method, method_runs in combined.items():
            run = method_runs[i]
            row["methods"][method] = {
                "new_tokens": len(run.tokens), "seconds": run.seconds,
                "seconds_per_round": [r.seconds for r in runs[method][i]], "tokens_per_s": run.tokens_per_second,
                "speedup": _ratio(run.tokens_per_second, baseline[i].tokens_per_second),
                "speculation_gain": (None if own_greedy is None
                                     else _ratio(run.tokens_per_second, own_greedy[i].tokens_per_second)),
                "mean_accepted_tokens": run.mean_accepted_tokens, "forward_passes": run.forward_passes,
                "accepted_lengths": run.accepted_lengths,
                "same_in_every_round": all(r.tokens == run.tokens and r.accepted_lengths == run.accepted_lengths
                                           for r in runs[method][i]),
                "draft_seconds_per_step": run.draft_seconds / max(1, run.forward_passes - 1),
                "identical_to_hf_greedy": run.tokens == baseline[i].tokens,
                "identical_to_greedy": None if own_greedy is None else run.tokens == own_greedy[i].tokens,
            }
        per_prompt.append(row)

    methods = {m: summarize([row["methods"][m] for row in per_prompt], peaks.get(m)) for m in runs}
    categories = sorted({p.category for p in prompts})
    by_category = {c: {m: summarize([row["methods"][m] for row in per_prompt if row["category"] == c], intervals=False)
                       for m in runs} for c in categories} if len(categories) > 1 else {}
    first_difference = {}
    for method in runs:
        for row in per_prompt:
            if not row["methods"][method]["identical_to_hf_greedy"]:
                first_difference[method] = row["id"]
                break
    measurement = None if runner is None else runner.measurement
    return {
        "methods": methods,
        "by_category": by_category,
        "first_difference_vs_hf_greedy": first_difference,
        "prompts": per_prompt,
        "setup": {**machine_info(threads), "heads_dir": str(heads_dir), "base_model": heads.config.base_model,
                  "style": heads.config.style, "num_heads": heads.config.num_heads,
                  "prompts": settings.prompts, "prompt_set": PROMPT_SETS.get(settings.prompts, settings.prompts),
                  "num_prompts": len(prompts), "repeats": settings.repeats,
                  "max_new_tokens": settings.max_new_tokens, "methods": list(runs), "tree": settings.tree,
                  "chat": settings.chat, "fast_kernels": settings.fast_kernels, "batch_size": 1,
                  "kernel_plan": None if measurement is None else measurement.plan.describe(),
                  "kernel_forward_seconds": None if measurement is None else measurement.to_dict()["seconds"],
                  "memory_prompt": memory_prompt, "suffix_corpus": None if corpus is None else str(corpus),
                  "dtype": str(heads.backbone.dtype).removeprefix("torch."), "device": str(heads.backbone.device)},
    }


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


def summarize(rows: list[dict], peak_mb: float | None = None, intervals: bool = True) -> dict:
    """Medians over prompts (with 95% bootstrap intervals when ``intervals``) and geometric means of the per-prompt
    figures; ``speculation_gain`` is None without a greedy run."""
    gains = [r.get("speculation_gain") for r in rows]
    measured_gain = all(g is not None for g in gains)
    speedups = [r["speedup"] for r in rows]
    accepted = [r["new_tokens"] / max(1, r["forward_passes"]) for r in rows]
    summary = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "speedup": geometric_mean(speedups),
        "speedup_median": statistics.median(speedups),
        "speculation_gain": geometric_mean(gains) if measured_gain else None,
        "speculation_gain_median": statistics.median(gains) if measured_gain else None,
        "mean_accepted_tokens": sum(r["new_tokens"] for r in rows) / max(1, sum(r["forward_passes"] for r in rows)),
        "accepted_median": statistics.median(accepted),
        "identical_rate": sum(r["identical_to_hf_greedy"] for r in rows) / len(rows),
        "identical_rate_vs_greedy": (None if rows[0]["identical_to_greedy"] is None
                                     else sum(r["identical_to_greedy"] for r in rows) / len(rows)),
        "prompts": len(rows),
    }
    if intervals:
        summary["speedup_interval"] = list(bootstrap_interval(speedups))
        summary["speculation_gain_interval"] = list(bootstrap_interval(gains)) if measured_gain else None
        summary["accepted_interval"] = list(bootstrap_interval(accepted))
    draft = [r["draft_seconds_per_step"] for r in rows if r.get("draft_seconds_per_step") is not None]
    if draft:
        summary["draft_seconds_per_step"] = statistics.median(draft)
    summary["peak_memory_mb"] = peak_mb
    return summary
