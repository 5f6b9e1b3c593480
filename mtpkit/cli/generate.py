"""``mtpkit generate``."""

from __future__ import annotations

from mtpkit.cli.common import not_built


def generate() -> None:
    """(not built yet)"""
    not_built("generate")
