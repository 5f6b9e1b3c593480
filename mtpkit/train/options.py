"""Every setting of a finetune run, declared once: the ``mtpkit finetune`` options, the recipe keys and the
help text all come from the fields of ``FinetuneOptions`` (peft's config style: help in the field's
metadata, validation in ``__post_init__``). Torch-free, so the CLI can build its signature from it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from mtpkit.data import BUILTIN_PROMPTS
from mtpkit.errors import MtpkitError

LOSSES = ("ce", "distill", "tv")
TRAIN_VOCABS = ("data", "full")
HEAD_WEIGHTS = ("uniform", "linear", "exponential", "primary-aux")
MIXED_PRECISION = ("no", "fp16", "bf16")
HIDDEN_DTYPES = ("base", "bfloat16")  # what cached hidden states are kept in


def option(default: Any = None, help: str = "", *, flag: str | None = None, recipe: bool = True,
           factory=None) -> Any:
    """A field of ``FinetuneOptions``: its default, its ``--help`` text, the flag spelling when it is not the
    plain ``--name`` (``--lora``, ``--self-distill/--no-self-distill``), and whether a recipe may set it."""
    metadata = {"help": help, "flag": flag, "recipe": recipe}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class FinetuneOptions:
    """Every setting of a run; the CLI options and the recipe keys have these names."""

    data: list[str] = option(help="Training data (repeatable): .jsonl/.json/.parquet/.csv/.txt file, a corpus "
                                  "from mtpkit corpus, hub dataset name, builtin:prompts, builtin:gsm8k, "
                                  "builtin:gpteacher, or self:N (N prompts the base writes itself).", flag="--data",
                             factory=lambda: [BUILTIN_PROMPTS])
    epochs: int = option(2, "Passes over the training data.")
    max_steps: int | None = option(None, "Stop after this many optimizer steps (overrides --epochs).")
    lr: float = option(1e-3, "Peak learning rate (AdamW, warmup then cosine decay).")
    batch_size: int = option(8, "Sequences per micro-batch (per process).")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    max_length: int = option(512, "Longest training sequence in tokens (longer ones are cut).")
    max_examples: int | None = option(None, "Use at most this many records (a seeded random subset).")
    eval_fraction: float = option(0.1, "Fraction of the records held out for evaluation.")
    eval_every: int = option(50, "Evaluate every N steps (0: only at the end).")
    save_every: int = option(50, "Write a resumable checkpoint every N steps (0: only on Ctrl-C).")
    head_weights: str = option("exponential", "Per-head loss weights: uniform, linear, exponential (0.8^k), "
                                              "primary-aux, or K numbers like 1,0.5,0.3.")
    # distill measured on the default model: better held-out accuracy than ce, and a longer accepted chain than
    # tv (1.686 against 1.641 tokens per step, reports/teacher-forcing)
    loss: str = option("distill", "distill (KL to the base's own distribution at the target position, Hydra's "
                                  "teacher loss), tv (total variation to that distribution: 1 - the chance a sampled "
                                  "draft is accepted) or ce (cross-entropy on the data's tokens).")
    train_vocab: str = option("data", "data (softmax over the tokens that occur in the training data: several "
                                      "times faster on a CPU) or full.")
    self_distill: bool | None = option(None, "Let the base write the responses itself (default: on for "
                                             "prompt-only data).", flag="--self-distill/--no-self-distill")
    distill_max_new_tokens: int = option(128, "Longest self-distilled response in tokens.")
    feature_loss: float = option(0.0, "Weight of the feature-regression term (EAGLE): each head's state is pulled "
                                      "towards the base's hidden state at its target position (0: off).")
    # measured (reports/teacher-forcing): 0.5 lost 0.02-0.035 top-1 at depths 2-4 and nothing gained on the chain
    teacher_forcing: float = option(1.0, "Sequential heads: fraction of positions where head k (k >= 2) reads the "
                                         "true previous token; at the others it reads head k-1's own draft (its "
                                         "argmax), as when decoding. Seeded.")
    lora: bool = option(False, "Also train a LoRA adapter on the base (Medusa-2); changes the base's outputs.",
                        flag="--lora")
    mixed_precision: str = option("no", "no, fp16 or bf16 (passed to accelerate).")
    dtype: str = option("float32", "dtype of the frozen base: float32, bfloat16 or float16 (not float32 needs "
                                   "--mixed-precision).")
    resume: bool = option(False, "Continue from the checkpoint in HEADS_DIR/checkpoint.", flag="--resume")
    seed: int = option(0, "Seed for the data split and order.")
    warmup_ratio: float = option(0.05, "Fraction of the steps spent warming the learning rate up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0: no clipping).")
    hidden_dtype: str = option("base", "Keep the cached hidden states in the base's dtype (base) or in bfloat16: half "
                                       "the memory and disk, each value rounded to 8 significant bits (the heads "
                                       "still read and train in the base's dtype).")
    hidden_cache_gb: float = option(4.0, "Hold the cached hidden states in memory up to this many GB, beyond it "
                                         "memory-map them from disk.")
    lora_rank: int = option(8, "Rank of the --lora adapter.")
    distill_batch_size: int | None = option(None, "Prompts per self-distillation batch (default: chosen from "
                                                  "the model).")
    # running the base's own code is the user's decision on the command line, never a shared recipe's
    trust_remote_code: bool = option(False, "Run the base's own modelling code from the hub (also on when "
                                            "attach recorded it).", flag="--trust-remote-code", recipe=False)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``MtpkitError`` naming the first invalid option."""
        for name in ("lr", "eval_fraction", "feature_loss", "teacher_forcing", "warmup_ratio", "weight_decay",
                     "max_grad_norm", "hidden_cache_gb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise MtpkitError(f"--{name.replace('_', '-')} must be a finite number (got {value!r})")
        if self.loss not in LOSSES:
            raise MtpkitError(f"--loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        if self.train_vocab not in TRAIN_VOCABS:
            raise MtpkitError(f"--train-vocab must be one of {', '.join(TRAIN_VOCABS)} (got {self.train_vocab!r})")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise MtpkitError(f"--hidden-dtype must be one of {', '.join(HIDDEN_DTYPES)} (got {self.hidden_dtype!r})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MtpkitError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)} (got {self.mixed_precision!r})")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "distill_max_new_tokens", "lora_rank"):
            if getattr(self, name) < 1:
                raise MtpkitError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.dtype != "float32" and self.mixed_precision == "no":
            raise MtpkitError(f"--dtype {self.dtype} needs --mixed-precision bf16 or fp16 (the heads train in float32)")
        for name in ("max_steps", "distill_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MtpkitError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 0 <= self.teacher_forcing <= 1:
            raise MtpkitError(f"--teacher-forcing must be between 0 and 1 (got {self.teacher_forcing})")
        if self.lr <= 0:
            raise MtpkitError(f"--lr must be positive (got {self.lr})")
        for name in ("feature_loss", "warmup_ratio", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise MtpkitError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(self, name)})")


RECIPE_KEYS = tuple(f.name for f in fields(FinetuneOptions) if f.metadata["recipe"])


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
