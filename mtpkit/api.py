"""mtpkit from Python: ``mtpkit.load(heads_dir)`` gives the base model, its tokenizer and two ways to decode.

    spec = mtpkit.load("mtpkit/trained/smollm2-135m-sequential")
    spec.generate("Write a haiku about caches.", max_new_tokens=64)            # mtpkit's own loop
    spec.model.generate(input_ids, max_new_tokens=64, custom_generate=spec.custom_generate)  # transformers'

Both decode with the decoder ``mtpkit generate`` runs (``draft_sources.build_decoder``). Through transformers'
``generate``, transformers prepares the generation config, the logits processors and the stopping criteria and
hands them to ``custom_generate``, which runs mtpkit's loop instead of its own: greedy gives transformers'
greedy tokens exactly (float32), ``do_sample=True`` samples the same distribution (temperature, top-k and
top-p; lossless rejection sampling), and the stopping criteria (``max_new_tokens``, ``eos_token_id``, stop
strings, your own) are asked after every token. Batch size 1 only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from mtpkit.checkpoint import open_heads
from mtpkit.decoding import GenerationResult, SpeculativeDecoder, check_sampling, encode_prompt
from mtpkit.draft_sources import build_decoder
from mtpkit.drafting.registry import check_draft
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads

# transformers' sampling warpers that mtpkit's sampler applies itself (temperature, then top-k, then top-p)
_WARPERS = {"TemperatureLogitsWarper": "temperature", "TopKLogitsWarper": "top_k", "TopPLogitsWarper": "top_p"}


def load(heads_dir, *, device: str | None = None, dtype: str | None = None, draft: str = "hybrid",
         tree="auto", model: str | None = None, trust_remote_code: bool = False,
         fast_kernels: bool = False) -> "Speculator":
    """Load a heads directory's base (or ``model``, which must be the same base) and heads.

    ``draft`` and ``tree`` are ``mtpkit generate``'s ``--draft`` and ``--tree``. ``fast_kernels`` switches the base's
    and the heads' linear layers to the layouts measured fastest on whole forwards on this machine (measured once,
    then cached; float32 on a CPU; the same results up to summation order), so it is off by default: ``spec.model``
    stays the model transformers loaded.
    """
    check_draft(draft)
    heads = open_heads(Path(heads_dir), model=model, dtype=dtype or "float32", device=device,
                       trust_remote_code=trust_remote_code)
    if fast_kernels:  # the layouts measured fastest on whole forwards here, as ``mtpkit generate`` runs
        from mtpkit.kernels import use_measured_kernels

        use_measured_kernels(heads.backbone, heads)
    return Speculator(heads=heads, heads_dir=Path(heads_dir), draft=draft, tree=tree)


@dataclass(eq=False)
class Speculator:
    """A base model with its draft heads; decoders are built once per sampling setting and reused."""

    heads: DraftHeads
    heads_dir: Path | None = None
    draft: str = "hybrid"
    tree: object = "auto"
    _decoders: dict = field(default_factory=dict, repr=False)

    @property
    def model(self):
        """The transformers base model."""
        return self.heads.backbone.model

    @property
    def tokenizer(self):
        return self.heads.backbone.tokenizer

    def decoder(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> SpeculativeDecoder:
        """The decoder for these sampling settings (greedy at temperature 0), built on first use."""
        check_sampling(temperature, top_p, top_k, False)
        key = (temperature, top_p, top_k) if temperature > 0 else (0.0, 1.0, 0)
        if key not in self._decoders:
            self._decoders[key] = build_decoder(self.heads, self.heads_dir, self.draft, self.tree,
                                                temperature=key[0], top_p=key[1], top_k=key[2])
        return self._decoders[key]

    def decode(self, input_ids, max_new_tokens: int = 128, *, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, stop: Sequence[str] = (), seed: int | None = None, **options) -> GenerationResult:
        """One prompt's token ids ([L] or [1, L]) decoded; the full result (tokens, text, steps, timings)."""
        decoder = self.decoder(temperature, top_p, top_k)
        if temperature > 0:  # without a seed, follow torch's global generator, as transformers' sampling does
            decoder.reseed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
        return decoder.generate(input_ids, max_new_tokens, stop_strings=tuple(stop), **options)

    def generate(self, prompt, max_new_tokens: int = 128, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] | str = (), seed: int | None = None, chat: bool = True):
        """Text in, text out (the prompt as a chat turn when ``chat``, like ``mtpkit generate``); token ids in
        (a list or a tensor of one row), the new token ids out as a list."""
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        is_text = isinstance(prompt, str)
        ids = encode_prompt(self.tokenizer, prompt, chat) if is_text else prompt
        result = self.decode(ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
                             seed=seed)
        return result.text if is_text else list(result.tokens)

    # ------------------------------------------------------------------ transformers' generate(custom_generate=...)

    @property
    def custom_generate(self):
        """The callable for ``spec.model.generate(ids, custom_generate=spec.custom_generate, ...)``."""
        return self._custom_generate

    def _custom_generate(self, model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
                         generation_config=None, synced_gpus: bool = False, streamer=None, **model_kwargs):
        """transformers calls this with what ``generate`` prepared, in place of its own decoding loop; it returns the
        prompt followed by the new tokens [1, L + n], as ``generate`` does for a decoder-only model."""
        if model is not self.model:
            raise MtpkitError("this custom_generate belongs to another model: call it through spec.model.generate")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise MtpkitError(f"mtpkit decodes one prompt at a time: got input_ids of shape {tuple(input_ids.shape)}")
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool((mask == 1).all()):
            raise MtpkitError("mtpkit decodes one unpadded prompt: the attention mask has zeros")
        config = generation_config
        if config.num_beams > 1 or config.return_dict_in_generate:
            raise MtpkitError("mtpkit's custom_generate returns token ids of one greedy or sampled sequence: "
                              "num_beams > 1 and return_dict_in_generate are not supported")
        sampling = _sampling_settings(logits_processor or [], config.do_sample)
        if streamer is None:  # transformers 5.23 hands a callable custom_generate no streamer: see _caller_streamer
            streamer = _caller_streamer()
        budget = config.max_length - input_ids.shape[1]
        if budget < 1:
            if streamer is not None:
                streamer.end()
            return input_ids
        criteria = stopping_criteria or []
        prompt = input_ids[0].tolist()

        def stop_when(tokens: list[int]) -> bool:
            if not criteria:
                return False
            sequence = torch.tensor([prompt + tokens], dtype=torch.long, device=input_ids.device)
            return bool(criteria(sequence, None).all())

        def stream(tokens: list[int]) -> None:
            for token in tokens:  # one token per put, as transformers' own loop does
                streamer.put(torch.tensor([token]))

        # EOS is the stopping criteria's to decide (generate's eos_token_id, not the tokenizer's)
        result = self.decode(input_ids, budget, **sampling, eos_token_ids=(), stop_when=stop_when,
                             on_tokens=None if streamer is None else stream)
        if streamer is not None:
            streamer.end()
        new = torch.tensor([result.tokens], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, new], dim=1)


