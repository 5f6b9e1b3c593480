"""Which drafters a decoder runs, built from a heads directory: the heads, prompt lookup, a suffix index, token
recycling (the base's own top-k successors of each token, kept from every verification).

``--draft`` names a set of sources (``mtpkit.drafting.registry``). The suffix drafter reads the corpus of the base's own
earlier responses that the heads directory carries (``corpus.parquet`` in it) or names (the config's
``corpus``, relative to the directory); without one it learns from this run's outputs alone. The corpus
index is built once per process and shared; what a decoder learns from its own outputs goes into an index
of its own, so two decoders (two bench methods) never see each other's outputs.

What the calibrator learned (how often each source's drafts were accepted) can be kept between runs
(``remember=acceptance_path(...)``, as ``mtpkit generate`` does): under the cache, keyed like the tree calibration (base,
heads weights, machine) and by draft set and greedy or sampling, so a one-prompt run starts from what
earlier runs measured instead of the drafters' raw confidences. ``mtpkit bench`` starts afresh, so its
figures do not depend on what ran before.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from mtpkit.calibrate import auto_tree, calibrate, calibration_key
from mtpkit.config import CORPUS_NAME, PRIOR_NAME, HeadsConfig
from mtpkit.decoding import HeadsDrafter, PlainDecoder, SpeculativeDecoder, resolve_tree
from mtpkit.drafting.base import Drafter
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.drafting.registry import SOURCES, DraftContext, check_draft
from mtpkit.drafting.recycle import RecycleDrafter, successor_table
from mtpkit.drafting.suffix import SuffixDrafter, SuffixIndex
from mtpkit.errors import MtpkitError
from mtpkit.files import cache_root
from mtpkit.tree import widen_choices

# In a tree chosen per step the heads offer the top 4 children of every node their static tree expands: those
# cost no drafting, and the chooser verifies them where they pay (measured: 1.91-1.93 accepted tokens per step
# against 1.87 on 16 held-out prompts, 2 per category; 1.97 against 1.96 on all 96, at 1.54x vs 1.53x).
HEADS_SIBLINGS = 4


def corpus_path(heads_dir: Path, config: HeadsConfig) -> Path | None:
    """The corpus a heads directory carries or names, if it exists."""
    heads_dir = Path(heads_dir)
    carried = heads_dir / CORPUS_NAME
    if carried.is_file():
        return carried
    if config.corpus:
        named = Path(config.corpus).expanduser()
        named = named if named.is_absolute() else heads_dir / named
        if named.is_file():
            return named.resolve()
    return None  # named but absent (not built yet, say): the suffix drafter learns from this run only


def corpus_index(path: Path, with_prompts: bool = False) -> SuffixIndex:
    """The suffix index of a corpus's responses (each one document; ``with_prompts``: prompt + response), built
    once per process for each version of the file."""
    return _corpus_index(*_version(path), with_prompts)


def _version(path: Path) -> tuple[str, int, int]:
    """What tells one version of a file from another: its resolved path, modification time and size."""
    path = Path(path).resolve()
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _corpus_index(path: str, mtime_ns: int, size: int, with_prompts: bool) -> SuffixIndex:
    prompts, responses = _corpus_columns(path, mtime_ns, size)
    if with_prompts:
        documents = [list(p or []) + list(r or []) for p, r in zip(prompts, responses)]
    else:
        documents = [r for r in responses if r]
    return SuffixIndex.from_documents(documents)


@functools.lru_cache(maxsize=2)
def _corpus_columns(path: str, mtime_ns: int, size: int) -> tuple[list, list]:
    """A corpus's prompt and response token ids, read once per process for each version of the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["prompt_ids", "response_ids"])
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise MtpkitError(f"cannot read the corpus {path}: {str(exc).splitlines()[0]}") from None
    return table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()


def corpus_successors(path: Path, vocab_size: int) -> tuple:
    """Token recycling's warm table from a corpus: the successors of each token in the base's responses (and from
    each prompt's last token to its response's first), built once per process for each version of the file."""
    return _corpus_successors(*_version(path), vocab_size)


@functools.lru_cache(maxsize=2)
def _corpus_successors(path: str, mtime_ns: int, size: int, vocab_size: int) -> tuple:
    prompts, responses = _corpus_columns(path, mtime_ns, size)
    return successor_table([list(p or [])[-1:] + list(r) for p, r in zip(prompts, responses) if r], vocab_size)


