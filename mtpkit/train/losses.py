"""The heads' training loss: the module accelerate prepares (``TrainedModel``) and one micro-batch's forward,
loss and backward (``backward_heads``).

A head's loss needs its full-vocabulary logits, the largest tensor here, so heads are scored one at a time
on a detached copy of their state, in chunks of rows, and the gradients reach the head trunks in one backward
at the end (the one DDP synchronises). Head k at position t predicts ``mtpkit.targets.head_targets`` and is
conditioned on ``mtpkit.targets.conditioning_tokens``: nothing here re-derives a shift. Below full teacher
forcing, sequential heads read head k-1's own draft at some positions instead (``self_conditioned_states``).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.nn import functional as F

from mtpkit import targets
from mtpkit.backbone import Backbone
from mtpkit.heads import DraftHeads
from mtpkit.train.batches import Batch, TrainVocab

CHUNK_ROWS = 1024  # rows of full-vocabulary logits alive at once
LORA_HEAD_SCALE = 0.2  # Medusa-2: with LoRA the base's own loss leads, the heads' is scaled down


def conditioning(heads: DraftHeads, ids: torch.Tensor) -> list[torch.Tensor]:
    return [targets.conditioning_tokens(ids, k) for k in range(1, heads.num_heads + 1)]


def draft_seed(seed: int, step: int, micro_batch: int, process: int) -> int:
    """Seed of the positions drawn for one micro-batch: a function of where it is in the run, so that a
    resumed run draws what an uninterrupted one does."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro_batch}:{process}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def drafted_positions(ids: torch.Tensor, num_heads: int, teacher_forcing: float,
                      seed: int) -> list[torch.Tensor | None] | None:
    """Per head k, where it reads head k-1's draft rather than the true token (each position with probability
    1 - ``teacher_forcing``); None for head 1, whose token at decode time is the base's own, and None in all
    at full teacher forcing."""
    if teacher_forcing >= 1.0:
        return None
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draw on every device
    return [None] + [(torch.rand(ids.shape, generator=generator) >= teacher_forcing).to(ids.device)
                     for _ in range(2, num_heads + 1)]


@torch.no_grad()
def draft_tokens(heads: DraftHeads, k: int, states: torch.Tensor, vocab: TrainVocab | None) -> torch.Tensor:
    """Head k's greedy draft (token ids) from its states [n, H] (k = 0: the base's), over ``vocab`` if given."""
    tokens = torch.empty(states.shape[0], dtype=torch.long, device=states.device)
    for start in range(0, states.shape[0], CHUNK_ROWS):
        best = _scores(heads, k, states[start: start + CHUNK_ROWS], vocab).argmax(-1)
        tokens[start: start + CHUNK_ROWS] = best if vocab is None else vocab.ids[best]
    return tokens


def self_conditioned_states(heads: DraftHeads, hidden: torch.Tensor, conditioning: list[torch.Tensor],
                            drafted: list[torch.Tensor | None], vocab: TrainVocab | None) -> list[torch.Tensor]:
    """Sequential heads' states where head k reads, at the ``drafted[k - 1]`` positions, the token head k-1
    drafted from its state in this same forward (as decoding feeds it), and the true token elsewhere."""
    states, prev = [], hidden
    for k in range(1, heads.num_heads + 1):
        tokens, where = conditioning[k - 1], drafted[k - 1]
        if where is not None and where.any():
            tokens = tokens.clone()
            tokens[where] = draft_tokens(heads, k - 1, prev[where], vocab)
        prev = heads.state(k, hidden, prev, tokens)
        states.append(prev)
    return states


