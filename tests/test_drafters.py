"""Drafters (prompt lookup, suffix index), the merged draft tree and the calibrator, against
hand-written values and brute-force scans."""

import random

import pytest
import torch

from mtpkit.drafting.base import Candidates
from mtpkit.drafting.calibrator import ConfidenceCalibrator
from mtpkit.drafting.lookup import PromptLookup
from mtpkit.drafting.merge import merge_candidates, select_tree
from mtpkit.drafting.suffix import SuffixDrafter, SuffixIndex
from mtpkit.errors import MtpkitError
from mtpkit.tree import build_tree, tree_from_parents


def as_lists(candidates: Candidates):
    return list(candidates.tokens), list(candidates.parents), list(candidates.confidences)


# --------------------------------------------------------------------------- brute force references


def brute_trie(continuations: list[list[int]], max_depth: int, max_nodes: int):
    """(tokens, parents, confidences) of the best-first trie of continuation lists, by full enumeration:
    confidence = count(path) / summed counts of its siblings; nodes sorted by (-path probability,
    depth, path), which is the order best-first expansion picks them in."""
    counts: dict[tuple, int] = {}
    for continuation in continuations:
        for d in range(1, min(max_depth, len(continuation)) + 1):
            counts[tuple(continuation[:d])] = counts.get(tuple(continuation[:d]), 0) + 1
    sibling_total: dict[tuple, int] = {}
    for path, n in counts.items():
        sibling_total[path[:-1]] = sibling_total.get(path[:-1], 0) + n
    probability, confidence = {(): 1.0}, {}
    for path in sorted(counts, key=len):
        confidence[path] = counts[path] / sibling_total[path[:-1]]
        probability[path] = probability[path[:-1]] * confidence[path]
    order = sorted(counts, key=lambda p: (-probability[p], len(p), p))[:max_nodes]
    position = {path: i for i, path in enumerate(order)}
    return ([p[-1] for p in order], [position[p[:-1]] if len(p) > 1 else -1 for p in order],
            [confidence[p] for p in order])


def brute_continuations(documents, pattern, max_depth):
    """What followed each occurrence of ``pattern`` inside a document (possibly nothing)."""
    n = len(pattern)
    return [doc[j + n:j + n + max_depth] for doc in documents for j in range(len(doc) - n + 1)
            if doc[j:j + n] == pattern]


def brute_match(documents, context, min_match, max_match):
    for n in range(min(max_match, len(context)), min_match - 1, -1):
        if any(brute_continuations(documents, context[len(context) - n:], 1)):
            return n
    return 0


def brute_lookup(context, min_ngram, max_ngram, max_tokens, max_matches):
    for n in range(min(max_ngram, len(context)), min_ngram - 1, -1):
        suffix = context[len(context) - n:]
        starts = [i + n for i in range(len(context) - n) if context[i:i + n] == suffix][-max_matches:]
        if starts:
            return [context[s:s + max_tokens] for s in starts]
    return []


# --------------------------------------------------------------------------- tree buffers


def test_tree_from_parents_matches_hand_written_values():
    # root; 1 and 2 under the root; 3 under 2; 4 under 1; 5 under 3 (not in depth order on purpose)
    tree = tree_from_parents([-1, 0, 0, 2, 1, 3])
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.position_offsets.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.ranks.tolist() == [-1, 0, 1, 0, 0, 0]
    assert tree.choices == ((0,), (1,), (1, 0), (0, 0), (1, 0, 0))
    assert tree.ancestor_mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 1, 0, 1],
    ]
    assert tree.retrieve_indices.tolist() == [[0, 1, 4, -1], [0, 2, 3, 5]]
    root = tree_from_parents([-1])
    assert root.num_nodes == 1 and root.retrieve_indices.tolist() == [[0]]


def test_tree_from_parents_equals_build_tree_in_canonical_order():
    rng = random.Random(0)
    for _ in range(50):
        choices = {()}
        for _ in range(rng.randint(0, 20)):
            parent = rng.choice(sorted(choices))
            if len(parent) < 5:
                siblings = sum(1 for c in choices if len(c) == len(parent) + 1 and c[:-1] == parent)
                choices.add(parent + (siblings,))
        paths = sorted((c for c in choices if c), key=lambda p: (len(p), p))
        index = {(): 0, **{p: i + 1 for i, p in enumerate(paths)}}
        expected = build_tree([list(p) for p in paths])
        tree = tree_from_parents([-1] + [index[p[:-1]] for p in paths])
        assert tree.choices == expected.choices
        for name in ("parents", "depths", "ranks", "ancestor_mask", "position_offsets", "retrieve_indices"):
            assert torch.equal(getattr(tree, name), getattr(expected, name)), name


