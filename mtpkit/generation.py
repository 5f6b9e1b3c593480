"""Batched generation on the frozen base: many prompts at once, left-padded, finished rows leaving the batch.

The one generation loop that makes training data: self-distilled responses (``mtpkit.distill``,
``mtpkit.corpus``) and self-written prompts (``mtpkit.self_prompts``). Greedy or sampled (temperature,
top-p, a seeded generator); optionally keeping the decoder's hidden states as they are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpkit.backbone import Backbone, features_of
from mtpkit.kv_cache import growing_cache

CPU_BATCH_SIZE = 64  # measured on 2 cores: 114 tokens/s at 64 rows, 86 at 32; 96 rows were slower than 64
GPU_BATCH_SIZE = 64


def default_batch_size(backbone: Backbone) -> int:
    return GPU_BATCH_SIZE if backbone.device.type == "cuda" else CPU_BATCH_SIZE


@dataclass(frozen=True)
class Sampler:
    """Sampling settings of a generation loop (greedy when ``temperature`` is 0)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # always keeps the most likely token
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0))
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


GREEDY = Sampler()


@dataclass
class Generated:
    """What a batch generation returns: each prompt's new tokens and, when asked, the base's hidden states of
    every position of prompt + response ([len(prompt) + len(response), width], on the CPU): its final ones, or
    the input states of the layers asked for side by side (``features_of``)."""

    responses: list[list[int]]
    hidden: list[torch.Tensor] | None = None


@torch.no_grad()
def generate(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int, *, sampler: Sampler = GREEDY,
             generator: torch.Generator | None = None, keep_hidden: bool = False,
             layer_ids: list[int] | None = None, hidden_dtype: torch.dtype = torch.float32,
             in_place: bool = True) -> Generated:
    """Continuations of a batch of prompts (token ids), left-padded, each cut after its end-of-sequence.

    A plain loop rather than ``generate``, on a cache that appends in place (``mtpkit.kv_cache``): a row
    that has finished leaves the batch (its cache rows are dropped), so the remaining rows stop paying for
    it. With ``keep_hidden`` the decoder's hidden states (of ``layer_ids``, or its final ones) are kept as they
    are computed, in ``hidden_dtype``, so training on these sequences needs no second forward: a finished row
    stays for one more step to have its last token's state computed too.
    """
    from transformers import DynamicCache

    tokenizer, device = backbone.tokenizer, backbone.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = eos_ids(backbone)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # appending in place: a concatenating cache (transformers' own, ``in_place=False``, kept to measure against)
    # spends most of a batched step copying itself
    cache = growing_cache() if in_place else DynamicCache()
    asked = {"output_hidden_states": True} if keep_hidden and layer_ids else {}
    outputs = backbone.hidden(input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True, **asked)
    hidden = outputs.last_hidden_state
    kept: list[list[torch.Tensor]] | None = None
    if keep_hidden:
        features = features_of(outputs, layer_ids).to("cpu", hidden_dtype)
        kept = [[features[row, width - len(ids):]] for row, ids in enumerate(prompts)]
    logits = backbone.logits(hidden[:, -1])
    responses: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts), device=device)  # which prompt each live batch row belongs to
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    position = positions[:, -1]
    for step in range(max_new_tokens):
        token = sampler.pick(logits, generator)
        for row, t in zip(rows.tolist(), token.tolist()):
            responses[row].append(t)
        done = torch.isin(token, stop) if stop.numel() else torch.zeros_like(token, dtype=torch.bool)
        if step + 1 == max_new_tokens:
            done = torch.ones_like(done)
        if not keep_hidden:  # a finished row leaves now; with keep_hidden after its last token is fed
            rows, token, mask, position = _keep_rows(cache, ~done, rows, token, mask, position)
            if rows.numel() == 0:
                break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = position + 1
        outputs = backbone.hidden(token[:, None], attention_mask=mask, position_ids=position[:, None],
                                  past_key_values=cache, use_cache=True, **asked)
        hidden = outputs.last_hidden_state
        if keep_hidden:
            for row, state in zip(rows.tolist(), features_of(outputs, layer_ids)[:, 0].to("cpu", hidden_dtype)):
                kept[row].append(state[None])
            live = ~done
            rows, token, mask, position, hidden = _keep_rows(cache, live, rows, token, mask, position, hidden)
            if rows.numel() == 0:
                break
        logits = backbone.logits(hidden[:, -1])
    # each response ends with its end-of-sequence token, if it reached one: the heads learn where answers stop
    return Generated(responses, None if kept is None else [torch.cat(parts) for parts in kept])


def _keep_rows(cache, live: torch.Tensor, *tensors: torch.Tensor):
    """Drop the batch rows that are not ``live`` from the cache and from each of ``tensors``."""
    if bool(live.all()):
        return tensors
    keep = live.nonzero().squeeze(1)
    if keep.numel():
        cache.batch_select_indices(keep)
    return tuple(t[keep] for t in tensors)


def eos_ids(backbone: Backbone) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the generation config's (one or several)."""
    ids = set()
    for value in (getattr(backbone.tokenizer, "eos_token_id", None),
                  getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