def make_drafters(sources, heads, heads_dir: Path | None, tree="auto") -> list[Drafter]:
    """Fresh drafters for ``sources`` (names in ``mtpkit.drafting.registry.SOURCES``); ``tree`` is the heads' static
    tree, which they draft widened to ``HEADS_SIBLINGS`` children per expanded node."""
    context = DraftContext(heads, None if heads_dir is None else Path(heads_dir), tree)
    drafters: list[Drafter] = []
    for source in sources:
        if source not in SOURCES:
            raise MtpkitError(f"unknown draft source {source!r}: choose from {', '.join(SOURCES)}")
        drafters.extend(SOURCES[source].build(context))
    return drafters


def heads_drafters(context: DraftContext) -> list[Drafter]:
    """The ``heads`` source: the heads' static tree, every node it expands given its top ``HEADS_SIBLINGS``."""
    heads = context.heads
    return [HeadsDrafter(heads, widen_choices(resolve_tree(context.tree, heads).choices, HEADS_SIBLINGS))]


def suffix_drafters(context: DraftContext) -> list[Drafter]:
    """The ``suffix`` source: the heads directory's corpus of the base's earlier outputs (shared, read-only), and
    an index of this decoder's own outputs."""
    drafters: list[Drafter] = []
    path = None if context.heads_dir is None else corpus_path(context.heads_dir, context.heads.config)
    if path is not None:
        drafters.append(SuffixDrafter(index=corpus_index(path), learn=False))
    drafters.append(SuffixDrafter(index=SuffixIndex(), learn=True))
    return drafters


def recycle_drafters(context: DraftContext) -> list[Drafter]:
    """The ``recycle`` source: a table over the base's vocabulary, each prompt starting from the successors counted
    in the heads directory's corpus (empty without one)."""
    vocab = context.heads.backbone.vocab_size
    path = None if context.heads_dir is None else corpus_path(context.heads_dir, context.heads.config)
    return [RecycleDrafter(vocab, warm=None if path is None else corpus_successors(path, vocab))]


def acceptance_path(heads, draft: str, sampling: bool) -> Path:
    """Where the calibrator's counts for these heads, this machine and this draft set are kept."""
    return cache_root() / "acceptance" / f"{calibration_key(heads)}-{draft}-{'sampling' if sampling else 'greedy'}.json"


def remembered_calibrator(path: Path) -> ConfidenceCalibrator | None:
    """The calibrator kept at ``path``; None when there is none or it cannot be read (it is then learned anew)."""
    try:
        return ConfidenceCalibrator.from_state_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remember_calibrator(decoder: SpeculativeDecoder, path: Path) -> None:
    """Keep what ``decoder``'s calibrator learned (atomically; a decoder without one keeps nothing)."""
    from mtpkit.files import atomic_write_text

    calibrator = getattr(decoder, "calibrator", None)
    if calibrator is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(calibrator.state_dict(), sort_keys=True) + "\n")


def shipped_prior(heads_dir: Path | None) -> ConfidenceCalibrator | None:
    """The acceptance prior the heads directory ships (``mtpkit calibrate``), None when it has none."""
    return None if heads_dir is None else remembered_calibrator(Path(heads_dir) / PRIOR_NAME)


def build_decoder(heads, heads_dir: Path | None, draft: str = "hybrid", tree="auto", remember: Path | None = None,
                  prior: bool = True, **sampling):
    """The decoder for ``--draft``: plain decoding ("none"), the heads' static tree alone ("heads"), or a tree chosen per step from the
    named sources, under this machine's measured forward costs (calibrated once, cached). With ``remember`` (an
    ``acceptance_path``) its calibrator starts from the counts ``remember_calibrator`` kept there; else, greedy and
    with ``prior``, from the acceptance prior the heads directory ships (``shipped_prior``); else from the drafters'
    raw confidences."""
    sources = check_draft(draft)
    if not sources:
        return PlainDecoder(heads.backbone, **sampling)
    if tree == "auto" and "heads" in sources:
        tree = auto_tree(heads)  # the calibration is wired here: decoding takes a ready tree
    if draft == "heads":
        return SpeculativeDecoder(heads, tree, **sampling)
    calibration = calibrate(heads)
    calibrator = None if remember is None else remembered_calibrator(remember)
    if calibrator is None and prior and not sampling.get("temperature"):  # measured greedy: sampling accepts otherwise
        calibrator = shipped_prior(heads_dir)
    return SpeculativeDecoder(heads, drafters=make_drafters(sources, heads, heads_dir, tree),
                              cost=calibration.forward_cost, calibrator=calibrator,
                              draft_cost=calibration.tree_draft_cost() if "heads" in sources else 0.0, **sampling)
