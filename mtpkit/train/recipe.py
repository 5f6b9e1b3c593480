"""``finetune``: train the draft heads of a heads directory on a frozen base.

Reads top to bottom, torchtune's recipe shape: ``setup`` (``_setup_model``: base and heads;
``_setup_data``: data, self-distillation, each process's shard and its cached hidden states;
``_setup_optimizer``: the model accelerate prepares, optimizer, schedule), ``train`` (the loop, with
evaluation and checkpoints), ``save`` (weights, config, metrics, plot, model card), and ``finetune``
calling them in order. Under ``accelerate launch`` or ``torchrun`` every process runs this on its shard;
only the main process writes and reports.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mtpkit import __version__
from mtpkit.backbone import Backbone, load_backbone
from mtpkit.checkpoint import check_compatible, load_heads, save_heads
from mtpkit.config import CARD_NAME, CHECKPOINT_DIR, CORPUS_NAME, LORA_DIR, METRICS_NAME, HeadsConfig
from mtpkit.data import Dataset, TokenizedExample, data_fingerprint, load_data, tokenize_all
from mtpkit.distill import DistillStats, KeepStates, distill
from mtpkit.generation import eos_ids
from mtpkit.errors import MtpkitError
from mtpkit.files import atomic_write_text, cache_root
from mtpkit.heads import DraftHeads
from mtpkit.quality import Degeneracy, degeneracy
from mtpkit.train.batches import (Batch, TrainVocab, collate, draft_vocab, draft_vocab_of_size, epoch_order, shard,
                                  target_rows)
from mtpkit.train.card import PLOT_NAME, learning_curve, model_card, plot_history
from mtpkit.train.checkpoints import CHECKPOINT_FILE, checkpoint_step, load_checkpoint, save_checkpoint
from mtpkit.train.evaluation import eval_counts, eval_summary
from mtpkit.train.hidden import HiddenStore, Slot, StateStorage, compute_hidden, sequence_key
from mtpkit.train.losses import TrainedModel, backward_heads, draft_seed
from mtpkit.train.options import FinetuneOptions, parse_head_weights

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


@dataclass
class _Data:
    """What ``_setup_data`` gives this process: every sequence tokenized, its shards, their hidden states."""

    dataset: Dataset
    train_examples: list[TokenizedExample]
    eval_examples: list[TokenizedExample]
    train_shard: list[int]
    eval_shard: list[int]
    train_store: HiddenStore | None
    eval_store: HiddenStore | None
    vocab: TrainVocab | None
    self_distill: bool
    distill_stats: DistillStats | None

    def hidden_sources(self) -> dict[str, int]:
        """This process's sequences whose hidden states its base computed, and those kept from generation."""
        stores = [s for s in (self.train_store, self.eval_store) if s is not None]
        computed = sum(s.computed for s in stores)
        return {"computed": computed, "from_generation": sum(len(s) for s in stores) - computed}

    def sequences_per_process(self) -> dict[str, list[int]]:
        """How many sequences each process trains on and evaluates (the hidden states it computed, if any)."""
        from accelerate.utils import gather_object

        return {name: gather_object([len(indices) if store is None else len(store)])
                for name, indices, store in (("train", self.train_shard, self.train_store),
                                             ("eval", self.eval_shard, self.eval_store))}


