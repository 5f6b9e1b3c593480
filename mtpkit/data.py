"""Training data for the heads: load records, recognise their shape, and tokenize them.

A ``--data`` source is a local file (.jsonl, .json, .parquet, .csv, .txt), a Hugging Face
Hub dataset name, ``builtin:prompts`` (the TRAIN split of mtpkit's own prompts; the
held-out split is for benchmarks and never read here), ``builtin:gsm8k`` (1,200 GSM8K
training questions, MIT) or ``builtin:gpteacher`` (2,000 GPTeacher code and role-play instructions, MIT). Each record is recognised as one of

- ``chat``: ``messages`` / ``conversations``, turns with role/content or from/value;
- ``instruction``: ``instruction`` (+ ``input``) and ``output``;
- ``qa``: ``question`` and ``answer`` (or ``prompt`` and ``response`` / ``completion``);
- ``text``: plain ``text``;
- ``prompt``: prompt-only (``turns``, ``prompt`` or ``question`` without an answer), whose
  responses the base writes itself (``mtpkit.distill``);
- ``tokens``: ``prompt_ids`` and ``response_ids`` (a self-distilled corpus, ``mtpkit.corpus``),
  trained on as they are when their ``base_fingerprint`` is this base's.

``self:N`` is N prompts the base writes itself (``mtpkit.self_prompts``).

Chat-like records go through the tokenizer's chat template when it has one. The loss covers
the response only (or all of a plain text), marked by ``TokenizedExample.loss_start``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mtpkit.chat import has_chat_template, prompt_token_ids, render_prompt
from mtpkit.errors import MtpkitError

BUILTIN_PROMPTS = "builtin:prompts"
# shipped training prompt files (mtpkit/prompts/SOURCES.md), and the key that holds each one's prompt
BUILTIN_SETS = {"builtin:gsm8k": ("gsm8k_train", "question"), "builtin:gpteacher": ("gpteacher_train", "prompt")}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
SELF_PROMPTS = "self:"
SHAPES = ("chat", "instruction", "qa", "text", "prompt", "tokens")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
              "model": "assistant", "system": "system"}


@dataclass
class Example:
    """One record, normalised: a prompt (chat messages) with an optional response, or a plain text."""

    shape: str
    messages: list[dict] = field(default_factory=list)
    response: str | None = None
    text: str | None = None
    prompt_ids: list[int] | None = None  # ``tokens`` records: the exact ids, no template applied
    response_ids: list[int] | None = None

    @property
    def needs_response(self) -> bool:
        return self.text is None and self.response is None and self.response_ids is None


@dataclass
class TokenizedExample:
    """Token ids of one training sequence; the loss counts target tokens at positions >= ``loss_start``."""

    ids: list[int]
    loss_start: int = 0


@dataclass
class SourceReport:
    source: str
    records: int
    shapes: dict[str, int]
    skipped: int
    detail: str = ""  # how the records were made, where mtpkit made them (self-written prompts)


@dataclass
class Dataset:
    """Examples of all sources, split into train and eval, and what was found in each source."""

    train: list[Example]
    eval: list[Example]
    sources: list[SourceReport]

    @property
    def shapes(self) -> dict[str, int]:
        """Shapes of the records used (after --max-examples)."""
        return dict(Counter(e.shape for e in self.train + self.eval))


# ----------------------------------------------------------------------------- loading


def _read_rows(source: str, cache_dir: Path | None, backbone=None, progress=None) -> tuple[list[dict], str]:
    """Rows of one source as plain dicts, and how they were made (for self-written prompts)."""
    if source.startswith(SELF_PROMPTS):
        return _self_prompt_rows(source, backbone, progress)
    return _stored_rows(source, cache_dir), ""


def _self_prompt_rows(source: str, backbone, progress=None) -> tuple[list[dict], str]:
    from mtpkit.self_prompts import self_prompts

    count = source[len(SELF_PROMPTS):]
    if not count.isdigit() or int(count) < 1:
        raise MtpkitError(f"--data {source}: write self:N with N a positive number of prompts (e.g. self:2000)")
    if backbone is None:
        raise MtpkitError(f"--data {source}: self-written prompts need the base model")
    texts, report = self_prompts(backbone, int(count), on_batch=progress)
    return [{"prompt": text} for text in texts], report.summary()


def _stored_rows(source: str, cache_dir: Path | None) -> list[dict]:
    """Rows of a file, a hub dataset or the built-in prompts."""
    if source == BUILTIN_PROMPTS:
        from mtpkit.prompts import load_builtin

        return [{"prompt": r["prompt"]} for r in load_builtin("train")]
    if source in BUILTIN_SETS:
        from mtpkit.prompts import load_training_set

        name, key = BUILTIN_SETS[source]
        return [{key: r[key]} for r in load_training_set(name)]
    if source.startswith("builtin:"):
        raise MtpkitError(f"unknown built-in data {source!r}: choose {', '.join([BUILTIN_PROMPTS, *BUILTIN_SETS])}")

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(source).expanduser()
    kwargs = {"cache_dir": str(cache_dir)} if cache_dir else {}
    if path.suffix.lower() in FILE_BUILDERS or path.exists():
        if not path.is_file():
            raise MtpkitError(f"--data {source}: no such file")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise MtpkitError(f"--data {source}: unsupported file type {path.suffix!r} "
                              f"(use {', '.join(FILE_BUILDERS)})")
        if path.stat().st_size == 0:
            raise MtpkitError(f"--data {source}: the file is empty")
        try:
            rows = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", **kwargs)
        except Exception as exc:  # the builders raise many types on malformed files
            raise MtpkitError(f"--data {source}: cannot read it as {path.suffix} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    else:
        name, _, split = source.partition(":")
        try:
            rows = datasets.load_dataset(name, split=split or "train", **kwargs)
        except Exception as exc:  # network, missing dataset, bad split: all one line for the user
            raise MtpkitError(f"--data {source}: not a local file and could not be loaded from the "
                              f"Hugging Face Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    return [dict(row) for row in rows]


def _token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(t, int) for t in value)


def _text(value) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    return None


def _chat_messages(turns) -> list[dict] | None:
    if not isinstance(turns, list) or not turns:
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_NAMES or not isinstance(content, str):
            return None
        messages.append({"role": ROLE_NAMES[role.lower()], "content": content})
    return messages


def to_example(row: dict) -> Example | None:
    """Recognise one record's shape; None when it has no usable field."""
    if _token_ids(row.get("prompt_ids")) and _token_ids(row.get("response_ids")):
        return Example("tokens", prompt_ids=list(row["prompt_ids"]), response_ids=list(row["response_ids"]))
    turns = row.get("messages") if row.get("messages") is not None else row.get("conversations")
    if turns is not None:
        messages = _chat_messages(turns)
        if messages is None:
            return None
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            return Example("chat", messages[:-1], response=messages[-1]["content"])
        return Example("prompt", messages) if messages[-1]["role"] == "user" else None
    if _text(row.get("instruction")):
        content = row["instruction"] + (f"\n\n{row['input']}" if _text(row.get("input")) else "")
        messages = [{"role": "user", "content": content}]
        output = _text(row.get("output"))
        return Example("instruction", messages, response=output) if output else Example("prompt", messages)
    for prompt_key, answer_keys in (("question", ("answer",)), ("prompt", ("response", "completion"))):
        prompt = _text(row.get(prompt_key))
        if prompt:
            answer = next((_text(row.get(k)) for k in answer_keys if _text(row.get(k))), None)
            messages = [{"role": "user", "content": prompt}]
            return Example("qa", messages, response=answer) if answer else Example("prompt", messages)
    if _text(row.get("text")):
        return Example("text", text=row["text"])
    turns = row.get("turns")
    if isinstance(turns, list) and turns and _text(turns[0]):
        return Example("prompt", [{"role": "user", "content": turns[0]}])  # multi-turn benchmarks: first turn
    return None


