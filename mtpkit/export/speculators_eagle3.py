"""speculators' ``eagle3`` format, for eagle3 heads: the draft model of EAGLE-3 as speculators saves it
(``Eagle3SpeculatorConfig`` in config.json, its ``Eagle3DraftModel``'s state in model.safetensors) and as vLLM
serves it (its speculators config reader turns it into ``Eagle3LlamaForCausalLM``, ``llama_eagle3.py``).

Read from both loaders (``SPECULATORS_EAGLE3_LOADERS``). mtpkit's eagle3 head was built as that draft, so its
tensors keep their names: ``fc`` [H, 3H] (no bias) on the base's aux hidden states, one Llama decoder layer
``layers.0`` whose q/k/v read [input_layernorm(embed(token)); hidden_norm(state)] (2H), the un-normed state as the
residual (``norm_before_residual: false``), ``norm``, ``lm_head`` over the draft vocabulary, ``d2t`` (int64 offsets:
target id = draft id + d2t) and ``t2d`` (bool, one per target id). Two things are converted, both exactly:

- the token embedding: mtpkit's draft reads the base's own input embedding; the format keeps a copy as
  ``embed_tokens.weight`` (speculators and vLLM use it when present), so the export serves without the base's
  embedding being shared. A base whose input embedding is more than a table lookup (a scaled one) is refused;
- the aux layers: vLLM collects the aux hidden states in layer order, whatever order the config lists them in, so
  ids that are not increasing are written sorted, with ``fc``'s three input blocks permuted to match. Repeated
  ids are refused (vLLM would hand over fewer than three states).

Where mtpkit's draft differs from a default Llama layer, the config says so: as many key/value heads as query
heads, ``head_dim`` H / heads, rotary theta 10000 (``mtpkit.draft_layer.ROPE_THETA``), RMSNorm eps 1e-6, the
base's MLP width. ``d2t`` / ``t2d`` are written only for a draft vocabulary smaller than the base's: speculators
has no such buffers otherwise.
"""

from __future__ import annotations

from pathlib import Path

from mtpkit import __version__
from mtpkit.errors import MtpkitError
from mtpkit.export.format import CONFIG_FILE, Exported, ExportFormat, compare_tensors, read_written

