"""The self-distilled corpus: a Parquet dataset that resumes, round-trips and trains like the distill cache."""

import json

import pytest

from mtpkit import corpus as corpus_module
from mtpkit.corpus import build_corpus, read_corpus
from mtpkit.data import load_data, tokenize_all
from mtpkit.distill import distill
from mtpkit.errors import MtpkitError

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

PROMPTS = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(7)] + ["Say hello.", "Question 0: what is 0 plus 0?"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_corpus_is_a_parquet_dataset_in_source_order(tiny_backbone, prompt_file, tmp_path):
    import datasets

    out = tmp_path / "corpus.parquet"
    report = build_corpus(tiny_backbone, [str(prompt_file)], out, max_new_tokens=5, batch_size=3,
                          metadata={"note": "test"})
    assert report.rows == report.generated_rows == 8  # the repeated prompt is distilled once
    rows, meta = read_corpus(out)
    assert [r["prompt"] for r in rows] == PROMPTS[:8]
    assert meta["base_fingerprint"] == tiny_backbone.fingerprint and meta["note"] == "test"
    assert all(r["base_fingerprint"] == tiny_backbone.fingerprint and r["generation"] == "greedy-n5" for r in rows)
    assert report.response_tokens == sum(len(r["response_ids"]) for r in rows) == report.generated_tokens

    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert loaded.column_names[:4] == ["source", "prompt", "prompt_ids", "response_ids"]
    assert [list(x) for x in loaded["response_ids"]] == [r["response_ids"] for r in rows]


def test_training_from_the_corpus_gives_the_same_sequences_as_distilling(tiny_backbone, prompt_file, tmp_path):
    out = tmp_path / "corpus.parquet"
    build_corpus(tiny_backbone, [str(prompt_file)], out, max_new_tokens=5, batch_size=4)
    tok = tiny_backbone.tokenizer

    from_prompts = load_data([str(prompt_file)], eval_fraction=0.25, seed=3, backbone=tiny_backbone)
    examples = from_prompts.train + from_prompts.eval
    responses, _ = distill(tiny_backbone, examples, 5, batch_size=4)
    by_id = {id(e): r for e, r in zip(examples, responses)}
    expected = [tokenize_all(tok, split, 64, [by_id[id(e)] for e in split]) for split in (from_prompts.train, from_prompts.eval)]

    from_corpus = load_data([str(out)], eval_fraction=0.25, seed=3, backbone=tiny_backbone)
    assert from_corpus.shapes == {"tokens": 8} and not any(e.needs_response for e in from_corpus.train)
    # the prompt file has 9 records (one repeated), the corpus 8 rows: compare on the corpus's prompts
    got = [tokenize_all(tok, split, 64) for split in (from_corpus.train, from_corpus.eval)]
    flat_expected = {(tuple(t.ids), t.loss_start) for split in expected for t in split}
    assert {(tuple(t.ids), t.loss_start) for split in got for t in split} == flat_expected


def test_heads_trained_on_a_corpus_name_it_for_their_suffix_drafter(tiny_model_dirs, prompt_file, tmp_path):
    from mtpkit import train
    from mtpkit.attach import attach
    from mtpkit.backbone import load_backbone
    from mtpkit.config import HeadsConfig
    from mtpkit.draft_sources import corpus_path

    tiny_backbone = load_backbone(str(tiny_model_dirs["llama"]))
    out = tmp_path / "data" / "corpus.parquet"
    out.parent.mkdir()
    build_corpus(tiny_backbone, [str(prompt_file)], out, max_new_tokens=5, batch_size=4)
    heads_dir = tmp_path / "models" / "heads"
    attach(str(tiny_model_dirs["llama"]), "medusa", 2, 1, heads_dir)
    train.finetune(heads_dir, train.FinetuneOptions(data=[str(out)], batch_size=2, eval_fraction=0.25, epochs=1,
                                                    eval_every=0, save_every=0), backbone=tiny_backbone)
    config = HeadsConfig.read(heads_dir)
    assert config.corpus == "../../data/corpus.parquet"  # relative: the two directories move together
    assert corpus_path(heads_dir, config).resolve() == out.resolve()
    records = [json.loads(line) for line in (heads_dir / "metrics.jsonl").read_text().splitlines()]
    # one epoch over the responses: every response token (but each one's last) is a head-1 target once
    assert [r["tokens"] for r in records if "loss" in r][-1] == config.training["train_tokens"]


def test_same_batches_as_the_cache_when_prompts_are_distinct(tiny_backbone, tmp_path):
    prompts = tmp_path / "distinct.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:8]))
    out = tmp_path / "corpus.parquet"
    build_corpus(tiny_backbone, [str(prompts)], out, max_new_tokens=5, batch_size=3)
    tok = tiny_backbone.tokenizer
    plain = load_data([str(prompts)], eval_fraction=0.25, seed=5, backbone=tiny_backbone)
    responses, _ = distill(tiny_backbone, plain.train, 5, batch_size=3)
    corpus = load_data([str(out)], eval_fraction=0.25, seed=5, backbone=tiny_backbone)
    expected = tokenize_all(tok, plain.train, 64, responses)
    got = tokenize_all(tok, corpus.train, 64)
    assert [(t.ids, t.loss_start) for t in got] == [(t.ids, t.loss_start) for t in expected]  # same order too


def test_an_interrupted_corpus_resumes_where_it_stopped(tiny_backbone, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "corpus.parquet"
    complete = build_corpus(tiny_backbone, [str(prompt_file)], tmp_path / "whole.parquet", max_new_tokens=5,
                            batch_size=3)
    calls = []
    real = corpus_module.generate

    def dies_on_third_batch(backbone, prompts, max_new_tokens, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(backbone, prompts, max_new_tokens, **kwargs)

    monkeypatch.setattr(corpus_module, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tiny_backbone, [str(prompt_file)], out, max_new_tokens=5, batch_size=3)
    rows, _ = read_corpus(out)
    assert len(rows) == 6  # two finished batches were written, atomically
    assert not list(tmp_path.glob(".corpus.parquet.*"))  # no temporary file left behind

    monkeypatch.setattr(corpus_module, "generate", real)
    report = build_corpus(tiny_backbone, [str(prompt_file)], out, max_new_tokens=5, batch_size=3)
    assert report.generated_rows == 2 and report.rows == 8
    assert read_corpus(out)[0] == read_corpus(tmp_path / "whole.parquet")[0]  # same rows, same order
    assert complete.rows == 8


def test_a_corpus_of_another_base_is_refused(tiny_backbone, prompt_file, tmp_path):
    out = tmp_path / "corpus.parquet"
    build_corpus(tiny_backbone, [str(prompt_file)], out, max_new_tokens=5, batch_size=4)
    rows, meta = read_corpus(out)
    for row in rows:
        row["base_fingerprint"] = "0123456789abcdef"
    corpus_module.write_corpus(out, rows, meta)
    with pytest.raises(MtpkitError, match="written by another base"):
        load_data([str(out)], eval_fraction=0.0, backbone=tiny_backbone)
    with pytest.raises(MtpkitError, match="holds responses of base 0123456789abcdef"):
        build_corpus(tiny_backbone, [str(prompt_file)], out, max_new_tokens=5)
    with pytest.raises(MtpkitError, match="not a readable Parquet corpus"):
        (tmp_path / "bad.parquet").write_text("not parquet")
        read_corpus(tmp_path / "bad.parquet")


def test_corpus_cli_refuses_bad_input_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from mtpkit.cli.app import app

    result = CliRunner().invoke(app, ["corpus", str(tmp_path / "corpus.jsonl")])
    assert result.exit_code == 1 and "name it *.parquet" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["corpus", str(tmp_path / "c.parquet"), "--max-new-tokens", "0"])
    assert result.exit_code == 1 and "at least 1" in result.output


def test_self_written_prompts_are_kept_in_the_corpus_and_reused_on_resume(tiny_backbone, tmp_path, monkeypatch):
    from mtpkit import self_prompts

    tiny_backbone.model.generation_config.eos_token_id = list(range(40, 136))  # see test_data_engine
    monkeypatch.setattr(self_prompts, "MIN_PROMPT_CHARS", 2)
    out = tmp_path / "corpus.parquet"
    build_corpus(tiny_backbone, ["self:4"], out, max_new_tokens=3, batch_size=2)
    rows, meta = read_corpus(out)
    assert [r["source"] for r in rows] == ["self:4"] * 4
    assert meta["self_prompts"]["self:4"] == [r["prompt"] for r in rows]

    def no_writing(*args, **kwargs):
        raise AssertionError("the prompts are in the corpus: nothing should be written again")

    monkeypatch.setattr(self_prompts, "self_prompts", no_writing)  # a fresh machine: no self-prompt cache
    report = build_corpus(tiny_backbone, ["self:4"], out, max_new_tokens=3, batch_size=2)
    assert report.generated_rows == 0 and report.rows == 4
