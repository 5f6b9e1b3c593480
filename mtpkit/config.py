"""The heads configuration and the file names of a heads directory (one place for both)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpkit import __version__
from mtpkit.errors import MtpkitError

CONFIG_NAME = "mtp_config.json"
WEIGHTS_NAME = "heads.safetensors"
LORA_DIR = "lora"
CARD_NAME = "README.md"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
CORPUS_NAME = "corpus.parquet"  # the base's own responses, drafted from by the suffix drafter
PRIOR_NAME = "acceptance_prior.json"  # how often each source's drafts held on held-out prompts (``mtpkit.priors``)

STYLES = ("medusa", "sequential", "eagle", "eagle3")  # each one module of mtpkit.heads, by ``registry``
# mtpkit export's formats and the head styles each carries (a style's one format is its default); each is a module of
# mtpkit.export, which checks this against them; kept here so the CLI's help needs no torch
EXPORT_FORMATS = {"vllm-medusa": ("medusa",), "speculators-eagle3": ("eagle3",)}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class HeadsConfig:
    """Everything needed to rebuild the heads and to check they belong to a base model."""

    style: str
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    base_model: str
    base_fingerprint: str
    base_architecture: str = ""
    own_lm_head: bool = False
    lora: bool = False
    trust_remote_code: bool = False  # the base needs its own code from the hub; every command honours it
    corpus: str = ""  # a corpus of the base's responses (relative: to the heads dir), if none is inside it
    mtpkit_version: str = __version__
    draft_vocab_size: int = 0  # eagle3: rows of its own output layer (0: the base's whole vocabulary)
    eagle_aux_hidden_state_layer_ids: list[int] = field(default_factory=list)  # eagle3: the base layers it reads
    training: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise MtpkitError(f"unknown head style {self.style!r}: choose one of {', '.join(STYLES)}")
        if self.num_heads < 1:
            raise MtpkitError(f"--heads must be at least 1 (got {self.num_heads})")
        if self.num_layers < 1:
            raise MtpkitError(f"--layers must be at least 1 (got {self.num_layers})")
        if self.draft_vocab_size < 0:
            raise MtpkitError(f"--draft-vocab-size must be at least 1, or 0 for the whole vocabulary "
                              f"(got {self.draft_vocab_size})")

    def check_base(self, vocab_size: int, num_layers: int) -> None:
        """The eagle3 options against the base: a draft vocabulary within its vocabulary, three layers it has."""
        if self.draft_vocab_size > vocab_size:
            raise MtpkitError(f"--draft-vocab-size {self.draft_vocab_size} is larger than the base's vocabulary "
                              f"of {vocab_size}")
        ids = self.eagle_aux_hidden_state_layer_ids
        if len(ids) != 3:
            raise MtpkitError(f"eagle3 reads three of the base's layers (low, middle, high); got {len(ids)}: {ids}")
        outside = [i for i in ids if not 0 <= i < num_layers]
        if outside:
            raise MtpkitError(f"--aux-layer {outside[0]} is outside the base's layers 0..{num_layers - 1}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadsConfig":
        """Build from a dict, dropping unknown keys so old readers survive new writers."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, heads_dir: Path) -> "HeadsConfig":
        path = Path(heads_dir) / CONFIG_NAME
        if not path.is_file():
            raise MtpkitError(f"{heads_dir} is not a heads directory: {CONFIG_NAME} is missing")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise MtpkitError(f"{path} is not a valid mtpkit config: {exc}") from None
