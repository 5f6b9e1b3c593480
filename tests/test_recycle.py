"""Token recycling: the successor table against hand-computed top-k, its drafts against a hand-made table, and
greedy speculative output equal to plain greedy output with recycling alone and inside the hybrid tree."""

from __future__ import annotations

import math

import pytest
import torch

from mtpkit.decoding import HeadsDrafter, SpeculativeDecoder
from mtpkit.draft_sources import make_drafters
from mtpkit.drafting.registry import draft_sets
from mtpkit.drafting.lookup import PromptLookup
from mtpkit.drafting.recycle import EMPTY, RecycleDrafter, successor_table
from mtpkit.drafting.suffix import SuffixDrafter
from mtpkit.errors import MtpkitError

from tests.test_decoding import random_heads
from tests.test_hybrid import FREE, HEADS_TREE, decode, reference_run

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def log_probabilities(*probabilities: float, vocab: int = 10) -> list[float]:
    """Logits whose softmax is ``probabilities`` (the rest of the vocabulary: probability 0)."""
    padded = list(probabilities) + [0.0] * (vocab - len(probabilities))
    return [math.log(p) if p > 0 else -math.inf for p in padded]


# ----------------------------------------------------------------------------- the table


def test_table_rows_are_the_top_successors_of_the_last_observation():
    drafter = RecycleDrafter(vocab_size=10, successors=3)
    # node tokens 4, 7, 4: token 4 is observed twice in one verification, its later node wins
    logits = torch.tensor([log_probabilities(0.1, 0.5, 0.0, 0.3, 0.1),       # 4: successors 1, 3, then 0 or 4
                           log_probabilities(0.0, 0.0, 0.6, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0, 0.15),  # 7: 2, 5, 9
                           log_probabilities(0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 0.2, 0.05)])  # 4: 6, 7, then 0 or 8
    drafter.observe_verification(torch.tensor([4, 7, 4]), logits)
    assert drafter.table[7].tolist() == [2, 5, 9]
    assert drafter.confidences[7].tolist() == pytest.approx([0.6, 0.25, 0.15])
    assert drafter.table[4].tolist()[:2] == [6, 7] and drafter.table[4, 2].item() in (0, 8)
    assert drafter.confidences[4].tolist() == pytest.approx([0.7, 0.2, 0.05])
    untouched = [t for t in range(10) if t not in (4, 7)]
    assert (drafter.table[untouched] == EMPTY).all() and (drafter.confidences[untouched] == 0).all()

    # a later verification replaces 7's row and leaves 4's as it was
    drafter.observe_verification(torch.tensor([7]), torch.tensor([log_probabilities(0.0, 0.9, 0.0, 0.0, 0.0, 0.0,
                                                                                    0.0, 0.0, 0.06, 0.04)]))
    assert drafter.table[7].tolist() == [1, 8, 9]
    assert drafter.confidences[7].tolist() == pytest.approx([0.9, 0.06, 0.04])
    assert drafter.table[4].tolist()[:2] == [6, 7]
    assert drafter.successors_of(7) == [(1, pytest.approx(0.9)), (8, pytest.approx(0.06)), (9, pytest.approx(0.04))]

    drafter.start([1, 2, 3])  # every prompt starts from an empty table
    assert (drafter.table == EMPTY).all() and (drafter.confidences == 0).all()
    assert drafter.successors_of(7) == [] and len(drafter.propose([1, 2, 7], budget=8)) == 0


def test_a_warm_table_counts_successors_and_every_prompt_starts_from_it():
    # 1 -> 2 three times, 1 -> 3 twice, 1 -> 5 twice (tie: the smaller id first), 1 -> 4 once; 2 -> 1 twice;
    # 3 -> 1 once; 5 -> 9 once; 9 is never followed; 12 is outside the vocabulary (not counted)
    documents = [[1, 2, 1, 3, 1, 2], [1, 5, 9], [1, 3, 1, 4], [1, 2, 1, 5], [7], [], [12, 1], [5, 12]]
    table, confidences = successor_table(documents, vocab_size=10, successors=3)
    assert table[1].tolist() == [2, 3, 5] and confidences[1].tolist() == pytest.approx([3 / 8, 2 / 8, 2 / 8])
    assert table[2].tolist() == [1, EMPTY, EMPTY] and confidences[2].tolist() == pytest.approx([1.0, 0, 0])
    assert table[3].tolist()[0] == 1 and table[5].tolist() == [9, EMPTY, EMPTY] and confidences[5, 0] == 1.0
    assert (table[[0, 4, 6, 7, 8, 9]] == EMPTY).all() and (confidences[[0, 4, 6, 7, 8, 9]] == 0).all()

    drafter = RecycleDrafter(vocab_size=10, successors=3, warm=(table, confidences))
    assert drafter.successors_of(5) == [(9, 1.0)]  # warm from the start
    drafter.record(torch.tensor([5]), torch.tensor([[7, 8]]), torch.tensor([[0.6, 0.3]]))
    assert drafter.successors_of(5) == [(7, pytest.approx(0.6)), (8, pytest.approx(0.3))]
    drafter.start([1, 2])  # the next prompt: the warm table again, nothing of the last prompt
    assert torch.equal(drafter.table, table) and torch.equal(drafter.confidences, confidences)
    assert table[5].tolist() == [9, EMPTY, EMPTY]  # the warm table itself never changes
    with pytest.raises(MtpkitError, match="warm recycling table must be"):
        RecycleDrafter(vocab_size=11, successors=3, warm=(table, confidences))