@dataclass
class Run:
    """Everything ``setup`` builds and ``train`` / ``save`` use. Under ``accelerate launch`` or ``torchrun``
    each process holds one, with its own ``data``: its shard of the training and held-out sequences, whose
    hidden states alone it computes."""

    heads_dir: Path
    options: FinetuneOptions
    heads: DraftHeads
    model: nn.Module  # the TrainedModel around the heads, as accelerate prepared it
    accelerator: Any
    data: _Data
    optimizer: Any
    scheduler: Any
    weights: list[float]
    total_steps: int
    steps_per_epoch: int
    micro_batches_per_epoch: int
    peft_model: Any = None
    trust_remote_code: bool = False
    sequences_per_process: dict[str, list[int]] = field(default_factory=dict)
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
    def global_batch(self) -> int:
        """Sequences per micro-batch over all processes."""
        return self.options.batch_size * self.accelerator.num_processes

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed."""
        o = self.options
        return {"batch_size": o.batch_size, "grad_accum": o.grad_accum, "total_steps": self.total_steps,
                "lr": o.lr, "loss": o.loss, "weights": self.weights, "seed": o.seed, "lora": o.lora,
                "train_vocab": o.train_vocab, "feature_loss": o.feature_loss, "teacher_forcing": o.teacher_forcing,
                "data": data_fingerprint(self.data.train_examples), "processes": self.accelerator.num_processes,
                # only where it departs from the default: checkpoints written before the option resume as they were
                **({"hidden_dtype": o.hidden_dtype} if o.hidden_dtype != "base" else {})}


def _on_cpu_only() -> bool:
    # accelerate joins a torchrun/launch group as MULTI_CPU (gloo) only when told it runs on CPUs
    return not torch.accelerator.is_available()


def is_main_process() -> bool:
    """Whether this is the process that writes and reports (the only one outside ``accelerate launch``/``torchrun``)."""
    from accelerate import PartialState

    return PartialState(cpu=_on_cpu_only()).is_main_process


def _make_accelerator(mixed_precision: str):
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=_on_cpu_only())
    except (ValueError, RuntimeError) as exc:
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes != 1:
            raise MtpkitError(f"--mixed-precision {mixed_precision}: {str(exc).splitlines()[0][:200]}") from None
        # a second run in one process (library use) may change precision
        AcceleratorState._reset_state()
        try:
            accelerator = Accelerator(mixed_precision=mixed_precision, cpu=_on_cpu_only())
        except (ValueError, RuntimeError) as again:
            raise MtpkitError(f"--mixed-precision {mixed_precision}: {str(again).splitlines()[0][:200]}") from None
    check_distributed_type(accelerator.distributed_type)
    return accelerator


def check_distributed_type(distributed_type) -> None:
    """finetune runs on one process or under DDP; DeepSpeed and FSDP are refused in one line."""
    from accelerate import DistributedType

    if distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine owns backward and step; the heads' chunked backward needs both in hand
        raise MtpkitError("finetune runs under DDP (accelerate config), not DeepSpeed")
    if distributed_type == DistributedType.FSDP:
        # evaluation and the saved state dict read the unwrapped heads, which FSDP shards: not supported
        raise MtpkitError("finetune runs under DDP (accelerate config), not FSDP: the heads are small enough to "
                          "replicate on every process")


def setup(heads_dir: Path, options: FinetuneOptions, backbone: Backbone | None = None,
          callbacks: Callbacks | None = None) -> Run:
    """Load the base and heads, the data (self-distilled where needed), cache hidden states, build the optimizer."""
    options.check()
    heads_dir = Path(heads_dir)
    config = HeadsConfig.read(heads_dir)  # fails early on a directory attach did not write
    weights = parse_head_weights(options.head_weights, config.num_heads)
    if options.resume and not (heads_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file():
        raise MtpkitError(f"--resume: {heads_dir / CHECKPOINT_DIR} holds no checkpoint to resume from")
    if options.teacher_forcing < 1 and config.style != "sequential":
        raise MtpkitError(f"--teacher-forcing below 1 trains sequential heads only "
                          f"({heads_dir} holds {config.style} heads)")
    if config.lora and not options.lora:
        raise MtpkitError(f"{heads_dir} was trained with --lora (its base was tuned); train it again with --lora "
                          "or attach fresh heads")
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    accelerator = _make_accelerator(options.mixed_precision)
    callbacks = _reporting(callbacks, accelerator)
    trust_remote_code = options.trust_remote_code or config.trust_remote_code
    heads = _setup_model(heads_dir, config, options, accelerator, backbone, trust_remote_code)
    timings["load_s"] = time.perf_counter() - started
    problem = heads.style.training_problem(options)
    if problem:
        raise MtpkitError(problem)
    data = _setup_data(heads.backbone, options, accelerator, callbacks, timings, heads.feature_layers)
    if heads.has_draft_head and not config.training and not options.resume:  # untrained: choose its draft vocabulary
        heads.set_draft_vocab(draft_vocab_of_size(data.train_examples, config.draft_vocab_size), init_output=True)
    peft_model = _add_lora(heads.backbone, config, options.lora_rank) if options.lora else None
    model, optimizer, scheduler, total_steps, steps_per_epoch, micro = _setup_optimizer(
        heads, peft_model, options, accelerator, len(data.train_examples))
    run = Run(heads_dir=heads_dir, options=options, heads=heads, model=model, accelerator=accelerator, data=data,
              optimizer=optimizer, scheduler=scheduler, weights=weights, total_steps=total_steps,
              steps_per_epoch=steps_per_epoch, micro_batches_per_epoch=micro, peft_model=peft_model,
              trust_remote_code=trust_remote_code,
              sequences_per_process=data.sequences_per_process(), timings=timings)
    if options.resume:
        load_checkpoint(run)
        callbacks.say(f"resuming at step {run.step} of {total_steps}")
    return run


def _setup_model(heads_dir: Path, config: HeadsConfig, options: FinetuneOptions, accelerator,
                 backbone: Backbone | None, trust_remote_code: bool) -> DraftHeads:
    """The frozen base (loaded unless given) on this process's device, and the heads on it in float32."""
    if backbone is None:
        backbone = load_backbone(config.base_model, dtype=options.dtype, trust_remote_code=trust_remote_code)
    check_compatible(config, backbone)
    backbone.model.to(accelerator.device)
    heads = load_heads(heads_dir, backbone)
    heads.to(accelerator.device, dtype=torch.float32)  # float32 master weights whatever the base's dtype
    return heads