@pytest.mark.parametrize("parents", [[], [0], [-1, 1], [-1, 0, 3, 0], [-1, -1]])
def test_tree_from_parents_refuses_bad_parents(parents):
    with pytest.raises(MtpkitError):
        tree_from_parents(parents)


def test_candidates_are_validated():
    assert Candidates((5, 6, 7), (-1, 0, -1), (0.5, 1.0, 0.2), ("a",) * 3).paths() == [(5,), (5, 6), (7,)]
    with pytest.raises(MtpkitError, match="come before"):
        Candidates((5, 6), (1, -1), (0.5, 0.5), ("a", "a"))
    with pytest.raises(MtpkitError, match=r"\[0, 1\]"):
        Candidates((5,), (-1,), (1.5,), ("a",))
    with pytest.raises(MtpkitError, match="one parent"):
        Candidates((5,), (), (0.5,), ("a",))


# --------------------------------------------------------------------------- prompt lookup


def test_lookup_proposes_each_distinct_continuation_with_its_frequency():
    context = [5, 1, 2, 3, 7, 1, 2, 4, 8, 1, 2, 3, 6, 1, 2]
    lookup = PromptLookup(min_ngram=1, max_ngram=3, max_tokens=3)
    lookup.start(context)
    assert lookup.matches() == [11, 7, 3]  # after each earlier "1 2", newest first
    # continuations 3 6 1 / 4 8 1 / 3 7 1: "3" followed 2 of 3 matches, then "6" and "7" once each
    tokens, parents, confidences = as_lists(lookup.propose(context, budget=10))
    assert tokens == [3, 4, 6, 7, 8, 1, 1, 1]
    assert parents == [-1, -1, 0, 0, 1, 2, 3, 4]
    assert confidences == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2, 1, 1, 1, 1])
    assert lookup.propose(context, budget=3).tokens == (3, 4, 6)  # the most probable paths first


def test_lookup_prefers_the_longest_ngram_and_never_matches_the_suffix_itself():
    lookup = PromptLookup(min_ngram=1, max_ngram=3, max_tokens=2)
    context = [1, 2, 3, 9, 0, 2, 3, 8, 1, 2, 3]
    lookup.start(context)
    assert as_lists(lookup.propose(context, 8)) == ([9, 0], [-1, 0], [1.0, 1.0])  # "1 2 3", not "2 3" -> 8
    lookup.start([4, 5, 6])
    assert len(lookup.propose([4, 5, 6], 8)) == 0  # the only "5 6" is the context's own end
    lookup.start([4, 4])
    assert as_lists(lookup.propose([4, 4], 8)) == ([4], [-1], [1.0])  # overlapping: "4" then "4"


def test_lookup_index_grows_with_committed_tokens():
    lookup = PromptLookup(min_ngram=1, max_ngram=2, max_tokens=2)
    lookup.start([1, 2, 3, 4])
    assert len(lookup.propose([1, 2, 3, 4], 4)) == 0
    lookup.update([1, 2])
    assert lookup.propose([1, 2, 3, 4, 1, 2], 4).tokens == (3, 4)
    # a caller that skipped update() is caught up from the context; a shorter one is refused
    assert lookup.propose([1, 2, 3, 4, 1, 2, 9, 3], 4).tokens == (4, 1)
    with pytest.raises(MtpkitError, match="shorter"):
        lookup.propose([1, 2], 4)


def test_lookup_equals_a_brute_force_scan():
    for seed in range(150):
        rng = random.Random(seed)
        settings = dict(min_ngram=rng.randint(1, 2), max_ngram=rng.randint(2, 4), max_tokens=rng.randint(1, 5),
                        max_matches=rng.randint(1, 6))
        context = [rng.randrange(3) for _ in range(rng.randint(0, 40))]
        lookup = PromptLookup(**settings)
        cut = rng.randint(0, len(context))
        lookup.start(context[:cut])  # incremental: the rest arrives in chunks
        while cut < len(context):
            step = rng.randint(1, 4)
            lookup.update(context[cut:cut + step])
            cut += step
        budget = rng.randint(1, 12)
        expected = brute_trie(brute_lookup(context, settings["min_ngram"], settings["max_ngram"],
                                           settings["max_tokens"], settings["max_matches"]),
                              settings["max_tokens"], budget)
        assert as_lists(lookup.propose(context, budget)) == expected, seed


