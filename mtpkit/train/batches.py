"""Batches of training sequences: collation, the order of an epoch and each process's shard of it, the
target rows each micro-batch holds, and the token vocabularies the loss and the drafts run over."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpkit import targets
from mtpkit.data import TokenizedExample
from mtpkit.train.hidden import HiddenStore

DRAFT_VOCAB_LIMIT = 32768  # EAGLE-3 drafts from 32k tokens too


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
        hidden = torch.zeros((len(indices), width, store.hidden_size), dtype=store.read_dtype)
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


def draft_vocab(examples: list[TokenizedExample], limit: int = DRAFT_VOCAB_LIMIT) -> torch.Tensor:
    """The ``limit`` most frequent target tokens of the training data, sorted: what the heads will draft from."""
    counts: dict[int, int] = {}
    for example in examples:
        for token in example.ids[max(example.loss_start, 1):]:
            counts[token] = counts.get(token, 0) + 1
    top = sorted(counts, key=lambda t: (-counts[t], t))[:limit]
    return torch.tensor(sorted(top), dtype=torch.long)


def draft_vocab_of_size(examples: list[TokenizedExample], size: int) -> torch.Tensor:
    """Exactly ``size`` token ids, sorted: the most frequent target tokens of the training data, then (if the
    data has fewer distinct ones) the lowest ids not among them. eagle3's draft vocabulary."""
    top = draft_vocab(examples, size)
    if top.numel() < size:
        taken = set(top.tolist())
        rest = [t for t in range(size + top.numel()) if t not in taken][: size - top.numel()]
        top = torch.tensor(sorted(top.tolist() + rest), dtype=torch.long)
    return top


def base_order(n: int, seed: int) -> list[int]:
    """The seeded shuffle of the training sequences that fixes their columns (and is epoch 0's order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000)).tolist()


def epoch_order(n: int, columns: int, seed: int, epoch: int) -> list[int]:
    """The order of the training sequences in ``epoch``, ``columns`` (the global micro-batch) to a row.

    The sequences are dealt once into ``columns`` columns (``base_order``, position p in column p % columns);
    every later epoch reshuffles each column, and micro-batch i is row i. Process r trains on the columns of
    its slots (r x batch_size onwards) in every epoch, so it needs the hidden states of those sequences only,
    and the order depends on the global batch, not on how many processes share it.
    """
    first = base_order(n, seed)
    if epoch == 0:
        return first
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    dealt = [first[c::columns] for c in range(columns)]
    dealt = [[column[i] for i in torch.randperm(len(column), generator=generator).tolist()] for column in dealt]
    return [column[row] for row in range(len(dealt[0]) if dealt else 0) for column in dealt if row < len(column)]


def shard(n: int, batch_size: int, processes: int, rank: int, seed: int) -> list[int]:
    """The training sequences process ``rank`` ever trains on: its columns of ``epoch_order``."""
    columns = batch_size * processes
    return sorted(i for position, i in enumerate(base_order(n, seed))
                  if (position % columns) // batch_size == rank)


def target_rows(examples: list[TokenizedExample], indices: list[int], num_heads: int, lora: bool,
                heads=None) -> list[int]:
    """How many target rows each output (the base's own with LoRA, then head 1..K) has in these sequences: with
    ``heads``, those their style's loss counts (eagle3: targets inside its draft vocabulary)."""
    if not indices:
        return [0] * (num_heads + lora)
    batch = collate(examples, indices, None, torch.device("cpu"))
    counts = []
    for k in range(0 if lora else 1, num_heads + 1):
        labels, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
        if heads is not None and k > 0:
            labels, valid = heads.style.loss_targets(heads, labels.to(heads.backbone.device),
                                                     valid.to(heads.backbone.device), None)
        counts.append(int(valid.sum()))
    return counts
