"""The data engine: self-written prompts, kept hidden states, degenerate data, duplicates and diversity."""

import json

import pytest
import torch

from mtpkit import distill, generation, self_prompts
from mtpkit.errors import MtpkitError
from mtpkit.quality import deduplicate, degeneracy, distinct_ngrams, is_looping
from mtpkit.self_prompts import SelfPromptSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ----------------------------------------------------------------------------- quality checks


def test_loops_are_flagged_and_varied_text_is_not():
    assert is_looping([7] * 40)
    assert is_looping([1, 2, 3, 4, 5] * 10)
    assert is_looping(list(range(30)) + [8, 9] * 30)  # a varied start, then a loop: the tail decides
    assert not is_looping(list(range(100)))
    assert not is_looping([7] * 10)  # too short to call
    varied = [(i * 37) % 101 for i in range(80)]
    assert not is_looping(varied)


def test_degenerate_data_is_flagged_with_figures_and_normal_data_is_not():
    eos = {2}
    normal = [[(i * 31 + j * 7) % 97 + 3 for j in range(60)] + [2] for i in range(10)]
    report = degeneracy(normal, eos)
    assert (report.responses, report.empty, report.looping) == (10, 0, 0)
    assert not report.degenerate and report.warning() is None

    loops = [[5, 6] * 40 for _ in range(6)] + [[2]] * 2 + normal[:2]
    report = degeneracy(loops, eos)
    assert (report.responses, report.empty, report.looping) == (10, 2, 6)
    assert report.degenerate
    assert "6 of 10 responses (60%) are loops" in report.warning() and "2 (20%) are empty" in report.warning()


def test_deduplicate_drops_exact_and_near_duplicates_and_keeps_order():
    texts = [
        "How do I bake sourdough bread at home with a simple starter?",
        "how do I bake sourdough bread at home, with a simple starter",  # exact after normalising
        "How do I bake sourdough bread at home with a simple starter and rye flour?",  # near
        "Write a poem about the sea at night.",
        "Explain how a transistor works to a ten year old.",
    ]
    keep, exact, near = deduplicate(texts)
    assert keep == [0, 3, 4] and (exact, near) == (1, 1)
    assert deduplicate(texts, threshold=0.99) == ([0, 2, 3, 4], 1, 0)