# --------------------------------------------------------------------------- suffix index


def test_suffix_index_counts_and_continuations_on_a_hand_made_corpus():
    index = SuffixIndex.from_documents([[1, 2, 3, 1, 2, 4], [1, 2, 3], [7, 1, 2, 3, 5]], min_match=2)
    assert index.count([1, 2]) == 4 and index.count([1, 2, 3]) == 3 and index.count([2, 4]) == 1
    assert index.next_counts([1, 2]) == {3: 3, 4: 1}
    assert index.next_counts([1, 2, 3]) == {1: 1, 5: 1}  # the third "1 2 3" ends its document
    assert index.match([9, 9, 1, 2]) == (index.match([1, 2])[0], 2)
    tokens, parents, confidences = as_lists(index.continuations([9, 1, 2], max_depth=3, max_nodes=10))
    # after "1 2": 3 (3 of 4), 4 (1 of 4); after "1 2 3": 1 or 5 (one each of the two that go on); then 2.
    # Path probabilities 3/4, 3/8, 3/8, 3/8, 1/4: the deep "3 1 2" comes before the shallow "4"
    assert tokens == [3, 1, 5, 2, 4]
    assert parents == [-1, 0, 0, 1, -1]
    assert confidences == pytest.approx([3 / 4, 1 / 2, 1 / 2, 1.0, 1 / 4])
    assert len(index.continuations([9, 8], 3, 10)) == 0  # no suffix of length >= 2 occurs
    assert len(index.continuations([1, 2], 3, 0)) == 0


def test_suffix_index_never_matches_across_documents():
    index = SuffixIndex.from_documents([[1, 2, 3], [4, 5], [2, 3, 9]], min_match=2)
    assert index.count([3, 4]) == 0 and index.count([3, 4, 5]) == 0
    assert index.next_counts([2, 3]) == {9: 1}
    # "1 2 3" only ends a document, so the match falls back to "2 3", followed by 9 (never by 4)
    assert index.match([1, 2, 3])[1] == 2
    assert as_lists(index.continuations([1, 2, 3], 3, 10)) == ([9], [-1], [1.0])
    with pytest.raises(MtpkitError, match=">= 0"):
        index.extend([-1])


def test_suffix_index_equals_a_brute_force_scan():
    for seed in range(200):
        rng = random.Random(seed)
        vocab = rng.randint(2, 4)
        documents = [[rng.randrange(vocab) for _ in range(rng.randint(0, 25))] for _ in range(rng.randint(1, 5))]
        min_match, max_match = rng.randint(1, 2), rng.randint(2, 6)
        if seed % 2:  # bulk build
            index = SuffixIndex.from_documents(documents, min_match, max_match)
        else:  # built at run time: documents started, then extended in chunks (counts kept online)
            index = SuffixIndex(min_match, max_match)
            for document in documents:
                index.add_document(document[:3])
                for at in range(3, len(document), 2):
                    index.extend(document[at:at + 2])
        for _ in range(6):
            if rng.random() < 0.5 and any(documents):
                source = rng.choice([d for d in documents if d])
                at = rng.randint(1, len(source))
                context = source[max(0, at - rng.randint(1, 8)):at]
            else:
                context = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
            pattern = context[-rng.randint(1, 3):] if context else [0]
            assert index.count(pattern) == len(brute_continuations(documents, pattern, 0)), seed
            followers = [c[0] for c in brute_continuations(documents, pattern, 1) if c]
            assert index.next_counts(pattern) == {t: followers.count(t) for t in set(followers)}, seed
            matched = brute_match(documents, context, min_match, max_match)
            assert index.match(context)[1] == matched, seed
            max_depth, max_nodes = rng.randint(1, 4), rng.randint(1, 10)
            expected = brute_trie(brute_continuations(documents, context[len(context) - matched:], max_depth),
                                  max_depth, max_nodes) if matched else ([], [], [])
            assert as_lists(index.continuations(context, max_depth, max_nodes)) == expected, seed


