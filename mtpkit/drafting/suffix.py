"""A suffix automaton over the base's earlier outputs and this run's, drafting what followed before.

SAM-Decoding / SuffixDecoding in one index: documents (token sequences) are joined by a separator
that no query contains, so every match lies inside one document and continuations stop at its end.
The automaton is built online (linear in the text); each state counts its occurrences (the size of
its end-position set: summed over the suffix-link tree after a bulk build, kept up to date while
appending at run time). A lookup reads at most ``max_match`` context tokens and then only the
states it proposes, so its time does not depend on the corpus size.

    python -m mtpkit.drafting.suffix --bench    # build and lookup times on 100k and 1M random tokens
"""

from __future__ import annotations

import argparse
import gc
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mtpkit.drafting.base import Candidates, best_first
from mtpkit.errors import MtpkitError

SEPARATOR = -1  # between documents; token ids are >= 0, so no query can match across it
FORMAT = "mtpkit-suffix-index"


class SuffixIndex:
    """Suffix automaton of documents of token ids; state 0 is the empty string."""

    def __init__(self, min_match: int = 2, max_match: int = 32):
        if not 1 <= min_match <= max_match:
            raise MtpkitError(f"the suffix index needs 1 <= min_match <= max_match (got {min_match}, {max_match})")
        self.min_match, self.max_match = min_match, max_match
        self._length = [0]  # longest string of each state
        self._link = [-1]  # suffix link
        self._next: list[dict[int, int]] = [{}]  # transitions
        self._count = [0]  # occurrences (end positions) of the state's strings
        self._is_clone = bytearray(1)
        self._last = 0
        self._text = array("i")  # the indexed tokens, documents joined by SEPARATOR (what save() writes)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_documents(cls, documents: Iterable[Sequence[int]], min_match: int = 2,
                       max_match: int = 32) -> "SuffixIndex":
        index = cls(min_match, max_match)
        index.add_documents(documents)
        return index

    def add_documents(self, documents: Iterable[Sequence[int]]) -> None:
        """Bulk append, then recount every state once (linear, whatever the text repeats)."""
        with _collector_paused():
            for document in documents:
                self._separate()
                for token in _checked(document):
                    self._append(token, counting=False)
            self._recount()

    def add_document(self, tokens: Sequence[int] = ()) -> None:
        """Start a new document (this run's generation, say) and index ``tokens`` as its beginning."""
        self._separate()
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the last document, counts kept current (cost: the suffix-link chain per token)."""
        for token in _checked(tokens):
            self._append(token, counting=True)

    def _separate(self) -> None:
        if self._text and self._text[-1] != SEPARATOR:
            self._append(SEPARATOR, counting=True)

    def _new_state(self, length: int, link: int, transitions: dict[int, int], count: int, clone: bool) -> int:
        self._length.append(length)
        self._link.append(link)
        self._next.append(transitions)
        self._count.append(count)
        self._is_clone.append(clone)
        return len(self._length) - 1

    def _append(self, token: int, counting: bool) -> None:
        length, link, following, count = self._length, self._link, self._next, self._count
        self._text.append(token)
        current = self._new_state(length[self._last] + 1, 0, {}, 1, False)
        state = self._last
        while state != -1 and token not in following[state]:
            following[state][token] = current
            state = link[state]
        if state != -1:
            target = following[state][token]
            if length[state] + 1 == length[target]:
                link[current] = target
            else:  # split: the shorter strings of ``target`` now also end here
                clone = self._new_state(length[state] + 1, link[target], dict(following[target]),
                                        count[target] if counting else 0, True)
                while state != -1 and following[state].get(token) == target:
                    following[state][token] = clone
                    state = link[state]
                link[target] = link[current] = clone
        self._last = current
        if counting:  # every suffix of the text gains this end position
            state = link[current]
            while state > 0:
                count[state] += 1
                state = link[state]

    def _recount(self) -> None:
        """Occurrences from scratch: each non-clone state owns one end position; sum up the suffix-link tree."""
        count = [0 if clone else 1 for clone in self._is_clone]
        count[0] = 0
        link = self._link
        for state in np.argsort(np.asarray(self._length), kind="stable")[::-1].tolist():  # longest first
            if link[state] > 0:
                count[link[state]] += count[state]
        self._count = count

    # ------------------------------------------------------------------ queries

    @property
    def num_tokens(self) -> int:
        """Indexed tokens, separators included."""
        return len(self._text)

    @property
    def num_states(self) -> int:
        return len(self._length)

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of ``tokens`` in the documents."""
        state = self._walk(tokens)
        return 0 if state is None or not tokens else self._count[state]

    def next_counts(self, tokens: Sequence[int]) -> dict[int, int]:
        """Token -> occurrences of ``tokens`` followed by it (within a document)."""
        state = self._walk(tokens)
        return {} if state is None else {token: n for token, n, _ in self._children(state)}

    def match(self, context: Sequence[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of the context's last ``max_match`` tokens that occurs
        followed by a token; (0, 0) if it is shorter than ``min_match``."""
        length, link, following = self._length, self._link, self._next
        state, matched = 0, 0
        for token in _checked(context[-self.max_match:]):
            while state and token not in following[state]:
                state = link[state]
                matched = length[state]
            if token in following[state]:
                state = following[state][token]
                matched += 1
            else:
                state, matched = 0, 0
        # strings of a state share their end positions: if the longest matched string is never
        # followed (it only ends documents or the text), no string of its state is; try the shorter ones
        while state and not any(token != SEPARATOR for token in following[state]):
            state = link[state]
            matched = length[state]
        return (state, matched) if matched >= self.min_match else (0, 0)

    def continuations(self, context: Sequence[int], max_depth: int, max_nodes: int,
                      source: str = "suffix") -> Candidates:
        """The most probable continuations of the context's longest matched suffix, as a trie.

        A node's confidence is count(its string) / count(its parent's string followed by a token).
        """
        state, matched = self.match(context)
        if not matched or max_nodes < 1 or max_depth < 1:
            return Candidates()
        return best_first(state, self._children, max_depth, max_nodes, source)

    def _children(self, state: int) -> list[tuple[int, int, int]]:
        count = self._count
        return [(token, count[child], child) for token, child in self._next[state].items() if token != SEPARATOR]

    def _walk(self, tokens: Sequence[int]) -> int | None:
        state = 0
        for token in _checked(tokens):
            state = self._next[state].get(token)
            if state is None:
                return None
        return state

    # ------------------------------------------------------------------ files

    def save(self, path: Path) -> None:
        """The indexed text (int32) in a safetensors file; ``load`` rebuilds the automaton from it."""
        from safetensors.numpy import save_file

        save_file({"text": np.frombuffer(self._text, dtype=np.int32)}, str(path),
                  metadata={"format": FORMAT, "min_match": str(self.min_match), "max_match": str(self.max_match)})

    @classmethod
    def load(cls, path: Path) -> "SuffixIndex":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise MtpkitError(f"{path} is not a suffix index file")
            text = handle.get_tensor("text")
        index = cls(int(metadata["min_match"]), int(metadata["max_match"]))
        with _collector_paused():
            for token in text.tolist():
                index._append(token, counting=False)
            index._recount()
        return index


@contextmanager
def _collector_paused():
    """The automaton is millions of small dicts and ints with no reference cycles: the cyclic garbage
    collector's repeated scans of them only slow a bulk build (by a third or more at 1M tokens)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _checked(tokens: Sequence[int]) -> list[int]:
    tokens = [int(t) for t in tokens]
    if any(t < 0 for t in tokens):
        raise MtpkitError("token ids must be >= 0 (negative ids separate documents in the suffix index)")
    return tokens


@dataclass
class SuffixDrafter:
    """Drafts from a suffix index of earlier outputs; with ``learn`` it indexes this run's output too."""

    index: SuffixIndex = field(default_factory=SuffixIndex)
    max_depth: int = 8
    learn: bool = True
    name: str = "suffix"

    def start(self, prompt_ids: Sequence[int]) -> None:
        if self.learn:
            self.index.add_document()  # the prompt is prompt lookup's; the output is a new document

    def propose(self, context_ids: Sequence[int], budget: int) -> Candidates:
        return self.index.continuations(context_ids, self.max_depth, budget, self.name)

    def update(self, accepted_ids: Sequence[int]) -> None:
        if self.learn:
            self.index.extend(accepted_ids)

    def reset(self) -> None:
        """Forget this run's outputs (a shared, read-only corpus index stays)."""
        if self.learn:
            self.index = SuffixIndex(self.index.min_match, self.index.max_match)


# ---------------------------------------------------------------------- benchmark


def markov_corpus(num_tokens: int, seed: int, vocab: int = 2000, successors: int = 6, source_seed: int = 0,
                  document_length: int = 500) -> list[list[int]]:
    """Documents from a random first-order source (fixed by ``source_seed``): each token has
    ``successors`` likely next tokens with Zipf weights, so contexts recur and branch as in real
    outputs, unlike uniform noise. ``seed`` draws the text."""
    table = np.random.default_rng(source_seed).integers(0, vocab, size=(vocab, successors)).tolist()
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, successors + 1)
    picks = rng.choice(successors, size=num_tokens, p=weights / weights.sum()).tolist()
    documents, token = [], int(rng.integers(vocab))
    for start in range(0, num_tokens, document_length):
        document = []
        for pick in picks[start:start + document_length]:
            token = table[token][pick]
            document.append(token)
        documents.append(document)
    return documents