def _setup_data(backbone: Backbone, options: FinetuneOptions, accelerator, callbacks: Callbacks,
                timings: dict[str, float], feature_layers: list[int] | None = None) -> _Data:
    """Load and split the data (after the base: ``self:N`` sources are prompts the base writes itself),
    self-distil where needed (the main process first, the others read its cache), tokenize, and cache the
    hidden states of this process's shard when the base is frozen: those generation just computed are kept
    (single process), the base runs over the rest."""
    world, rank = accelerator.num_processes, accelerator.process_index
    dataset = load_data(options.data, max_examples=options.max_examples, eval_fraction=options.eval_fraction,
                        seed=options.seed, cache_dir=cache_root() / "datasets", backbone=backbone)
    prompt_only = any(e.needs_response for e in dataset.train + dataset.eval)
    self_distill = prompt_only if options.self_distill is None else options.self_distill
    if prompt_only and not self_distill:
        raise MtpkitError("the data has prompt-only records, which need --self-distill (the base writes the responses)")
    distill_stats = None
    tokenizer = backbone.tokenizer
    frozen = not options.lora  # the base's hidden states are the same in every epoch: computed once
    kept_dtype = torch.bfloat16 if options.hidden_dtype == "bfloat16" else backbone.dtype
    storage = StateStorage.for_features(backbone, options.hidden_cache_gb * (1 << 30), feature_layers,
                                        kept_dtype) if frozen else None
    kept: dict[str, Slot] = {}
    if self_distill:
        tick = time.perf_counter()
        keep = None
        if frozen and world == 1:  # under several processes the main one generates all, the others compute theirs

            def put(ids: list[int], states: torch.Tensor) -> None:
                ids = ids[: options.max_length]  # as ``tokenize`` cuts the sequence
                kept[sequence_key(ids)] = storage.put(states[: len(ids)])

            keep = KeepStates(put, feature_layers, kept_dtype)
        with accelerator.main_process_first():  # the main process generates, the others read its cache
            examples = [e for e in dataset.train + dataset.eval if e.text is None]
            responses, distill_stats = distill(
                backbone, examples, options.distill_max_new_tokens, batch_size=options.distill_batch_size,
                on_batch=lambda done, total: callbacks.report("self-distilling", done, total), keep=keep)
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
    quality = response_quality(train_examples, eos_ids(backbone))
    if quality.warning() and accelerator.is_main_process:
        callbacks.say(f"warning: {quality.warning()}")
    train_shard = shard(len(train_examples), options.batch_size, world, rank, options.seed)
    eval_shard = list(range(rank, len(eval_examples), world))

    train_store = eval_store = None
    if frozen:
        tick = time.perf_counter()
        train_store = compute_hidden(backbone, train_examples, storage,
                                     lambda d, t: callbacks.report("caching hidden states", d, t), train_shard,
                                     layer_ids=feature_layers, kept=kept)
        eval_store = compute_hidden(backbone, eval_examples, storage, indices=eval_shard,
                                    layer_ids=feature_layers, kept=kept) if eval_shard else None
        timings["hidden_s"] = time.perf_counter() - tick

    vocab = None
    if options.train_vocab == "data" and backbone.model.get_output_embeddings().bias is None:
        vocab = TrainVocab.of(train_examples, backbone.vocab_size, accelerator.device)
    return _Data(dataset, train_examples, eval_examples, train_shard, eval_shard, train_store, eval_store, vocab,
                 self_distill, distill_stats)


