"""The Python API: ``mtpkit.load``, ``spec.generate`` and transformers' ``generate(custom_generate=...)``."""

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

import mtpkit
import mtpkit.api as api
from mtpkit.attach import attach
from mtpkit.checkpoint import open_heads, save_heads
from mtpkit.decoding import encode_prompt
from mtpkit.errors import MtpkitError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "def add(a, b):", "What is the capital of France?"]


@pytest.fixture(scope="module")
def heads_dir(tiny_model_dirs, tmp_path_factory):
    """Sequential heads with random weights: their drafts are mostly wrong, so rejections and rollbacks happen."""
    path = tmp_path_factory.mktemp("heads")
    attach(str(tiny_model_dirs["llama"]), "sequential", 3, 1, path)
    heads = open_heads(path, device="cpu")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    save_heads(heads, path)
    return path


@pytest.fixture(scope="module")
def spec(heads_dir):
    return mtpkit.load(heads_dir)  # hybrid: the heads, prompt lookup and the suffix index of its own outputs


@pytest.fixture(scope="module")
def chain_spec(heads_dir):
    return mtpkit.load(heads_dir, draft="heads", tree="chain")  # every step verifies the heads' 3 drafts


def ids_of(spec, text):
    return spec.tokenizer(text, return_tensors="pt").input_ids


def test_import_mtpkit_loads_no_torch():
    code = "import mtpkit, sys; assert 'torch' not in sys.modules; assert callable(mtpkit.load)"
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "torch" in subprocess.run([sys.executable, "-c", "import mtpkit, sys; mtpkit.load; print(sorted(sys.modules))"],
                                     cwd=ROOT, capture_output=True, text=True).stdout


def test_load_gives_the_model_and_tokenizer(spec):
    from transformers import PreTrainedModel

    assert isinstance(spec.model, PreTrainedModel) and spec.model is spec.heads.backbone.model
    assert spec.tokenizer("hello").input_ids


def test_load_with_fast_kernels_runs_the_measured_layouts_and_decodes_alike(heads_dir, spec):
    from mtpkit.kernels import cached_measurement, kernel_plan, uses_fast_kernels

    fast = mtpkit.load(heads_dir, fast_kernels=True)
    assert uses_fast_kernels(fast.model) and not uses_fast_kernels(spec.model)
    assert kernel_plan(fast.model) == cached_measurement(fast.heads.backbone).plan  # what generate runs on
    ids = ids_of(spec, PROMPTS[1])
    assert fast.decode(ids, 12).tokens == spec.decode(ids, 12).tokens


