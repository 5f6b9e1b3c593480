"""`mtpkit attach` through the CLI: the files it writes and each bad input's one-line error."""

import json
import os

import pytest
from typer.testing import CliRunner

from mtpkit.cli.app import app
from mtpkit.config import CONFIG_NAME, WEIGHTS_NAME

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and fragment in " ".join(lines), result.output


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_attach_writes_heads_dir(tiny_model_dirs, tmp_path, family, style):
    out = tmp_path / "heads"
    result = run("attach", "--model", tiny_model_dirs[family], "--style", style, "--heads", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == [WEIGHTS_NAME, CONFIG_NAME]
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["style"] == style and config["num_heads"] == 3 and config["hidden_size"] == 64
    assert "trainable head parameters" in result.output and "overhead" in result.output
    # no base weights: the heads file is far smaller than the model file
    model_bytes = (tiny_model_dirs[family] / "model.safetensors").stat().st_size
    assert (out / WEIGHTS_NAME).stat().st_size < model_bytes


def test_attach_refuses_non_empty_out_without_force(tiny_model_dirs, tmp_path):
    out = tmp_path / "heads"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("mine")
    result = run("attach", "--model", tiny_model_dirs["llama"], "--out", out)
    assert_one_line_error(result, "not empty")
    assert keep.read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]
    assert run("attach", "--model", tiny_model_dirs["llama"], "--out", out, "--force").exit_code == 0
    assert keep.read_text() == "mine"


def test_bad_inputs_give_one_line_errors(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llama"]
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(64))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (("--model", tmp_path / "missing" / "model.gguf"), "not found"),
        (("--model", tmp_path / "no-such-dir/"), "not found"),
        (("--model", "no-such-alias"), "unknown model alias"),
        (("--model", bad_gguf), "could not read GGUF"),
        (("--model", model, "--heads", 0), "at least 1"),
        (("--model", model, "--style", "hydra"), "unknown head style"),
        (("--model", model, "--dtype", "int3"), "unknown dtype"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run("attach", *args, "--out", tmp_path / "out"), fragment)
    assert_one_line_error(run("attach", "--model", model, "--out", a_file / "sub"), "cannot write")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("attach", "finetune", "generate", "bench"):
        assert command in result.output
