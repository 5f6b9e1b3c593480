"""Sequential heads trained on their own drafts (``--teacher-forcing``) and the total-variation loss (``--loss tv``)."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from typer.testing import CliRunner

from mtpkit import targets, train
from mtpkit.cli.app import app
from mtpkit.config import CARD_NAME, WEIGHTS_NAME, HeadsConfig
from mtpkit.errors import MtpkitError
from mtpkit.train import losses

from tests.test_train import make_heads as make_train_heads, options as train_options, text_data  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_heads(tiny_model_dirs, tmp_path, style="sequential", num_heads=3, name="heads"):
    return make_train_heads(tiny_model_dirs, tmp_path, style, num_heads, name)


def options(data, **kw):
    return train_options(data, **{"max_steps": 4, "train_vocab": "full", "loss": "ce", **kw})


def random_run(tiny_model_dirs, tmp_path, text_data, **kw):
    """A run on sequential heads with random (not identity) weights, so each head drafts something of its own."""
    run = train.setup(make_heads(tiny_model_dirs, tmp_path), options(text_data, **kw))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in run.heads.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    batch = train.collate(run.data.train_examples, [0, 1, 2, 3], run.data.train_store, torch.device("cpu"))
    return run, batch


def head_grads(heads):
    return {name: p.grad.clone() for name, p in heads.named_parameters() if p.grad is not None}


def test_full_teacher_forcing_is_the_teacher_forced_loss_and_gradient(tiny_model_dirs, tmp_path, text_data):
    """R = 1: each head's loss and every gradient are those of the heads fed the true tokens, written out here."""
    run, batch = random_run(tiny_model_dirs, tmp_path, text_data)
    heads, weights = run.heads, [1.0, 0.5, 0.25]
    got = train.backward_heads(run.model, batch, weights, "ce", run.accelerator, 1.0, False, None,
                               teacher_forcing=1.0, seed=7)
    got_grads = head_grads(heads)
    heads.zero_grad(set_to_none=True)

    conditioning = [targets.conditioning_tokens(batch.ids, k) for k in (1, 2, 3)]
    states = heads.teacher_forced_states(batch.hidden, conditioning)
    total, expected = 0.0, []
    for k, state in enumerate(states, start=1):
        labels, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
        loss = F.cross_entropy(heads.logits(k, state[valid]), labels[valid])
        expected.append(loss.item())
        total = total + weights[k - 1] * loss
    total.backward()
    assert got == pytest.approx(expected, rel=1e-5)
    reference = head_grads(heads)
    assert reference.keys() == got_grads.keys() and len(reference) > 3
    for name in reference:
        torch.testing.assert_close(got_grads[name], reference[name], rtol=1e-4, atol=1e-6)

    heads.zero_grad(set_to_none=True)  # below 1 the later heads' losses change, head 1's never does
    drafted = train.backward_heads(run.model, batch, weights, "ce", run.accelerator, 1.0, False, None,
                                   teacher_forcing=0.0, seed=7)
    assert drafted[0] == pytest.approx(expected[0], rel=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(drafted[1:], expected[1:]))


@pytest.mark.parametrize("train_vocab", ["full", "data"])
def test_a_drafted_position_reads_the_previous_heads_argmax(tiny_model_dirs, tmp_path, text_data, monkeypatch,
                                                            train_vocab):
    run, batch = random_run(tiny_model_dirs, tmp_path, text_data, train_vocab=train_vocab)
    heads, vocab = run.heads, run.data.vocab
    read = {}  # head k -> the token ids it was conditioned on
    real_state = heads.state

    def recording_state(k, hidden, prev_state=None, token=None):
        read[k] = token.clone()
        return real_state(k, hidden, prev_state, token)

    monkeypatch.setattr(heads, "state", recording_state)
    train.backward_heads(run.model, batch, [1.0, 1.0, 1.0], "ce", run.accelerator, 1.0, False, vocab,
                         teacher_forcing=0.5, seed=11)
    monkeypatch.undo()

    drafted = losses.drafted_positions(batch.ids, 3, 0.5, seed=11)
    assert drafted[0] is None and 0.35 < drafted[1].float().mean() < 0.65
    assert torch.equal(read[1], targets.conditioning_tokens(batch.ids, 1))  # head 1 reads the base's own token
    with torch.no_grad():
        prev = batch.hidden
        for k in (1, 2, 3):
            true = targets.conditioning_tokens(batch.ids, k)
            if k > 1:
                logits = heads.logits(k - 1, prev)
                argmax = logits.argmax(-1) if vocab is None else vocab.ids[logits[..., vocab.ids].argmax(-1)]
                where = drafted[k - 1]
                assert torch.equal(read[k][where], argmax[where])
                assert torch.equal(read[k][~where], true[~where])
                assert (argmax[where] != true[where]).float().mean() > 0.3  # the drafts are not the true tokens
            prev = heads.state(k, batch.hidden, prev, read[k])


