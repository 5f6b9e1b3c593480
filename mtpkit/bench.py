"""``bench``: self-speculative decoding against plain greedy and transformers' own modes.

All methods run in one process, after a warm-up, interleaved prompt by prompt, on the same
prompts and thread count. Per prompt and method it records tokens/s, tokens per base forward
(Spec-Bench's mean accepted tokens: plain decoding scores 1.00) and the output tokens, so the
identical-output rate is measured, not assumed.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch

from mtpkit import __version__
from mtpkit.backbone import resolve_placement
from mtpkit.checkpoint import open_heads
from mtpkit.decoding import GenerationResult, SpeculativeDecoder, encode_prompt, greedy_generate
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads
from mtpkit.kernels import kernel_choices, synchronize
from mtpkit.prompts import load_builtin

METHODS = ("hf-greedy", "greedy", "hf-pld", "pld", "suffix", "mtp-chain", "mtp-tree", "mtp-hybrid", "recycle")
DEFAULT_METHODS = ("hf-greedy", "greedy", "hf-pld", "mtp-chain", "mtp-tree", "mtp-hybrid")
# mtpkit's drafters on mtpkit's loop: the method -> ``--draft`` sources (``mtpkit.draft_sources.DRAFTS``)
DRAFTED = {"pld": "lookup", "suffix": "suffix", "mtp-hybrid": "hybrid", "recycle": "recycle"}
BASELINE = "hf-greedy"  # transformers' own greedy decoding: what a user runs without mtpkit
CONTROL = "greedy"  # mtpkit's greedy loop on mtpkit's kernels: speculation_gain is measured against it
REQUIRED = (BASELINE, CONTROL)  # every report carries both, so a speed-up always splits into kernels x speculation


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
    fast_kernels: bool = True
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        """Numbers that make no sense are refused here, in one line, before anything loads."""
        for option, value, least in (("--limit", self.limit, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                     ("--threads", self.threads, 1), ("--pld-tokens", self.pld_tokens, 1)):
            if value is not None and not value >= least:
                raise MtpkitError(f"{option} must be at least {least} (got {value})")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise MtpkitError(f"unknown bench method {unknown[0]!r}: choose from {', '.join(METHODS)}")
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
    """``builtin`` (the held-out built-in prompts), or a JSONL file (``turns``/``prompt``/``text``,
    MT-Bench, Spec-Bench and HumanEval shapes; ``.gz`` allowed) or a text file (one prompt a line)."""
    if source == "builtin":
        prompts = [BenchPrompt(r["id"], r["category"], r["prompt"]) for r in load_builtin("heldout")]
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
    """Peak resident memory (MB) while a block runs: RSS sampled in a thread, or CUDA's own counter."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak_mb = device, interval, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)


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
    """Runs one method on one prompt; mtpkit's methods on fast kernels, transformers' on stock ones."""

    def __init__(self, heads: DraftHeads, settings: BenchSettings, heads_dir: Path | None = None):
        from mtpkit.draft_sources import build_decoder

        self.heads, self.settings = heads, settings
        self.backbone = heads.backbone
        self.decoders: dict[str, SpeculativeDecoder] = {}
        self.kernels("mtp-tree")  # the auto tree and the forward costs are measured on the kernels they run on
        if "mtp-chain" in settings.methods:
            self.decoders["mtp-chain"] = build_decoder(heads, heads_dir, "heads", tree="chain")
        if "mtp-tree" in settings.methods:
            self.decoders["mtp-tree"] = build_decoder(heads, heads_dir, "heads", tree=settings.tree)
        for method, draft in DRAFTED.items():
            if method in settings.methods:
                self.decoders[method] = build_decoder(heads, heads_dir, draft, tree=settings.tree)
        tokenizer, model = self.backbone.tokenizer, self.backbone.model
        eos = model.generation_config.eos_token_id
        self.eos_ids = sorted({*([eos] if isinstance(eos, int) else (eos or [])), *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]

    def forget_outputs(self) -> None:
        """Drop what the suffix drafters learnt from the warm-up's outputs: a timed run must not draft from an
        earlier run of its own prompt."""
        from mtpkit.drafting.suffix import SuffixDrafter, SuffixIndex

        for decoder in self.decoders.values():
            for drafter in decoder.drafters or ():
                if isinstance(drafter, SuffixDrafter) and drafter.learn:
                    drafter.index = SuffixIndex(drafter.index.min_match, drafter.index.max_match)

    def predicted_tokens(self) -> dict[str, float | None]:
        """Mean accepted tokens each heads-only method should reach, from the heads' held-out accuracies (None for
        trees chosen per step, and for untrained heads)."""
        from mtpkit.calibrate import recorded_topk_accuracy
        from mtpkit.tree import expected_tokens

        accuracy = recorded_topk_accuracy(self.heads.config)
        return {method: None if accuracy is None or decoder.tree is None else expected_tokens(decoder.tree.choices,
                                                                                             accuracy)
                for method, decoder in self.decoders.items()}

    def kernels(self, method: str) -> None:
        from mtpkit import kernels

        fast = self.settings.fast_kernels and not method.startswith("hf-")
        switch = kernels.enable_fast_kernels if fast else kernels.disable_fast_kernels
        switch(self.backbone.model)
        switch(self.heads)  # the draft layers run on few rows too

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
        if method == "greedy":
            result = greedy_generate(self.backbone, input_ids, max_new_tokens)
        elif method in self.decoders:
            result = self.decoders[method].generate(input_ids, max_new_tokens)
        else:
            raise MtpkitError(f"unknown bench method {method!r}: choose from {', '.join(METHODS)}")
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


def predicted_chain_tokens(heads: DraftHeads) -> float | None:
    """Tokens per step a chain of the heads should reach, from their held-out top-1 accuracies."""
    top1 = heads.config.training.get("eval", {}).get("head_top1")
    if not top1:
        return None
    expected, survive = 1.0, 1.0
    for accuracy in top1:
        survive *= accuracy
        expected += survive
    return expected


def run_bench(heads_dir: Path, settings: BenchSettings, *, model: str | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run every method on every prompt, interleaved; return the report as a JSON-ready dict.

    hf-greedy and mtpkit's greedy always run (``REQUIRED``): each method's speed-up over hf-greedy is then
    the product of what mtpkit's kernels gain (greedy over hf-greedy) and what speculation gains
    (``speculation_gain``: the method over greedy, per prompt).
    """
    threads = settings.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    prompts = load_bench_prompts(settings.prompts, settings.limit)
    heads = open_heads(heads_dir, model=model, dtype=settings.dtype, device=settings.device,
                       trust_remote_code=settings.trust_remote_code)
    tokenizer = heads.backbone.tokenizer
    runner = Runner(heads, settings, heads_dir)
    encoded = [encode_prompt(tokenizer, p.text, settings.chat).to(heads.backbone.device) for p in prompts]

    if progress:
        progress("warm-up", 0, len(prompts))
    for method in settings.methods:  # warm-up: kernels, caches, calibration of the auto tree
        runner.run(method, encoded[0], min(16, settings.max_new_tokens))
    runner.forget_outputs()

    runs: dict[str, list[MethodRun]] = {m: [] for m in settings.methods}
    peaks = {m: 0.0 for m in settings.methods}
    for index, ids in enumerate(encoded):
        for method in settings.methods:
            with PeakMemory(heads.backbone.device) as memory:
                runs[method].append(runner.run(method, ids, settings.max_new_tokens))
            peaks[method] = max(peaks[method], memory.peak_mb)
        if progress:
            progress(prompts[index].id, index + 1, len(prompts))
    runner.kernels(CONTROL)
    layouts = kernel_choices(heads.backbone.model)  # what mtpkit's methods ran on, by layer shape
    runner.kernels(BASELINE)  # leave the model on stock kernels
    from mtpkit.draft_sources import corpus_path

    corpus = corpus_path(heads_dir, heads.config) if any(m in DRAFTED for m in settings.methods) else None
    return build_report(prompts, runs, peaks, settings, heads, threads, heads_dir, runner.predicted_tokens(),
                        layouts, corpus)


def build_report(prompts: list[BenchPrompt], runs: dict[str, list[MethodRun]], peaks: dict[str, float],
                 settings: BenchSettings, heads: DraftHeads, threads: int, heads_dir: Path,
                 predicted: dict[str, float | None], layouts: dict[str, str] | None = None,
                 corpus: Path | None = None) -> dict:
    baseline, own_greedy = runs[BASELINE], runs.get(CONTROL)
    per_prompt = []
    for i, prompt in enumerate(prompts):
        row = {"id": prompt.id, "category": prompt.category, "prompt_tokens": None, "methods": {}}
        for method, method_runs in runs.items():
            run = method_runs[i]
            row["methods"][method] = {
                "new_tokens": len(run.tokens), "seconds": run.seconds, "tokens_per_s": run.tokens_per_second,
                "speedup": _ratio(run.tokens_per_second, baseline[i].tokens_per_second),
                "speculation_gain": (None if own_greedy is None
                                     else _ratio(run.tokens_per_second, own_greedy[i].tokens_per_second)),
                "mean_accepted_tokens": run.mean_accepted_tokens, "forward_passes": run.forward_passes,
                "accepted_lengths": run.accepted_lengths,
                "draft_seconds_per_step": run.draft_seconds / max(1, run.forward_passes - 1),
                "identical_to_hf_greedy": run.tokens == baseline[i].tokens,
                "identical_to_greedy": None if own_greedy is None else run.tokens == own_greedy[i].tokens,
            }
        per_prompt.append(row)

    methods = {m: summarize([row["methods"][m] for row in per_prompt], peaks[m]) for m in runs}
    categories = sorted({p.category for p in prompts})
    by_category = {c: {m: summarize([row["methods"][m] for row in per_prompt if row["category"] == c])
                       for m in runs} for c in categories} if len(categories) > 1 else {}
    first_difference = {}
    for method in runs:
        for row in per_prompt:
            if not row["methods"][method]["identical_to_hf_greedy"]:
                first_difference[method] = row["id"]
                break
    return {
        "methods": methods,
        "by_category": by_category,
        "predicted_mean_accepted_tokens": predicted,
        "first_difference_vs_hf_greedy": first_difference,
        "prompts": per_prompt,
        "setup": {**machine_info(threads), "heads_dir": str(heads_dir), "base_model": heads.config.base_model,
                  "style": heads.config.style, "num_heads": heads.config.num_heads,
                  "prompts": settings.prompts, "num_prompts": len(prompts),
                  "max_new_tokens": settings.max_new_tokens, "methods": list(runs), "tree": settings.tree,
                  "chat": settings.chat, "fast_kernels": settings.fast_kernels, "batch_size": 1,
                  "kernel_layouts": layouts or {}, "suffix_corpus": None if corpus is None else str(corpus),
                  "dtype": str(heads.backbone.dtype).removeprefix("torch."), "device": str(heads.backbone.device)},
    }


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


def summarize(rows: list[dict], peak_mb: float | None = None) -> dict:
    """Medians and geometric means of per-prompt figures; ``speculation_gain`` is None without a greedy run."""
    gains = [r.get("speculation_gain") for r in rows]
    measured_gain = all(g is not None for g in gains)
    summary = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "speedup": geometric_mean([r["speedup"] for r in rows]),
        "speedup_median": statistics.median(r["speedup"] for r in rows),
        "speculation_gain": geometric_mean(gains) if measured_gain else None,
        "speculation_gain_median": statistics.median(gains) if measured_gain else None,
        "mean_accepted_tokens": sum(r["new_tokens"] for r in rows) / max(1, sum(r["forward_passes"] for r in rows)),
        "identical_rate": sum(r["identical_to_hf_greedy"] for r in rows) / len(rows),
        "identical_rate_vs_greedy": (None if rows[0]["identical_to_greedy"] is None
                                     else sum(r["identical_to_greedy"] for r in rows) / len(rows)),
        "prompts": len(rows),
    }
    draft = [r["draft_seconds_per_step"] for r in rows if r.get("draft_seconds_per_step") is not None]
    if draft:
        summary["draft_seconds_per_step"] = statistics.median(draft)
    if peak_mb is not None:
        summary["peak_memory_mb"] = peak_mb
    return summary
