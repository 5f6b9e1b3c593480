"""What decoding takes and gives: a prompt encoded as training saw it, the checked token budget, the committed
tokens with their stop rules, streamed text, and the result of one generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mtpkit.backbone import Backbone
from mtpkit.chat import prompt_token_ids
from mtpkit.errors import MtpkitError
from mtpkit.generation import eos_ids


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    text: str  # decoded new tokens (skip_special_tokens=True)
    forward_passes: int  # base forward passes INCLUDING prefill
    accepted_lengths: list[int]  # tokens committed by each verification step
    prefill_seconds: float
    decode_seconds: float
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens" | "stop_when"
    draft_seconds: float = 0.0  # of decode_seconds, the time spent drafting (and choosing the tree)

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens per base forward pass (plain decoding scores 1.00)."""
        return len(self.tokens) / max(1, self.forward_passes)

    @property
    def tokens_per_second(self) -> float:
        seconds = self.prefill_seconds + self.decode_seconds
        return len(self.tokens) / seconds if seconds > 0 else 0.0


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.LongTensor:
    """Token ids [1, L] of a user prompt: as a chat turn (``mtpkit.chat``: the chat template, or plain turns
    without one, as the heads were trained on) when ``chat``, else the raw text."""
    if chat:
        ids = torch.tensor([prompt_token_ids(tokenizer, [{"role": "user", "content": prompt}])], dtype=torch.long)
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise MtpkitError("the prompt is empty: it encodes to no tokens")
    return ids


def check_prompt(backbone: Backbone, input_ids, max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """Validate the prompt; return it as [1, L] on the model's device and the token budget."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise MtpkitError(f"generate takes one prompt at a time (batch size 1), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise MtpkitError("the prompt is empty: it encodes to no tokens")
    if max_new_tokens < 1:
        raise MtpkitError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    context = backbone.max_context
    budget = max_new_tokens
    if context is not None:
        if ids.shape[1] >= context:
            raise MtpkitError(f"the prompt has {ids.shape[1]} tokens; the model's context is {context}")
        budget = min(max_new_tokens, context - ids.shape[1])  # the last new token is never fed back
    return ids.to(backbone.device), budget


class Output:
    """Collects committed tokens and decides, token by token, where generation stops."""

    def __init__(self, backbone: Backbone, budget: int, stop_strings: Sequence[str],
                 on_tokens: Callable[[list[int]], None] | None, eos: "Sequence[int] | None" = None,
                 stop_when: Callable[[list[int]], bool] | None = None):
        self.tokenizer = backbone.tokenizer
        self.eos = eos_ids(backbone) if eos is None else set(eos)
        self.stop_when = stop_when  # a caller's own rule, asked after every token (transformers' stopping criteria)
        self.budget = budget
        self.stop_strings = [s for s in stop_strings if s]
        self.window = max((len(s) for s in self.stop_strings), default=0) + 8
        self.on_tokens = on_tokens
        self.tokens: list[int] = []
        self.stop_reason: str | None = None

    def push(self, new: list[int]) -> int:
        """Commit tokens up to the first stop; return how many were committed."""
        taken = 0
        for token in new:
            self.tokens.append(token)
            taken += 1
            if token in self.eos:
                self.stop_reason = "eos"
            elif self.stop_strings and self._stop_string_completed():
                self.stop_reason = "stop_string"
            elif len(self.tokens) >= self.budget:
                self.stop_reason = "max_new_tokens"
            elif self.stop_when is not None and self.stop_when(self.tokens):
                self.stop_reason = "stop_when"
            if self.stop_reason:
                break
        if self.on_tokens is not None and taken:
            self.on_tokens(new[:taken])
        return taken

    def _stop_string_completed(self) -> bool:
        # the stop string was absent before this token, so it must end in the recent text
        tail = self.tokenizer.decode(self.tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)

    def result(self, forward_passes: int, accepted: list[int], prefill: float, decode: float,
               draft: float = 0.0) -> GenerationResult:
        return GenerationResult(tokens=self.tokens, text=self.tokenizer.decode(self.tokens, skip_special_tokens=True),
                                forward_passes=forward_passes, accepted_lengths=accepted, prefill_seconds=prefill,
                                decode_seconds=decode, stop_reason=self.stop_reason or "max_new_tokens",
                                draft_seconds=draft)


class TextStream:
    """Turns streamed token ids into text pieces for ``write`` (waits out partial UTF-8 characters)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.written = 0

    def __call__(self, new_tokens: list[int]) -> None:
        self.tokens.extend(new_tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self) -> None:
        self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if len(text) > self.written:
            self.write(text[self.written:])
            self.written = len(text)
