"""``mtpkit export``: write a heads directory in a serving engine's format, then check what was written.

One format today: vLLM's ``medusa`` draft model, for medusa heads. Its layout is read from vLLM's loader
(``VLLM_MEDUSA_LOADER``), which builds, for head h and layer l, ``blocks.{h}.layers.{l}`` = Linear(H, H)
applied as ``x + SiLU(W x + b)`` (bias when the config says ``medusa_fc_bias``) on the base's final normed
hidden state, and one output layer ``lm_heads.{h}`` = [vocab, H] per head (no bias). mtpkit's medusa heads
are the same blocks (``mtpkit.heads.ResidualBlock``); heads sharing the base's frozen output layer get a copy of
it as every ``lm_heads.{h}.weight``, since the format has one per head.

An export is written into a staging directory beside ``out``, checked there against the loader's names and
shapes (``check_vllm_medusa``: every tensor it reads, present with its shape, and nothing it would leave unread),
and only then renamed onto ``out``: a refused or failed export leaves nothing behind. Safetensors and JSON only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mtpkit import __version__
from mtpkit.config import HeadsConfig
from mtpkit.errors import MtpkitError

# The loader this format was read from (names, shapes, config keys); kept in every exported config too.
VLLM_MEDUSA_LOADER = {
    "repo": "vllm-project/vllm",
    "model": "vllm/model_executor/models/medusa.py",
    "model_commit": "01dbb08195ca9c70ac9044786a906a353e07fcdf",
    "config": "vllm/transformers_utils/configs/medusa.py",
    "config_commit": "0531c2226a6a25cd96ccc856f3bda3f0bb4efb5f",
}
FORMATS = {"vllm-medusa": ("medusa",)}  # format -> the head styles it can carry
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ExportResult:
    out: Path
    files: list[Path]
    config: dict
    shared_lm_head: bool  # the heads scored with the base's output layer, copied once per head


def export_heads(heads_dir: Path, out: Path, fmt: str = "vllm-medusa", *, verifier: str | None = None,
                 force: bool = False, allow_untrained: bool = False, trust_remote_code: bool = False) -> ExportResult:
    """Export the heads of ``heads_dir`` to ``out`` in ``fmt``, for serving beside ``verifier`` (default: the base
    the heads were made for, which it must be). Refused with one line, before anything is written: an unknown
    format, a style the format cannot carry, untrained heads (unless ``allow_untrained``), a non-empty ``out``
    (unless ``force``), another base, heads trained with a LoRA adapter on the base."""
    heads_dir, out = Path(heads_dir), Path(out).expanduser()
    config = HeadsConfig.read(heads_dir)
    if fmt not in FORMATS:
        raise MtpkitError(f"unknown --format {fmt!r}: choose from {', '.join(FORMATS)}")
    if config.style not in FORMATS[fmt]:
        exportable = ", ".join(f"{'/'.join(styles)} heads ({name})" for name, styles in FORMATS.items())
        raise MtpkitError(f"{config.style} heads have no serving format yet: mtpkit export writes {exportable}")
    if not is_trained(config) and not allow_untrained:
        raise MtpkitError(f"{heads_dir} holds untrained heads (no finetune recorded in its config): train them with "
                          "mtpkit finetune, or pass --allow-untrained")
    if out.exists() and not out.is_dir():
        raise MtpkitError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MtpkitError(f"--out {out} is not empty; pass --force to replace it")
    if config.lora:
        raise MtpkitError("these heads were trained with a LoRA adapter on the base (Medusa-2): the served base "
                          "would not be the one they draft for")

    from mtpkit.checkpoint import open_heads

    heads = open_heads(heads_dir, model=verifier or config.base_model, trust_remote_code=trust_remote_code)
    tensors, shared = vllm_medusa_tensors(heads)
    exported = vllm_medusa_config(heads, heads_dir, shared)
    return _write_checked(out, exported, tensors, shared)


def is_trained(config: HeadsConfig) -> bool:
    """Whether finetune has trained these heads (it records its steps in the config's ``training``)."""
    return bool(config.training) and int(config.training.get("steps") or 0) > 0


# --------------------------------------------------------------------------- vLLM's medusa format


def vllm_medusa_tensors(heads) -> tuple[dict, bool]:
    """The exported tensors by vLLM's names, and whether the output layers are copies of the base's."""
    output = heads.backbone.model.get_output_embeddings()
    if output.bias is not None:
        raise MtpkitError("the base's output layer has a bias, which vLLM's medusa output layers do not take")
    tensors = {}
    for h, head in enumerate(heads.heads):
        for layer, block in enumerate(head.blocks):
            tensors[f"blocks.{h}.layers.{layer}.weight"] = block.linear.weight
            tensors[f"blocks.{h}.layers.{layer}.bias"] = block.linear.bias
        tensors[f"lm_heads.{h}.weight"] = heads.output_layer(h + 1)[0]
    return {name: t.detach().float().cpu().contiguous().clone() for name, t in tensors.items()}, \
        not heads.config.own_lm_head


def vllm_medusa_config(heads, heads_dir: Path, shared: bool) -> dict:
    """config.json as vLLM's MedusaConfig reads it (no other key may hold both "num" and "heads" or "layers":
    its loader renames those), with what mtpkit exported under ``mtpkit_export``."""
    config: HeadsConfig = heads.config
    exported = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "truncated_vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "medusa_fc_bias": True,  # mtpkit's blocks have a bias; vLLM builds them without one unless told
        "original_lm_head": False,  # one output layer per head, as written
        "torch_dtype": "float32",
        "mtpkit_export": {
            "format": "vllm-medusa",
            "loader": VLLM_MEDUSA_LOADER,
            "mtpkit_version": __version__,
            "heads_dir": str(heads_dir),
            "base_model": config.base_model,
            "base_fingerprint": config.base_fingerprint,
            "lm_heads": ("a copy of the base's output layer per head (the heads share it)" if shared
                         else "the heads' own output layers"),
            "draft_vocab": "not exported: the heads draft from the full vocabulary in vLLM",
        },
    }
    scale = getattr(heads.backbone.model.config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        exported["logit_scale"] = scale
    return exported


def expected_vllm_medusa_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor vLLM's medusa loader reads for ``config``, with its shape."""
    hidden, heads, layers = config["hidden_size"], config["num_heads"], config["num_hidden_layers"]
    vocab = config.get("truncated_vocab_size") or config["vocab_size"]
    expected = {}
    for h in range(heads):
        for layer in range(layers):
            expected[f"blocks.{h}.layers.{layer}.weight"] = (hidden, hidden)
            if config.get("medusa_fc_bias", False):
                expected[f"blocks.{h}.layers.{layer}.bias"] = (hidden,)
    lm_heads = 1 if config.get("original_lm_head", False) else heads  # original_lm_head: one, read from lm_heads.0
    for h in range(lm_heads):
        expected[f"lm_heads.{h}.weight"] = (vocab, hidden)
    if vocab < config["vocab_size"]:
        expected["token_map"] = (vocab,)
    return expected


def check_vllm_medusa(directory: Path) -> list[str]:
    """What vLLM's medusa loader would find wrong in ``directory``: one line per problem (none: it loads all)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{CONFIG_FILE}: cannot be read ({exc})"]
    problems = []
    if config.get("model_type") != "medusa":
        problems.append(f"{CONFIG_FILE}: model_type is {config.get('model_type')!r}, not 'medusa'")
    missing_keys = [k for k in ("hidden_size", "vocab_size", "num_heads", "num_hidden_layers")
                    if not isinstance(config.get(k), int) or config[k] < 1]
    if missing_keys:
        return problems + [f"{CONFIG_FILE}: {', '.join(missing_keys)} missing or not positive integers"]
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
            found = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError) as exc:
        return problems + [f"{WEIGHTS_FILE}: cannot be read ({exc})"]
    expected = expected_vllm_medusa_tensors(config)
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"{WEIGHTS_FILE}: missing {name} {list(shape)}")
        elif found[name] != shape:
            problems.append(f"{WEIGHTS_FILE}: {name} has shape {list(found[name])}, the loader expects {list(shape)}")
    problems += [f"{WEIGHTS_FILE}: {name} would be left unread" for name in sorted(set(found) - set(expected))]
    return problems


# --------------------------------------------------------------------------- writing


def _write_checked(out: Path, config: dict, tensors: dict, shared: bool) -> ExportResult:
    """Write into a staging directory beside ``out``, check it, then put it in ``out``'s place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "library": "mtpkit"})
        problems = check_vllm_medusa(staging)
        if problems:
            raise MtpkitError(f"the export failed its own check ({len(problems)} problems): {'; '.join(problems[:3])}")
        _replace_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportResult(out=out, files=[out / CONFIG_FILE, out / WEIGHTS_FILE], config=config, shared_lm_head=shared)


def _replace_dir(source: Path, target: Path) -> None:
    """Rename ``source`` onto ``target``, whose old contents (a --force export) are removed only afterwards."""
    if not target.exists():
        source.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(old / target.name)
    source.rename(target)
    shutil.rmtree(old)