# The loaders this format was read from; kept in every exported config too.
SPECULATORS_EAGLE3_LOADERS = {
    "speculators": {  # read in its 0.9.0 release (the wheel's version.py names no commit), which `make interop` runs
        "repo": "vllm-project/speculators",
        "version": "0.9.0",
        "wheel_sha256": "f0de7571274ce996d769ce81240379728dcb38701f77d2d34cfd0d670d1b4481",
        "config": "src/speculators/models/eagle3/config.py",
        "model": "src/speculators/models/eagle3/core.py",
        "layer": "src/speculators/models/eagle3/model_definitions.py",
        "vocab": "src/speculators/model.py",
    },
    "vllm": {
        "repo": "vllm-project/vllm",
        "model": "vllm/model_executor/models/llama_eagle3.py",
        "model_commit": "00bd1493b3e82d6c13c68ee8a0e1c5a96707e190",
        "config": "vllm/transformers_utils/configs/speculators/base.py",
        "config_commit": "052316aeab2a1b2a9076518f20fe776052b947c9",
    },
}
SPECULATORS_VERSION = SPECULATORS_EAGLE3_LOADERS["speculators"]["version"]
LAYER = "layers.0"  # the draft's one decoder layer; its tensors keep mtpkit's names, which are the format's
LAYER_TENSORS = ("input_layernorm.weight", "hidden_norm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def build(heads, heads_dir: Path, verifier: str | None = None) -> Exported:
    """The heads as speculators' eagle3 draft, for serving beside ``verifier`` (default: the base the heads name)."""
    ids, order = export_aux_layers(heads.config.eagle_aux_hidden_state_layer_ids)
    tensors = speculators_eagle3_tensors(heads, order)
    config = speculators_eagle3_config(heads, heads_dir, ids, verifier or heads.config.base_model)
    layer, vllm = config["transformer_layer_config"], SPECULATORS_EAGLE3_LOADERS["vllm"]
    permuted = ids != list(heads.config.eagle_aux_hidden_state_layer_ids)
    summary = [
        ("draft", f"1 Llama decoder layer, hidden {layer['hidden_size']}, {layer['num_attention_heads']} head(s) of "
                  f"{layer['head_dim']}, MLP {layer['intermediate_size']}"),
        ("reads base layers", f"{ids} (input hidden states)" + (", sorted for vLLM: fc's blocks permuted" if permuted
                                                                else "")),
        ("draft vocabulary", f"{config['draft_vocab_size']:,} of {layer['vocab_size']:,} tokens"),
        ("verifier", config["speculators_config"]["verifier"]["name_or_path"]),
        ("checked against", f"speculators {SPECULATORS_VERSION} (Eagle3DraftModel) and vLLM {vllm['model']} @ "
                            f"{vllm['model_commit'][:12]}"),
    ]
    return Exported(config, tensors, summary)


def export_aux_layers(ids: list[int]) -> tuple[list[int], list[int]]:
    """The aux layer ids as vLLM collects the states (increasing), and which of the heads' fc blocks goes where."""
    if len(set(ids)) != len(ids):
        raise MtpkitError(f"these eagle3 heads read base layer(s) {ids} with one repeated: vLLM and speculators take "
                          "distinct aux layers (one hidden state each), so the export cannot carry them")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return [ids[i] for i in order], order


def speculators_eagle3_tensors(heads, order: list[int]) -> dict:
    """The exported tensors by the format's names (float32; d2t int64, t2d bool), ``fc``'s input blocks in
    ``order``."""
    import torch
    from torch import nn

    head = heads.heads[0]
    embedding = heads.backbone.model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise MtpkitError(f"the base's input embedding is a {type(embedding).__name__}, not a plain table lookup as "
                          "the format's embed_tokens is: the draft would read other token embeddings when served")
    hidden = heads.config.hidden_size
    fc = head.fc.weight
    tensors = {"embed_tokens.weight": embedding.weight,
               "fc.weight": torch.cat([fc[:, i * hidden:(i + 1) * hidden] for i in order], dim=1),
               **{f"{LAYER}.{name}": head.layers[0].get_parameter(name) for name in LAYER_TENSORS},
               "norm.weight": head.norm.weight,
               "lm_head.weight": head.lm_head.weight}
    tensors = {name: t.detach().float().cpu().contiguous().clone() for name, t in tensors.items()}
    if heads.config.draft_vocab_size < heads.config.vocab_size:
        tensors["d2t"] = head.d2t.detach().long().cpu().contiguous().clone()
        tensors["t2d"] = head.t2d.detach().bool().cpu().contiguous().clone()
    return tensors


def speculators_eagle3_config(heads, heads_dir: Path, aux_layers: list[int], verifier: str) -> dict:
    """config.json as ``Eagle3SpeculatorConfig`` reads it, its ``transformer_layer_config`` describing mtpkit's
    layer as a LlamaConfig, with what mtpkit exported under ``mtpkit_export``."""
    from mtpkit.draft_layer import ROPE_THETA

    config = heads.config
    layer = heads.heads[0].layers[0]
    attention = layer.self_attn
    base = heads.backbone.model.config
    base = base.get_text_config() if hasattr(base, "get_text_config") else base
    context = getattr(base, "max_position_embeddings", None) or getattr(base, "n_positions", None)
    if not isinstance(context, int):
        raise MtpkitError("the base's config gives no max_position_embeddings, which the format's layer config needs")
    transformer_layer_config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": config.hidden_size,
        "intermediate_size": layer.mlp.gate_proj.out_features,
        "num_hidden_layers": len(heads.heads[0].layers),
        "num_attention_heads": attention.num_heads,
        "num_key_value_heads": attention.num_heads,  # no grouped key/value heads in mtpkit's draft
        "head_dim": attention.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": layer.input_layernorm.variance_epsilon,
        "rope_theta": ROPE_THETA,  # transformers < 5 and vLLM's older readers
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "max_position_embeddings": context,
        "vocab_size": config.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    return {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": transformer_layer_config,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.hidden_size,
        "eagle_aux_hidden_state_layer_ids": aux_layers,
        # mtpkit's layer adds attention to the state before hidden_norm, reads fc's input as it is, and feeds the
        # state before ``norm`` to the next depth (speculators 0.9's Eagle 3.1 options, off)
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "torch_dtype": "float32",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": config.num_heads,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": [heads.backbone.architecture]},
        },
        "mtpkit_export": {
            "format": "speculators-eagle3",
            "loader": SPECULATORS_EAGLE3_LOADERS,
            "mtpkit_version": __version__,
            "heads_dir": str(heads_dir),
            "base_model": config.base_model,
            "base_fingerprint": config.base_fingerprint,
            "heads_aux_layers": list(config.eagle_aux_hidden_state_layer_ids),
            "embed_tokens": "a copy of the base's input embedding",
        },
    }