def distill_loss(logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(base || head), summed over rows (Hydra's teacher loss)."""
    return F.kl_div(F.log_softmax(logits, -1), teacher_log_probs, log_target=True, reduction="sum")


def total_variation(logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """TV(head, base) = 1/2 sum_v |p_v - q_v| = 1 - sum_v min(p_v, q_v), summed over rows: exactly the chance
    that a draft sampled from the head is rejected by speculative sampling against the base; below half the
    base's top-1 margin it also makes the head's argmax the base's (greedy acceptance)."""
    return 0.5 * (F.softmax(logits, -1) - teacher_log_probs.exp()).abs().sum()


TEACHER_LOSSES = {"distill": distill_loss, "tv": total_variation}  # the losses scored against the base


def head_rows(valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the positions t where head k has a target, and of t + k (where the base predicts it)."""
    flat = valid.reshape(-1).nonzero().squeeze(1)
    return flat, flat + (targets.target_offset(k) - 1)  # never crosses a row: valid t has t + k + 1 < width


def _scores(heads: DraftHeads, k: int, states: torch.Tensor, vocab: TrainVocab | None,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of head k (k = 0: the base itself) over the full vocabulary or only ``vocab``; ``weight`` stands
    in for head k's own output layer (a detached copy whose gradient is collected)."""
    backbone = heads.backbone
    if k == 0:
        return backbone.logits(states) if vocab is None else backbone.logits(states, *_base_rows(backbone, vocab.ids))
    return heads.style.scores(heads, k, states, vocab, weight)


def _base_rows(backbone: Backbone, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    layer = backbone.model.get_output_embeddings()
    return layer.weight[rows], None if layer.bias is None else layer.bias[rows]


class TrainedModel(nn.Module):
    """What accelerate prepares (DDP): the heads, and with LoRA the base too. Its forward is the
    teacher-forced pass; the losses run outside it, on detached copies of what it returns, and one backward
    from those copies into it per micro-batch is where the gradients are synchronised."""

    def __init__(self, heads: DraftHeads, base: nn.Module | None = None):
        super().__init__()
        self.heads = heads
        self.base = base  # the LoRA-wrapped base, None when frozen (the frozen base is never registered)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor | None = None,
                drafted: list[torch.Tensor | None] | None = None, vocab: TrainVocab | None = None):
        """The base's features (its hidden states; eagle3: three layers'), every head's states, and the heads'
        own output layers (if any). ``drafted``: where sequential heads read the previous head's draft
        (``drafted_positions``)."""
        heads = self.heads
        if hidden is None:
            hidden = heads.features(heads.backbone.hidden(ids, attention_mask=attention_mask, **heads.feature_kwargs))
        if drafted is None:
            states = heads.teacher_forced_states(hidden, conditioning(heads, ids))
        else:
            states = self_conditioned_states(heads, hidden, conditioning(heads, ids), drafted, vocab)
        output_layers = heads.style.output_layers(heads)
        return hidden, states, output_layers


class _Teacher:
    """The base's next-token log-probabilities at the positions the heads are distilled towards, computed once
    per micro-batch: head k at t and head k + 1 at t - 1 both learn the base's distribution at t + k."""

    def __init__(self, heads: DraftHeads, hidden: torch.Tensor, vocab: TrainVocab | None, accelerator):
        self.heads, self.hidden, self.vocab, self.accelerator = heads, hidden, vocab, accelerator
        self.row_of = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
        self.rows: list[torch.Tensor] = []  # log-probabilities, in the order positions were first asked for

    @torch.no_grad()
    def log_probs(self, positions: torch.Tensor) -> torch.Tensor:
        new = positions[self.row_of[positions] < 0].unique()
        if new.numel():
            self.row_of[new] = torch.arange(len(self), len(self) + new.numel(), device=new.device)
            with self.accelerator.autocast():  # accelerate may hand the hidden states back in float32
                self.rows.append(F.log_softmax(_scores(self.heads, 0, self.hidden[new], self.vocab).float(), -1))
            self.rows = [torch.cat(self.rows)] if len(self.rows) > 1 else self.rows
        return self.rows[0][self.row_of[positions]]

    def __len__(self) -> int:
        return sum(r.shape[0] for r in self.rows)


def _unwrap(model: nn.Module) -> TrainedModel:
    return model.module if hasattr(model, "module") else model  # DDP keeps the module it wraps in .module


def backward_heads(model: nn.Module, batch: Batch, weights: list[float], loss_type: str, accelerator, scale: float,
                   lora: bool, vocab: TrainVocab | None = None, feature_weight: float = 0.0,
                   total_rows: list[int] | None = None, teacher_forcing: float = 1.0,
                   seed: int = 0) -> list[float | None]:
    """Forward, loss and backward of one micro-batch; each head's mean loss, None where it had no target.

    ``model`` is a ``TrainedModel``, prepared by accelerate or not. Each output's loss is a mean over
    ``total_rows`` target rows: those of this micro-batch in every process (None: this process's own), so that
    N processes with batch B step exactly as one process with batch N x B.
    With LoRA, entry 0 is the base's own next-token loss (Medusa-2 trains base and heads jointly).
    With ``vocab`` the softmax runs over the tokens of the training data only (a sampled softmax).
    ``feature_weight`` adds EAGLE's feature regression: head k's state at t is scored by the output layer
    just as the base's hidden state at t + k is, so it is pulled towards that state (smooth L1, mean over
    dimensions): a dense target beside the token one.
    ``teacher_forcing`` below 1 feeds sequential heads their own drafts at positions drawn with ``seed``.
    """
    heads = _unwrap(model).heads
    drafted = drafted_positions(batch.ids, heads.num_heads, teacher_forcing, seed)
    with accelerator.autocast():
        hidden, states, output_layers = model(batch.ids, batch.attention_mask, batch.hidden,
                                              **({} if drafted is None else {"drafted": drafted, "vocab": vocab}))
    outputs = ([(0, hidden, 1.0)] if lora else []) + [
        (k, state, weights[k - 1] * (LORA_HEAD_SCALE if lora else 1.0)) for k, state in enumerate(states, start=1)]
    layer_leaves = [w.detach().requires_grad_() for w in output_layers]
    teacher_hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    teacher = _Teacher(heads, teacher_hidden, vocab, accelerator) if loss_type in TEACHER_LOSSES else None
    leaves, losses = [], []
    for position, (k, state, weight) in enumerate(outputs):
        leaf = state.detach().requires_grad_()
        leaves.append(leaf)
        labels_all, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
        if k > 0:  # as columns of the head's scores (the style's own vocabulary, the training one or all)
            labels_all, valid = heads.style.loss_targets(heads, labels_all, valid, vocab)
        elif vocab is not None:
            labels_all = vocab.position[labels_all]
        rows, teacher_rows = head_rows(valid, k)
        if rows.numel() == 0 or weight == 0:
            losses.append(None if rows.numel() == 0 else 0.0)
            continue
        flat_state, labels = leaf.reshape(-1, leaf.shape[-1]), labels_all.reshape(-1)
        own_layer = layer_leaves[heads.style.output_layer_of(k)] if k > 0 and layer_leaves else None
        share = rows.numel() if total_rows is None else total_rows[position] / accelerator.num_processes
        total = 0.0
        for start in range(0, rows.numel(), CHUNK_ROWS):
            chunk = rows[start: start + CHUNK_ROWS]
            with accelerator.autocast():
                logits = _scores(heads, k, flat_state[chunk], vocab, own_layer).float()
            if teacher is not None and k > 0:
                loss = TEACHER_LOSSES[loss_type](logits, teacher.log_probs(teacher_rows[start: start + CHUNK_ROWS]))
            else:
                loss = F.cross_entropy(logits, labels[chunk], reduction="sum")
            if feature_weight and k > 0:
                loss = loss + feature_weight * F.smooth_l1_loss(
                    flat_state[chunk].float(), teacher_hidden[teacher_rows[start: start + CHUNK_ROWS]].float(),
                    reduction="sum") / flat_state.shape[-1]
            total += loss.item()
            accelerator.backward(loss * (weight * scale / share))
        losses.append(total / rows.numel())
    # every output takes part, with a zero gradient where it had no target: DDP expects each parameter once
    pairs = [(s, leaf) for (_, s, _), leaf in zip(outputs, leaves) if s.requires_grad]
    pairs += list(zip(output_layers, layer_leaves))
    if pairs:
        torch.autograd.backward([s for s, _ in pairs],
                                [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in pairs])
    return losses