def test_suffix_drafter_learns_this_runs_output():
    drafter = SuffixDrafter(SuffixIndex.from_documents([[1, 2, 3, 4]], min_match=2), max_depth=4)
    drafter.start([9, 9])  # the prompt is not indexed
    assert drafter.propose([9, 9], 4).tokens == ()
    drafter.update([7, 8, 5])
    drafter.update([6, 7, 8])
    # "7 8" was followed by 5 in this run's output, "8" alone matches nothing of length >= 2
    assert as_lists(drafter.propose([9, 9, 7, 8, 5, 6, 7, 8], 4)) == ([5, 6, 7, 8], [-1, 0, 1, 2], [1.0] * 4)
    drafter.start([1])  # a new run: no match may run from the last run's output into this one
    drafter.update([8, 1, 2])
    assert drafter.index.count([7, 8, 8]) == 0 and drafter.index.count([8, 1, 2]) == 1
    assert drafter.index.next_counts([1, 2]) == {3: 1}
    frozen = SuffixDrafter(SuffixIndex.from_documents([[1, 2, 3]]), learn=False)
    frozen.start([5])
    frozen.update([5, 6, 5, 6])
    assert frozen.index.num_tokens == 3


def test_suffix_index_file_round_trip(tmp_path):
    documents = [[random.Random(i).randrange(5) for _ in range(30)] for i in range(4)]
    index = SuffixIndex.from_documents(documents, min_match=1, max_match=5)
    index.extend([1, 2, 3])
    index.save(tmp_path / "suffix.safetensors")
    loaded = SuffixIndex.load(tmp_path / "suffix.safetensors")
    assert (loaded.min_match, loaded.max_match, loaded.num_states) == (1, 5, index.num_states)
    for context in ([0], [1, 2], [4, 4, 3], [3, 1, 2, 3]):
        assert loaded.continuations(context, 3, 8) == index.continuations(context, 3, 8)
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"text": np.zeros(3, dtype=np.int32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MtpkitError, match="not a suffix index"):
        SuffixIndex.load(tmp_path / "other.safetensors")


# --------------------------------------------------------------------------- merged tree


LOOKUP = Candidates((3, 4, 6), (-1, -1, 0), (0.5, 0.3, 0.5), ("lookup",) * 3)
SUFFIX = Candidates((3, 6, 9, 2), (-1, 0, 1, -1), (0.6, 0.7, 0.4, 0.1), ("suffix",) * 4)


def test_merge_joins_identical_paths_and_keeps_every_source():
    trie = merge_candidates([LOOKUP, SUFFIX])
    assert trie.tokens == (3, 4, 6, 9, 2)
    assert trie.parents == (-1, -1, 0, 2, -1)
    assert trie.sources == (("lookup", "suffix"), ("lookup",), ("lookup", "suffix"), ("suffix",), ("suffix",))
    assert trie.raw_confidences == ((0.5, 0.6), (0.3,), (0.5, 0.7), (0.4,), (0.1,))
    assert trie.confidences == (0.6, 0.3, 0.7, 0.4, 0.1)  # the largest
    assert len(merge_candidates([])) == 0


def test_siblings_chances_never_add_up_to_more_than_one():
    """At most one child of a node is accepted: siblings whose chances sum past 1 are scaled to sum to 1."""
    heads = Candidates((5, 6, 7), (-1, -1, 0), (0.7, 0.2, 0.9), ("heads",) * 3)
    lookup = Candidates((8,), (-1,), (0.6,), ("lookup",))
    trie = merge_candidates([heads, lookup])
    assert trie.tokens == (5, 6, 7, 8)
    assert trie.confidences == pytest.approx((0.7 / 1.5, 0.2 / 1.5, 0.9, 0.6 / 1.5))
    assert merge_candidates([heads]).confidences == pytest.approx((0.7, 0.2, 0.9))  # 0.9 <= 1: kept


