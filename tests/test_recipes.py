"""Every shipped recipe parses into valid finetune options, and opens with the command that runs it."""

from pathlib import Path

import pytest

from mtpkit.cli.finetune import RECIPE_KEYS, read_recipe
from mtpkit.train import FinetuneOptions

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {path.stem for path in RECIPES}
    assert {"smollm2-135m-medusa", "smollm2-135m-sequential"} <= names
    assert any("7b" in name for name in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_to_valid_options(path):
    recipe = read_recipe(path)
    assert set(recipe) <= set(RECIPE_KEYS)
    assert recipe["data"], "a recipe names its data"
    options = FinetuneOptions(**recipe)
    options.check()  # raises on any invalid value


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_its_command(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#")
    header = [line for line in lines if line.startswith("#")]
    commands = " ".join(header)
    assert "mtpkit attach" in commands
    assert "finetune" in commands and f"--recipe recipes/{path.name}" in commands


def test_default_recipes_never_see_the_held_out_prompts():
    """The default recipes train on the built-in train split (self-distilled) or on the shipped corpus, whose
    prompts are that split, the base's own, GSM8K's train questions and GPTeacher's: never a held-out prompt,
    never an MT-Bench question."""
    from mtpkit.corpus import read_corpus
    from mtpkit.prompts import load_builtin

    root = Path(__file__).resolve().parents[1]
    held_out = {r["prompt"] for r in load_builtin("heldout")}
    corpora = (["mtpkit/trained/corpus/smollm2-135m.parquet"], ["mtpkit/trained/corpus/smollm2-135m-wide.parquet"])
    for name in ("smollm2-135m-medusa", "smollm2-135m-sequential"):
        recipe = read_recipe(root / "recipes" / f"{name}.yaml")
        assert recipe["data"] in (["builtin:prompts"], *corpora), name
        if recipe["data"] == ["builtin:prompts"]:
            assert recipe["self_distill"] is True
    from mtpkit.prompts import load_mt_bench

    benchmark = {q["turns"][0] for q in load_mt_bench()}
    for path in sorted((root / "mtpkit/trained/corpus").glob("*.parquet")):  # the shipped one and any growing
        rows, meta = read_corpus(path)
        assert meta["base_model"] == "smollm2-135m" and rows, path.name
        sources = {r["source"] for r in rows}
        assert all(s in ("builtin:prompts", "builtin:gsm8k", "builtin:gpteacher") or s.startswith("self:")
                   for s in sources), path.name
        prompts = {r["prompt"] for r in rows}
        assert not held_out & prompts and not benchmark & prompts, path.name


def test_shipped_heads_were_trained_by_their_recipe():
    """The heads in mtpkit/trained are what `make heads` reproduces: same recipe settings."""
    import json

    root = Path(__file__).resolve().parents[1]
    shipped = sorted(path.parent for path in (root / "mtpkit" / "trained").glob("*/mtp_config.json"))
    assert shipped, "mtpkit ships trained heads for the default model"
    for heads_dir in shipped:
        recipe = read_recipe(root / "recipes" / f"{heads_dir.name}.yaml")
        config = json.loads((heads_dir / "mtp_config.json").read_text())
        training = config["training"]
        for key in ("data", "lr", "loss", "batch_size", "seed", "feature_loss"):
            assert training.get(key, 0.0) == recipe.get(key, 0.0), key
        if recipe.get("self_distill"):
            assert training["distill_max_new_tokens"] == recipe.get("distill_max_new_tokens", 0.0)
        assert training["epochs"] == pytest.approx(recipe["epochs"])
        assert config["base_model"] == "smollm2-135m" and config["style"] in heads_dir.name
        assert len(training["eval"]["head_top1"]) == config["num_heads"]
        # heads only (eagle3's draft model with its own output layer: 15M parameters, 62 MB), never the 538 MB base
        assert (heads_dir / "heads.safetensors").stat().st_size < 128 * 2**20


def test_every_option_is_declared_once_and_reaches_the_cli_and_the_recipes():
    """The dataclass is the one declaration: each field is a `finetune` option with its help text, and a recipe
    key unless it is marked otherwise (only --trust-remote-code, which stays a command-line decision)."""
    import dataclasses

    from typer.testing import CliRunner

    from mtpkit.cli.app import app

    fields = dataclasses.fields(FinetuneOptions)
    assert all(f.metadata["help"] for f in fields)
    assert RECIPE_KEYS == tuple(f.name for f in fields if f.name != "trust_remote_code")
    result = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "4000", "TERMINAL_WIDTH": "4000"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "YAML file of these options" in text and "Heads directory written by `mtpkit attach`" in text
    for f in fields:
        flag = (f.metadata["flag"] or "--" + f.name.replace("_", "-")).split("/")[0]
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split())[:60] in text, f.name