def test_distinct_ngrams():
    assert distinct_ngrams(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_ngrams(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_ngrams([], 2) == 0.0


# ----------------------------------------------------------------------------- hidden states kept from generation


def test_hidden_states_kept_from_generation_equal_a_separate_forward(tiny_backbone):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23]]
    plain = generation.generate(tiny_backbone, prompts, max_new_tokens=9)
    # make one row finish early, so rows leave the batch at different steps
    tiny_backbone.model.generation_config.eos_token_id = plain.responses[1][2]
    kept = generation.generate(tiny_backbone, prompts, max_new_tokens=9, keep_hidden=True)
    expected_responses = generation.generate(tiny_backbone, prompts, max_new_tokens=9).responses
    assert kept.responses == expected_responses  # keeping states does not change what is generated
    assert len(kept.responses[1]) == 3 and len(kept.responses[0]) > 3
    for prompt, response, states in zip(prompts, kept.responses, kept.hidden):
        ids = torch.tensor([prompt + response])
        separate = tiny_backbone.hidden(ids).last_hidden_state[0]
        assert states.shape == separate.shape
        torch.testing.assert_close(states, separate, atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]])
    picks = {generation.Sampler(1.0, 0.7).pick(logits, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert picks == {0, 1}  # p = 0.63, 0.23, 0.14: token 1 completes the 0.7 nucleus; 2 and 3 are never drawn
    a = generation.Sampler(1.0, 1.0).pick(logits.expand(64, -1), torch.Generator().manual_seed(3))
    b = generation.Sampler(1.0, 1.0).pick(logits.expand(64, -1), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1
    assert generation.Sampler().pick(logits, None).item() == 0  # temperature 0: greedy


# ----------------------------------------------------------------------------- self-written prompts


class _Calls:
    def __init__(self, monkeypatch):
        self.batches = 0
        real = self_prompts.generate

        def counting(*args, **kwargs):
            self.batches += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(self_prompts, "generate", counting)


def test_self_prompts_are_written_from_the_user_turn_prefix(tiny_backbone):
    prefix = self_prompts.user_turn_prefix(tiny_backbone)
    assert prefix == "<|im_start|>user\n"  # tests/conftest.py's template, up to the user's content


def test_self_prompts_are_filtered_deduplicated_cached_and_resumed(tiny_backbone, monkeypatch):
    settings = SelfPromptSettings(temperature=1.5, top_p=1.0, seed=1, max_tokens=6)
    # the tiny random model never writes its end-of-turn token: let a quarter of the vocabulary end the turn
    tiny_backbone.model.generation_config.eos_token_id = list(range(40, 136))
    monkeypatch.setattr(self_prompts, "MIN_PROMPT_CHARS", 2)
    calls = _Calls(monkeypatch)
    texts, report = self_prompts.self_prompts(tiny_backbone, 5, settings, batch_size=16)
    assert len(texts) == 5 == report.kept and len(set(texts)) == 5
    assert report.sampled == 16 * calls.batches
    assert report.empty + report.too_long + report.looping + report.exact_duplicates + report.near_duplicates \
        + report.kept <= report.sampled
    assert report.too_long > 0  # 6 tokens without the end-of-turn token are dropped, not kept half-written
    assert 0 < report.distinct_1 <= 1

    first_calls = calls.batches
    again, _ = self_prompts.self_prompts(tiny_backbone, 5, settings, batch_size=16)
    assert again == texts and calls.batches == first_calls  # all from the cache

    # an interrupted run: the last batch's line is torn; it is drawn again with the same seed
    path = self_prompts.cache_file(tiny_backbone, settings)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    resumed, _ = self_prompts.self_prompts(tiny_backbone, 5, settings, batch_size=16)
    assert resumed == texts and calls.batches == first_calls + 1
    assert [json.loads(line)["batch"] for line in path.read_text().splitlines()] == list(range(len(lines)))

    other, _ = self_prompts.self_prompts(tiny_backbone, 5, SelfPromptSettings(temperature=1.5, top_p=1.0, seed=2,
                                                                              max_tokens=6), batch_size=16)
    assert other != texts  # another seed, another cache entry


def test_self_prompts_refuse_a_model_without_a_chat_template(tiny_backbone, monkeypatch):
    monkeypatch.setattr(tiny_backbone.tokenizer, "chat_template", None)
    with pytest.raises(MtpkitError, match="no chat template.*text data"):
        self_prompts.self_prompts(tiny_backbone, 3)


def test_self_prompts_give_up_with_one_line_when_nothing_usable_comes(tiny_backbone, monkeypatch):
    for module in (generation, self_prompts):  # no turn ever ends: everything is over-long
        monkeypatch.setattr(module, "eos_ids", lambda backbone: set())
    with pytest.raises(MtpkitError, match="only 0 usable prompts"):
        self_prompts.self_prompts(tiny_backbone, 3, SelfPromptSettings(max_tokens=4), batch_size=4)


def test_distillation_bench_times_every_configuration_on_the_same_prompts(tiny_backbone):
    from mtpkit.distill_bench import Config, compare, native_bfloat16

    configs = [Config("two passes", 2, False, False), Config("kept", 3, True, True)]
    result = compare(tiny_backbone, [[5, 6, 7], [8, 9], [10, 11, 12, 13]], 4, configs, rounds=2)
    assert set(result["tokens_per_second"]) == {"two passes", "kept"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in result["samples"].values())
    assert result["speedup"]["two passes"] == 1.0
    native, evidence = native_bfloat16(torch.device("cpu"))
    assert isinstance(native, bool) and evidence


def test_distill_reports_degenerate_responses(tiny_backbone):
    from mtpkit.data import Example

    examples = [Example("prompt", [{"role": "user", "content": f"Count to {i}."}]) for i in range(3)]
    responses, stats = distill.distill(tiny_backbone, examples, max_new_tokens=40, batch_size=3)
    expected = degeneracy(responses, generation.eos_ids(tiny_backbone))
    assert stats.degeneracy == expected and stats.degeneracy.responses == 3
    # a random tiny model repeats itself: the figures say so
    assert stats.degeneracy.looping == sum(is_looping(r) for r in responses)
