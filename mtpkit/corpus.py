"""A self-distilled corpus as a real dataset: one Parquet file of prompts and the base's own responses.

Each row holds ``source``, ``prompt`` (text), ``prompt_ids`` and ``response_ids`` (token ids, exactly
what the base saw and said), ``base_fingerprint`` and ``generation`` (the settings). ``datasets`` reads
it (``load_dataset("parquet", data_files=...)``) and ``mtpkit finetune --data corpus.parquet`` trains on
it without running the base again for responses. A user can inspect, share and extend it.

``build_corpus`` grows a corpus: prompts already in it are skipped, the rest are distilled in batches,
and after every batch the whole file is rewritten atomically (temporary file, then rename), so an
interrupted run keeps every finished batch and the next run goes on from there. Rows are kept in the
order of their sources, so a corpus trains on the same batches as the same prompts distilled on the fly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mtpkit import __version__
from mtpkit.backbone import Backbone
from mtpkit.files import atomic_write
from mtpkit.data import SELF_PROMPTS, Example, load_data, prompt_ids, to_example
from mtpkit.distill import prompt_key
from mtpkit.generation import default_batch_size, eos_ids, generate
from mtpkit.errors import MtpkitError
from mtpkit.quality import degeneracy

METADATA_KEY = b"mtpkit_corpus"
COLUMNS = ("source", "prompt", "prompt_ids", "response_ids", "base_fingerprint", "generation")


@dataclass
class CorpusReport:
    path: str
    rows: int
    prompt_tokens: int
    response_tokens: int
    generated_rows: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    sources: dict[str, int] = field(default_factory=dict)
    degeneracy: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how self-written prompts were chosen
    warning: str | None = None  # set when most responses are empty or loops

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def generation_settings(max_new_tokens: int) -> str:
    return f"greedy-n{max_new_tokens}"


def read_corpus(path: Path) -> tuple[list[dict], dict]:
    """The rows of a corpus file (plain dicts) and its file-level metadata."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        return [], {}
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types on a damaged file
        raise MtpkitError(f"{path} is not a readable Parquet corpus: {type(exc).__name__}: {str(exc)[:160]}") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise MtpkitError(f"{path} is not an mtpkit corpus: it lacks the columns {', '.join(missing)}")
    meta = (table.schema.metadata or {}).get(METADATA_KEY)
    return table.to_pylist(), (json.loads(meta) if meta else {})


