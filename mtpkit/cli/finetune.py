"""``mtpkit finetune``."""

from __future__ import annotations

from mtpkit.cli.common import not_built


def finetune() -> None:
    """(not built yet)"""
    not_built("finetune")
