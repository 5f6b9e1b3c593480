"""The in-place KV cache against transformers' concatenating one: the same keys and values after any
sequence of appends, crops, row selections and repeats, and the same generations."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from mtpkit import generation
from mtpkit.kv_cache import GrowingLayer, growing_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_growing_layer_equals_the_dynamic_layer_through_every_operation():
    generator = torch.Generator().manual_seed(0)

    def states(rows, length):
        return torch.randn(rows, 2, length, 4, generator=generator), torch.randn(rows, 2, length, 4, generator=generator)

    growing, dynamic = GrowingLayer(), DynamicLayer()
    operations = [("update", 3, 5)] + [("update", 3, 1)] * 70 + [("crop", -4), ("update", 3, 2),
                                                                    ("select", [2, 0, 1]), ("update", 3, 1),
                                                                    ("select", [0, 2]), ("update", 2, 1),
                                                                    ("repeat", 2), ("update", 4, 3), ("crop", -1),
                                                                    ("update", 4, 1)]
    buffers = set()
    for operation in operations:
        if operation[0] == "update":
            keys, values = states(operation[1], operation[2])
            out_g, out_d = growing.update(keys, values), dynamic.update(keys, values)
            assert torch.equal(out_g[0], out_d[0]) and torch.equal(out_g[1], out_d[1])
            buffers.add(growing._buffers[0].data_ptr())
        elif operation[0] == "crop":
            growing.crop(operation[1]), dynamic.crop(operation[1])
        elif operation[0] == "select":
            index = torch.tensor(operation[1])
            growing.batch_select_indices(index), dynamic.batch_select_indices(index)
        else:
            growing.batch_repeat_interleave(operation[1]), dynamic.batch_repeat_interleave(operation[1])
        assert growing.get_seq_length() == dynamic.get_seq_length()
        assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values)
    # 78 positions grown geometrically from 5: a handful of buffers, not one per token
    assert growing.get_seq_length() == 78 and len(buffers) <= 7


def test_generation_on_the_growing_cache_equals_each_prompt_alone(tiny_backbone):
    """Batched, left-padded generation (rows leaving as they finish) writes what each prompt gets alone, and the
    cache it runs on is the growing one."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23]]
    batched = generation.generate(tiny_backbone, prompts, max_new_tokens=80).responses
    alone = [generation.generate(tiny_backbone, [p], max_new_tokens=80).responses[0] for p in prompts]
    assert batched == alone and max(len(r) for r in batched) > 64  # the buffers grew several times
    assert all(type(layer) is GrowingLayer for layer in _cache_of(tiny_backbone, prompts[0]).layers)


def _cache_of(backbone, prompt):
    cache = growing_cache()
    backbone.hidden(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    return cache
