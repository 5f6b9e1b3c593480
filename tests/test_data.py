"""Training data: every record shape in every file format, chat templates, loss masks, the distillation cache."""

import json

import pytest
import torch

from mtpkit import distill as distill_module
from mtpkit.data import BUILTIN_PROMPTS, Example, load_data, to_example, tokenize
from mtpkit.errors import MtpkitError
from mtpkit.prompts import load_builtin

RECORDS = {
    "chat": {"messages": [{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": "The capital of France is Paris."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Translate to French: good morning"},
                                   {"from": "gpt", "value": "Bonjour"}]},
    "instruction": {"instruction": "Summarize the following text.", "input": "The quick brown fox.", "output": "A fox."},
    "qa": {"question": "What is 2 + 2?", "answer": "4"},
    "text": {"text": "def add(a, b):\n    return a + b\n"},
    "prompt": {"prompt": "Write a Python function that returns the sum of a list."},
    "turns": {"turns": ["Extract all names from this email.", "Now the dates."]},
    "question-only": {"question": "How far does a train go in 2 hours at 60 mph?"},
}
EXPECTED_SHAPE = {"chat": "chat", "sharegpt": "chat", "instruction": "instruction", "qa": "qa", "text": "text",
                  "prompt": "prompt", "turns": "prompt", "question-only": "prompt"}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_record_shape_is_recognised(name):
    example = to_example(RECORDS[name])
    assert example is not None and example.shape == EXPECTED_SHAPE[name]
    assert example.needs_response == (EXPECTED_SHAPE[name] == "prompt")


def test_sharegpt_roles_and_instruction_input_are_normalised():
    chat = to_example(RECORDS["sharegpt"])
    assert chat.messages == [{"role": "user", "content": "Translate to French: good morning"}]
    assert chat.response == "Bonjour"
    instruction = to_example(RECORDS["instruction"])
    assert instruction.messages[0]["content"] == "Summarize the following text.\n\nThe quick brown fox."
    assert to_example(RECORDS["turns"]).messages[0]["content"] == "Extract all names from this email."
    assert to_example({"unrelated": 1}) is None


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_shape_loads_from_every_structured_format(tmp_path, suffix, name):
    path = _write(tmp_path / f"data{suffix}", [RECORDS[name]] * 3)
    dataset = load_data([str(path)], eval_fraction=0, cache_dir=tmp_path / "cache")
    assert dataset.shapes == {EXPECTED_SHAPE[name]: 3}
    assert len(dataset.train) == 3 and dataset.eval == []


def test_csv_and_txt(tmp_path):
    csv_path = _write(tmp_path / "qa.csv", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(4)])
    assert load_data([str(csv_path)], eval_fraction=0, cache_dir=tmp_path / "c").shapes == {"qa": 4}
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line of text\nsecond line of text\n")
    dataset = load_data([str(txt)], eval_fraction=0, cache_dir=tmp_path / "c")
    assert dataset.shapes == {"text": 2}
    assert sorted(e.text for e in dataset.train) == ["first line of text", "second line of text"]


def test_sources_combine_and_split_deterministically(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    b = _write(tmp_path / "b.jsonl", [{"text": f"t{i}"} for i in range(10)])
    first = load_data([str(a), str(b)], eval_fraction=0.25, seed=3, cache_dir=tmp_path / "c")
    again = load_data([str(a), str(b)], eval_fraction=0.25, seed=3, cache_dir=tmp_path / "c")
    assert (len(first.train), len(first.eval)) == (15, 5)
    assert [e.messages or e.text for e in first.eval] == [e.messages or e.text for e in again.eval]
    assert [r.shapes for r in first.sources] == [{"qa": 10}, {"text": 10}]
    assert len(load_data([str(a)], max_examples=4, eval_fraction=0, cache_dir=tmp_path / "c").train) == 4


def test_builtin_prompts_are_the_train_split_only():
    dataset = load_data([BUILTIN_PROMPTS], eval_fraction=0)
    heldout = {r["prompt"] for r in load_builtin("heldout")}
    prompts = {e.messages[0]["content"] for e in dataset.train}
    assert len(dataset.train) == len(load_builtin("train")) == 384
    assert dataset.shapes == {"prompt": 384}
    assert not prompts & heldout


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ('{"foo": 1}\n{"foo": 2}\n', "no usable records"),
    ("this is { not json\n", "cannot read"),
])
def test_bad_files_fail_with_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MtpkitError, match=message):
        load_data([str(path)], cache_dir=tmp_path / "c")


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(MtpkitError, match="no such file"):
        load_data([str(tmp_path / "missing.jsonl")])
    with pytest.raises(MtpkitError, match="choose builtin:prompts, builtin:gsm8k, builtin:gpteacher"):
        load_data(["builtin:nothing"])
    with pytest.raises(MtpkitError, match="no training data"):
        load_data([])


