"""Every draft source, declared once: its name, one line saying what it proposes, the function that builds it, and
the bench method that runs it alone. ``--draft``'s choices, its help, its error messages and the bench's methods
derive from here (``mtpkit.bench_methods``). No torch at import: the command line reads this for ``--help``.

A new source is one module with a ``build(context: DraftContext) -> list[Drafter]`` function, plus one line in
``SOURCES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HYBRID = "hybrid"  # every source in one tree chosen per step
PLAIN = "none"  # no drafts: plain decoding on mtpkit's kernels, the baseline


@dataclass(frozen=True)
class DraftContext:
    """What a source may build its drafters from."""

    heads: Any  # mtpkit.heads.DraftHeads: the heads and, through them, the base
    heads_dir: Path | None  # the heads directory (a suffix corpus may sit beside the weights)
    tree: Any  # the heads' static tree (choices), which the heads source widens


@dataclass(frozen=True)
class DraftSource:
    name: str
    summary: str  # one line for --help
    builder: str  # "module:function" taking a DraftContext, returning the source's drafters
    bench_method: str | None = None  # the bench method that runs this source alone on mtpkit's loop

    def build(self, context: DraftContext) -> list:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(context)


SOURCES: dict[str, DraftSource] = {source.name: source for source in (
    DraftSource("heads", "the draft heads' tree, each node they expand offered with its top 4 children",
                "mtpkit.draft_sources:heads_drafters"),  # alone: the static tree (bench's mtp-chain, mtp-tree)
    DraftSource("lookup", "prompt lookup: n-grams of the prompt and the output so far", "mtpkit.drafting.lookup:build",
                "pld"),
    DraftSource("suffix", "a suffix index of the base's earlier outputs (the heads directory's corpus) and this "
                "run's", "mtpkit.draft_sources:suffix_drafters", "suffix"),
    DraftSource("recycle", "token recycling: each token's top-8 successors, kept from every verification, "
                "starting from those in the heads directory's corpus", "mtpkit.draft_sources:recycle_drafters",
                "recycle"),
)}


def draft_sets() -> dict[str, tuple[str, ...]]:
    """``--draft``'s choices: every source together (hybrid), each alone, or none."""
    return {HYBRID: tuple(SOURCES), **{name: (name,) for name in SOURCES}, PLAIN: ()}


def draft_help() -> str:
    """``--draft``'s help text."""
    alone = "; ".join(f"{name} ({source.summary})" for name, source in SOURCES.items())
    return (f"Who drafts: {HYBRID} (every source below, in one tree chosen each step), or one source alone: {alone}; "
            f"or {PLAIN} (plain decoding on mtpkit's kernels: the fastest plain decoding on this machine).")


def check_draft(draft: str) -> tuple[str, ...]:
    """The sources of ``--draft``; an unknown name is one line naming the choices."""
    from mtpkit.errors import MtpkitError

    sets = draft_sets()
    if draft not in sets:
        raise MtpkitError(f"unknown --draft {draft!r}: choose from {', '.join(sets)}")
    return sets[draft]
