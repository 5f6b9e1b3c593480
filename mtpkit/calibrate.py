"""Choosing the ``auto`` tree for these heads on this machine.

Two measurements feed ``mtpkit.tree.greedy_tree``: how often each head's top-i holds the
true token (from the finetune metrics, else measured here on held-out builtin prompts), and
what a base forward over n tokens costs on this machine. The result is cached under
``cache_root() / "calibration"``, keyed by the base, the heads' weights and the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from mtpkit.backbone import Backbone
from mtpkit.config import HeadsConfig
from mtpkit.files import cache_root
from mtpkit.heads import DraftHeads
from mtpkit.kernels import DEFAULT_SIZES, cached_measurement, kernel_measurement, kernel_plan, synchronize, uses_fast_kernels
from mtpkit.targets import conditioning_tokens, head_targets
from mtpkit.tree import MAX_RANK, chain_choices, expected_tokens, greedy_tree, monotone_cost

FORWARD_SIZES = DEFAULT_SIZES  # the sizes whose whole-forward cost mtpkit.kernels measures per layout
CALIBRATION_PROMPTS = 4
CALIBRATION_TOKENS = 32
DRAFT_CONTEXT = 128  # committed positions in the eagle draft cache while its drafting is timed
FORMAT_VERSION = 8  # 2: draft costs on the base's kernels; 3: keyed by the measured layout of each layer shape;
# 4: forward costs made non-decreasing in n; 5: draft cost timed through the decoder's drafting code; 6: per depth;
# 7: forward costs from whole forwards per layout (mtpkit.kernels), n = 1 as plain decoding runs its token;
# 8: keyed by those costs too


@dataclass
class Calibration:
    head_topk_accuracy: list[list[float]]  # [head k][i]: P(true token within head k's top-(i+1))
    accuracy_source: str  # "training" (finetune metrics) or "measured"
    forward_cost: dict[int, float]  # seconds of a base forward over n tokens as decoding runs it (context 128)
    draft_cost: list[float]  # [d - 1]: seconds the heads take to draft a chain d deep
    choices: list[list[int]]
    expected_tokens: float  # per step, for ``choices``
    predicted_tokens_per_second: float
    # whole-forward seconds per kernel layout and n that ``forward_cost`` was taken from ({"current": ...} when the
    # model runs kernels no layout was measured for: stock outside float32 on a CPU)
    forward_cost_by_layout: dict[str, dict[str, float]] | None = None

    def tree_draft_cost(self) -> float:
        """Seconds to draft ``choices`` (as deep as its deepest path; 0 for no drafts)."""
        depth = max((len(c) for c in self.choices), default=0)
        return self.draft_cost[min(depth, len(self.draft_cost)) - 1] if depth else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        data = json.loads(text)
        data["forward_cost"] = {int(k): v for k, v in data["forward_cost"].items()}
        return cls(**data)


def auto_tree(heads: DraftHeads) -> list[list[int]]:
    return calibrate(heads).choices


def calibrate(heads: DraftHeads, refresh: bool = False) -> Calibration:
    """The calibrated tree for these heads on this machine (from the cache when it is there)."""
    from mtpkit.files import atomic_write_text

    path = cache_root() / "calibration" / f"{calibration_key(heads)}.json"
    if path.is_file() and not refresh:
        try:
            return Calibration.from_json(path.read_text())
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # a damaged cache entry is simply measured again
    accuracy, source = head_topk_accuracy(heads)
    backbone = heads.backbone
    cost, by_layout = measure_forward_cost(backbone, FORWARD_SIZES)
    draft = measure_draft_cost(heads)
    choices, rate = greedy_tree(accuracy, cost, max_nodes=max(FORWARD_SIZES), draft_cost=draft)
    result = Calibration(head_topk_accuracy=accuracy, accuracy_source=source, forward_cost=cost, draft_cost=draft,
                         choices=choices, expected_tokens=expected_tokens(choices, accuracy),
                         predicted_tokens_per_second=rate, forward_cost_by_layout=by_layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, result.to_json())
    return result


def calibration_key(heads: DraftHeads) -> str:
    """Hash of (base fingerprint, heads weights, machine, torch version, dtype)."""
    digest = hashlib.sha256()
    backbone = heads.backbone
    machine = [platform.machine(), platform.processor(), os.cpu_count(), torch.get_num_threads(),
               torch.__version__, str(backbone.device), str(backbone.dtype), _kernel_mode(backbone)]
    digest.update(json.dumps([FORMAT_VERSION, backbone.fingerprint, machine], default=str).encode())
    digest.update(heads.config.style.encode())
    from mtpkit.checkpoint import heads_state_dict  # includes the draft vocabulary, which sets the draft cost

    for name, tensor in sorted(heads_state_dict(heads).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def head_topk_accuracy(heads: DraftHeads) -> tuple[list[list[float]], str]:
    """Per-head top-1..10 accuracy: the finetune's held-out metrics if recorded, else measured now."""
    recorded = recorded_topk_accuracy(heads.config)
    if recorded is not None:
        return recorded, "training"
    return measure_head_accuracy(heads), "measured"