def test_recycle_starts_from_the_heads_corpus(tiny_model_dirs, tmp_path):
    """Built for a heads directory with a corpus, the drafter's table is the corpus's successors."""
    from mtpkit.attach import attach
    from mtpkit.checkpoint import open_heads
    from mtpkit.config import CORPUS_NAME
    from mtpkit.corpus import write_corpus

    heads_dir = tmp_path / "heads"
    attach(str(tiny_model_dirs["llama"]), "sequential", 2, 1, heads_dir)
    heads = open_heads(heads_dir)
    cold = make_drafters(("recycle",), heads, heads_dir)[0]
    assert (cold.table == EMPTY).all()
    rows = [{"source": "x", "prompt": "p", "prompt_ids": [1, 4], "response_ids": [6, 7, 6, 8], "base_fingerprint": "f",
             "generation": "g"}]
    write_corpus(heads_dir / CORPUS_NAME, rows, {})
    warm = make_drafters(("recycle",), heads, heads_dir)[0]
    assert warm.table[4].tolist()[0] == 6 and warm.table[6].tolist()[:2] == [7, 8]
    assert warm.confidences[6].tolist()[:2] == pytest.approx([0.5, 0.5])
    assert int((warm.table != EMPTY).sum()) == 4  # 4 -> 6, 6 -> 7, 7 -> 6, 6 -> 8


def test_record_keeps_short_rows_and_drops_tokens_outside_the_table():
    drafter = RecycleDrafter(vocab_size=10, successors=4)
    drafter.record(torch.tensor([3, 12, 3]), torch.tensor([[5, 6], [1, 2], [8, EMPTY]]),
                   torch.tensor([[0.5, 0.25], [0.9, 0.1], [0.75, 0.2]]))
    assert drafter.table[3].tolist() == [8, EMPTY, EMPTY, EMPTY]
    assert drafter.confidences[3].tolist() == pytest.approx([0.75, 0.0, 0.0, 0.0])
    assert (drafter.table[[t for t in range(10) if t != 3]] == EMPTY).all()
    with pytest.raises(MtpkitError, match="at most 4 successors"):
        drafter.record(torch.tensor([1]), torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5))


# ----------------------------------------------------------------------------- drafting


def hand_table(max_depth: int) -> RecycleDrafter:
    """3 -> 5 (0.6), 9 (0.3); 5 -> 6 (0.8), 3 (0.1); 9 -> 4 (0.9); 4 -> 9 (0.5); 6: nothing recorded."""
    drafter = RecycleDrafter(vocab_size=20, successors=2, max_depth=max_depth)
    drafter.record(torch.tensor([3, 5, 9, 4]), torch.tensor([[5, 9], [6, 3], [4, EMPTY], [9, EMPTY]]),
                   torch.tensor([[0.6, 0.3], [0.8, 0.1], [0.9, 0.0], [0.5, 0.0]]))
    return drafter


def test_drafts_the_most_probable_paths_of_the_table_best_first():
    # path probabilities: 5 .6, 5-6 .48, 9 .3, 9-4 .27, 9-4-9 .135, 5-3 .06: the first five, parents first
    candidates = hand_table(max_depth=3).propose([1, 2, 3], budget=5)
    assert candidates.tokens == (5, 6, 9, 4, 9)  # a token may repeat along a path (9 -> 4 -> 9)
    assert candidates.parents == (-1, 0, -1, 2, 3)
    assert candidates.confidences == pytest.approx((0.6, 0.8, 0.3, 0.9, 0.5))
    assert candidates.sources == ("recycle",) * 5
    # two deep: 9-4-9 is too deep, so 5-3 (.06) comes in last
    shallow = hand_table(max_depth=2).propose([1, 2, 3], budget=8)
    assert (shallow.tokens, shallow.parents) == ((5, 6, 9, 4, 3), (-1, 0, -1, 2, 0))
    assert shallow.confidences == pytest.approx((0.6, 0.8, 0.3, 0.9, 0.1))
    assert hand_table(3).propose([1, 2, 3], budget=2).tokens == (5, 6)
    assert len(hand_table(3).propose([1, 6], budget=8)) == 0  # an empty row drafts nothing
    assert len(hand_table(3).propose([1, 25], budget=8)) == 0  # a token outside the table too
    assert len(hand_table(3).propose([1, 3], budget=0)) == 0


