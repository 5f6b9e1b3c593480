"""The frozen base's hidden states for training: kept from generation where the run just distilled its data,
computed for the rest, in memory up to a budget and on disk beyond it."""

import json

import pytest
import torch

from mtpkit import train
from mtpkit.attach import attach
from mtpkit.backbone import load_backbone
from mtpkit.data import TokenizedExample
from mtpkit.generation import generate
from mtpkit.train.hidden import StateStorage, compute_hidden, sequence_key

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

TOLERANCE = 1e-4  # incremental, left-padded decoding against one right-padded forward: float32 rounding only


@pytest.fixture
def prompt_data(tmp_path, monkeypatch):
    """Prompt-only records: finetune has the base write the responses (into a cache of this test's own)."""
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {word} twice, please."}) + "\n"
                            for word in ("cat", "dog", "bird", "fish", "red", "blue", "one", "two", "tree", "sun")))
    return path


@pytest.mark.parametrize("layer_ids", [None, [0, 1, 2]])
def test_states_kept_by_generation_equal_one_forward_over_the_sequence(tiny_backbone, layer_ids):
    prompts = [[1, 5, 9, 4, 7], [1, 8, 3], [1, 2, 6, 6, 11, 4, 3]]  # different lengths: left padding
    made = generate(tiny_backbone, prompts, 6, keep_hidden=True, layer_ids=layer_ids)
    sequences = [TokenizedExample(p + r, len(p)) for p, r in zip(prompts, made.responses)]
    store = compute_hidden(tiny_backbone, sequences, float("inf"), layer_ids=layer_ids)
    width = tiny_backbone.hidden_size * (len(layer_ids) if layer_ids else 1)
    for i, sequence in enumerate(sequences):
        assert made.hidden[i].shape == (len(sequence.ids), width)
        torch.testing.assert_close(made.hidden[i], store[i], atol=TOLERANCE, rtol=0)
    half = generate(tiny_backbone, prompts, 6, keep_hidden=True, layer_ids=layer_ids, hidden_dtype=torch.bfloat16)
    assert half.responses == made.responses and half.hidden[0].dtype == torch.bfloat16


def test_storage_keeps_what_fits_in_memory_and_the_rest_on_disk():
    states = [torch.randn(n, 3) for n in (4, 2, 5, 1)]
    storage = StateStorage(budget_bytes=6 * 3 * 4, width=3, dtype=torch.float32)  # the first two fit
    slots = [storage.put(s) for s in states]
    assert [isinstance(s, torch.Tensor) for s in slots] == [True, True, False, False]
    assert slots[2:] == [(0, 5), (15, 1)] and storage.on_disk
    assert storage.read(slots[3]).shape == (1, 3)  # read while the file is still growing
    more = storage.put(torch.ones(2, 3))
    for slot, expected in zip(slots + [more], states + [torch.ones(2, 3)]):
        assert torch.equal(storage.read(slot), expected)
    path = storage.path
    storage.close()
    assert not path.exists()
    assert sequence_key([1, 23]) != sequence_key([12, 3]) and sequence_key([1, 2]) == sequence_key([1, 2])


@pytest.mark.parametrize("style", ["sequential", "eagle3"])
def test_finetune_keeps_the_states_of_what_it_just_distilled(tiny_model_dirs, tmp_path, prompt_data, style):
    """The first run generates every response and runs the base over none of them; a second run, reading its
    responses from the distillation cache, computes them all, and both hold the same states."""
    heads_dir = tmp_path / "heads"
    attach(str(tiny_model_dirs["llama"]), style, 2, 1, heads_dir)
    settings = dict(data=[str(prompt_data)], batch_size=4, eval_fraction=0.2, eval_every=0, save_every=0,
                    max_steps=1, seed=0, distill_max_new_tokens=8, max_length=40,  # some sequences are cut
                    loss="ce" if style == "eagle3" else "distill")
    first = train.setup(heads_dir, train.FinetuneOptions(**settings))
    examples = first.data.train_examples + first.data.eval_examples
    assert first.data.distill_stats.generated == 10 and any(len(e.ids) == 40 for e in examples)
    assert first.data.hidden_sources() == {"computed": 0, "from_generation": len(examples)}
    again = train.setup(heads_dir, train.FinetuneOptions(**settings))
    assert again.data.distill_stats.cached == 10
    assert again.data.hidden_sources() == {"computed": len(examples), "from_generation": 0}
    assert again.data.train_examples == first.data.train_examples
    for name in ("train", "eval"):
        kept, computed = getattr(first.data, f"{name}_store"), getattr(again.data, f"{name}_store")
        for i in range(len(getattr(first.data, f"{name}_examples"))):
            torch.testing.assert_close(kept[i], computed[i], atol=TOLERANCE, rtol=0)
    train.train(first)
    assert train.save(first, 1.0)
    recorded = json.loads((heads_dir / "mtp_config.json").read_text())["training"]["hidden_states"]
    assert recorded == {"computed": 0, "from_generation": len(examples)}


def test_kept_states_spill_to_disk_past_the_budget(tiny_model_dirs, tmp_path, prompt_data):
    heads_dir = tmp_path / "heads"
    attach(str(tiny_model_dirs["llama"]), "sequential", 2, 1, heads_dir)
    run = train.setup(heads_dir, train.FinetuneOptions(
        data=[str(prompt_data)], batch_size=4, eval_fraction=0.2, eval_every=0, save_every=0, max_steps=1,
        seed=0, distill_max_new_tokens=8, hidden_cache_gb=0))
    assert run.data.train_store.on_disk and run.data.hidden_sources()["computed"] == 0
    backbone = load_backbone(str(tiny_model_dirs["llama"]))
    fresh = compute_hidden(backbone, run.data.train_examples, float("inf"))
    for i in range(len(run.data.train_examples)):
        torch.testing.assert_close(run.data.train_store[i], fresh[i], atol=TOLERANCE, rtol=0)
    run.data.train_store.close()
