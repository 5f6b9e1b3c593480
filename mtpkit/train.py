"""``finetune``: train the draft heads of a heads directory on a frozen base.

Reads top to bottom: ``setup`` (base, heads, data, self-distillation, cached hidden states,
optimizer), ``train`` (the loop, with evaluation and checkpoints), ``save`` (weights, config,
metrics, plot, model card), and ``finetune`` calling them in order.

The base is frozen, so each sequence's final hidden states are computed once and reused in
every epoch; only the heads run per step. A head's loss needs its full-vocabulary logits,
the largest tensor here, so heads are scored one at a time on a detached copy of their
state, in chunks of rows, and the gradients reach the head trunks in one backward at the end.
Head k at position t predicts ``mtpkit.targets.head_targets`` and is conditioned on
``mtpkit.targets.conditioning_tokens``: nothing here re-derives a shift.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn import functional as F

from mtpkit import __version__, targets
from mtpkit.backbone import Backbone, cache_root, load_backbone
from mtpkit.checkpoint import atomic_write, atomic_write_text, check_compatible, load_heads, save_heads
from mtpkit.config import CARD_NAME, CHECKPOINT_DIR, LORA_DIR, METRICS_NAME, HeadsConfig
from mtpkit.data import BUILTIN_PROMPTS, Dataset, TokenizedExample, data_fingerprint, load_data, tokenize_all
from mtpkit.distill import DistillStats, distill
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads

LOSSES = ("ce", "distill")
TRAIN_VOCABS = ("data", "full")
HEAD_WEIGHTS = ("uniform", "linear", "exponential", "primary-aux")
MIXED_PRECISION = ("no", "fp16", "bf16")
PLOT_NAME = "training.png"
CHECKPOINT_FILE = "state.pt"
TOPK = 10  # head_topk_accuracy holds P(target in top-i) for i = 1..TOPK
CHUNK_ROWS = 1024  # rows of full-vocabulary logits alive at once
HIDDEN_BATCH_TOKENS = 4096  # tokens per backbone forward when caching hidden states
DRAFT_VOCAB_LIMIT = 32768  # EAGLE-3 drafts from 32k tokens too
LORA_HEAD_SCALE = 0.2  # Medusa-2: with LoRA the base's own loss leads, the heads' is scaled down

SETTINGS_ADDED_LATER = {"feature_loss": 0.0}  # resume settings older checkpoints lack, with the value they ran with


@dataclass
class FinetuneOptions:
    """Every setting of a run; the CLI options and the recipe keys have these names."""

    data: list[str] = field(default_factory=lambda: [BUILTIN_PROMPTS])
    epochs: int = 2
    max_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    max_examples: int | None = None
    eval_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 50
    head_weights: str = "exponential"
    loss: str = "distill"  # measured on the default model: better held-out accuracy than "ce"
    train_vocab: str = "data"
    self_distill: bool | None = None  # None: on when some records are prompt-only
    distill_max_new_tokens: int = 128
    lora: bool = False
    mixed_precision: str = "no"
    dtype: str = "float32"
    resume: bool = False
    seed: int = 0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    hidden_cache_gb: float = 4.0
    lora_rank: int = 8
    distill_batch_size: int | None = None
    feature_loss: float = 0.0  # weight of the feature-regression term (EAGLE); 0: off

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise MtpkitError(f"--loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        if self.train_vocab not in TRAIN_VOCABS:
            raise MtpkitError(f"--train-vocab must be one of {', '.join(TRAIN_VOCABS)} (got {self.train_vocab!r})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MtpkitError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)} (got {self.mixed_precision!r})")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "distill_max_new_tokens"):
            if getattr(self, name) < 1:
                raise MtpkitError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.dtype != "float32" and self.mixed_precision == "no":
            raise MtpkitError(f"--dtype {self.dtype} needs --mixed-precision bf16 or fp16 (the heads train in float32)")
        if self.max_steps is not None and self.max_steps < 1:
            raise MtpkitError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if self.lr <= 0:
            raise MtpkitError(f"--lr must be positive (got {self.lr})")
        if self.feature_loss < 0:
            raise MtpkitError(f"--feature-loss must be 0 or more (got {self.feature_loss})")


@dataclass
class Callbacks:
    """How a run reports: ``progress(stage, done, total, info)``, ``message(text)``, ``after_step(step)``."""

    progress: Callable[[str, int, int, dict], None] | None = None
    message: Callable[[str], None] | None = None
    after_step: Callable[[int], None] | None = None

    def report(self, stage: str, done: int, total: int, **info) -> None:
        if self.progress:
            self.progress(stage, done, total, info)

    def say(self, text: str) -> None:
        if self.message:
            self.message(text)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the checkpoint was written."""


