"""The frozen base's hidden states of the training sequences, computed once per run and reused every epoch:
in memory up to a budget, memory-mapped from one file on disk beyond it. Each process keeps those of its own
shard only.

Where the run has just self-distilled its data, generation already computed the states of every sequence it
wrote (``mtpkit.generation.generate(keep_hidden=True)``): they are kept in a ``StateStorage`` as they come, keyed
by the sequence's token ids (``sequence_key``), and ``compute_hidden`` runs the base only over the sequences
that are not there (those whose responses came from the distillation cache, or from the data itself).

eagle3 heads read three layers' hidden states instead (``layer_ids``), side by side: three times the memory
or disk of the final state, 3 x H x (2 bytes in bfloat16, 4 in float32) per token, e.g. 3 x 576 x 4 = 6.9 kB
per token for SmolLM2-135M in float32 (4.0 GB for the shipped corpus's 585k tokens), half that with
``--hidden-dtype bfloat16``, 24 kB per token for a 4096-wide base in bfloat16.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch

from mtpkit.backbone import Backbone, features_of
from mtpkit.data import TokenizedExample
from mtpkit.files import cache_root

HIDDEN_BATCH_TOKENS = 4096  # tokens per backbone forward when caching hidden states

Slot = Union[torch.Tensor, tuple[int, int]]  # a sequence's states: in memory, or (first element, rows) on disk


def sequence_key(ids: list[int]) -> str:
    """What identifies a sequence's states: a hash of its exact token ids."""
    return hashlib.sha256(b",".join(str(i).encode() for i in ids)).hexdigest()[:32]


class StateStorage:
    """Where a run keeps hidden states: in memory until ``budget_bytes`` are used, then appended to one file
    (created on first need, removed by ``close``) and memory-mapped back."""

    def __init__(self, budget_bytes: float, width: int, dtype: torch.dtype):
        self.budget, self.width, self.dtype = budget_bytes, width, dtype
        self.in_memory = 0  # bytes
        self.path: Path | None = None
        self._handle = None
        self._written = 0  # elements in the file
        self._mapped = None

    @classmethod
    def for_features(cls, backbone: Backbone, budget_bytes: float, layer_ids: list[int] | None = None,
                     dtype: torch.dtype | None = None) -> "StateStorage":
        """A storage as wide as the heads' features: the final state, or ``layer_ids``' states side by side."""
        return cls(budget_bytes, backbone.hidden_size * (len(layer_ids) if layer_ids else 1), dtype or backbone.dtype)

    def put(self, states: torch.Tensor) -> Slot:
        """Keep one sequence's states [rows, width] (converted to the storage's dtype); where they went."""
        size = states.numel() * torch.empty((), dtype=self.dtype).element_size()
        if self.in_memory + size <= self.budget:
            self.in_memory += size
            return states.detach().to("cpu", self.dtype, copy=True)  # a copy: a view would hold its whole batch
        states = states.detach().to("cpu", self.dtype).contiguous()
        if self._handle is None:
            (cache_root() / "hidden").mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix="run-", dir=cache_root() / "hidden")) / "hidden.bin"
            self._handle = open(self.path, "wb")
        self._handle.write(states.view(torch.uint8).numpy().tobytes())
        slot = (self._written, states.shape[0])
        self._written += states.numel()
        self._mapped = None  # the file grew: map it again on the next read
        return slot

    def read(self, slot: Slot) -> torch.Tensor:
        if isinstance(slot, torch.Tensor):
            return slot
        if self._mapped is None:
            self._handle.flush()
            self._mapped = torch.from_file(str(self.path), shared=True, size=self._written, dtype=self.dtype)
        start, rows = slot
        return self._mapped[start: start + rows * self.width].view(rows, self.width)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def close(self) -> None:
        self._mapped = None
        if self._handle is not None:
            self._handle.close()
            shutil.rmtree(self.path.parent, ignore_errors=True)
            self._handle = None


class HiddenStore:
    """The hidden states of the sequences one process trains on (or evaluates), by sequence index."""

    def __init__(self, storage: StateStorage, slots: dict[int, Slot], read_dtype: torch.dtype | None = None,
                 computed: int | None = None):
        self.storage, self.slots = storage, slots
        self.computed = len(slots) if computed is None else computed  # by the base here; the rest were kept
        self.read_dtype = read_dtype or storage.dtype  # as the heads read them (the base's: kept in bfloat16, read back up)

    @property
    def hidden_size(self) -> int:
        return self.storage.width

    @property
    def dtype(self) -> torch.dtype:
        """As kept."""
        return self.storage.dtype

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.storage.read(self.slots[index])

    @property
    def on_disk(self) -> bool:
        return self.storage.on_disk

    def __len__(self) -> int:
        """How many sequences' states it holds."""
        return len(self.slots)

    def close(self) -> None:
        self.storage.close()


@torch.no_grad()
def compute_hidden(backbone: Backbone, examples: list[TokenizedExample], budget_bytes: float | StateStorage,
                   on_batch: Callable[[int, int], None] | None = None, indices: list[int] | None = None,
                   layer_ids: list[int] | None = None, dtype: torch.dtype | None = None,
                   kept: dict[str, Slot] | None = None) -> HiddenStore:
    """The states of the sequences ``indices`` (all: None): taken from ``kept`` (states generation computed,
    by ``sequence_key``) where there, else from the frozen base run once over them, longest first, in
    right-padded batches. The final hidden states, or the input hidden states of ``layer_ids`` side by side
    (eagle3's features), kept in ``dtype`` (default: the base's) in a new storage of ``budget_bytes``, or in
    the given one (which ``kept`` must be in)."""
    storage = budget_bytes if isinstance(budget_bytes, StateStorage) else \
        StateStorage.for_features(backbone, budget_bytes, layer_ids, dtype)
    wanted = range(len(examples)) if indices is None else indices
    slots: dict[int, Slot] = {}
    order = []
    for i in wanted:
        found = kept.get(sequence_key(examples[i].ids)) if kept else None
        if found is None:
            order.append(i)
        else:
            slots[i] = found
    order.sort(key=lambda i: -len(examples[i].ids))
    done = 0
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
            slots[i] = storage.put(hidden[row, : len(examples[i].ids)])
        done += len(batch)
        if on_batch:
            on_batch(done, len(order))
    return HiddenStore(storage, slots, read_dtype=backbone.dtype, computed=len(order))