def recorded_decodes(monkeypatch) -> list:
    """The results of every mtpkit decode from now on (custom_generate runs through ``Speculator.decode``)."""
    seen = []
    decode = api.Speculator.decode

    def record(self, *args, **kwargs):
        seen.append(decode(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(api.Speculator, "decode", record)
    return seen


@pytest.mark.parametrize("which", ["spec", "chain_spec"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_custom_generate_equals_plain_greedy(request, which, prompt, monkeypatch):
    spec = request.getfixturevalue(which)
    seen = recorded_decodes(monkeypatch)
    ids = ids_of(spec, prompt)
    for max_new_tokens in (16, 40):  # the second run's suffix index drafts the first's output: long acceptances
        plain = spec.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        ours = spec.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   custom_generate=spec.custom_generate)
        assert ours.dtype == torch.long and ours.shape[0] == 1
        assert ours.tolist() == plain.tolist()
    assert len(seen) == 2 and len(seen[1].tokens) == plain.shape[1] - ids.shape[1]  # mtpkit's decoder ran
    if which == "spec":
        assert max(seen[1].accepted_lengths) > 1  # it accepted drafts: speculation, not one token per step
    else:
        assert seen[1].forward_passes == len(seen[1].tokens)  # its random heads' drafts were all rejected


class Collect(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.pieces, self.ended = [], 0

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        self.ended += stream_end


def test_streamer_receives_the_same_text(spec):
    ids = ids_of(spec, PROMPTS[1])
    plain, ours = Collect(spec.tokenizer), Collect(spec.tokenizer)
    spec.model.generate(ids, max_new_tokens=30, do_sample=False, streamer=plain)
    spec.model.generate(ids, max_new_tokens=30, do_sample=False, streamer=ours, custom_generate=spec.custom_generate)
    assert "".join(plain.pieces) and "".join(ours.pieces) == "".join(plain.pieces)
    assert ours.ended == plain.ended == 1


def test_eos_token_id_and_max_new_tokens_are_honoured(spec):
    ids = ids_of(spec, PROMPTS[0])
    plain = spec.model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = plain[6]  # a token greedy decoding reaches: generation must end right on it
    stop_at = plain.index(eos) + 1
    for max_new_tokens in (30, 3):
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
        expected = spec.model.generate(ids, **kwargs)
        ours = spec.model.generate(ids, custom_generate=spec.custom_generate, **kwargs)
        assert ours.tolist() == expected.tolist()
        assert ours.shape[1] == ids.shape[1] + min(stop_at, max_new_tokens)


def test_stopping_criteria_are_asked_after_every_token(spec):
    ids = ids_of(spec, PROMPTS[2])

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 11, dtype=torch.bool)

    ours = spec.model.generate(ids, max_new_tokens=30, stopping_criteria=StoppingCriteriaList([AtLength()]),
                               custom_generate=spec.custom_generate)
    assert ours.shape[1] == ids.shape[1] + 11


def test_a_batch_of_two_is_refused_in_one_line(spec):
    ids = ids_of(spec, PROMPTS[0]).repeat(2, 1)
    with pytest.raises(MtpkitError) as caught:
        spec.model.generate(ids, max_new_tokens=5, custom_generate=spec.custom_generate)
    assert "one prompt at a time" in str(caught.value) and "\n" not in str(caught.value)


def test_an_unsupported_logits_processor_is_refused(spec):
    with pytest.raises(MtpkitError, match="RepetitionPenaltyLogitsProcessor"):
        spec.model.generate(ids_of(spec, PROMPTS[0]), max_new_tokens=5, repetition_penalty=1.3,
                            custom_generate=spec.custom_generate)


def test_spec_generate_text_and_ids_round_trip(spec):
    prompt = PROMPTS[2]
    chat_ids = encode_prompt(spec.tokenizer, prompt, chat=True)  # as `mtpkit generate` puts it to the base
    plain = spec.model.generate(chat_ids, max_new_tokens=20, do_sample=False)[0, chat_ids.shape[1]:]
    text = spec.generate(prompt, max_new_tokens=20)
    assert isinstance(text, str) and text == spec.tokenizer.decode(plain, skip_special_tokens=True)
    eos = set(spec.heads.backbone.model.generation_config.eos_token_id if isinstance(
        spec.model.generation_config.eos_token_id, list) else [spec.model.generation_config.eos_token_id])
    tokens = spec.generate(chat_ids[0].tolist(), max_new_tokens=20)
    assert tokens == plain.tolist()[:len(tokens)] and (len(tokens) == 20 or tokens[-1] in eos)
    assert spec.generate(prompt, max_new_tokens=20, stop="zzz-never") == text


# ----------------------------------------------------------------------------- sampling


def _exact_two_tokens(model, ids, top_k, eos):
    """P(first two new tokens) of the base under top-k sampling at temperature 1, computed exactly."""
    def top(sequence):
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0, -1]
        values = torch.topk(logits, top_k)
        return dict(zip(values.indices.tolist(), torch.softmax(values.values, -1).tolist()))

    joint = {}
    for x1, p1 in top(ids).items():
        if x1 == eos:
            joint[(x1,)] = p1
            continue
        for x2, p2 in top(torch.cat([ids, torch.tensor([[x1]])], dim=1)).items():
            joint[(x1, x2)] = p1 * p2
    return joint


def _total_variation(spec, ids, exact, samples):
    torch.manual_seed(0)
    counts = Counter(
        tuple(spec.model.generate(ids, max_new_tokens=2, do_sample=True, top_k=3,
                                  custom_generate=spec.custom_generate)[0, ids.shape[1]:].tolist())
        for _ in range(samples))
    return 0.5 * sum(abs(counts[o] / samples - exact.get(o, 0.0)) for o in set(exact) | set(counts))


@pytest.mark.parametrize("which", ["spec", "chain_spec"])
def test_sampling_stays_within_the_base_distribution(request, which, monkeypatch):
    spec = request.getfixturevalue(which)
    ids = ids_of(spec, PROMPTS[0])
    exact = _exact_two_tokens(spec.model, ids, top_k=3, eos=spec.model.generation_config.eos_token_id)
    assert _total_variation(spec, ids, exact, 600) < 0.08

    # the test can fail: a custom_generate that drops generate's top_k samples another distribution ...
    settings = api._sampling_settings
    monkeypatch.setattr(api, "_sampling_settings",
                        lambda processors, do_sample: {k: v for k, v in settings(processors, do_sample).items()
                                                       if k != "top_k"})
    assert _total_variation(spec, ids, exact, 150) > 0.2
    monkeypatch.setattr(api, "_sampling_settings", settings)
    if which == "chain_spec":  # ... and so does a sampler that accepts every draft it is shown
        import mtpkit.decoding.acceptance as decoding

        monkeypatch.setattr(decoding, "rejection_walk", lambda children, probs, uniform: ([0, 1], []))
        assert _total_variation(spec, ids, exact, 150) > 0.2


# ----------------------------------------------------------------------------- the default model


SHIPPED = ROOT / "mtpkit" / "trained" / "smollm2-135m-sequential"


@pytest.mark.slow
def test_custom_generate_equals_plain_greedy_on_the_default_model(monkeypatch):
    spec = mtpkit.load(SHIPPED)
    seen = recorded_decodes(monkeypatch)
    for prompt in ["Write a haiku about caches.", "What is 17 * 23? Explain.", "List three uses of Python."]:
        ids = encode_prompt(spec.tokenizer, prompt, chat=True)
        plain = spec.model.generate(ids, max_new_tokens=64, do_sample=False)
        ours = spec.model.generate(ids, max_new_tokens=64, do_sample=False, custom_generate=spec.custom_generate)
        assert ours.tolist() == plain.tolist(), prompt
    accepted = sum(len(r.tokens) for r in seen) / sum(r.forward_passes for r in seen)
    assert accepted > 1.3  # the trained heads' drafts were accepted: it ran speculatively


@pytest.mark.slow
def test_readme_python_snippet_runs(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert isinstance(namespace["text"], str) and namespace["text"]
    assert namespace["output"].shape[0] == 1 and namespace["output"].shape[1] > namespace["input_ids"].shape[1]
