"""What an export format is: one module of ``mtpkit.export`` gives an ``ExportFormat`` (what it writes from the heads,
and what its loader would find wrong in a written directory), and the checks they share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Exported:
    """What a format makes of a heads directory, before it is written."""

    config: dict  # config.json
    tensors: dict  # model.safetensors, by the loader's names
    summary: list[tuple[str, str]] = field(default_factory=list)  # rows the CLI shows


@dataclass(frozen=True)
class ExportFormat:
    name: str
    styles: tuple[str, ...]  # the head styles it carries
    build: Callable[..., Exported]  # (heads, heads_dir, verifier) -> Exported; refuses with MtpkitError
    check: Callable[[Path], list[str]]  # a written directory -> what the loader would find wrong (one line each)


def read_written(directory: Path) -> tuple[dict | None, dict[str, tuple[tuple[int, ...], str]] | None, list[str]]:
    """``directory``'s config, its tensors' shapes and dtypes by name, and why either cannot be read."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, None, [f"{CONFIG_FILE}: cannot be read ({exc})"]
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
            found = {}
            for name in weights.keys():
                piece = weights.get_slice(name)
                found[name] = (tuple(piece.get_shape()), piece.get_dtype())
    except (SafetensorError, OSError) as exc:
        return config, None, [f"{WEIGHTS_FILE}: cannot be read ({exc})"]
    return config, found, []


def compare_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[tuple[int, ...], str]],
                    dtypes: dict[str, str] | None = None) -> list[str]:
    """Every tensor the loader reads (``expected``: name -> shape, ``dtypes``: name -> safetensors dtype where it
    matters) present with its shape, and none it would leave unread."""
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"{WEIGHTS_FILE}: missing {name} {list(shape)}")
        elif found[name][0] != shape:
            problems.append(f"{WEIGHTS_FILE}: {name} has shape {list(found[name][0])}, the loader expects {list(shape)}")
        elif dtypes and name in dtypes and found[name][1] != dtypes[name]:
            problems.append(f"{WEIGHTS_FILE}: {name} is {found[name][1]}, the loader expects {dtypes[name]}")
    problems += [f"{WEIGHTS_FILE}: {name} would be left unread" for name in sorted(set(found) - set(expected))]
    return problems