def expected_speculators_eagle3_tensors(config: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor speculators' ``Eagle3DraftModel`` and vLLM's ``Eagle3LlamaForCausalLM`` read for ``config``,
    with its shape, and the dtypes that matter (the vocabulary maps)."""
    layer = config["transformer_layer_config"]
    hidden, vocab, width = layer["hidden_size"], layer["vocab_size"], layer["intermediate_size"]
    heads, kv_heads = layer["num_attention_heads"], layer.get("num_key_value_heads") or layer["num_attention_heads"]
    head_dim = layer.get("head_dim") or hidden // heads
    draft_vocab = config.get("draft_vocab_size") or vocab
    target_hidden = config.get("target_hidden_size") or hidden
    expected = {
        "embed_tokens.weight": (vocab, hidden),
        "fc.weight": (hidden, 3 * target_hidden),
        f"{LAYER}.input_layernorm.weight": (hidden,),
        f"{LAYER}.hidden_norm.weight": (hidden,),
        f"{LAYER}.self_attn.q_proj.weight": (heads * head_dim, 2 * hidden),
        f"{LAYER}.self_attn.k_proj.weight": (kv_heads * head_dim, 2 * hidden),
        f"{LAYER}.self_attn.v_proj.weight": (kv_heads * head_dim, 2 * hidden),
        f"{LAYER}.self_attn.o_proj.weight": (hidden, heads * head_dim),
        f"{LAYER}.post_attention_layernorm.weight": (hidden,),
        f"{LAYER}.mlp.gate_proj.weight": (width, hidden),
        f"{LAYER}.mlp.up_proj.weight": (width, hidden),
        f"{LAYER}.mlp.down_proj.weight": (hidden, width),
        "norm.weight": (hidden,),
        "lm_head.weight": (draft_vocab, hidden),
    }
    dtypes = {}
    if draft_vocab < vocab:  # speculators holds d2t / t2d only for a smaller draft vocabulary
        expected.update({"d2t": (draft_vocab,), "t2d": (vocab,)})
        dtypes = {"d2t": "I64", "t2d": "BOOL"}
    return expected, dtypes


def check_speculators_eagle3(directory: Path) -> list[str]:
    """What speculators' and vLLM's eagle3 loaders would find wrong in ``directory``: one line per problem."""
    config, found, problems = read_written(directory)
    if config is None:
        return problems
    if config.get("speculators_model_type") != "eagle3":
        problems.append(f"{CONFIG_FILE}: speculators_model_type is {config.get('speculators_model_type')!r}, "
                        "not 'eagle3'")
    layer = config.get("transformer_layer_config")
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    if not isinstance(layer, dict) or any(not isinstance(layer.get(k), int) or layer[k] < 1 for k in keys):
        return problems + [f"{CONFIG_FILE}: transformer_layer_config lacks positive integers {', '.join(keys)}"]
    if layer.get("num_hidden_layers", 1) != 1:
        problems.append(f"{CONFIG_FILE}: transformer_layer_config has {layer.get('num_hidden_layers')} layers; "
                        "these loaders build later layers that read the state alone, which was not written")
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if not isinstance(ids, list) or len(ids) != 3 or ids != sorted(set(ids)):
        problems.append(f"{CONFIG_FILE}: eagle_aux_hidden_state_layer_ids is {ids!r}, not three increasing layer ids")
    try:
        proposal = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
        verifier = config["speculators_config"]["verifier"]["name_or_path"]
    except (KeyError, IndexError, TypeError):
        proposal = verifier = None
    if not isinstance(proposal, int) or not verifier:
        problems.append(f"{CONFIG_FILE}: speculators_config lacks proposal_methods[0].speculative_tokens or "
                        "verifier.name_or_path")
    if found is None:
        return problems
    expected, dtypes = expected_speculators_eagle3_tensors(config)
    return problems + compare_tensors(expected, found, dtypes)


SPECULATORS_EAGLE3 = ExportFormat("speculators-eagle3", ("eagle3",), build, check_speculators_eagle3)