def parse_head_weights(spec: str, num_heads: int) -> list[float]:
    """Loss weight of each head: a named scheme or an explicit comma list of K numbers."""
    if spec == "uniform":
        return [1.0] * num_heads
    if spec == "linear":
        return [(num_heads - k + 1) / num_heads for k in range(1, num_heads + 1)]
    if spec == "exponential":
        return [0.8 ** k for k in range(1, num_heads + 1)]
    if spec == "primary-aux":  # the first head leads, the rest are auxiliary (DeepSeek-V3's 0.3)
        return [1.0] + [0.3] * (num_heads - 1)
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise MtpkitError(f"--head-weights must be one of {', '.join(HEAD_WEIGHTS)} or {num_heads} "
                          f"comma-separated numbers (got {spec!r})") from None
    if len(weights) != num_heads or any(w < 0 or not math.isfinite(w) for w in weights) or not any(weights):
        raise MtpkitError(f"--head-weights needs {num_heads} non-negative numbers, one per head (got {spec!r})")
    return weights


def chain_tokens(top1: list[float]) -> float:
    """Mean tokens per step that a chain of heads implies: 1 + sum_k prod_{j<=k} top1_j."""
    total, survive = 1.0, 1.0
    for p in top1:
        survive *= p
        total += survive
    return total


# ----------------------------------------------------------------------------- hidden states


class HiddenStore:
    """Final hidden states of every sequence, computed once, held in memory or memory-mapped on disk."""

    def __init__(self, tensors: list[torch.Tensor] | None = None, path: Path | None = None,
                 offsets: list[tuple[int, int]] | None = None, hidden_size: int = 0, dtype=torch.float32):
        self.tensors, self.path, self.offsets = tensors, path, offsets
        self.hidden_size, self.dtype = hidden_size, dtype
        self._mapped = None

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[index]
        if self._mapped is None:
            size = self.path.stat().st_size // torch.empty((), dtype=self.dtype).element_size()
            self._mapped = torch.from_file(str(self.path), shared=True, size=size, dtype=self.dtype)  # memory-mapped
        start, length = self.offsets[index]
        return self._mapped[start: start + length * self.hidden_size].view(length, self.hidden_size)

    @property
    def on_disk(self) -> bool:
        return self.tensors is None

    def close(self) -> None:
        self._mapped = None
        if self.path is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)


@torch.no_grad()
def compute_hidden(backbone: Backbone, examples: list[TokenizedExample], budget_bytes: float,
                   on_batch: Callable[[int, int], None] | None = None) -> HiddenStore:
    """Run the frozen base once over every sequence (longest first, right-padded batches)."""
    hidden_size, dtype = backbone.hidden_size, backbone.dtype
    element = torch.empty((), dtype=dtype).element_size()
    total = sum(len(e.ids) for e in examples) * hidden_size * element
    in_memory = total <= budget_bytes
    tensors: list[torch.Tensor | None] = [None] * len(examples)
    path = handle = None
    offsets: list[tuple[int, int]] = [(0, 0)] * len(examples)
    if not in_memory:
        (cache_root() / "hidden").mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="run-", dir=cache_root() / "hidden")) / "hidden.bin"
        handle = open(path, "wb")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    position, done = 0, 0
    while done < len(order):
        width = len(examples[order[done]].ids)
        rows = max(1, HIDDEN_BATCH_TOKENS // width)
        batch = order[done: done + rows]
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(examples[i].ids)] = torch.tensor(examples[i].ids)
            attention[row, : len(examples[i].ids)] = 1
        hidden = backbone.hidden(ids.to(backbone.device), attention_mask=attention.to(backbone.device)).last_hidden_state
        for row, i in enumerate(batch):
            sequence = hidden[row, : len(examples[i].ids)].to("cpu", dtype)
            if in_memory:
                tensors[i] = sequence.clone()
            else:
                handle.write(sequence.contiguous().view(torch.uint8).numpy().tobytes())
                offsets[i] = (position, len(examples[i].ids))
                position += sequence.numel()
        done += len(batch)
        if on_batch:
            on_batch(done, len(order))
    if in_memory:
        return HiddenStore(tensors=tensors, hidden_size=hidden_size, dtype=dtype)
    handle.close()
    return HiddenStore(path=path, offsets=offsets, hidden_size=hidden_size, dtype=dtype)


# ----------------------------------------------------------------------------- batches and losses


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T], right-padded
    loss_mask: torch.Tensor  # [B, T]: target tokens that count (response tokens, not padding)
    attention_mask: torch.Tensor  # [B, T]
    hidden: torch.Tensor | None  # [B, T, H] from the store, or None when the base must run (LoRA)


def collate(examples: list[TokenizedExample], indices: list[int], store: HiddenStore | None,
            device: torch.device, pad: int = 0) -> Batch:
    width = max(len(examples[i].ids) for i in indices)
    ids = torch.full((len(indices), width), pad, dtype=torch.long)
    loss_mask = torch.zeros((len(indices), width), dtype=torch.bool)
    attention = torch.zeros((len(indices), width), dtype=torch.long)
    hidden = None
    if store is not None:
        hidden = torch.zeros((len(indices), width, store.hidden_size), dtype=store.dtype)
    for row, i in enumerate(indices):
        example = examples[i]
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        attention[row, :n] = 1
        loss_mask[row, max(example.loss_start, 1): n] = True
        if hidden is not None:
            hidden[row, :n] = store[i]
    return Batch(ids.to(device), loss_mask.to(device), attention.to(device),
                 None if hidden is None else hidden.to(device))