def test_drafted_positions_are_seeded():
    ids = torch.zeros((4, 50), dtype=torch.long)
    assert losses.drafted_positions(ids, 3, 1.0, seed=3) is None
    first, again, other = (losses.drafted_positions(ids, 3, 0.25, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:]))
    assert not torch.equal(first[1], other[1])
    assert 0.65 < first[1].float().mean() < 0.85  # 1 - R of the positions read a draft
    assert all(torch.equal(p, q) for p, q in zip(losses.drafted_positions(ids, 3, 0.0, seed=3)[1:],
                                                  [torch.ones_like(ids, dtype=torch.bool)] * 2))
    seeds = {losses.draft_seed(0, step, micro, process) for step in range(3) for micro in range(2) for process in range(2)}
    assert len(seeds) == 12 and losses.draft_seed(0, 1, 1, 0) == losses.draft_seed(0, 1, 1, 0)


def test_teacher_forcing_runs_are_reproducible_and_recorded(tiny_model_dirs, tmp_path, text_data):
    fresh = make_heads(tiny_model_dirs, tmp_path, name="fresh")
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(fresh, first)
    shutil.copytree(fresh, second)
    train.finetune(first, options(text_data, teacher_forcing=0.5))
    train.finetune(second, options(text_data, teacher_forcing=0.5))
    a, b = load_file(str(first / WEIGHTS_NAME)), load_file(str(second / WEIGHTS_NAME))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert HeadsConfig.read(first).training["teacher_forcing"] == 0.5
    assert "teacher forcing 0.5" in (first / CARD_NAME).read_text()


def test_teacher_forcing_below_one_is_refused_for_other_styles_and_out_of_range(tiny_model_dirs, tmp_path, text_data):
    for style in ("medusa", "eagle"):
        heads_dir = make_heads(tiny_model_dirs, tmp_path, style, name=style)
        with pytest.raises(MtpkitError, match=f"sequential heads only .*holds {style} heads"):
            train.setup(heads_dir, options(text_data, teacher_forcing=0.5))
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(MtpkitError, match="--teacher-forcing"):
            options(text_data, teacher_forcing=bad)
    result = CliRunner().invoke(app, ["finetune", str(tmp_path / "medusa"), "--data", str(text_data),
                                      "--teacher-forcing", "0.5"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("error:") == 1 and result.output.lstrip().startswith("error:")
    assert "--teacher-forcing below 1 trains sequential heads only" in " ".join(result.output.split())


def test_total_variation_matches_a_hand_computed_value():
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, -math.inf]])  # p = (.25, .5, .25), (.5, .5, 0)
    teacher = torch.tensor([[0.5, 0.25, 0.25], [0.9, 0.1, 0.0]]).log()
    # row 1: (|.25-.5| + |.5-.25| + 0) / 2 = .25; row 2: (.4 + .4 + 0) / 2 = .4
    assert float(losses.total_variation(logits, teacher)) == pytest.approx(0.65, abs=1e-6)
    p, q = logits.softmax(-1), teacher.exp()
    assert float(losses.total_variation(logits, teacher)) == pytest.approx(float((1 - torch.minimum(p, q).sum(-1)).sum()))


def test_total_variation_gradient_raises_the_acceptance_rate():
    """A toy head (free logits) trained on TV against a fixed base: the chance that a draft sampled from it is
    accepted, sum_v min(p, q), rises step by step, and its greedy draft becomes the base's."""
    generator = torch.Generator().manual_seed(0)
    teacher = (torch.randn(16, 50, generator=generator) * 2).log_softmax(-1)
    logits = torch.randn(16, 50, generator=generator).requires_grad_()

    def acceptance():
        return float(torch.minimum(logits.detach().softmax(-1), teacher.exp()).sum(-1).mean())

    rates = [acceptance()]
    for _ in range(250):
        losses.total_variation(logits, teacher).backward()
        with torch.no_grad():
            logits -= 2.0 * logits.grad
        logits.grad = None
        rates.append(acceptance())
    assert all(b > a for a, b in zip(rates[:30], rates[1:31])), rates  # every early step; later ones settle
    assert rates[0] < 0.3 and rates[-1] > 0.85
    assert (logits.argmax(-1) == teacher.argmax(-1)).float().mean() > 0.9


def test_tv_loss_in_training_is_the_total_variation_to_the_base_at_t_plus_k(tiny_model_dirs, tmp_path, text_data):
    """Fresh Medusa heads pass h_t through, so head k's tv loss is the mean over its rows of
    TV(base(h_t), base(h_{t+k})), both softmaxes over the training vocabulary."""
    run = train.setup(make_heads(tiny_model_dirs, tmp_path, "medusa"), options(text_data, train_vocab="data"))
    batch = train.collate(run.data.train_examples, [0, 1, 2], run.data.train_store, torch.device("cpu"))
    got = train.backward_heads(run.model, batch, [1.0, 1.0, 1.0], "tv", run.accelerator, 1.0, False, run.data.vocab)
    flat = batch.hidden.reshape(-1, batch.hidden.shape[-1])
    weight = run.heads.backbone.model.get_output_embeddings().weight[run.data.vocab.ids]
    probs = torch.softmax(flat @ weight.T, -1)
    for k in (1, 2, 3):
        _, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
        rows, at_target = train.head_rows(valid, k)
        expected = 0.5 * (probs[rows] - probs[at_target]).abs().sum(-1).mean()
        assert expected > 0.01
        assert got[k - 1] == pytest.approx(float(expected), rel=1e-4)