def train_tokens(examples: list[TokenizedExample]) -> int:
    """Target tokens trained on: the responses (all of a plain text but its first token)."""
    return sum(len(e.ids) - max(e.loss_start, 1) for e in examples)


def trained_corpus(heads_dir: Path, dataset: Dataset) -> str:
    """The self-distilled corpus the heads trained on, relative to their directory, for the suffix drafter
    ("": none, several, or the directory carries its own ``corpus.parquet``)."""
    corpora = [Path(r.source) for r in dataset.sources if r.shapes.get("tokens") and Path(r.source).is_file()]
    if len(corpora) != 1 or (heads_dir / CORPUS_NAME).is_file():
        return ""
    return os.path.relpath(corpora[0].resolve(), heads_dir.resolve())


def tokens_seen(history: list[dict]) -> int:
    """Training tokens (``train_tokens`` of the sequences, over every process) seen up to the last logged step."""
    return next((r["tokens"] for r in reversed(history) if "loss" in r and "tokens" in r), 0)


def response_quality(examples: list[TokenizedExample], stop_ids: set[int]) -> Degeneracy:
    """Empty and looping responses among the training sequences (plain texts count as responses)."""
    return degeneracy([e.ids[e.loss_start:] for e in examples], stop_ids)


def _setup_optimizer(heads: DraftHeads, peft_model, options: FinetuneOptions, accelerator, sequences: int):
    """The model accelerate prepares (DDP around it), AdamW with mixed-precision scaling, warmup + cosine
    (stepped once per optimizer step, so not prepared); and the run's length in steps and micro-batches."""
    micro = math.ceil(sequences / (options.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(micro / options.grad_accum)
    total_steps = options.max_steps or options.epochs * steps_per_epoch
    model = TrainedModel(heads, peft_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr,
                                  weight_decay=options.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, round(options.warmup_ratio * total_steps)), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, total_steps, steps_per_epoch, micro


def _reporting(callbacks: Callbacks | None, accelerator) -> Callbacks:
    """The callbacks as given on the main process; elsewhere only ``after_step`` (the others stay quiet)."""
    callbacks = callbacks or Callbacks()
    return callbacks if accelerator.is_main_process else Callbacks(after_step=callbacks.after_step)


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
        run.orders[epoch] = epoch_order(len(run.data.train_examples), run.global_batch, run.options.seed, epoch)
    return run.orders[epoch]


def _global_micro_batch(run: Run, epoch: int, index: int) -> list[int]:
    """Indices of micro-batch ``index`` of ``epoch``, every process's share of it in process order."""
    return _epoch_order(run, epoch)[index * run.global_batch: (index + 1) * run.global_batch]


def _micro_batch(run: Run, epoch: int, index: int) -> list[int]:
    """Indices of this process's share of micro-batch ``index`` of ``epoch``."""
    size = run.options.batch_size
    first = run.accelerator.process_index * size
    return _global_micro_batch(run, epoch, index)[first: first + size]


def _empty_batch(run: "Run") -> Batch:
    """A one-token batch with no target: a process whose share of a micro-batch is empty still takes part
    in the gradient synchronisation, contributing zeros."""
    device = run.accelerator.device
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    hidden = None
    if run.data.train_store is not None:
        hidden = torch.zeros((1, 1, run.data.train_store.hidden_size), dtype=run.data.train_store.dtype, device=device)
    return Batch(ids, torch.zeros_like(ids, dtype=torch.bool), torch.ones_like(ids), hidden)


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
    """The loop: one optimizer step per ``grad_accum`` micro-batches, evaluation and checkpoints every N steps.

    Gradients are synchronised across processes (DDP) in the last micro-batch's backward only.
    """
    callbacks = _reporting(callbacks, run.accelerator)
    options, accelerator = run.options, run.accelerator
    num_heads = run.heads.num_heads
    tick = time.perf_counter()
    try:
        while run.step < run.total_steps:
            epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
            first = in_epoch * options.grad_accum
            micro = range(first, min(first + options.grad_accum, run.micro_batches_per_epoch))
            measure = _PeakRss() if run.peak_step_rss_mb is None else None
            if measure:
                measure.__enter__()
            loss_sums, row_counts = [], []
            tokens = tokens_seen(run.history)
            for index in micro:
                indices = _micro_batch(run, epoch, index)
                everywhere = _global_micro_batch(run, epoch, index)
                everyone = target_rows(run.data.train_examples, everywhere, num_heads, options.lora, run.heads)
                tokens += train_tokens([run.data.train_examples[i] for i in everywhere])
                batch = collate(run.data.train_examples, indices, run.data.train_store, accelerator.device) if indices \
                    else _empty_batch(run)
                sync = index == micro[-1]
                with contextlib.nullcontext() if sync else accelerator.no_sync(run.model):
                    losses = backward_heads(run.model, batch, run.weights, options.loss, accelerator, 1.0 / len(micro),
                                            options.lora, run.data.vocab, options.feature_loss, total_rows=everyone,
                                            teacher_forcing=options.teacher_forcing,
                                            seed=draft_seed(options.seed, run.step, index, accelerator.process_index))
                mine = target_rows(run.data.train_examples, indices, num_heads, options.lora, run.heads)
                loss_sums.append([0.0 if x is None else x * n for x, n in zip(losses, mine)])
                row_counts.append(everyone)
            losses = _step_losses(accelerator, loss_sums, row_counts)
            if any(x is not None and not math.isfinite(x) for x in losses):
                _stop_on_nonfinite(run, losses)
            if options.max_grad_norm:
                accelerator.clip_grad_norm_(run.model.parameters(), options.max_grad_norm)
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
                      "lr": run.scheduler.get_last_lr()[0], "tokens": tokens}
            run.history.append(record)
            _append_metrics(run, record)
            callbacks.report("training", run.step, run.total_steps, loss=weighted)
            if options.eval_every and run.step % options.eval_every == 0 and run.step < run.total_steps and run.data.eval_examples:
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
    if run.data.eval_examples:
        run.final_eval = _log_eval(run, callbacks)
    run.timings["eval_s"] = time.perf_counter() - tick


def _step_losses(accelerator, loss_sums: list[list[float]], row_counts: list[list[int]]) -> list[float | None]:
    """Each output's loss in a step, over every process: per micro-batch the summed loss over its target rows,
    then the mean over the micro-batches where it had targets (None: none)."""
    sums = torch.tensor(loss_sums, dtype=torch.float64)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    counts = torch.tensor(row_counts, dtype=torch.float64)
    per_micro = [[float(s / c) if c else None for s, c in zip(row_sums, row_rows)]
                 for row_sums, row_rows in zip(sums.tolist(), counts.tolist())]
    return [_mean(x) for x in zip(*per_micro)]


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
    where = (f"the last good checkpoint (step {checkpoint_step(run)}) is kept in {run.checkpoint_path.parent}"
             if run.checkpoint_path.is_file() else "no checkpoint was written yet")
    shown = ", ".join("-" if x is None else f"{x:.4g}" for x in losses)
    raise MtpkitError(f"the loss became non-finite at step {run.step + 1} (per head: {shown}); training stopped and "
                      f"{where}; try a lower --lr or --mixed-precision no")


def _log_eval(run: Run, callbacks: Callbacks) -> dict:
    """Evaluate: each process scores its shard of the held-out sequences, the sums are added over processes."""
    callbacks.report("evaluating", 0, 1)
    accelerator = run.accelerator
    with torch.no_grad(), accelerator.autocast():
        sums = eval_counts(run.heads, run.data.eval_examples, run.data.eval_shard, run.data.eval_store, run.options.batch_size,
                           accelerator.device)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    result = eval_summary(sums, len(run.data.eval_examples))
    record = {"step": run.step, "tokens": tokens_seen(run.history), "eval": result}
    run.history.append(record)
    _append_metrics(run, record)
    callbacks.say(f"step {run.step}: eval top-1 per head {result['head_top1']}, "
                  f"chain accepts {result['chain_accepted']} tokens per step")
    return result


def _append_metrics(run: Run, record: dict) -> None:
    if run.accelerator.is_main_process:
        with open(run.heads_dir / METRICS_NAME, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def save(run: Run, wall_seconds: float) -> list[Path]:
    """Write the trained heads, the config with its ``training`` record, the plot and the model card."""
    if not run.accelerator.is_main_process:
        return []
    heads, options = run.heads, run.options
    config = heads.config
    config.lora = options.lora
    config.trust_remote_code = run.trust_remote_code
    config.corpus = config.corpus or trained_corpus(run.heads_dir, run.data.dataset)
    config.training = {
        "data": options.data, "data_shapes": run.data.dataset.shapes,
        "train_sequences": len(run.data.train_examples), "eval_sequences": len(run.data.eval_examples),
        "train_tokens": train_tokens(run.data.train_examples),
        "sources": [{"source": r.source, "records": r.records, "shapes": r.shapes, **({"detail": r.detail} if r.detail else {})}
                    for r in run.data.dataset.sources],
        "responses": response_quality(run.data.train_examples, eos_ids(run.heads.backbone)).as_dict(),
        "self_distill": run.data.self_distill,
        "distill_max_new_tokens": options.distill_max_new_tokens if run.data.self_distill else None,
        "steps": run.step, "epochs": round(run.step / run.steps_per_epoch, 3), "lr": options.lr,
        "batch_size": options.batch_size, "grad_accum": options.grad_accum, "max_length": options.max_length,
        "loss": options.loss, "feature_loss": options.feature_loss, "teacher_forcing": options.teacher_forcing,
        "train_vocab": run.data.vocab.ids.numel() if run.data.vocab is not None else "full",
        "head_weights": options.head_weights, "weights": run.weights, "lora": options.lora,
        "mixed_precision": options.mixed_precision, "dtype": options.dtype, "seed": options.seed,
        "eval_fraction": options.eval_fraction, "max_examples": options.max_examples,
        "hidden_dtype": options.hidden_dtype, "hidden_states": run.data.hidden_sources(),
        "processes": run.accelerator.num_processes, "sequences_per_process": run.sequences_per_process,
        "wall_seconds": round(wall_seconds, 1), "timings": {k: round(v, 1) for k, v in run.timings.items()},
        "peak_step_rss_mb": run.peak_step_rss_mb, "mtpkit_version": __version__,
    }
    if run.final_eval is not None:
        config.training["eval"] = {k: run.final_eval[k] for k in
                                   ("head_top1", "head_top5", "head_topk_accuracy", "expected_chain_tokens",
                                    "chain_accepted", "examples")}
    config.training["learning_curve"] = learning_curve(run.history)
    if not heads.has_draft_head:  # eagle3's was chosen before training: its lm_head is trained over it
        heads.set_draft_vocab(draft_vocab(run.data.train_examples))
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
    main_process: bool = True  # the others of a multi-process run wrote nothing and report nothing
    heads: DraftHeads | None = None  # the trained heads, on their base


def finetune(heads_dir: Path, options: FinetuneOptions | None = None, *, backbone: Backbone | None = None,
             callbacks: Callbacks | None = None) -> FinetuneResult:
    """Train the heads of ``heads_dir`` and rewrite it: setup, train, save."""
    options = options or FinetuneOptions()
    started = time.perf_counter()
    run = setup(heads_dir, options, backbone, callbacks)
    try:
        train(run, callbacks)
        files = save(run, time.perf_counter() - started)
        run.accelerator.wait_for_everyone()  # the heads directory is complete when any process returns
    finally:
        for store in (run.data.train_store, run.data.eval_store):
            if store is not None:
                store.close()
    run.timings["total_s"] = time.perf_counter() - started
    return FinetuneResult(heads_dir=Path(heads_dir), config=run.heads.config, eval=run.final_eval, files=files,
                          steps=run.step, epochs=round(run.step / run.steps_per_epoch, 3), timings=run.timings,
                          peak_step_rss_mb=run.peak_step_rss_mb, peak_step_gpu_mb=run.peak_step_gpu_mb,
                          distill=run.data.distill_stats, dataset=run.data.dataset,
                          train_sequences=len(run.data.train_examples), eval_sequences=len(run.data.eval_examples),
                          main_process=run.accelerator.is_main_process, heads=run.heads)