def _conditioning(heads: DraftHeads, ids: torch.Tensor) -> list[torch.Tensor]:
    return [targets.conditioning_tokens(ids, k) for k in range(1, heads.num_heads + 1)]


def _rows(valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the positions t where head k has a target, and of t + k (where the base predicts it)."""
    width = valid.shape[1]
    flat = valid.reshape(-1).nonzero().squeeze(1)
    return flat, flat + (targets.target_offset(k) - 1)  # never crosses a row: valid t has t + k + 1 < width


@dataclass
class TrainVocab:
    """The token ids the training loss is normalised over, and where each full-vocabulary id sits in them."""

    ids: torch.Tensor  # [S], sorted
    position: torch.Tensor  # [V]: index into ids, -1 outside

    @classmethod
    def of(cls, examples: list[TokenizedExample], vocab_size: int, device) -> "TrainVocab":
        present = torch.zeros(vocab_size, dtype=torch.bool)
        for example in examples:
            present[torch.tensor(example.ids)] = True
        ids = present.nonzero().squeeze(1)
        position = torch.full((vocab_size,), -1, dtype=torch.long)
        position[ids] = torch.arange(ids.numel())
        return cls(ids.to(device), position.to(device))


def _scores(heads: DraftHeads, k: int, states: torch.Tensor, vocab: TrainVocab | None) -> torch.Tensor:
    """Logits of head k (k = 0: the base itself) over the full vocabulary or only ``vocab``."""
    backbone = heads.backbone
    if vocab is None:
        return backbone.logits(states) if k == 0 else heads.logits(k, states)
    if k == 0:
        return backbone.logits(states, *_base_rows(backbone, vocab.ids))
    return backbone.logits(states, *heads.output_layer(k, vocab.ids))


def _base_rows(backbone: Backbone, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    layer = backbone.model.get_output_embeddings()
    return layer.weight[rows], None if layer.bias is None else layer.bias[rows]


def draft_vocab(examples: list[TokenizedExample], limit: int = DRAFT_VOCAB_LIMIT) -> torch.Tensor:
    """The ``limit`` most frequent target tokens of the training data, sorted: what the heads will draft from."""
    counts: dict[int, int] = {}
    for example in examples:
        for token in example.ids[max(example.loss_start, 1):]:
            counts[token] = counts.get(token, 0) + 1
    top = sorted(counts, key=lambda t: (-counts[t], t))[:limit]
    return torch.tensor(sorted(top), dtype=torch.long)


def backward_heads(heads: DraftHeads, batch: Batch, hidden: torch.Tensor, weights: list[float], loss_type: str,
                   accelerator, scale: float, lora: bool, vocab: TrainVocab | None = None,
                   feature_weight: float = 0.0) -> list[float | None]:
    """Forward, loss and backward of one micro-batch; each head's mean loss, None where it had no target.

    With LoRA, entry 0 is the base's own next-token loss (Medusa-2 trains base and heads jointly).
    With ``vocab`` the softmax runs over the tokens of the training data only (a sampled softmax).
    ``feature_weight`` adds EAGLE's feature regression: head k's state at t is scored by the output layer
    just as the base's hidden state at t + k is, so it is pulled towards that state (smooth L1, mean over
    dimensions): a dense target beside the token one.
    """
    with accelerator.autocast():
        states = heads.teacher_forced_states(hidden, _conditioning(heads, batch.ids))
    outputs = ([(0, hidden, 1.0)] if lora else []) + [
        (k, state, weights[k - 1] * (LORA_HEAD_SCALE if lora else 1.0)) for k, state in enumerate(states, start=1)]
    teacher_hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    leaves, losses = [], []
    for k, state, weight in outputs:
        leaf = state.detach().requires_grad_()
        leaves.append(leaf)
        labels_all, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
        rows, teacher_rows = _rows(valid, k)
        if rows.numel() == 0 or weight == 0:
            losses.append(None if rows.numel() == 0 else 0.0)
            continue
        flat_state, labels = leaf.reshape(-1, leaf.shape[-1]), labels_all.reshape(-1)
        if vocab is not None:
            labels = vocab.position[labels]
        total = 0.0
        for start in range(0, rows.numel(), CHUNK_ROWS):
            chunk = rows[start: start + CHUNK_ROWS]
            with accelerator.autocast():
                logits = _scores(heads, k, flat_state[chunk], vocab).float()
            if loss_type == "distill" and k > 0:
                with torch.no_grad():
                    teacher = F.log_softmax(_scores(heads, 0, teacher_hidden[teacher_rows[start: start + CHUNK_ROWS]],
                                                    vocab).float(), -1)
                loss = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="sum")
            else:
                loss = F.cross_entropy(logits, labels[chunk], reduction="sum")
            if feature_weight and k > 0:
                loss = loss + feature_weight * F.smooth_l1_loss(
                    flat_state[chunk].float(), teacher_hidden[teacher_rows[start: start + CHUNK_ROWS]].float(),
                    reduction="sum") / flat_state.shape[-1]
            total += loss.item()
            accelerator.backward(loss * (weight * scale / rows.numel()))
        losses.append(total / rows.numel())
    roots = [s for (_, s, _), leaf in zip(outputs, leaves) if leaf.grad is not None and s.requires_grad]
    grads = [leaf.grad for (_, s, _), leaf in zip(outputs, leaves) if leaf.grad is not None and s.requires_grad]
    if roots:
        torch.autograd.backward(roots, grads)
    return losses


def evaluate(heads: DraftHeads, examples: list[TokenizedExample], store: HiddenStore | None,
             batch_size: int, device: torch.device, autocast=None) -> dict[str, Any]:
    """Per-head top-i accuracy (i = 1..10) and loss on held-out sequences, teacher-forced."""
    with torch.no_grad(), (autocast if autocast is not None else contextlib.nullcontext()):
        return _evaluate(heads, examples, store, batch_size, device)


def _evaluate(heads: DraftHeads, examples: list[TokenizedExample], store: HiddenStore | None,
              batch_size: int, device: torch.device) -> dict[str, Any]:
    K = heads.num_heads
    hits = torch.zeros((K, TOPK), dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.float64)
    loss_sums = torch.zeros(K, dtype=torch.float64)
    for first in range(0, len(examples), batch_size):
        batch = collate(examples, list(range(first, min(first + batch_size, len(examples)))), store, device)
        hidden = batch.hidden if batch.hidden is not None else heads.backbone.hidden(
            batch.ids, attention_mask=batch.attention_mask).last_hidden_state
        states = heads.teacher_forced_states(hidden, _conditioning(heads, batch.ids))
        for k, state in enumerate(states, start=1):
            labels, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
            rows, _ = _rows(valid, k)
            flat_state, flat_labels = state.reshape(-1, state.shape[-1]), labels.reshape(-1)
            for start in range(0, rows.numel(), CHUNK_ROWS):
                chunk = rows[start: start + CHUNK_ROWS]
                logits = heads.logits(k, flat_state[chunk]).float()
                top = logits.topk(min(TOPK, logits.shape[-1]), dim=-1).indices
                found = (top == flat_labels[chunk, None]).cumsum(-1).clamp(max=1).sum(0).double()
                hits[k - 1, : found.numel()] += found.cpu()
                counts[k - 1] += chunk.numel()
                loss_sums[k - 1] += F.cross_entropy(logits, flat_labels[chunk], reduction="sum").item()
    accuracy = hits / counts.clamp(min=1)[:, None]
    if hits.shape[1] and accuracy.shape[1] > 1:  # a vocab smaller than TOPK: top-i beyond it is top-V
        accuracy = torch.cummax(accuracy, dim=1).values
    top1 = [round(float(a), 5) for a in accuracy[:, 0]]
    return {"head_top1": top1,
            "head_top5": [round(float(a), 5) for a in accuracy[:, min(4, TOPK - 1)]],
            "head_topk_accuracy": [[round(float(a), 5) for a in row] for row in accuracy],
            "head_loss": [round(float(s / max(c, 1)), 5) for s, c in zip(loss_sums, counts)],
            "expected_chain_tokens": round(chain_tokens(top1), 4),
            "examples": len(examples),
            "tokens": int(counts[0].item()) if K else 0}


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything ``setup`` builds and ``train`` / ``save`` use."""

    heads_dir: Path
    options: FinetuneOptions
    heads: DraftHeads
    accelerator: Any
    dataset: Dataset
    train_examples: list[TokenizedExample]
    eval_examples: list[TokenizedExample]
    train_store: HiddenStore | None
    eval_store: HiddenStore | None
    optimizer: Any
    scheduler: Any
    weights: list[float]
    total_steps: int
    steps_per_epoch: int
    micro_batches_per_epoch: int
    self_distill: bool
    distill_stats: DistillStats | None
    peft_model: Any = None
    vocab: TrainVocab | None = None
    step: int = 0
    orders: dict[int, list[int]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peak_step_rss_mb: float | None = None
    peak_step_gpu_mb: float | None = None
    final_eval: dict | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.heads_dir / CHECKPOINT_DIR / CHECKPOINT_FILE

    @property
    def head_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        lora = [p for p in self.heads.backbone.model.parameters() if p.requires_grad] if self.options.lora else []
        return self.head_parameters + lora

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed."""
        o = self.options
        return {"batch_size": o.batch_size, "grad_accum": o.grad_accum, "total_steps": self.total_steps,
                "lr": o.lr, "loss": o.loss, "weights": self.weights, "seed": o.seed, "lora": o.lora,
                "train_vocab": o.train_vocab, "feature_loss": o.feature_loss,
                "data": data_fingerprint(self.train_examples), "processes": self.accelerator.num_processes}


def _make_accelerator(mixed_precision: str):
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mixed_precision)
    except (ValueError, RuntimeError) as exc:
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes == 1:  # a second run in one process (library use) may change precision
            AcceleratorState._reset_state()
            with contextlib.suppress(ValueError, RuntimeError):
                return Accelerator(mixed_precision=mixed_precision)
        raise MtpkitError(f"--mixed-precision {mixed_precision}: {str(exc).splitlines()[0][:200]}") from None


def setup(heads_dir: Path, options: FinetuneOptions, backbone: Backbone | None = None,
          callbacks: Callbacks | None = None) -> Run:
    """Load the base and heads, the data (self-distilled where needed), cache hidden states, build the optimizer."""
    callbacks = callbacks or Callbacks()
    options.check()
    heads_dir = Path(heads_dir)
    config = HeadsConfig.read(heads_dir)  # fails early on a directory attach did not write
    weights = parse_head_weights(options.head_weights, config.num_heads)
    if options.resume and not (heads_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file():
        raise MtpkitError(f"--resume: {heads_dir / CHECKPOINT_DIR} holds no checkpoint to resume from")
    if config.lora and not options.lora:
        raise MtpkitError(f"{heads_dir} was trained with --lora (its base was tuned); train it again with --lora "
                          "or attach fresh heads")
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    accelerator = _make_accelerator(options.mixed_precision)
    if backbone is None:
        backbone = load_backbone(config.base_model, dtype=options.dtype)
    check_compatible(config, backbone)
    # after the base: ``self:N`` sources are prompts the base writes itself
    dataset = load_data(options.data, max_examples=options.max_examples, eval_fraction=options.eval_fraction,
                        seed=options.seed, cache_dir=cache_root() / "datasets", backbone=backbone)
    prompt_only = any(e.needs_response for e in dataset.train + dataset.eval)
    self_distill = prompt_only if options.self_distill is None else options.self_distill
    if prompt_only and not self_distill:
        raise MtpkitError("the data has prompt-only records, which need --self-distill (the base writes the responses)")
    backbone.model.to(accelerator.device)
    heads = load_heads(heads_dir, backbone)
    heads.to(accelerator.device, dtype=torch.float32)  # float32 master weights whatever the base's dtype
    timings["load_s"] = time.perf_counter() - started

    distill_stats = None
    tokenizer = backbone.tokenizer
    if self_distill:
        tick = time.perf_counter()
        with accelerator.main_process_first():  # the main process generates, the others read its cache
            examples = [e for e in dataset.train + dataset.eval if e.text is None]
            responses, distill_stats = distill(
                backbone, examples, options.distill_max_new_tokens, batch_size=options.distill_batch_size,
                on_batch=lambda done, total: callbacks.report("self-distilling", done, total))
        by_id = {id(e): r for e, r in zip(examples, responses)}
        train_examples = tokenize_all(tokenizer, dataset.train, options.max_length, [by_id.get(id(e)) for e in dataset.train])
        eval_examples = tokenize_all(tokenizer, dataset.eval, options.max_length, [by_id.get(id(e)) for e in dataset.eval])
        timings["distill_s"] = time.perf_counter() - tick
    else:
        train_examples = tokenize_all(tokenizer, dataset.train, options.max_length)
        eval_examples = tokenize_all(tokenizer, dataset.eval, options.max_length)
    if not train_examples:
        raise MtpkitError(f"no training sequences left after tokenizing (is --max-length {options.max_length} "
                          "shorter than the prompts?)")

    peft_model = None
    train_store = eval_store = None
    if options.lora:
        peft_model = _add_lora(backbone, config, options.lora_rank)
    else:  # the base is frozen: its hidden states are the same in every epoch
        tick = time.perf_counter()
        budget = options.hidden_cache_gb * (1 << 30)
        train_store = compute_hidden(backbone, train_examples, budget,
                                     lambda d, t: callbacks.report("caching hidden states", d, t))
        eval_store = compute_hidden(backbone, eval_examples, budget) if eval_examples else None
        timings["hidden_s"] = time.perf_counter() - tick

    vocab = None
    if options.train_vocab == "data" and backbone.model.get_output_embeddings().bias is None:
        vocab = TrainVocab.of(train_examples, backbone.vocab_size, accelerator.device)

    world = accelerator.num_processes
    micro = math.ceil(len(train_examples) / (options.batch_size * world))
    steps_per_epoch = math.ceil(micro / options.grad_accum)
    total_steps = options.max_steps or options.epochs * steps_per_epoch
    params = [p for p in heads.parameters() if p.requires_grad]
    if options.lora:
        params += [p for p in backbone.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, round(options.warmup_ratio * total_steps)), total_steps)
    optimizer = accelerator.prepare(optimizer)  # mixed-precision scaling; gradients are reduced by hand
    run = Run(heads_dir=heads_dir, options=options, heads=heads, accelerator=accelerator, dataset=dataset,
              train_examples=train_examples, eval_examples=eval_examples, train_store=train_store,
              eval_store=eval_store, optimizer=optimizer, scheduler=scheduler, weights=weights,
              total_steps=total_steps, steps_per_epoch=steps_per_epoch, micro_batches_per_epoch=micro,
              self_distill=self_distill, distill_stats=distill_stats, peft_model=peft_model, vocab=vocab,
              timings=timings)
    if options.resume:
        load_checkpoint(run)
        callbacks.say(f"resuming at step {run.step} of {total_steps}")
    return run


def _add_lora(backbone: Backbone, config: HeadsConfig, rank: int):
    """Medusa-2: LoRA on every linear layer of the base (not its output layer), trained with the heads."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    peft_model = get_peft_model(backbone.model, lora_config)  # injects into backbone.model in place
    peft_model.peft_config["default"].base_model_name_or_path = config.base_model
    return peft_model


def _epoch_order(run: Run, epoch: int) -> list[int]:
    if epoch not in run.orders:
        generator = torch.Generator().manual_seed(run.options.seed * 1000 + epoch)
        run.orders[epoch] = torch.randperm(len(run.train_examples), generator=generator).tolist()
    return run.orders[epoch]


def _micro_batch(run: Run, epoch: int, index: int) -> list[int]:
    """Indices of one process's share of micro-batch ``index`` of ``epoch``."""
    order = _epoch_order(run, epoch)
    size, world, rank = run.options.batch_size, run.accelerator.num_processes, run.accelerator.process_index
    first = (index * world + rank) * size
    return order[first: first + size]


class _PeakRss:
    """Samples this process's RSS (psutil) in a thread while a block runs."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def train(run: Run, callbacks: Callbacks | None = None) -> None:
    """The loop: one optimizer step per ``grad_accum`` micro-batches, evaluation and checkpoints every N steps."""
    callbacks = callbacks or Callbacks()
    options, accelerator, heads = run.options, run.accelerator, run.heads
    backbone = heads.backbone
    tick = time.perf_counter()
    try:
        while run.step < run.total_steps:
            epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
            first = in_epoch * options.grad_accum
            micro = range(first, min(first + options.grad_accum, run.micro_batches_per_epoch))
            measure = _PeakRss() if run.peak_step_rss_mb is None else None
            if measure:
                measure.__enter__()
            head_losses = []
            for index in micro:
                indices = _micro_batch(run, epoch, index)
                if not indices:
                    continue
                batch = collate(run.train_examples, indices, run.train_store, accelerator.device)
                hidden = batch.hidden if batch.hidden is not None else backbone.hidden(
                    batch.ids, attention_mask=batch.attention_mask).last_hidden_state
                head_losses.append(backward_heads(heads, batch, hidden, run.weights, options.loss, accelerator,
                                                  1.0 / len(micro), options.lora, run.vocab, options.feature_loss))
            losses = [_mean(x) for x in zip(*head_losses)]
            if any(x is not None and not math.isfinite(x) for x in losses):
                _stop_on_nonfinite(run, losses)
            _reduce_gradients(run)
            if options.max_grad_norm:
                accelerator.clip_grad_norm_(run.trainable_parameters, options.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            if measure:
                measure.__exit__(None, None, None)
                run.peak_step_rss_mb = round(measure.peak / 2 ** 20, 1)
                if torch.cuda.is_available():
                    run.peak_step_gpu_mb = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            weighted = _weighted_loss(run, losses)
            record = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 3), "loss": round(weighted, 5),
                      "head_loss": [None if x is None else round(x, 5) for x in losses],
                      "lr": run.scheduler.get_last_lr()[0]}
            run.history.append(record)
            _append_metrics(run, record)
            callbacks.report("training", run.step, run.total_steps, loss=weighted)
            if options.eval_every and run.step % options.eval_every == 0 and run.step < run.total_steps and run.eval_examples:
                _log_eval(run, callbacks)
            if options.save_every and run.step % options.save_every == 0 and run.step < run.total_steps:
                save_checkpoint(run)
            if callbacks.after_step:
                callbacks.after_step(run.step)
    except KeyboardInterrupt:
        run.optimizer.zero_grad(set_to_none=True)
        save_checkpoint(run)
        raise TrainingInterrupted(f"interrupted at step {run.step} of {run.total_steps}; checkpoint saved in "
                                  f"{run.checkpoint_path.parent}, continue with --resume") from None
    run.timings["train_s"] = run.timings.get("train_s", 0.0) + time.perf_counter() - tick
    tick = time.perf_counter()
    if run.eval_examples:
        run.final_eval = _log_eval(run, callbacks)
    run.timings["eval_s"] = time.perf_counter() - tick


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _weighted_loss(run: Run, losses: list[float]) -> float:
    """The heads' weighted loss (the base's own term excluded), over heads that had targets."""
    head_losses = losses[1:] if run.options.lora else losses
    pairs = [(w, x) for w, x in zip(run.weights, head_losses) if x is not None]
    return sum(w * x for w, x in pairs) / max(sum(w for w, _ in pairs), 1e-12)


def _stop_on_nonfinite(run: Run, losses: list[float]) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    where = (f"the last good checkpoint (step {_checkpoint_step(run)}) is kept in {run.checkpoint_path.parent}"
             if run.checkpoint_path.is_file() else "no checkpoint was written yet")
    shown = ", ".join("-" if x is None else f"{x:.4g}" for x in losses)
    raise MtpkitError(f"the loss became non-finite at step {run.step + 1} (per head: {shown}); training stopped and "
                      f"{where}; try a lower --lr or --mixed-precision no")


def _checkpoint_step(run: Run) -> int | None:
    try:
        return int(torch.load(run.checkpoint_path, weights_only=True, map_location="cpu")["step"])
    except Exception:  # an unreadable checkpoint is reported as such, not raised over the real error
        return None


def _reduce_gradients(run: Run) -> None:
    """Average gradients over processes (``accelerate launch``); a no-op on one process."""
    if run.accelerator.num_processes == 1:
        return
    for param in run.trainable_parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad = run.accelerator.reduce(param.grad, reduction="mean")


def _log_eval(run: Run, callbacks: Callbacks) -> dict:
    callbacks.report("evaluating", 0, 1)
    result = evaluate(run.heads, run.eval_examples, run.eval_store, run.options.batch_size, run.accelerator.device,
                      run.accelerator.autocast())
    record = {"step": run.step, "eval": result}
    run.history.append(record)
    _append_metrics(run, record)
    callbacks.say(f"step {run.step}: eval top-1 per head {result['head_top1']}, "
                  f"expected chain tokens {result['expected_chain_tokens']}")
    return result


def _append_metrics(run: Run, record: dict) -> None:
    if run.accelerator.is_main_process:
        with open(run.heads_dir / METRICS_NAME, "a") as handle:
            handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run) -> Path | None:
    """Heads, optimizer, scheduler, RNG, step and data order, written atomically."""
    if not run.accelerator.is_main_process:
        return None
    state = {"step": run.step, "heads": {k: v.detach().cpu() for k, v in run.heads.state_dict().items()},
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
             "orders": {str(k): v for k, v in run.orders.items()}, "settings": run.settings(),
             "mtpkit_version": __version__}
    if run.peft_model is not None:
        from peft import get_peft_model_state_dict

        state["lora"] = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(run.peft_model).items()}
    run.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(run.checkpoint_path, lambda tmp: torch.save(state, tmp))
    return run.checkpoint_path


def load_checkpoint(run: Run) -> None:
    try:
        state = torch.load(run.checkpoint_path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types on a damaged file
        raise MtpkitError(f"cannot read the checkpoint {run.checkpoint_path}: {type(exc).__name__}") from None
    settings = run.settings()
    saved = {**SETTINGS_ADDED_LATER, **state["settings"]}  # a checkpoint older than a setting ran with its default
    differ = [k for k in settings if saved.get(k) != settings[k]]
    if differ:
        raise MtpkitError(f"--resume: the checkpoint in {run.checkpoint_path.parent} was made with different "
                          f"settings ({', '.join(differ)}); rerun with the same options, or without --resume")
    run.heads.load_state_dict({k: v.to(run.accelerator.device) for k, v in state["heads"].items()})
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.orders = {int(k): list(v) for k, v in state["orders"].items()}
    run.step = int(state["step"])
    if run.peft_model is not None and "lora" in state:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(run.peft_model, state["lora"])
    _truncate_metrics(run)


def _truncate_metrics(run: Run) -> None:
    """Drop metrics logged after the checkpoint: the resumed run logs those steps again."""
    path = run.heads_dir / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= run.step:
            kept.append(record)
    run.history = kept
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- saving


def save(run: Run, wall_seconds: float) -> list[Path]:
    """Write the trained heads, the config with its ``training`` record, the plot and the model card."""
    if not run.accelerator.is_main_process:
        return []
    heads, options = run.heads, run.options
    config = heads.config
    config.lora = options.lora
    config.training = {
        "data": options.data, "data_shapes": run.dataset.shapes,
        "train_sequences": len(run.train_examples), "eval_sequences": len(run.eval_examples),
        "self_distill": run.self_distill,
        "distill_max_new_tokens": options.distill_max_new_tokens if run.self_distill else None,
        "steps": run.step, "epochs": round(run.step / run.steps_per_epoch, 3), "lr": options.lr,
        "batch_size": options.batch_size, "grad_accum": options.grad_accum, "max_length": options.max_length,
        "loss": options.loss, "feature_loss": options.feature_loss, "train_vocab": run.vocab.ids.numel() if run.vocab is not None else "full",
        "head_weights": options.head_weights, "weights": run.weights, "lora": options.lora,
        "mixed_precision": options.mixed_precision, "dtype": options.dtype, "seed": options.seed, "processes": run.accelerator.num_processes,
        "wall_seconds": round(wall_seconds, 1), "timings": {k: round(v, 1) for k, v in run.timings.items()},
        "peak_step_rss_mb": run.peak_step_rss_mb, "mtpkit_version": __version__,
    }
    if run.final_eval is not None:
        config.training["eval"] = {k: run.final_eval[k] for k in
                                   ("head_top1", "head_top5", "head_topk_accuracy", "expected_chain_tokens", "examples")}
    heads.set_draft_vocab(draft_vocab(run.train_examples))
    config.training["draft_vocab"] = int(heads.draft_vocab.numel())
    files = save_heads(heads, run.heads_dir)
    if run.peft_model is not None:
        run.peft_model.save_pretrained(str(run.heads_dir / LORA_DIR))
        files.append(run.heads_dir / LORA_DIR)
    plot = plot_history(run.history, run.heads_dir / PLOT_NAME)
    if plot:
        files.append(plot)
    card = run.heads_dir / CARD_NAME
    atomic_write_text(card, model_card(config))
    files += [card, run.heads_dir / METRICS_NAME]
    shutil.rmtree(run.heads_dir / CHECKPOINT_DIR, ignore_errors=True)  # the run is complete
    return files


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Training loss and per-head eval top-1 accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval" in r]
    if not train:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="weighted head loss", title="training loss")
    if evals:
        for k in range(len(evals[0]["eval"]["head_top1"])):
            right.plot([r["step"] for r in evals], [r["eval"]["head_top1"][k] for r in evals], marker="o", label=f"head {k + 1}")
        right.legend()
    right.set(xlabel="step", ylabel="held-out top-1 accuracy", title="per-head accuracy", ylim=(0, 1))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _shape(config: HeadsConfig) -> str:
    if config.style == "eagle":
        return (f"eagle, one draft model of {config.num_layers} decoder layer(s) with its own attention, "
                f"run {config.num_heads} times per step (one per draft depth)")
    return f"{config.style}, {config.num_heads} heads x {config.num_layers} layer(s)"


def model_card(config: HeadsConfig) -> str:
    t = config.training
    evaluation = t.get("eval", {})
    rows = "\n".join(f"| {k} | {a:.3f} | {b:.3f} |" for k, (a, b) in
                     enumerate(zip(evaluation.get("head_top1", []), evaluation.get("head_top5", [])), start=1))
    return f"""---