def load_data(sources: list[str], *, max_examples: int | None = None, eval_fraction: float = 0.1,
              seed: int = 0, cache_dir: Path | None = None, backbone=None, shuffle: bool = True,
              progress=None) -> Dataset:
    """Load, recognise and split every source; fail with one line when nothing usable is found.

    ``backbone`` (the frozen base) is needed by ``self:N`` sources only, whose prompts the base writes
    (``progress(done, total)`` follows that)."""
    if not sources:
        raise MtpkitError("no training data: pass --data (a file, a hub dataset or builtin:prompts)")
    if not 0 <= eval_fraction < 1:
        raise MtpkitError(f"--eval-fraction must be in [0, 1) (got {eval_fraction})")
    examples, reports = [], []
    for source in sources:
        rows, detail = _read_rows(source, cache_dir, backbone, progress)
        if not rows:
            raise MtpkitError(f"--data {source}: the dataset is empty")
        _check_distilled_by(source, rows, backbone)
        found = [to_example(row) for row in rows]
        usable = [e for e in found if e is not None]
        if not usable:
            columns = sorted({key for row in rows[:20] for key in row})
            raise MtpkitError(f"--data {source}: no usable records; expected messages/conversations, "
                              f"instruction/output, question/answer, text, prompt or turns, found columns {columns}")
        reports.append(SourceReport(source, len(rows), dict(Counter(e.shape for e in usable)), len(rows) - len(usable),
                                    detail))
        examples.extend(usable)
    if shuffle:  # a seeded shuffle, so --max-examples and the eval split mix the sources and categories
        random.Random(seed).shuffle(examples)
    if max_examples is not None:
        if max_examples < 1:
            raise MtpkitError(f"--max-examples must be at least 1 (got {max_examples})")
        examples = examples[:max_examples]
    num_eval = round(len(examples) * eval_fraction)
    if eval_fraction > 0 and len(examples) >= 2:
        num_eval = max(1, num_eval)
    if num_eval >= len(examples):
        raise MtpkitError(f"only {len(examples)} examples: too few to hold out {eval_fraction:.0%} for evaluation")
    return Dataset(train=examples[num_eval:], eval=examples[:num_eval], sources=reports)


