"""The bench's methods, declared once: the command line's help, the settings' checks and the runner derive from
here, and each draft source adds the method that runs it alone (``mtpkit.drafting.registry``). No torch at import.
"""

from __future__ import annotations

from mtpkit.drafting.registry import HYBRID, SOURCES

BASELINE = "hf-greedy"  # transformers' own greedy decoding: what a user runs without mtpkit
CONTROL = "greedy"  # mtpkit's plain decoding on the measured kernel plan: speculation_gain is measured against it
REQUIRED = (BASELINE, CONTROL)  # every report carries both, so a speed-up always splits into kernels x speculation
# plain greedy with every layer on one layout (no padded token): the candidates the control must be the fastest of
PLAIN_LAYOUTS = {"greedy-stock": "stock", "greedy-column": "column", "greedy-pair": "pair", "greedy-packed": "packed"}
TRANSFORMERS = ("hf-greedy", "hf-pld")  # transformers' generate: greedy, and its prompt lookup
HEADS_TREES = {"mtp-chain": "chain", "mtp-tree": None}  # the heads alone on a static tree (None: --tree)
MIXED = "mtp-hybrid"  # every source in one tree chosen per step
DEFAULT_METHODS = ("hf-greedy", "greedy", "hf-pld", "pld", "mtp-tree", "mtp-hybrid")
DESCRIPTIONS = {"hf-greedy": "transformers' greedy generate", "greedy": "mtpkit's plain decoding on the kernels "
                "measured fastest here, the control every gain is over", "hf-pld": "transformers' prompt lookup",
                "mtp-chain": "the heads' top-1 chain", "mtp-tree": "the heads' --tree",
                MIXED: "every draft source in one tree chosen per step"}


def drafted_methods() -> dict[str, str]:
    """Each method that runs mtpkit's loop on a set of draft sources: method -> ``--draft`` value."""
    alone = {source.bench_method: name for name, source in SOURCES.items() if source.bench_method}
    return {**alone, MIXED: HYBRID}


def all_methods() -> tuple[str, ...]:
    drafted = drafted_methods()
    return (*TRANSFORMERS[:1], CONTROL, *PLAIN_LAYOUTS, *TRANSFORMERS[1:], *(m for m in drafted if m != MIXED),
            *HEADS_TREES, MIXED)


def methods_help() -> str:
    """``mtpkit bench --methods``' help text."""
    sources = {source.bench_method: source.summary for source in SOURCES.values() if source.bench_method}
    described = {**DESCRIPTIONS, **sources, **{m: f"plain greedy, every layer on {layout}"
                                               for m, layout in PLAIN_LAYOUTS.items()}}
    parts = "; ".join(f"{method}: {described[method]}" for method in all_methods())
    return f"Comma-separated methods ({parts}). {BASELINE} and {CONTROL} always run."