library_name: mtpkit
base_model: {config.base_model}
tags: [mtpkit, speculative-decoding, medusa, multi-token-prediction]
---

# {config.num_heads} {config.style} draft heads for {config.base_model}

Multi-token-prediction draft heads trained with mtpkit on the frozen base
`{config.base_model}` (architecture `{config.base_architecture}`, fingerprint `{config.base_fingerprint}`).
Head k predicts the token k + 1 positions ahead; the base verifies every draft, so greedy output
is identical to the base's own.

- style: {_shape(config)}, {"own output layers" if config.own_lm_head else "sharing the base's output layer"}
- LoRA on the base: {"yes (Medusa-2 style; the base's outputs change, adapter in `lora/`)" if config.lora else "no (the base is untouched)"}
- data: {", ".join(t.get("data", []))} ({t.get("train_sequences")} training sequences{", responses self-distilled from the base" if t.get("self_distill") else ""})
- training: {t.get("steps")} steps ({t.get("epochs")} epochs), lr {t.get("lr")}, batch {t.get("batch_size")} x {t.get("grad_accum")}, loss `{t.get("loss")}`{f' + feature regression x{t["feature_loss"]}' if t.get("feature_loss") else ''}, head weights `{t.get("head_weights")}`
- wall time: {t.get("wall_seconds")} s; mtpkit {config.mtpkit_version}