def _check_distilled_by(source: str, rows: list[dict], backbone) -> None:
    """Token-id records carry the fingerprint of the base that wrote them: only that base may learn from them."""
    if backbone is None:
        return
    others = {row.get("base_fingerprint") for row in rows if row.get("response_ids") is not None} - {None}
    if others - {backbone.fingerprint}:
        raise MtpkitError(f"--data {source}: its responses were written by another base (fingerprint "
                          f"{sorted(others - {backbone.fingerprint})[0]}, this one is {backbone.fingerprint}); "
                          "heads must learn what their own base says: build a corpus with this base (mtpkit corpus)")


# ----------------------------------------------------------------------------- tokenizing


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """Token ids of the prompt, as the base sees it before generating (BOS included if it uses one)."""
    if example.prompt_ids is not None:
        return list(example.prompt_ids)
    return prompt_token_ids(tokenizer, example.messages)


def _response_ids(tokenizer, example: Example) -> list[int]:
    """The response's ids as the chat template closes them (its end-of-turn marker included)."""
    eos = tokenizer.eos_token_id
    if has_chat_template(tokenizer):
        prompt = render_prompt(tokenizer, example.messages)
        full = tokenizer.apply_chat_template(
            example.messages + [{"role": "assistant", "content": example.response}], tokenize=False)
        if full.startswith(prompt):
            return _encode(tokenizer, full[len(prompt):])
    return _encode(tokenizer, example.response) + ([eos] if eos is not None else [])


def tokenize(tokenizer, example: Example, max_length: int, response_ids: list[int] | None = None) -> TokenizedExample | None:
    """Token ids of one example, cut to ``max_length``; None when no target token is left to learn."""
    if example.text is not None:
        ids, start = _encode(tokenizer, example.text), 0
    elif example.prompt_ids is not None:
        ids, start = example.prompt_ids + example.response_ids, len(example.prompt_ids)
    else:
        prompt = prompt_ids(tokenizer, example)
        response = response_ids if response_ids is not None else _response_ids(tokenizer, example)
        ids, start = prompt + list(response), len(prompt)
    ids = ids[:max_length]
    if len(ids) - max(start, 1) < 1:
        return None
    return TokenizedExample(ids=ids, loss_start=start)


def tokenize_all(tokenizer, examples: list[Example], max_length: int,
                 responses: list[list[int] | None] | None = None) -> list[TokenizedExample]:
    responses = responses if responses is not None else [None] * len(examples)
    out = [tokenize(tokenizer, e, max_length, r) for e, r in zip(examples, responses)]
    return [t for t in out if t is not None]


def data_fingerprint(examples: list[TokenizedExample]) -> str:
    """A hash of the exact token sequences, so a resumed run can check it trains on the same data."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.loss_start, example.ids]).encode())
    return digest.hexdigest()[:16]
