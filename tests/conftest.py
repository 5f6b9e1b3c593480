"""Tiny random models (Llama, Qwen2, GPT-2) and a tiny tokenizer, built offline in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a Python function that returns the sum of a list of numbers.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "Translate to French: good morning, how are you today?",
    "A train leaves at 3 pm and travels 60 miles per hour for 2 hours.",
    "Summarize the following text in one sentence.",
    "Extract all names and dates from this email: Alice met Bob on 3 May 2024.",
] * 4

FAMILIES = ("llama", "qwen2", "gpt2")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, initializer_range=0.2, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    return model.float().eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """Each tiny family saved as a local HF model directory (safetensors + tokenizer)."""
    dirs = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        make_model(family, len(tiny_tokenizer)).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[family] = path
    return dirs


@pytest.fixture(scope="module")
def heads_dir(tiny_model_dirs, tmp_path_factory):
    """Freshly attached sequential heads (3, random weights) on the tiny Llama, one directory per test module (a
    module may override it with heads of its own)."""
    from mtpkit.attach import attach

    out = tmp_path_factory.mktemp("heads")
    attach(str(tiny_model_dirs["llama"]), "sequential", 3, 1, out)
    return out


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param


@pytest.fixture
def tiny_backbone(family, tiny_tokenizer):
    from mtpkit.backbone import wrap_model

    return wrap_model(make_model(family, len(tiny_tokenizer)), tiny_tokenizer, f"tiny-{family}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and OpenMP threads spinning on a shared 2-core box
    can stall a 2-thread barrier; modules of tiny-model tests ask for this with ``pytestmark``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep calibration and model caches of tests out of the user's cache, but share GGUF conversions."""
    if "MTPKIT_CACHE" not in os.environ:
        monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path_factory.getbasetemp() / "mtpkit-cache"))


def assert_one_line_error(result, fragment: str) -> None:
    """A CLI run refused bad input the way every command must: non-zero exit, no traceback, one 'error:' line."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output