## Held-out accuracy ({evaluation.get("examples", 0)} sequences)

| head | top-1 | top-5 |
|---|---|---|
{rows}

Expected tokens per step for a chain of all heads: {evaluation.get("expected_chain_tokens", "n/a")}

## Use

```bash
mtpkit generate <this directory> --prompt "Your prompt"
mtpkit bench <this directory> --prompts builtin
```

`metrics.jsonl` holds the training log and `training.png` its plot.
"""


@dataclass
class FinetuneResult:
    heads_dir: Path
    config: HeadsConfig
    eval: dict | None
    files: list[Path]
    steps: int
    epochs: float
    timings: dict[str, float]
    peak_step_rss_mb: float | None
    peak_step_gpu_mb: float | None
    distill: DistillStats | None
    dataset: Dataset
    train_sequences: int
    eval_sequences: int


def finetune(heads_dir: Path, options: FinetuneOptions | None = None, *, backbone: Backbone | None = None,
             callbacks: Callbacks | None = None) -> FinetuneResult:
    """Train the heads of ``heads_dir`` and rewrite it: setup, train, save."""
    options = options or FinetuneOptions()
    started = time.perf_counter()
    run = setup(heads_dir, options, backbone, callbacks)
    try:
        train(run, callbacks)
        files = save(run, time.perf_counter() - started)
    finally:
        for store in (run.train_store, run.eval_store):
            if store is not None:
                store.close()
    run.timings["total_s"] = time.perf_counter() - started
    return FinetuneResult(heads_dir=Path(heads_dir), config=run.heads.config, eval=run.final_eval, files=files,
                          steps=run.step, epochs=round(run.step / run.steps_per_epoch, 3), timings=run.timings,
                          peak_step_rss_mb=run.peak_step_rss_mb, peak_step_gpu_mb=run.peak_step_gpu_mb,
                          distill=run.distill_stats, dataset=run.dataset,
                          train_sequences=len(run.train_examples), eval_sequences=len(run.eval_examples))
