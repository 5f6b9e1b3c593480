"""The ``mtpkit`` command: one small module per command, composed here."""

from __future__ import annotations

import typer

from mtpkit import __version__
from mtpkit.cli import attach, bench, calibrate, corpus, export, finetune, generate

app = typer.Typer(
    name="mtpkit",
    help="Multi-token-prediction draft heads and lossless self-speculative decoding for Hugging Face causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("attach")(attach.attach)
app.command("corpus")(corpus.corpus)
app.command("finetune")(finetune.finetune)
app.command("generate")(generate.generate)
app.command("bench")(bench.bench)
app.command("calibrate")(calibrate.calibrate)
app.command("export")(export.export)


@app.callback(invoke_without_command=True)
def _version(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