def _sampling_settings(logits_processor, do_sample: bool) -> dict:
    """mtpkit's sampling settings for transformers' prepared logits processors (greedy unless ``do_sample``);
    one line naming any processor mtpkit cannot apply losslessly."""
    names = [type(processor).__name__ for processor in logits_processor]
    unsupported = [name for name in names if name not in _WARPERS]
    if unsupported:
        raise MtpkitError(f"mtpkit's custom_generate cannot apply {', '.join(unsupported)}: it decodes with "
                          f"temperature, top_k and top_p only")
    if not do_sample:
        return {}
    settings = {"temperature": 1.0}
    for processor in logits_processor:
        option = _WARPERS[type(processor).__name__]
        settings[option] = getattr(processor, option)
    return settings


def _caller_streamer():
    """The ``streamer`` given to transformers' ``generate`` that called us, or None.

    transformers 5.23 calls ``streamer.put(prompt)`` and then drops the streamer when ``custom_generate`` is a
    callable (it rebuilds the mode's keyword arguments from the callable's own extra parameters), so the streamer
    is read from ``generate``'s frame, and only from that frame.
    """
    from transformers.generation.utils import GenerationMixin

    generate_code = getattr(GenerationMixin.generate, "__wrapped__", GenerationMixin.generate).__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not generate_code:
        frame = frame.f_back
    return None if frame is None else frame.f_locals.get("streamer")
