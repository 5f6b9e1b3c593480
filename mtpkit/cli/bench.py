"""``mtpkit bench``."""

from __future__ import annotations

from mtpkit.cli.common import not_built


def bench() -> None:
    """(not built yet)"""
    not_built("bench")
