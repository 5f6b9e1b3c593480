"""Held-out evaluation: per-head top-1..10 accuracy and loss, teacher-forced, and the tokens a greedy chain of the
heads would have accepted, as sums that processes add up.

Teacher forcing is exact for the chain: head k's draft is only ever accepted when heads 1..k-1 were right, and
then the tokens it reads are the true ones. So the leading run of right heads at a position, counted with true
inputs, is what greedy verification of the heads' own chain accepts there (``chain_accepted``)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn import functional as F

from mtpkit import targets
from mtpkit.data import TokenizedExample
from mtpkit.heads import DraftHeads
from mtpkit.train.batches import collate
from mtpkit.train.hidden import HiddenStore
from mtpkit.train.losses import CHUNK_ROWS, conditioning, head_rows

TOPK = 10  # head_topk_accuracy holds P(target in top-i) for i = 1..TOPK


def chain_tokens(top1: list[float]) -> float:
    """Mean tokens per step that a chain of heads implies: 1 + sum_k prod_{j<=k} top1_j."""
    total, survive = 1.0, 1.0
    for p in top1:
        survive *= p
        total += survive
    return total


def evaluate(heads: DraftHeads, examples: list[TokenizedExample], store: HiddenStore | None,
             batch_size: int, device: torch.device, autocast=None) -> dict[str, Any]:
    """Per-head top-i accuracy (i = 1..10) and loss on held-out sequences, teacher-forced."""
    with torch.no_grad(), (autocast if autocast is not None else contextlib.nullcontext()):
        counts = eval_counts(heads, examples, range(len(examples)), store, batch_size, device)
    return eval_summary(counts, len(examples))


def eval_counts(heads: DraftHeads, examples: list[TokenizedExample], indices, store: HiddenStore | None,
                batch_size: int, device: torch.device) -> torch.Tensor:
    """Sums over the sequences ``indices``, one row per head: top-1..TOPK hits, then targets, then loss, then the
    targets the loss counts (eagle3: those in its draft vocabulary; a target outside it is a miss, never a loss
    row, as in training), then the positions where heads 1..k were all right. Sums, so that processes which each
    scored a share add up to the whole."""
    K = heads.num_heads
    hits = torch.zeros((K, TOPK), dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.float64)
    loss_sums = torch.zeros(K, dtype=torch.float64)
    loss_rows = torch.zeros(K, dtype=torch.float64)
    reach = torch.zeros(K, dtype=torch.float64)
    draft_index = heads.draft_index() if heads.has_draft_head else None  # its columns' ids, -1 outside
    indices = list(indices)
    for first in range(0, len(indices), batch_size):
        batch = collate(examples, indices[first: first + batch_size], store, device)
        hidden = batch.hidden if batch.hidden is not None else heads.features(heads.backbone.hidden(
            batch.ids, attention_mask=batch.attention_mask, **heads.feature_kwargs))
        states = heads.teacher_forced_states(hidden, conditioning(heads, batch.ids))
        chain = torch.ones(batch.ids.numel(), dtype=torch.bool)  # positions where heads 1..k-1 were all right
        for k, state in enumerate(states, start=1):
            right = torch.zeros_like(chain)
            labels, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
            rows, _ = head_rows(valid, k)
            flat_state, flat_labels = state.reshape(-1, state.shape[-1]), labels.reshape(-1)
            for start in range(0, rows.numel(), CHUNK_ROWS):
                chunk = rows[start: start + CHUNK_ROWS]
                logits = heads.logits(k, flat_state[chunk]).float()
                top = logits.topk(min(TOPK, logits.shape[-1]), dim=-1).indices
                hit = top == flat_labels[chunk, None]
                right[chunk.cpu()] = hit[:, 0].cpu()
                found = hit.cumsum(-1).clamp(max=1).sum(0).double()
                hits[k - 1, : found.numel()] += found.cpu()
                counts[k - 1] += chunk.numel()
                if draft_index is None:
                    loss_sums[k - 1] += F.cross_entropy(logits, flat_labels[chunk], reduction="sum").item()
                    loss_rows[k - 1] += chunk.numel()
                else:
                    drafted = draft_index[flat_labels[chunk]]
                    inside = drafted >= 0
                    draft_logits = heads.draft_logits(k, flat_state[chunk][inside])[0].float()
                    loss_sums[k - 1] += F.cross_entropy(draft_logits, drafted[inside], reduction="sum").item()
                    loss_rows[k - 1] += int(inside.sum())
            chain &= right
            reach[k - 1] += int(chain.sum())
    return torch.cat([hits, counts[:, None], loss_sums[:, None], loss_rows[:, None], reach[:, None]], dim=1)


def eval_summary(sums: torch.Tensor, examples: int) -> dict[str, Any]:
    """The metrics recorded for an evaluation, from ``eval_counts`` (added over processes)."""
    hits, counts, loss_sums, loss_rows = sums[:, :TOPK], sums[:, TOPK], sums[:, TOPK + 1], sums[:, TOPK + 2]
    reach = sums[:, TOPK + 3]
    accuracy = hits / counts.clamp(min=1)[:, None]
    if hits.shape[1] and accuracy.shape[1] > 1:  # a vocab smaller than TOPK: top-i beyond it is top-V
        accuracy = torch.cummax(accuracy, dim=1).values
    top1 = [round(float(a), 5) for a in accuracy[:, 0]]
    return {"head_top1": top1,
            "head_top5": [round(float(a), 5) for a in accuracy[:, min(4, TOPK - 1)]],
            "head_topk_accuracy": [[round(float(a), 5) for a in row] for row in accuracy],
            "head_loss": [round(float(s / max(c, 1)), 5) for s, c in zip(loss_sums, loss_rows)],
            "expected_chain_tokens": round(chain_tokens(top1), 4),
            # measured: 1 + the mean leading run of right heads over the positions head 1 scores
            "chain_accepted": round(1 + float(reach.sum() / counts[0].clamp(min=1)), 4) if len(counts) else 1.0,
            "examples": examples,
            "tokens": int(counts[0].item()) if len(counts) else 0}
