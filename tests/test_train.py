"""Training the heads: loss goes down, only heads move, resume == uninterrupted, NaN stops, the CLI."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mtpkit import targets, train
from mtpkit.train import recipe
from mtpkit.attach import attach
from mtpkit.backbone import load_backbone
from mtpkit.checkpoint import open_heads
from mtpkit.cli.app import app
from mtpkit.config import CHECKPOINT_DIR, CONFIG_NAME, LORA_DIR, METRICS_NAME, WEIGHTS_NAME, HeadsConfig
from mtpkit.errors import MtpkitError
from tests.conftest import CORPUS

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def text_data(tmp_path):
    """Sentences the tiny tokenizer knows, repeated: learnable in a few steps."""
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS * 2))
    return path


def make_heads(tiny_model_dirs, tmp_path, style="medusa", num_heads=3, name="heads"):
    out = tmp_path / name
    attach(str(tiny_model_dirs["llama"]), style, num_heads, 1, out)
    return out


def options(data, **kw):
    settings = dict(data=[str(data)], lr=1e-2, batch_size=4, eval_fraction=0.2, eval_every=0, save_every=0,
                    max_steps=6, seed=0)
    settings.update(kw)
    return train.FinetuneOptions(**settings)


def test_head_weights_and_chain_tokens():
    assert train.parse_head_weights("uniform", 3) == [1.0, 1.0, 1.0]
    assert train.parse_head_weights("linear", 4) == [1.0, 0.75, 0.5, 0.25]
    assert train.parse_head_weights("exponential", 3) == pytest.approx([0.8, 0.64, 0.512])
    assert train.parse_head_weights("primary-aux", 3) == [1.0, 0.3, 0.3]
    assert train.parse_head_weights("1,0.5,0", 3) == [1.0, 0.5, 0.0]
    for bad in ("1,2", "a,b,c", "-1,1,1", "geometric"):
        with pytest.raises(MtpkitError, match="head-weights"):
            train.parse_head_weights(bad, 3)
    assert train.chain_tokens([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert train.chain_tokens([]) == 1.0


@pytest.mark.parametrize("style, train_vocab", [("medusa", "data"), ("sequential", "data"), ("eagle", "data"),
                                               ("medusa", "full")])
def test_training_lowers_the_loss_and_moves_only_the_heads(tiny_model_dirs, tmp_path, text_data, style, train_vocab):
    heads_dir = make_heads(tiny_model_dirs, tmp_path, style)
    run = train.setup(heads_dir, options(text_data, max_steps=15, train_vocab=train_vocab, loss="ce"))
    assert (run.data.vocab is None) == (train_vocab == "full")
    base_before = {k: v.clone() for k, v in run.heads.backbone.model.state_dict().items()}
    heads_before = {k: v.clone() for k, v in run.heads.state_dict().items()}
    before = train.evaluate(run.heads, run.data.eval_examples, run.data.eval_store, 4, torch.device("cpu"))
    train.train(run)
    after = run.final_eval
    assert all(a < b - 0.1 for a, b in zip(after["head_loss"], before["head_loss"])), (before, after)
    assert sum(after["head_top1"]) > sum(before["head_top1"])
    base_after = run.heads.backbone.model.state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # bit-identical base
    assert not any(p.requires_grad for p in run.heads.backbone.model.parameters())
    moved = [k for k, v in run.heads.state_dict().items() if not torch.equal(heads_before[k], v)]
    assert moved and all(k.startswith("heads.") for k in moved)


def test_feature_loss_adds_the_regression_to_the_base_hidden_state_at_t_plus_k(tiny_model_dirs, tmp_path, text_data):
    """Fresh Medusa heads pass h_t through, so the added term is smooth-L1(h_t, h_{t+k}), weighted."""
    heads_dir = make_heads(tiny_model_dirs, tmp_path, num_heads=2)
    run = train.setup(heads_dir, options(text_data))
    batch = train.collate(run.data.train_examples, [0, 1, 2], run.data.train_store, torch.device("cpu"))
    args = (run.model, batch, [1.0, 1.0], "distill", run.accelerator, 1.0, False, run.data.vocab)
    plain = train.backward_heads(*args)
    with_feature = train.backward_heads(*args, feature_weight=2.0)
    flat = batch.hidden.reshape(-1, batch.hidden.shape[-1])
    for k in (1, 2):
        _, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
        rows, at_target = train.head_rows(valid, k)
        expected = torch.nn.functional.smooth_l1_loss(flat[rows], flat[at_target], reduction="none").mean()
        assert expected > 0.01
        assert with_feature[k - 1] - plain[k - 1] == pytest.approx(2.0 * float(expected), rel=1e-4)


def test_distill_loss_is_the_kl_to_the_base_at_t_plus_k(tiny_model_dirs, tmp_path, text_data):
    """Fresh Medusa heads pass h_t through, so head k's distill loss is the mean over its rows of
    KL(base(h_{t+k}) || base(h_t)), both softmaxes over the training vocabulary."""
    heads_dir = make_heads(tiny_model_dirs, tmp_path, num_heads=3)
    run = train.setup(heads_dir, options(text_data))
    batch = train.collate(run.data.train_examples, [0, 1, 2], run.data.train_store, torch.device("cpu"))
    losses = train.backward_heads(run.model, batch, [1.0, 1.0, 1.0], "distill", run.accelerator, 1.0, False,
                                  run.data.vocab)
    flat = batch.hidden.reshape(-1, batch.hidden.shape[-1])
    weight = run.heads.backbone.model.get_output_embeddings().weight[run.data.vocab.ids]
    log_probs = torch.log_softmax(flat @ weight.T, -1)
    for k in (1, 2, 3):
        _, valid = targets.head_targets(batch.ids, k, batch.loss_mask)
        rows, at_target = train.head_rows(valid, k)
        teacher, student = log_probs[at_target], log_probs[rows]
        expected = (teacher.exp() * (teacher - student)).sum(-1).mean()
        assert expected > 0.01
        assert losses[k - 1] == pytest.approx(float(expected), rel=1e-4)


def test_train_vocab_holds_the_tokens_of_the_data():
    from mtpkit.data import TokenizedExample

    vocab = train.TrainVocab.of([TokenizedExample([5, 9, 5]), TokenizedExample([2])], 12, "cpu")
    assert vocab.ids.tolist() == [2, 5, 9]
    assert vocab.position.tolist() == [-1, -1, 0, -1, -1, 1, -1, -1, -1, 2, -1, -1]


def test_evaluate_matches_a_hand_count(tiny_model_dirs, tmp_path, monkeypatch):
    """Fresh Medusa heads reproduce the base, so head k's top-1 is how often argmax base(t) == token t+k+1. On
    the base's own greedy responses the heads' hits are correlated, so the chain's count is not what the
    product of their accuracies implies."""
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in CORPUS[0].split()))
    heads_dir = make_heads(tiny_model_dirs, tmp_path, num_heads=2)
    run = train.setup(heads_dir, options(prompts, eval_fraction=0.5, distill_max_new_tokens=24))
    result = train.evaluate(run.heads, run.data.eval_examples, run.data.eval_store, 3, torch.device("cpu"))
    backbone = run.heads.backbone
    for k in (1, 2):
        hits = total = hits5 = 0
        for example in run.data.eval_examples:
            ids = torch.tensor([example.ids])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, max(example.loss_start, 1):] = True
            with torch.no_grad():
                logits = backbone.model(input_ids=ids).logits[0]
            labels, valid = targets.head_targets(ids, k, mask)
            for t in valid[0].nonzero().flatten().tolist():
                total += 1
                hits += int(logits[t].argmax() == labels[0, t])
                hits5 += int(labels[0, t] in logits[t].topk(5).indices)
        assert result["head_top1"][k - 1] == pytest.approx(hits / total, abs=1e-4)
        assert result["head_top5"][k - 1] == pytest.approx(hits5 / total, abs=1e-4)
    accuracy = result["head_topk_accuracy"]
    assert len(accuracy) == 2 and all(len(row) == 10 for row in accuracy)
    assert all(row == sorted(row) for row in accuracy)
    assert result["expected_chain_tokens"] == pytest.approx(train.chain_tokens(result["head_top1"]), abs=1e-3)
    # the chain: at every position head 1 scores, 1 + how many heads from the first on were right in a row
    accepted = positions = 0
    for example in run.data.eval_examples:
        ids = torch.tensor([example.ids])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, max(example.loss_start, 1):] = True
        with torch.no_grad():
            argmax = backbone.model(input_ids=ids).logits[0].argmax(-1)
        right = [dict(zip(*[v.tolist() for v in (valid[0].nonzero().flatten(), argmax[valid[0]] == labels[0, valid[0]])]))
                 for labels, valid in (targets.head_targets(ids, k, mask) for k in (1, 2))]
        for t in right[0]:
            positions += 1
            accepted += 1 + int(right[0][t]) + int(right[0][t] and right[1].get(t, False))
    assert result["chain_accepted"] == pytest.approx(accepted / positions, abs=1e-4)
    assert abs(result["chain_accepted"] - result["expected_chain_tokens"]) > 0.005  # 1.053 against 1.044 here


def test_finetune_writes_the_heads_dir_contract(tiny_model_dirs, tmp_path, text_data):
    heads_dir = make_heads(tiny_model_dirs, tmp_path, style="sequential")
    result = train.finetune(heads_dir, options(text_data, loss="distill", eval_every=3, save_every=2))
    config = HeadsConfig.read(heads_dir)
    evaluation = config.training["eval"]
    assert set(evaluation) == {"head_top1", "head_top5", "head_topk_accuracy", "expected_chain_tokens",
                               "chain_accepted", "examples"}
    assert len(evaluation["head_topk_accuracy"]) == 3 and all(len(r) == 10 for r in evaluation["head_topk_accuracy"])
    assert evaluation["head_top1"] == [row[0] for row in evaluation["head_topk_accuracy"]]
    assert evaluation["head_top5"] == [row[4] for row in evaluation["head_topk_accuracy"]]
    assert evaluation["examples"] == result.eval_sequences > 0
    training = config.training
    assert (training["steps"], training["loss"], training["lr"], training["data"]) == (6, "distill", 1e-2, [str(text_data)])
    assert training["weights"] == pytest.approx([0.8, 0.64, 0.512]) and training["wall_seconds"] > 0
    assert 0 < training["train_tokens"] < sum(len(line) for line in CORPUS * 2)  # tokens, fewer than characters
    assert training["sources"] == [{"source": str(text_data), "records": len(text_data.read_text().splitlines()),
                                    "shapes": {"text": len(text_data.read_text().splitlines())}}]
    assert training["draft_vocab"] > 0 and set(training["responses"]) >= {"responses", "empty", "looping"}
    assert result.peak_step_rss_mb > 0
    for name in (WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, "training.png", "README.md"):
        assert (heads_dir / name).is_file(), name
    assert not (heads_dir / CHECKPOINT_DIR).exists()  # a finished run leaves no checkpoint behind
    records = [json.loads(line) for line in (heads_dir / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval" in r] == [3, 6]
    seen = [r["tokens"] for r in records if "loss" in r]
    assert all(0 < a < b for a, b in zip(seen, seen[1:]))  # every step learns from new tokens
    assert [r["tokens"] for r in records if "eval" in r] == [seen[2], seen[5]]  # evaluated after steps 3 and 6
    assert training["learning_curve"] == [{"step": r["step"], "tokens": r["tokens"], "head_top1": r["eval"]["head_top1"],
                                           "chain_accepted": r["eval"]["chain_accepted"]} for r in records if "eval" in r]
    card = (heads_dir / "README.md").read_text()
    assert f"| {seen[5]:,} | 6 | " + " | ".join(f"{a:.3f}" for a in evaluation["head_top1"]) + " |" in card
    assert "mtpkit generate <this directory> --prompt" in (heads_dir / "README.md").read_text()
    trained = {name: tensor.detach().cpu() for name, tensor in result.heads.state_dict().items()}
    fresh = open_heads(make_heads(tiny_model_dirs, tmp_path, style="sequential", name="fresh")).state_dict()
    assert any(not torch.equal(trained[name], fresh[name]) for name in trained)  # training moved them
    reloaded = open_heads(heads_dir).state_dict()  # the written dir loads again, with the trained weights
    assert reloaded.keys() == trained.keys()
    for name, tensor in reloaded.items():
        assert torch.equal(tensor, trained[name]), name


class StopAt:
    def __init__(self, step):
        self.step = step

    def __call__(self, step):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("style, teacher_forcing", [("medusa", 1.0), ("sequential", 1.0), ("sequential", 0.5)])
def test_resumed_run_equals_uninterrupted_run(tiny_model_dirs, tmp_path, text_data, style, teacher_forcing):
    fresh = make_heads(tiny_model_dirs, tmp_path, style, name="fresh")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    shutil.copytree(fresh, straight)
    shutil.copytree(fresh, interrupted)
    settings = dict(max_steps=None, epochs=2, grad_accum=2, batch_size=8, save_every=3,  # 51 sequences: 4 steps/epoch
                    teacher_forcing=teacher_forcing)  # below 1 the drafted positions are drawn again on resume

    train.finetune(straight, options(text_data, **settings))
    with pytest.raises(train.TrainingInterrupted, match="interrupted at step 5"):
        train.finetune(interrupted, options(text_data, **settings), callbacks=train.Callbacks(after_step=StopAt(5)))
    checkpoint = torch.load(interrupted / CHECKPOINT_DIR / "state.pt", weights_only=True)
    assert checkpoint["step"] == 5 and set(checkpoint["orders"]) == {"0", "1"}
    assert torch.equal(load_file(str(interrupted / WEIGHTS_NAME))["heads.0.blocks.0.linear.weight"],
                       load_file(str(fresh / WEIGHTS_NAME))["heads.0.blocks.0.linear.weight"])  # not yet rewritten
    train.finetune(interrupted, options(text_data, resume=True, **settings))

    expected, resumed = load_file(str(straight / WEIGHTS_NAME)), load_file(str(interrupted / WEIGHTS_NAME))
    assert expected.keys() == resumed.keys()
    assert not torch.equal(expected["heads.0.blocks.0.linear.weight"], load_file(str(fresh / WEIGHTS_NAME))["heads.0.blocks.0.linear.weight"])
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (interrupted / METRICS_NAME).read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # steps logged before the interruption are not logged twice
    tokens = [[json.loads(line)["tokens"] for line in (run / METRICS_NAME).read_text().splitlines()
               if "loss" in json.loads(line)] for run in (straight, interrupted)]
    assert tokens[0] == tokens[1]  # the count of tokens seen goes on across the interruption
    # two epochs: every training sequence's targets, twice
    assert tokens[0][-1] == 2 * HeadsConfig.read(straight).training["train_tokens"]


def test_resume_refuses_other_settings_or_no_checkpoint(tiny_model_dirs, tmp_path, text_data):
    heads_dir = make_heads(tiny_model_dirs, tmp_path)
    with pytest.raises(MtpkitError, match="no checkpoint"):
        train.setup(heads_dir, options(text_data, resume=True))
    with pytest.raises(train.TrainingInterrupted):
        train.finetune(heads_dir, options(text_data), callbacks=train.Callbacks(after_step=StopAt(2)))
    with pytest.raises(MtpkitError, match="different settings.*lr"):
        train.setup(heads_dir, options(text_data, resume=True, lr=5e-3))
    # a checkpoint written before --feature-loss existed ran without it
    path = heads_dir / CHECKPOINT_DIR / train.CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    del state["settings"]["feature_loss"]
    torch.save(state, path)
    assert train.setup(heads_dir, options(text_data, resume=True)).step == 2
    with pytest.raises(MtpkitError, match="different settings.*feature_loss"):
        train.setup(heads_dir, options(text_data, resume=True, feature_loss=1.0))


def test_hidden_states_on_disk_give_the_same_heads(tiny_model_dirs, tmp_path, text_data):
    fresh = make_heads(tiny_model_dirs, tmp_path, "sequential", name="fresh")
    memory, disk = tmp_path / "memory", tmp_path / "disk"
    shutil.copytree(fresh, memory)
    shutil.copytree(fresh, disk)
    train.finetune(memory, options(text_data))
    run = train.setup(disk, options(text_data, hidden_cache_gb=0))
    assert run.data.train_store.on_disk
    train.train(run)
    train.save(run, 1.0)
    run.data.train_store.close()
    a, b = load_file(str(memory / WEIGHTS_NAME)), load_file(str(disk / WEIGHTS_NAME))
    for name in a:
        assert torch.equal(a[name], b[name])


@pytest.mark.parametrize("cache_gb", [4.0, 0])
def test_hidden_states_kept_in_bfloat16_are_the_base_states_rounded_and_train(tiny_model_dirs, tmp_path, text_data,
                                                                                cache_gb):
    """Half the memory or disk: each kept value is the base's rounded to bfloat16, read back in the base's dtype."""
    heads_dir = make_heads(tiny_model_dirs, tmp_path, "sequential")
    full = train.setup(heads_dir, options(text_data, hidden_cache_gb=cache_gb))
    half = train.setup(heads_dir, options(text_data, hidden_dtype="bfloat16", hidden_cache_gb=cache_gb))
    assert half.data.train_store.dtype == torch.bfloat16 and full.data.train_store.dtype == torch.float32
    assert half.data.train_store.on_disk == full.data.train_store.on_disk == (cache_gb == 0)
    for i in range(len(half.data.train_examples)):
        assert torch.equal(half.data.train_store[i], full.data.train_store[i].to(torch.bfloat16))
    batch = train.collate(half.data.train_examples, [0, 1], half.data.train_store, torch.device("cpu"))
    assert batch.hidden.dtype == torch.float32
    assert torch.equal(batch.hidden[0, :len(half.data.train_examples[0].ids)],
                       full.data.train_store[0].to(torch.bfloat16).float())
    train.train(half)
    assert all(math.isfinite(r["loss"]) for r in half.history if "loss" in r)
    for run in (full, half):
        run.data.train_store.close()
    with pytest.raises(MtpkitError, match="--hidden-dtype"):
        options(text_data, hidden_dtype="float16")


def test_nan_loss_stops_with_a_clear_message(tiny_model_dirs, tmp_path, text_data):
    heads_dir = make_heads(tiny_model_dirs, tmp_path)
    state = load_file(str(heads_dir / WEIGHTS_NAME))
    state["heads.1.blocks.0.linear.bias"][0] = float("nan")
    save_file(state, str(heads_dir / WEIGHTS_NAME))
    with pytest.raises(MtpkitError, match=r"non-finite at step 1 \(per head: [0-9.]+, nan, [0-9.]+\).*no checkpoint"):
        train.finetune(heads_dir, options(text_data))
    assert not (heads_dir / CHECKPOINT_DIR).exists()


def test_nan_keeps_the_last_good_checkpoint(tiny_model_dirs, tmp_path, text_data, monkeypatch):
    heads_dir = make_heads(tiny_model_dirs, tmp_path)
    real = recipe.backward_heads  # the loop calls the name it imported
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        losses = real(*args, **kwargs)
        return [float("inf")] + losses[1:] if len(calls) == 4 else losses

    monkeypatch.setattr(recipe, "backward_heads", poisoned)
    with pytest.raises(MtpkitError, match=r"non-finite at step 4.*last good checkpoint \(step 2\)"):
        train.finetune(heads_dir, options(text_data, save_every=2))
    assert torch.load(heads_dir / CHECKPOINT_DIR / "state.pt", weights_only=True)["step"] == 2


def test_lora_trains_an_adapter_with_the_heads(tiny_model_dirs, tmp_path, text_data):
    heads_dir = make_heads(tiny_model_dirs, tmp_path, num_heads=2)
    base = load_backbone(str(tiny_model_dirs["llama"]))
    base_state = {k: v.clone() for k, v in base.model.state_dict().items()}
    train.finetune(heads_dir, options(text_data, lora=True, max_steps=3))
    config = HeadsConfig.read(heads_dir)
    assert config.lora and (heads_dir / LORA_DIR / "adapter_config.json").is_file()
    adapter = json.loads((heads_dir / LORA_DIR / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == config.base_model
    merged = open_heads(heads_dir)  # base + adapter merged, then the heads
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert not torch.allclose(merged.backbone.model(input_ids=ids).logits, base.model(input_ids=ids).logits)
    # the base on disk is untouched: a fresh load equals the one taken before training
    fresh = load_backbone(str(tiny_model_dirs["llama"])).model.state_dict()
    assert all(torch.equal(base_state[k], fresh[k]) for k in base_state)


# ----------------------------------------------------------------------------- CLI


def test_cli_finetune_on_self_distilled_builtin_prompts(tiny_model_dirs, tmp_path):
    heads_dir = make_heads(tiny_model_dirs, tmp_path)
    args = ["finetune", str(heads_dir), "--data", "builtin:prompts", "--max-examples", "12",
            "--distill-max-new-tokens", "6", "--max-steps", "2", "--batch-size", "4", "--eval-every", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output and "12 generated" in result.output
    training = HeadsConfig.read(heads_dir).training
    assert training["self_distill"] and training["data_shapes"] == {"prompt": 12} and training["steps"] == 2
    again = runner.invoke(app, args)  # the second run reads every response from the cache
    assert again.exit_code == 0 and "0 generated, 12 from cache" in again.output


def test_cli_recipe_with_command_line_override(tiny_model_dirs, tmp_path, text_data):
    heads_dir = make_heads(tiny_model_dirs, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"# mtpkit finetune HEADS --recipe {recipe}\ndata: {text_data}\nmax-steps: 2\nlr: 0.005\n"
                      "batch_size: 4\neval_every: 0\n")
    result = runner.invoke(app, ["finetune", str(heads_dir), "--recipe", str(recipe), "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    training = HeadsConfig.read(heads_dir).training
    assert (training["steps"], training["lr"], training["batch_size"]) == (3, 0.005, 4)


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ('{"foo": 1}\n', "no usable records"),
    ("[1, 2", "cannot read"),
])
def test_cli_bad_data_exits_nonzero_with_one_line(tiny_model_dirs, tmp_path, content, message):
    heads_dir = make_heads(tiny_model_dirs, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = runner.invoke(app, ["finetune", str(heads_dir), "--data", str(bad)])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


def test_cli_refuses_a_missing_heads_dir_bad_options_and_recipe_keys(tmp_path, text_data):
    missing = runner.invoke(app, ["finetune", str(tmp_path / "nothing"), "--data", str(text_data)])
    assert missing.exit_code == 1 and "mtp_config.json is missing" in missing.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 0.1\n")
    bad_key = runner.invoke(app, ["finetune", str(tmp_path), "--recipe", str(recipe)])
    assert bad_key.exit_code == 1 and "unknown option(s) learning_rate" in bad_key.output
    no_data = runner.invoke(app, ["finetune", str(tmp_path)])
    assert no_data.exit_code == 1 and "no training data" in no_data.output
    negative = runner.invoke(app, ["finetune", str(tmp_path), "--data", str(text_data), "--feature-loss", "-1"])
    assert negative.exit_code == 1 and "--feature-loss must be 0 or more" in negative.output


def test_bfloat16_base_with_mixed_precision_trains_float32_heads(tiny_model_dirs, tmp_path, text_data):
    heads_dir = make_heads(tiny_model_dirs, tmp_path, style="sequential", num_heads=2)
    with pytest.raises(MtpkitError, match="needs --mixed-precision"):
        train.finetune(heads_dir, options(text_data, dtype="bfloat16"))
    result = train.finetune(heads_dir, options(text_data, dtype="bfloat16", mixed_precision="bf16", max_steps=3))
    assert all(0 <= a <= 1 for a in result.eval["head_top1"])
    saved = load_file(str(heads_dir / WEIGHTS_NAME))
    draft_vocab = saved.pop("draft_vocab")  # the target tokens of the training data, drafted from at decode time
    assert draft_vocab.dtype == torch.int64 and draft_vocab.numel() > 0 and bool((draft_vocab.diff() > 0).all())
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("option", ["--lr", "--warmup-ratio", "--weight-decay", "--max-grad-norm", "--feature-loss",
                                    "--eval-fraction"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_non_finite_numbers_give_one_error_line(tmp_path, text_data, option, value):
    result = runner.invoke(app, ["finetune", str(tmp_path), "--data", str(text_data), option, value])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # not an uncaught error
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {option} must be a finite number (got {float(value)!r})"], result.output


def test_finetune_honours_and_records_trust_remote_code(tiny_model_dirs, tmp_path, text_data, monkeypatch):
    """From --trust-remote-code, or from the heads' config (attach recorded it), down to the base's loader."""
    asked = []

    def recording_load_backbone(model, **kwargs):
        asked.append(kwargs.get("trust_remote_code"))
        return load_backbone(model, dtype=kwargs.get("dtype", "float32"))

    monkeypatch.setattr(recipe, "load_backbone", recording_load_backbone)
    heads_dir = make_heads(tiny_model_dirs, tmp_path)
    args = ["finetune", str(heads_dir), "--data", str(text_data), "--max-steps", "1", "--batch-size", "4",
            "--eval-every", "0", "--eval-fraction", "0.2"]
    assert runner.invoke(app, args).exit_code == 0
    assert asked == [False] and HeadsConfig.read(heads_dir).trust_remote_code is False
    result = runner.invoke(app, args + ["--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert asked == [False, True] and HeadsConfig.read(heads_dir).trust_remote_code is True
    assert runner.invoke(app, args).exit_code == 0  # now the config says so, without the flag
    assert asked == [False, True, True] and HeadsConfig.read(heads_dir).trust_remote_code is True


def test_train_tokens_count_response_targets_and_degenerate_responses_are_found():
    from mtpkit.data import TokenizedExample

    examples = [TokenizedExample([1, 2, 3, 4, 5], loss_start=3), TokenizedExample([7, 8, 9], loss_start=0),
                TokenizedExample([1, 2] + [6] * 40, loss_start=2), TokenizedExample([1, 2, 3, 0], loss_start=3)]
    assert recipe.train_tokens(examples) == 2 + 2 + 40 + 1
    quality = recipe.response_quality(examples, {0})
    assert (quality.responses, quality.empty, quality.looping) == (4, 1, 1)


def test_learning_curves_of_two_runs_compare_in_one_png_and_one_table(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from mtpkit.train.card import compare_curves, curves_table

    curves = {"sequential": [{"step": 75, "tokens": 1000, "head_top1": [0.3, 0.2]},
                             {"step": 150, "tokens": 2000, "head_top1": [0.4, 0.25]}],
              "eagle3": [{"step": 75, "tokens": 1000, "head_top1": [0.5, 0.45]}]}
    table = curves_table(curves).splitlines()
    assert table[0] == "| run | training tokens | depth 1 top-1 | depth 2 top-1 |"
    assert table[2:] == ["| sequential | 1,000 | 0.300 | 0.200 |", "| sequential | 2,000 | 0.400 | 0.250 |",
                         "| eagle3 | 1,000 | 0.500 | 0.450 |"]
    curves["sequential"][1]["chain_accepted"] = 1.61  # recorded by newer runs only
    table = curves_table(curves).splitlines()
    assert table[0].endswith("| depth 2 top-1 | chain accepts |") and table[1] == "|---|---|---|---|---|"
    assert table[2:] == ["| sequential | 1,000 | 0.300 | 0.200 | n/a |", "| sequential | 2,000 | 0.400 | 0.250 | 1.610 |",
                         "| eagle3 | 1,000 | 0.500 | 0.450 | n/a |"]
    png = compare_curves(curves, tmp_path / "curves.png")
    width, height = Image.open(png).size
    assert width == 640 and height == 340  # one panel per depth, 3.2 x 3.4 inches at 100 dpi
    with pytest.raises(MtpkitError, match="no learning curve"):
        compare_curves({"untrained": []}, tmp_path / "none.png")
    # the command reads the runs' configs
    for name, curve in curves.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_NAME).write_text(json.dumps({
            "style": name, "num_heads": 2, "num_layers": 1, "hidden_size": 8, "vocab_size": 10, "base_model": "tiny",
            "base_fingerprint": "0", "training": {"learning_curve": curve}}))
    done = subprocess.run([sys.executable, "-m", "mtpkit.train.card", str(tmp_path / "sequential"),
                           str(tmp_path / "eagle3"), "--png", str(tmp_path / "both.png"), "--markdown",
                           str(tmp_path / "both.md")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "both.png").stat().st_size > 0
    assert "| eagle3 (eagle3) | 1,000 | 0.500 | 0.450 | n/a |" in (tmp_path / "both.md").read_text()
    done = subprocess.run([sys.executable, "-m", "mtpkit.train.card", str(tmp_path / "nowhere"), "--png",
                           str(tmp_path / "x.png")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
