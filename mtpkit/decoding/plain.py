"""Plain decoding, one token per base forward, on mtpkit's kernels and cache: greedy, or sampling."""

from __future__ import annotations

import random
import time
from typing import Callable

import torch

from mtpkit.backbone import Backbone
from mtpkit.decoding.acceptance import check_sampling, sampling_probs
from mtpkit.decoding.io import GenerationResult, Output, check_prompt
from mtpkit.errors import MtpkitError
from mtpkit.kernels import kernel_plan
from mtpkit.kv_cache import decoder_cache



@torch.inference_mode()
def greedy_generate(backbone: Backbone, input_ids, max_new_tokens: int = 128, *, stop_strings=(),
                    on_tokens=None, pick: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GenerationResult:
    """Plain greedy decoding, one token per base forward, on the same decoder/output layer/cache and on the kernel
    plan the model runs (``mtpkit.kernels``: the token padded to two rows where that measured faster). ``pick``
    turns the logits [1, V] into the next token [1] (default: argmax; ``PlainDecoder`` samples)."""
    pick = pick or (lambda logits: logits.argmax(-1))
    ids, budget = check_prompt(backbone, input_ids, max_new_tokens)
    output = Output(backbone, budget, stop_strings, on_tokens)
    # where a forward over two tokens measured cheaper than over one, the token goes in twice and the copy's
    # cache entry is dropped: causal attention keeps the first row's result the one-token forward's
    padded = kernel_plan(backbone.model).padded_token
    start = time.perf_counter()
    cache = decoder_cache(backbone)
    hidden = backbone.hidden(ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1:]
    token = pick(backbone.logits(hidden[:, 0]))[:, None]
    forward_passes = 1
    output.push([token.item()])
    prefill = time.perf_counter() - start
    while output.stop_reason is None:
        if padded:
            hidden = backbone.hidden(token.repeat(1, 2), past_key_values=cache, use_cache=True).last_hidden_state
            cache.crop(-1)
            hidden = hidden[:, :1]
        else:
            hidden = backbone.hidden(token, past_key_values=cache, use_cache=True).last_hidden_state
        token = pick(backbone.logits(hidden[:, 0]))[:, None]
        forward_passes += 1
        output.push([token.item()])
    decode = time.perf_counter() - start - prefill
    return output.result(forward_passes, [1] * (forward_passes - 1), prefill, decode)


class PlainDecoder:
    """Plain decoding, one token per forward, on mtpkit's kernels and cache (``--draft none``): greedy, or sampling
    from the same warped distribution the speculative decoder samples losslessly from. The baseline every
    speculation gain is measured against."""

    calibrator = None  # nothing to learn between runs

    def __init__(self, backbone: Backbone, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 typical: bool = False, seed: int | None = None):
        check_sampling(temperature, top_p, top_k, typical)
        if typical:
            raise MtpkitError("--typical accepts drafts: it needs a draft source other than none")
        self.backbone = backbone
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._generator = torch.Generator(device=backbone.device)
        self._generator.manual_seed(seed if seed is not None else random.randrange(2**63))

    def describe(self) -> str:
        return "plain decoding, no drafts"

    def reset(self) -> None:
        pass  # nothing carries over from one prompt to the next

    def generate(self, input_ids, max_new_tokens: int = 128, *, stop_strings=(), on_tokens=None,
                 trace=None) -> GenerationResult:
        return greedy_generate(self.backbone, input_ids, max_new_tokens, stop_strings=stop_strings,
                               on_tokens=on_tokens, pick=self._sample if self.temperature > 0 else None)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        probs = sampling_probs(logits, self.temperature, self.top_k, self.top_p)
        return torch.multinomial(probs, 1, generator=self._generator)[:, 0]