def recorded_topk_accuracy(config: HeadsConfig) -> list[list[float]] | None:
    """The per-head top-1..10 held-out accuracies finetune recorded in the config, if any."""
    recorded = config.training.get("eval", {}).get("head_topk_accuracy")
    if (isinstance(recorded, list) and len(recorded) == config.num_heads
            and all(isinstance(row, list) and row and all(isinstance(a, (int, float)) for a in row) for row in recorded)):
        return [[float(a) for a in row[:MAX_RANK]] for row in recorded]
    return None


@torch.inference_mode()
def measure_head_accuracy(heads: DraftHeads, prompts: int = CALIBRATION_PROMPTS,
                          new_tokens: int = CALIBRATION_TOKENS) -> list[list[float]]:
    """Score the heads against what the base itself generates greedily on held-out builtin prompts."""
    from mtpkit.decoding import encode_prompt, greedy_generate
    from mtpkit.prompts import load_builtin

    backbone = heads.backbone
    records = load_builtin("heldout")
    step = max(1, len(records) // prompts)
    hits = torch.zeros(heads.num_heads, MAX_RANK)
    counts = torch.zeros(heads.num_heads)
    for record in records[::step][:prompts]:
        prompt = encode_prompt(backbone.tokenizer, record["prompt"], chat=True)
        generated = greedy_generate(backbone, prompt, new_tokens).tokens
        ids = torch.cat([prompt, torch.tensor([generated])], dim=1).to(backbone.device)
        hidden = heads.features(backbone.hidden(ids, **heads.feature_kwargs))
        conditioning = [conditioning_tokens(ids, k) for k in range(1, heads.num_heads + 1)]
        states = heads.teacher_forced_states(hidden, conditioning)
        # score only positions whose target the base generated (not prompt tokens)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        scored[:, prompt.shape[1] - 1:] = True
        for k, state in enumerate(states, start=1):
            targets, valid = head_targets(ids, k)
            valid &= scored
            if not valid.any():
                continue
            top = heads.logits(k, state[valid]).topk(MAX_RANK, dim=-1).indices
            found = (top == targets[valid].unsqueeze(-1)).float().cumsum(-1).clamp(max=1)
            hits[k - 1] += found.sum(0).cpu()
            counts[k - 1] += found.shape[0]
    return (hits / counts.clamp(min=1).unsqueeze(-1)).tolist()


def measure_forward_cost(backbone: Backbone, sizes=FORWARD_SIZES, context: int = 128,
                         repeats: int = 5) -> tuple[dict[int, float], dict[str, dict[str, float]]]:
    """Seconds of a base forward over n tokens after ``context`` cached ones, as decoding runs it, made
    non-decreasing in n (``monotone_cost``), and the per-layout table it came from.

    On mtpkit's kernels these are the whole-forward measurements that chose the kernel plan (n = 1 is plain
    decoding's token, padded to two where that is faster), so the tree chooser and the plain-decoding control
    read one measurement; on stock kernels the current forward is timed."""
    from mtpkit import kernels

    if uses_fast_kernels(backbone.model):
        measurement = kernel_measurement(backbone)
        if measurement.seconds["stock"] and set(sizes) <= set(measurement.seconds["stock"]):
            cost = {n: s for n, s in measurement.forward_cost().items() if n in set(sizes)}
            return monotone_cost(cost), measurement.to_dict()["seconds"]
    measured = kernels.measure_forward_cost(backbone, list(sizes), context=context, repeats=repeats)
    return monotone_cost({int(n): float(s) for n, s in measured.items()}), {"current": {str(n): s for n, s in measured.items()}}


@torch.inference_mode()
def measure_draft_cost(heads: DraftHeads, repeats: int = 5) -> list[float]:
    """Median seconds for the heads to draft a chain 1, 2, ..., K deep (sequential and eagle heads run one more
    head per depth; Medusa's share one product), timed through the decoder's own drafting code (``HeadsDrafter``:
    take the last step's hidden states, then draft), after a typical context."""
    from mtpkit.decoding import HeadsDrafter

    backbone = heads.backbone
    hidden = torch.zeros(DRAFT_CONTEXT, heads.feature_size, device=backbone.device, dtype=backbone.dtype)
    drafters = [HeadsDrafter(heads, chain_choices(depth)) for depth in range(1, heads.num_heads + 1)]
    for drafter in drafters:
        drafter.start([0])
        drafter.condition(hidden, [0] * DRAFT_CONTEXT)  # eagle attends over the context: give it a typical one
    times: list[list[float]] = [[] for _ in drafters]
    for attempt in range(repeats + 1):
        for drafter, samples in zip(drafters, times):  # depths interleaved: a slow moment hits all alike
            synchronize(backbone.device)
            start = time.perf_counter()
            drafter.condition(hidden[:2], [0, 0])  # a step commits the last step's accepted tokens (two, typically)
            drafter.draft(drafter.plan, drafter.plan.tokens, tracing=False)
            synchronize(backbone.device)
            if attempt:
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def _kernel_mode(backbone: Backbone) -> str:
    """The forward cost depends on the kernels the model runs: stock, or the plan measured on whole forwards and
    the costs measured with it (a new measurement is a new calibration, even where it picks the same plan)."""
    if not uses_fast_kernels(backbone.model):
        return "stock"
    measured = cached_measurement(backbone)
    return json.dumps([kernel_plan(backbone.model).describe(), measured and measured.to_dict()["seconds"]],
                      sort_keys=True)
