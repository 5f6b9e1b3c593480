"""The frozen base's final hidden states, computed once per run and reused every epoch: in memory, or
memory-mapped on disk beyond a budget. Each process computes those of its own shard only.

eagle3 heads read three layers' hidden states instead (``layer_ids``), side by side: three times the memory
or disk of the final state, 3 x H x (2 bytes in bfloat16, 4 in float32) per token, e.g. 3 x 576 x 4 = 6.9 kB
per token for SmolLM2-135M in float32 (4.0 GB for the shipped corpus's 585k tokens), half that with
``--hidden-dtype bfloat16``, 24 kB per token for a 4096-wide base in bfloat16.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from mtpkit.backbone import Backbone
from mtpkit.data import TokenizedExample
from mtpkit.files import cache_root
from mtpkit.heads import features_of

HIDDEN_BATCH_TOKENS = 4096  # tokens per backbone forward when caching hidden states


class HiddenStore:
    """Final hidden states of the sequences one process trains on, computed once, in memory or memory-mapped."""

    def __init__(self, tensors: list[torch.Tensor] | None = None, path: Path | None = None,
                 offsets: dict[int, tuple[int, int]] | None = None, hidden_size: int = 0, dtype=torch.float32,
                 read_dtype=None):
        self.tensors, self.path, self.offsets = tensors, path, offsets
        self.hidden_size, self.dtype = hidden_size, dtype  # ``dtype``: as kept
        self.read_dtype = read_dtype or dtype  # as the heads read them (the base's: kept in bfloat16, read back up)
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

    def __len__(self) -> int:
        """How many sequences' states it holds."""
        return sum(t is not None for t in self.tensors) if self.tensors is not None else len(self.offsets)

    def close(self) -> None:
        self._mapped = None
        if self.path is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)


@torch.no_grad()
def compute_hidden(backbone: Backbone, examples: list[TokenizedExample], budget_bytes: float,
                   on_batch: Callable[[int, int], None] | None = None, indices: list[int] | None = None,
                   layer_ids: list[int] | None = None, dtype: torch.dtype | None = None) -> HiddenStore:
    """Run the frozen base once over the sequences ``indices`` (all: None), longest first, right-padded batches;
    keep its final hidden states, or the input hidden states of ``layer_ids`` side by side (eagle3's features), in
    ``dtype`` (default: the base's)."""
    hidden_size, dtype = backbone.hidden_size * (len(layer_ids) if layer_ids else 1), dtype or backbone.dtype
    element = torch.empty((), dtype=dtype).element_size()
    wanted = range(len(examples)) if indices is None else indices
    total = sum(len(examples[i].ids) for i in wanted) * hidden_size * element
    in_memory = total <= budget_bytes
    tensors: list[torch.Tensor | None] = [None] * len(examples)
    path = handle = None
    offsets: dict[int, tuple[int, int]] = {}
    if not in_memory:
        (cache_root() / "hidden").mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="run-", dir=cache_root() / "hidden")) / "hidden.bin"
        handle = open(path, "wb")
    order = sorted(wanted, key=lambda i: -len(examples[i].ids))
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
        outputs = backbone.hidden(ids.to(backbone.device), attention_mask=attention.to(backbone.device),
                                  output_hidden_states=bool(layer_ids))
        hidden = features_of(outputs, layer_ids)
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
        return HiddenStore(tensors=tensors, hidden_size=hidden_size, dtype=dtype, read_dtype=backbone.dtype)
    handle.close()
    return HiddenStore(path=path, offsets=offsets, hidden_size=hidden_size, dtype=dtype, read_dtype=backbone.dtype)
