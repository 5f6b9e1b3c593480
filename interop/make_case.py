"""`make interop`, step 1 (mtpkit's venv): a tiny random Llama, random eagle3 heads on it, their export in
speculators' eagle3 format, and what the heads compute on one sequence, for ``check_speculators.py`` to compare.

    .venv/bin/python interop/make_case.py out/interop

Writes, under the given directory: ``base/`` (the Llama, which the export names as its verifier), ``heads/``,
``export/`` (``mtpkit export``'s output) and ``case.safetensors``: the base's hidden states of every layer
(``hidden_states`` [L + 1, T, H], index i = layer i's input, as vLLM's aux hidden states), the token read with each
position (``tokens`` [T]: the next one) and the heads' draft logits at every depth (``logits`` [K, T, N], float32),
step k at position t fed the true token t + k (the training-time test, as speculators' forward runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtpkit.attach import attach
from mtpkit.checkpoint import open_heads, save_heads
from mtpkit.export import export_heads

SEQUENCE = 128  # one block of speculators' flex attention, its default
DEPTHS = 3
AUX_LAYERS = [3, 1, 4]  # not increasing: the export must sort them and permute fc's blocks to match
DRAFT_VOCAB = 96


def tiny_base(path: Path) -> None:
    """A random 6-layer Llama (hidden 128: the draft gets two attention heads of 64) and a byte-level tokenizer of
    about 300 tokens, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(fast),
                         tie_word_embeddings=False, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    LlamaForCausalLM(config).float().eval().save_pretrained(path)
    fast.save_pretrained(path)


def random_heads(heads_dir: Path, base: Path) -> None:
    """eagle3 heads with random weights everywhere (norms around 1) and a draft vocabulary of scattered ids."""
    attach(str(base), "eagle3", DEPTHS, 1, heads_dir, draft_vocab_size=DRAFT_VOCAB, aux_layers=AUX_LAYERS)
    heads = open_heads(heads_dir, device="cpu")
    generator = torch.Generator().manual_seed(1)
    heads.set_draft_vocab(torch.randperm(heads.config.vocab_size, generator=generator)[:DRAFT_VOCAB].sort().values)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator) + (parameter.ndim == 1))
    heads.config.training = {"steps": 1, "note": "random weights for make interop"}
    save_heads(heads, heads_dir)


def draft_logits(heads_dir: Path) -> dict[str, torch.Tensor]:
    """The base's hidden states on one random sequence and the heads' draft logits at every depth."""
    heads = open_heads(heads_dir, device="cpu")
    ids = torch.randint(3, heads.config.vocab_size, (1, SEQUENCE + 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outputs = heads.backbone.hidden(ids[:, :-1], **heads.feature_kwargs)
        tokens = ids[0, 1:]  # position t reads the base's states at t and token t + 1
        # depth k at t is fed token t + k, the end padded with id 0 (what speculators' forward feeds)
        fed = [torch.cat([tokens[k:], tokens.new_zeros(k)]).unsqueeze(0) for k in range(DEPTHS)]
        states = heads.teacher_forced_states(heads.features(outputs), fed)
        logits = torch.stack([heads.heads[0].lm_head(state)[0] for state in states])
    return {"hidden_states": torch.stack(outputs.hidden_states)[:, 0].float().contiguous(),
            "tokens": tokens.contiguous(), "logits": logits.float().contiguous()}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tiny_base(out / "base")
    random_heads(out / "heads", out / "base")
    export_heads(out / "heads", out / "export", force=True)
    case = draft_logits(out / "heads")
    save_file(case, str(out / "case.safetensors"))
    print(f"mtpkit: exported {out / 'export'}; draft logits {list(case['logits'].shape)} on a sequence of "
          f"{SEQUENCE} (aux layers {AUX_LAYERS}) in {out / 'case.safetensors'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/interop"))