def test_selected_tree_buffers_match_hand_written_values():
    trie = merge_candidates([LOOKUP, SUFFIX])
    draft = select_tree(trie, root_token=42, cost={1: 1.0, 8: 1.0})  # a flat cost: every node pays
    # depth 1 by confidence, not by token: 3 (0.6), 4 (0.3), 2 (0.1); then 6 under 3; then 9 under 6
    assert draft.tokens.tolist() == [42, 3, 4, 2, 6, 9]
    assert draft.trie_nodes == (-1, 0, 1, 4, 2, 3)
    assert draft.tree.parents.tolist() == [-1, 0, 0, 0, 1, 4]
    assert draft.tree.depths.tolist() == [0, 1, 1, 1, 2, 3]
    assert draft.tree.position_offsets.tolist() == [0, 1, 1, 1, 2, 3]
    assert draft.tree.ancestor_mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]
    assert draft.tree.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 3, -1, -1], [0, 1, 4, 5]]
    assert draft.path_probabilities == pytest.approx([1, 0.6, 0.3, 0.1, 0.42, 0.168])
    assert draft.sources[1] == ("lookup", "suffix") and draft.sources[0] == ()
    assert draft.expected_tokens == pytest.approx(1 + 0.6 + 0.3 + 0.1 + 0.42 + 0.168)
    assert draft.tokens_per_second == pytest.approx(draft.expected_tokens / 1.0)


@pytest.mark.parametrize("cost, draft_cost, seconds, tokens", [
    # seconds: the cost of a forward over 1..6 tokens, as the table gives it (between sizes: the larger's)
    ({1: 1.0, 2: 1.0, 3: 1.1, 4: 1.5, 5: 1.6, 6: 2.0}, 0.0, [1.0, 1.0, 1.1, 1.5, 1.6, 2.0], [42, 3, 6]),
    ({1: 1.0, 2: 1.0, 3: 1.1, 4: 1.5, 5: 1.6, 6: 2.0}, 10.0, [1.0, 1.0, 1.1, 1.5, 1.6, 2.0], [42, 3, 4, 2, 6, 9]),
    ({1: 1.0, 4: 1.3}, 0.0, [1.0, 1.3, 1.3, 1.3, 1.4, 1.5], [42, 3, 4, 6]),
    ({1: 1.0, 2: 1.0, 8: 2.0}, 0.0, [1.0, 1.0, 2.0, 2.0, 2.0, 2.0], [42, 3]),  # linear: 4 nodes
    ({1: 1.0, 2: 2.0}, 0.0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [42]),
])
def test_selection_cuts_where_expected_tokens_per_second_peak(cost, draft_cost, seconds, tokens):
    # best first: 3 (0.6), 6 (0.42), 4 (0.3), 9 (0.168), 2 (0.1); expected tokens 1, 1.6, 2.02, 2.32, ...
    draft = select_tree(merge_candidates([LOOKUP, SUFFIX]), 42, cost, draft_cost)
    assert draft.tokens.tolist() == tokens
    gains = [0.6, 0.42, 0.3, 0.168, 0.1]
    rates = [(1 + sum(gains[:k])) / (seconds[k] + draft_cost) for k in range(6)]
    assert rates.index(max(rates)) == len(tokens) - 1
    assert draft.tokens_per_second == pytest.approx(max(rates))
    assert draft.expected_tokens == pytest.approx(1 + sum(gains[:len(tokens) - 1]))


def test_selection_respects_max_nodes_and_keeps_parents():
    draft = select_tree(merge_candidates([LOOKUP, SUFFIX]), 42, {1: 1.0}, max_nodes=3)
    assert draft.tokens.tolist() == [42, 3, 6] and draft.tree.parents.tolist() == [-1, 0, 1]
    with pytest.raises(MtpkitError, match="cost table"):
        select_tree(merge_candidates([LOOKUP]), 42, {})


# --------------------------------------------------------------------------- calibrator


def test_calibrator_starts_at_the_raw_confidence_and_moves_to_the_measured_rate():
    calibrator = ConfidenceCalibrator(num_bins=10, prior_weight=4.0)
    assert calibrator.calibrate("lookup", 0.35) == pytest.approx(0.35)
    for accepted in [True] * 6 + [False] * 14:
        calibrator.record("lookup", 0.31, accepted)
    assert calibrator.calibrate("lookup", 0.35) == pytest.approx((6 + 4 * 0.35) / (20 + 4))
    assert calibrator.calibrate("lookup", 0.45) == pytest.approx(0.45)  # another bin
    assert calibrator.calibrate("suffix", 0.35) == pytest.approx(0.35)  # another source
    for _ in range(10_000):
        calibrator.record("lookup", 1.0, False)
    assert calibrator.calibrate("lookup", 1.0) < 0.001
    restored = ConfidenceCalibrator.from_state_dict(calibrator.state_dict())
    assert restored.calibrate("lookup", 0.35) == calibrator.calibrate("lookup", 0.35)
    with pytest.raises(ValueError, match="version"):  # counts kept per source, before agreements: not read
        ConfidenceCalibrator.from_state_dict({**calibrator.state_dict(), "version": 1})