# ----------------------------------------------------------------------------- inside the decoder


class OracleRecycle(RecycleDrafter):
    """A recycling table that knows the base's greedy output: each token's row holds the token that followed its
    last occurrence, with probability 1. Observations still run, then the oracle rows are put back: the random base
    repeats tokens in other contexts, and nodes off the accepted path would overwrite them with its guesses there,
    while this table is meant to draft long, mostly accepted paths."""

    def __init__(self, vocab_size: int, sequence: list[int]):
        super().__init__(vocab_size)
        self.sequence = sequence

    def start(self, prompt_ids):
        super().start(prompt_ids)
        self.record_oracle()

    def observe_verification(self, tokens, logits):
        super().observe_verification(tokens, logits)
        self.record_oracle()

    def record_oracle(self):
        tokens = torch.tensor(self.sequence)
        self.record(tokens[:-1], tokens[1:, None], torch.ones(len(tokens) - 1, 1))


class Spy(RecycleDrafter):
    """Records what the decoder hands over after each verification."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size)
        self.observed: list[tuple[list[int], torch.Tensor]] = []

    def observe_verification(self, tokens, logits):
        self.observed.append((tokens.tolist(), logits.clone()))
        super().observe_verification(tokens, logits)


def test_the_decoder_hands_every_verified_tree_to_the_table(tiny_backbone):
    ids, reference, _ = reference_run(tiny_backbone)
    heads = random_heads(tiny_backbone, "medusa")
    spy = Spy(tiny_backbone.vocab_size)
    result, steps = decode(heads, [spy, PromptLookup()], ids, 40)
    assert result.tokens == reference.tokens
    assert [tokens for tokens, _ in spy.observed] == [step["draft_tokens"] for step in steps]
    assert all(logits.shape == (len(tokens), tiny_backbone.vocab_size) for tokens, logits in spy.observed)
    # the base's choice at each step's root is the step's first new token
    firsts = [reference.tokens[1 + sum(result.accepted_lengths[:k])] for k in range(len(steps))]
    assert [logits[0].argmax().item() for _, logits in spy.observed] == firsts
    # drafters without the hook are not asked; a decoder of the heads alone asks no one
    plain = SpeculativeDecoder(heads, drafters=[PromptLookup()], cost=FREE)
    assert plain.proposer.observers == []
    assert not hasattr(SpeculativeDecoder(heads, HEADS_TREE).proposer, "observers")  # the static tree: no drafters


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_recycling_greedy_equals_plain_greedy(tiny_backbone, style):
    ids, reference, sequence = reference_run(tiny_backbone)
    heads = random_heads(tiny_backbone, style)
    vocab = tiny_backbone.vocab_size
    mixes = {
        "recycle": lambda: make_drafters(draft_sets()["recycle"], heads, None, HEADS_TREE),
        "hybrid": lambda: make_drafters(draft_sets()["hybrid"], heads, None, HEADS_TREE),
        "oracle-recycle": lambda: [OracleRecycle(vocab, sequence)],
        "oracle-recycle-in-hybrid": lambda: [HeadsDrafter(heads, HEADS_TREE), PromptLookup(), SuffixDrafter(),
                                             OracleRecycle(vocab, sequence)],
    }
    for name, drafters in mixes.items():
        made = drafters()
        assert any(isinstance(d, RecycleDrafter) for d in made), name
        decoder = SpeculativeDecoder(heads, drafters=made, cost=FREE)
        steps: list[dict] = []
        result = decoder.generate(ids, 40, trace=steps.append)
        assert result.tokens == reference.tokens, name
        assert result.text == reference.text, name
        assert sum(result.accepted_lengths) + 1 == len(result.tokens), name
        recycled = [s for s in steps if "recycle" in {source for node in s["draft_sources"] for source in node}]
        assert recycled, name  # the table drafted: the comparison has teeth
        # the calibrator measured recycling's drafts as a source of their own
        assert any("recycle" in key for key in decoder.calibrator.state_dict()["tried"]), name
        if name.startswith("oracle"):
            assert result.mean_accepted_tokens > 3.0, (name, result.accepted_lengths)
        if name == "recycle":  # the random base repeats itself: a table filled while decoding gets drafts right
            assert max(result.accepted_lengths) >= 2, result.accepted_lengths