def test_chat_records_use_the_chat_template_and_mask_the_prompt(tiny_tokenizer):
    example = to_example(RECORDS["chat"])
    tokenized = tokenize(tiny_tokenizer, example, max_length=512)
    text = tiny_tokenizer.decode(tokenized.ids)
    assert text.startswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>")
    prompt = tiny_tokenizer.decode(tokenized.ids[: tokenized.loss_start])
    response = tiny_tokenizer.decode(tokenized.ids[tokenized.loss_start:])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert response.startswith("The capital of France is Paris.<|im_end|>")
    plain = tokenize(tiny_tokenizer, Example("text", text="The quick brown fox."), max_length=512)
    assert plain.loss_start == 0 and tiny_tokenizer.decode(plain.ids) == "The quick brown fox."
    cut = tokenize(tiny_tokenizer, example, max_length=tokenized.loss_start + 3)
    assert cut.ids == tokenized.ids[: tokenized.loss_start + 3]
    assert tokenize(tiny_tokenizer, example, max_length=tokenized.loss_start) is None  # no response left


def test_self_distillation_is_cached_and_resumable(tiny_backbone, monkeypatch):
    examples = [Example("prompt", [{"role": "user", "content": f"What is {i} plus {i}?"}]) for i in range(5)]
    calls = []
    real = distill_module.generate_responses

    def counting_generate(backbone, prompts, max_new_tokens, keep=None):
        calls.append(len(prompts))
        return real(backbone, prompts, max_new_tokens, keep)

    monkeypatch.setattr(distill_module, "generate_responses", counting_generate)
    first, stats = distill_module.distill(tiny_backbone, examples, max_new_tokens=6, batch_size=2)
    assert calls == [2, 2, 1] and (stats.generated, stats.cached) == (5, 0)
    assert all(1 <= len(r) <= 6 for r in first)

    again, stats = distill_module.distill(tiny_backbone, examples, max_new_tokens=6, batch_size=2)
    assert calls == [2, 2, 1] and (stats.generated, stats.cached) == (0, 5)
    assert again == first

    # an interrupted run: the last batch's line is torn, so only that prompt is generated again
    path = distill_module.cache_file(tiny_backbone, 6)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    resumed, stats = distill_module.distill(tiny_backbone, examples, max_new_tokens=6, batch_size=2)
    assert (stats.generated, stats.cached) == (1, 4) and calls[-1] == 1
    assert resumed == first

    # other settings are another cache entry
    _, stats = distill_module.distill(tiny_backbone, examples[:2], max_new_tokens=4, batch_size=2)
    assert stats.generated == 2


def test_greedy_generation_matches_unbatched(tiny_backbone):
    """Left padding must not change what the base says: batched greedy == one prompt at a time."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    batched = distill_module.generate_responses(tiny_backbone, prompts, max_new_tokens=5)
    for prompt, response in zip(prompts, batched):
        assert distill_module.generate_responses(tiny_backbone, [prompt], max_new_tokens=5) == [response]


def test_greedy_generation_matches_transformers_generate(tiny_backbone):
    prompt = [5, 6, 7, 8, 9, 10, 11]
    expected = tiny_backbone.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert distill_module.generate_responses(tiny_backbone, [prompt], max_new_tokens=8) == [expected]


def test_a_finished_row_leaves_the_batch_and_the_others_go_on(tiny_backbone, monkeypatch):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    alone = [distill_module.generate_responses(tiny_backbone, [p], max_new_tokens=8)[0] for p in prompts]
    # make the first token of prompt 0's answer that prompt 1's answer never says the end-of-sequence token
    cut = next(i for i, t in enumerate(alone[0]) if i > 0 and t not in alone[1] and t not in alone[0][:i])
    monkeypatch.setattr(tiny_backbone.model.generation_config, "eos_token_id", alone[0][cut])
    first, second = distill_module.generate_responses(tiny_backbone, prompts, max_new_tokens=8)
    assert first == alone[0][: cut + 1]
    assert second == alone[1]


def test_builtin_gpteacher_reads_the_shipped_instructions():
    dataset = load_data(["builtin:gpteacher"], eval_fraction=0.0, shuffle=False)
    assert len(dataset.train) == 2000 and dataset.shapes == {"prompt": 2000}
    assert dataset.train[0].messages[0]["content"].startswith("Write a C++ program that calculates the area of a rectangle")
    assert not {r["prompt"] for r in load_builtin("heldout")} & {e.messages[0]["content"] for e in dataset.train}


def test_builtin_gsm8k_reads_the_shipped_training_questions():
    dataset = load_data(["builtin:gsm8k"], eval_fraction=0.0, shuffle=False)
    assert len(dataset.train) == 1200 and dataset.shapes == {"prompt": 1200}
    assert dataset.train[0].messages[0]["content"].startswith("Natalia sold clips to 48 of her friends")