def test_calibrator_learns_only_from_nodes_that_were_tried():
    calibrator = ConfidenceCalibrator()
    draft = select_tree(merge_candidates([LOOKUP, SUFFIX]), 42, {1: 1.0, 8: 1.0})
    # tree: 1 = "3" (lookup 0.5, suffix 0.6), 2 = "4" (lookup 0.3), 3 = "2" (suffix 0.1), 4 = "6" under 1
    # (lookup 0.5, suffix 0.7), 5 = "9" under 4 (suffix 0.4). Accepted: the root and "4".
    calibrator.observe(draft, [0, 2])
    lookup = calibrator.acceptance_rates("lookup")
    suffix = calibrator.acceptance_rates("suffix")
    both = calibrator.acceptance_rates("lookup+suffix")
    assert (lookup[3], lookup[5]) == (1.0, None)  # "6" (under rejected "3"): never tried
    assert (suffix[1], suffix[4], suffix[6], suffix[7]) == (0.0, None, None, None)
    assert (both[6], both[7]) == (0.0, None)  # "3", proposed by both: counted as the pair, bin of the larger 0.6


def test_calibrator_learns_each_depth_apart():
    """A copy that held for two tokens holds for a third far more often than a first copied token is right:
    the same raw confidence (1.0, one match) gets each depth's own rate, at the merged trie's depths too."""
    calibrator = ConfidenceCalibrator(prior_weight=4.0)
    chain = Candidates((7, 8, 9, 10, 11), (-1, 0, 1, 2, 3), (1.0,) * 5, ("lookup",) * 5)
    tree = select_tree(merge_candidates([chain]), 42, {1: 1.0, 8: 1.0})
    for step in range(40):  # the first token holds 1 time in 4; once it did, the rest hold
        calibrator.observe(tree, [0, 1, 2, 3, 4, 5] if step % 4 == 0 else [0])
    assert calibrator.acceptance_rates("lookup", 1)[9] == pytest.approx(0.25)
    assert calibrator.acceptance_rates("lookup", 2)[9] == calibrator.acceptance_rates("lookup", 5)[9] == 1.0
    assert calibrator.acceptance_rates("lookup", 4) == calibrator.acceptance_rates("lookup", 9)  # 4 and deeper: one
    assert calibrator.calibrate("lookup", 1.0, 1) == pytest.approx((10 + 4) / (40 + 4))
    assert calibrator.calibrate("lookup", 1.0, 3) == pytest.approx(1.0)
    trie = merge_candidates([chain], calibrator)
    assert trie.confidences[0] == pytest.approx(14 / 44) and trie.confidences[1:] == pytest.approx([1.0] * 4)


def test_calibration_changes_the_merged_confidence():
    calibrator = ConfidenceCalibrator()
    for _ in range(100):
        calibrator.record("suffix", 0.6, False)  # the suffix index's lone 0.6 is never right
    trie = merge_candidates([LOOKUP, SUFFIX], calibrator)
    # node "3", proposed by both and never measured as a pair: its prior is the better source alone, lookup's 0.5
    assert trie.confidences[0] == pytest.approx(0.5)
    assert trie.raw_confidences[0] == (0.5, 0.6)


def test_an_agreement_is_calibrated_apart_from_its_sources_alone():
    """Two sources agreeing on a token are right more often than either alone: each gets its own rate."""
    calibrator = ConfidenceCalibrator(prior_weight=4.0)
    for step in range(40):
        calibrator.record("lookup+suffix", 0.6, step % 4 != 0)  # the pair: 3 in 4
        calibrator.record("suffix", 0.6, step % 4 == 0)  # the suffix index alone: 1 in 4
    assert calibrator.calibrate_node(("suffix",), (0.6,)) == pytest.approx((10 + 4 * 0.6) / 44)
    prior = max(calibrator.calibrate("lookup", 0.5), calibrator.calibrate("suffix", 0.6))  # lookup alone: 0.5
    assert prior == pytest.approx(0.5)
    assert calibrator.calibrate_node(("suffix", "lookup"), (0.6, 0.5)) == pytest.approx((30 + 4 * prior) / 44)
    assert calibrator.calibrate_node(("lookup", "suffix"), (0.2, 0.3)) == pytest.approx(0.3)  # another bin: prior
