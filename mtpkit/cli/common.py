"""What every command shares: the stderr console and turning errors into one line."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from mtpkit.errors import MtpkitError

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(command):
    """Turn MtpkitError and Ctrl-C into one line on stderr and a non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MtpkitError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except MemoryError:
            fail("out of memory: try a smaller batch, --max-length or model")

    return wrapper


def not_built(name: str) -> None:
    console.print(f"mtpkit {name} is not built yet", highlight=False)
    sys.stderr.flush()
    raise typer.Exit(2)