def write_corpus(path: Path, rows: list[dict], metadata: dict) -> None:
    """Write every row atomically (zstd-compressed Parquet, token ids as int32 lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("source", pa.string()), ("prompt", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
                        ("response_ids", pa.list_(pa.int32())), ("base_fingerprint", pa.string()),
                        ("generation", pa.string())],
                       metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    table = pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows], schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", compression_level=9))


def corpus_stats(rows: list[dict]) -> tuple[int, int, dict[str, int]]:
    sources: dict[str, int] = {}
    for row in rows:
        sources[row["source"]] = sources.get(row["source"], 0) + 1
    return (sum(len(r["prompt_ids"]) for r in rows), sum(len(r["response_ids"]) for r in rows), sources)


def _prompts_of(sources: list[str], backbone: Backbone, written: dict[str, list[str]],
                progress=None) -> tuple[list[tuple[str, Example]], list[str]]:
    """Every prompt of every source, in order (no split: the corpus holds them all), and notes on them.

    ``written`` holds the prompts of ``self:N`` sources that an earlier run wrote (kept in the corpus's
    metadata, so a resumed run on another machine distills the same prompts); new ones are added to it.
    """
    found, notes = [], []
    for source in sources:
        if source in written:
            prompts = [to_example({"prompt": text}) for text in written[source]]
        else:
            dataset = load_data([source], eval_fraction=0.0, seed=0, backbone=backbone, shuffle=False,
                                progress=progress)
            notes.extend(f"{r.source}: {r.detail}" for r in dataset.sources if r.detail)
            prompts = [e for e in dataset.train if e.needs_response]
        if not prompts:
            raise MtpkitError(f"--data {source}: no prompt-only records to distill (the corpus holds the base's "
                              "own responses)")
        if source.startswith(SELF_PROMPTS):
            written[source] = [e.messages[-1]["content"] for e in prompts]
        found.extend((source, e) for e in prompts)
    return found, notes


def estimate_seconds(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                     mean_fraction: float = 0.6) -> float:
    """A first guess of a run's length, measured: one batch's prefill and a few decoding steps are timed,
    and responses are taken to use ``mean_fraction`` of the token budget on average."""
    probe = prompts[:batch_size]
    steps = 4
    tick = time.perf_counter()
    generate(backbone, probe, 1)
    prefill = time.perf_counter() - tick
    tick = time.perf_counter()
    generate(backbone, probe, 1 + steps)
    step = max(0.0, time.perf_counter() - tick - prefill) / steps
    batches = -(-len(prompts) // batch_size)
    return batches * (prefill + step * max_new_tokens * mean_fraction)


def build_corpus(backbone: Backbone, sources: list[str], out: Path, *, max_new_tokens: int = 256,
                 batch_size: int | None = None, metadata: dict | None = None,
                 on_prompts: Callable[[int, int], None] | None = None,
                 on_start: Callable[[int, int, list[list[int]], int], None] | None = None,
                 on_batch: Callable[[int, int, int], None] | None = None) -> CorpusReport:
    """Distill every prompt of ``sources`` not yet in ``out`` and keep the corpus file up to date.

    ``on_prompts(done, total)`` follows self-written prompts; ``on_start(todo, already, todo_prompt_ids,
    batch_size)`` is called once the work is known; ``on_batch(done, total, tokens)`` after every batch written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, old_meta = read_corpus(out)
    settings = generation_settings(max_new_tokens)
    foreign = {(r["base_fingerprint"], r["generation"]) for r in rows} - {(backbone.fingerprint, settings)}
    if foreign:
        fingerprint, other = sorted(foreign)[0]
        raise MtpkitError(f"{out} holds responses of base {fingerprint} ({other}); this run is base "
                          f"{backbone.fingerprint} ({settings}): write to another file")
    written = dict(old_meta.get("self_prompts", {}))
    prompts, notes = _prompts_of(sources, backbone, written, on_prompts)
    present = {prompt_key(r["prompt_ids"]) for r in rows}
    encoded = [(source, example, prompt_ids(backbone.tokenizer, example)) for source, example in prompts]
    todo, seen = [], set(present)
    for index, (source, example, ids) in enumerate(encoded):
        key = prompt_key(ids)
        if key not in seen:  # a prompt given twice is distilled once
            seen.add(key)
            todo.append(index)
    todo.sort(key=lambda i: -len(encoded[i][2]))  # longest first: little padding, memory errors come early
    place: dict[str, int] = {}
    for index, (_, _, ids) in enumerate(encoded):
        place.setdefault(prompt_key(ids), index)
    metadata = {**old_meta, **(metadata or {}), "base_model": backbone.reference, "base_fingerprint": backbone.fingerprint,
                "generation": settings, "mtpkit_version": __version__, "self_prompts": written}
    batch_size = batch_size or default_batch_size(backbone)
    if on_start:
        on_start(len(todo), len(rows), [encoded[i][2] for i in todo], batch_size)
    stop_ids = eos_ids(backbone)
    start, generated_tokens = time.perf_counter(), 0
    for first in range(0, len(todo), batch_size):
        batch = todo[first:first + batch_size]
        responses = generate(backbone, [encoded[i][2] for i in batch], max_new_tokens).responses
        for i, response in zip(batch, responses):
            source, example, ids = encoded[i]
            rows.append({"source": source, "prompt": example.messages[-1]["content"], "prompt_ids": ids,
                         "response_ids": response, "base_fingerprint": backbone.fingerprint, "generation": settings})
        generated_tokens += sum(len(r) for r in responses)
        # the sources' order, however the work was cut; rows of prompts no longer asked for stay, last
        rows.sort(key=lambda r: place.get(prompt_key(r["prompt_ids"]), len(place)))
        write_corpus(out, rows, metadata)
        if on_batch:
            on_batch(min(first + batch_size, len(todo)), len(todo), generated_tokens)
    prompt_tokens, response_tokens, by_source = corpus_stats(rows)
    quality = degeneracy([r["response_ids"] for r in rows], stop_ids)
    return CorpusReport(path=str(out), rows=len(rows), prompt_tokens=prompt_tokens, response_tokens=response_tokens,
                        generated_rows=len(todo), generated_tokens=generated_tokens,
                        seconds=time.perf_counter() - start, sources=by_source, degeneracy=quality.as_dict(),
                        notes=notes, warning=quality.warning())


def report_dict(report: CorpusReport) -> dict:
    return {**asdict(report), "tokens_per_second": round(report.tokens_per_second, 2)}
