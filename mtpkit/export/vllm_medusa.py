"""vLLM's ``medusa`` draft-model format, for medusa heads.

Its layout is read from vLLM's loader (``VLLM_MEDUSA_LOADER``), which builds, for head h and layer l,
``blocks.{h}.layers.{l}`` = Linear(H, H) applied as ``x + SiLU(W x + b)`` (bias when the config says
``medusa_fc_bias``) on the base's final normed hidden state, and one output layer ``lm_heads.{h}`` = [vocab, H] per
head (no bias). mtpkit's medusa heads are the same blocks (``mtpkit.heads.ResidualBlock``); heads sharing the base's
frozen output layer get a copy of it as every ``lm_heads.{h}.weight``, since the format has one per head.
"""

from __future__ import annotations

from pathlib import Path

from mtpkit import __version__
from mtpkit.config import HeadsConfig
from mtpkit.errors import MtpkitError
from mtpkit.export.format import CONFIG_FILE, Exported, ExportFormat, compare_tensors, read_written

# The loader this format was read from (names, shapes, config keys); kept in every exported config too.
VLLM_MEDUSA_LOADER = {
    "repo": "vllm-project/vllm",
    "model": "vllm/model_executor/models/medusa.py",
    "model_commit": "01dbb08195ca9c70ac9044786a906a353e07fcdf",
    "config": "vllm/transformers_utils/configs/medusa.py",
    "config_commit": "0531c2226a6a25cd96ccc856f3bda3f0bb4efb5f",
}


def build(heads, heads_dir: Path, verifier: str | None = None) -> Exported:
    """The heads as vLLM's medusa model (``verifier`` plays no part: the format does not name its base)."""
    tensors, shared = vllm_medusa_tensors(heads)
    config = vllm_medusa_config(heads, heads_dir, shared)
    summary = [("heads", f"{config['num_heads']} x {config['num_hidden_layers']} residual block(s), hidden "
                         f"{config['hidden_size']}"),
               ("output layers", config["mtpkit_export"]["lm_heads"]),
               ("checked against", f"{VLLM_MEDUSA_LOADER['repo']} {VLLM_MEDUSA_LOADER['model']} @ "
                                   f"{VLLM_MEDUSA_LOADER['model_commit'][:12]}")]
    return Exported(config, tensors, summary)


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
    config, found, problems = read_written(directory)
    if config is None:
        return problems
    if config.get("model_type") != "medusa":
        problems.append(f"{CONFIG_FILE}: model_type is {config.get('model_type')!r}, not 'medusa'")
    missing_keys = [k for k in ("hidden_size", "vocab_size", "num_heads", "num_hidden_layers")
                    if not isinstance(config.get(k), int) or config[k] < 1]
    if missing_keys:
        return problems + [f"{CONFIG_FILE}: {', '.join(missing_keys)} missing or not positive integers"]
    if found is None:
        return problems
    return problems + compare_tensors(expected_vllm_medusa_tensors(config), found)


VLLM_MEDUSA = ExportFormat("vllm-medusa", ("medusa",), build, check_vllm_medusa)