def bench(sizes: Sequence[int], queries: int, seed: int, max_depth: int, max_nodes: int) -> None:
    print(f"{'tokens':>10} {'states':>10} {'build s':>8} {'tokens/s':>10} {'lookup us':>10} "
          f"{'match len':>9} {'nodes':>6} {'append us':>9}")
    for size in sizes:
        documents = markov_corpus(size, seed=seed)
        start = time.perf_counter()
        index = SuffixIndex.from_documents(documents, min_match=2, max_match=32)
        build = time.perf_counter() - start
        states = index.num_states
        # queries: other text from the same source (parts of it recur in the corpus, with other continuations)
        contexts = markov_corpus(queries * 40, seed=seed + 1, document_length=40)
        for context in contexts[: queries // 10]:  # warm-up
            index.continuations(context, max_depth, max_nodes)
        nodes = 0
        start = time.perf_counter()
        for context in contexts:
            nodes += len(index.continuations(context, max_depth, max_nodes))
        lookup = (time.perf_counter() - start) / len(contexts)
        lengths = [index.match(context)[1] for context in contexts]
        # a run's output appended as it is committed, a few tokens per step (counts kept online)
        output = markov_corpus(4000, seed=seed + 2, document_length=4000)[0]
        start = time.perf_counter()
        index.add_document()
        for at in range(0, len(output), 4):
            index.extend(output[at:at + 4])
        append = (time.perf_counter() - start) / len(output)
        print(f"{size:>10} {states:>10} {build:>8.2f} {size / build:>10.0f} {lookup * 1e6:>10.1f} "
              f"{sum(lengths) / len(lengths):>9.2f} {nodes / len(contexts):>6.1f} {append * 1e6:>9.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtpkit.drafting.suffix", description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="time building and lookups on random corpora")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes in tokens")
    parser.add_argument("--queries", type=int, default=2000, help="lookups timed per size")
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.bench:
        parser.error("nothing to do: pass --bench")
    bench(args.sizes, args.queries, args.seed, args.max_depth, args.max_nodes)


if __name__ == "__main__":
    main()
