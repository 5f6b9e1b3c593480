"""Tree buffers against hand-written values, and the auto tree's objective (tokens per second)."""

import json

import pytest
import torch

from mtpkit.errors import MtpkitError
from mtpkit.tree import (build_tree, chain_choices, expected_tokens, greedy_tree, load_tree_file, monotone_cost,
                         rank_probabilities, widen_choices)

CHOICES = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]


def test_tree_buffers_match_hand_written_values():
    tree = build_tree(CHOICES)
    # nodes: 0 root, 1 (0), 2 (1), 3 (0,0), 4 (0,1), 5 (0,0,0)
    assert tree.num_nodes == 6 and tree.max_depth == 3 and not tree.is_chain
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.position_offsets.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.ranks.tolist() == [-1, 0, 1, 0, 1, 0]
    expected_mask = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ]
    assert tree.ancestor_mask.int().tolist() == expected_mask
    assert tree.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert [tree.top_k(d) for d in (1, 2, 3)] == [2, 2, 1]


def test_tree_order_of_choices_does_not_matter():
    shuffled = build_tree([[0, 0, 0], [0, 1], [1], [0, 0], [0]])
    reference = build_tree(CHOICES)
    assert shuffled.choices == reference.choices
    assert torch.equal(shuffled.ancestor_mask, reference.ancestor_mask)
    assert torch.equal(shuffled.retrieve_indices, reference.retrieve_indices)


def test_chain_and_root_only_trees():
    chain = build_tree(chain_choices(3))
    assert chain.is_chain and chain.num_nodes == 4
    assert chain.parents.tolist() == [-1, 0, 1, 2]
    assert chain.ancestor_mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert chain.retrieve_indices.tolist() == [[0, 1, 2, 3]]
    root = build_tree([])
    assert root.num_nodes == 1 and root.max_depth == 0 and root.retrieve_indices.tolist() == [[0]]


@pytest.mark.parametrize("bad, message", [
    ([[0, 0]], "no parent path"),
    ([[0], [0]], "twice"),
    ([[0], [-1]], "bad tree path"),
    ([[0], []], "bad tree path"),
    ([[0], [10]], "bad tree path"),
    ({"0": 1}, "list of paths"),
])
def test_bad_choices_are_refused(bad, message):
    with pytest.raises(MtpkitError, match=message):
        build_tree(bad)


def test_tree_file(tmp_path):
    good = tmp_path / "tree.json"
    good.write_text(json.dumps(CHOICES))
    assert load_tree_file(good) == CHOICES
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"choices": CHOICES}))
    assert load_tree_file(wrapped) == CHOICES
    broken = tmp_path / "broken.json"
    broken.write_text("[[0], [1")
    with pytest.raises(MtpkitError, match="not valid JSON"):
        load_tree_file(broken)
    with pytest.raises(MtpkitError, match="not found"):
        load_tree_file(tmp_path / "missing.json")


ACCURACY = [[0.6, 0.8], [0.3, 0.5]]  # per head: P(true token within top-1), P(within top-2)


def test_expected_tokens_is_sum_of_path_probabilities():
    probs = rank_probabilities(ACCURACY)
    assert probs[0] == pytest.approx([0.6, 0.2]) and probs[1] == pytest.approx([0.3, 0.2])
    assert expected_tokens([[0], [0, 0]], ACCURACY) == pytest.approx(1 + 0.6 + 0.6 * 0.3)
    assert expected_tokens([[0], [1], [0, 0], [1, 1]], ACCURACY) == pytest.approx(1 + 0.6 + 0.2 + 0.18 + 0.04)


def test_greedy_tree_adds_nodes_by_marginal_gain():
    flat = {n: 1.0 for n in range(1, 10)}
    choices, rate = greedy_tree(ACCURACY, flat, max_nodes=4)
    assert choices == [[0], [1], [0, 0]]  # gains 0.6, 0.2, 0.18 beat (0,1) 0.12
    assert rate == pytest.approx(1.98)
    every, _ = greedy_tree(ACCURACY, flat, max_nodes=64)
    assert sorted(every) == [[0], [0, 0], [0, 1], [1], [1, 0], [1, 1]]


def test_greedy_tree_maximises_tokens_per_second_not_per_step():
    # a third token makes the forward 10x slower: the best tree has 2 nodes, though bigger ones accept more
    steep = {1: 1.0, 2: 1.0, 3: 10.0, 8: 80.0}
    choices, rate = greedy_tree(ACCURACY, steep, max_nodes=8)
    assert choices == [[0]] and rate == pytest.approx(1.6)
    # heads that are never right: plain decoding (no drafts) is best
    useless = [[0.0, 0.0], [0.0, 0.0]]
    assert greedy_tree(useless, {1: 1.0, 2: 1.5}, max_nodes=8) == ([], 1.0)


def test_monotone_cost_pools_the_dips_of_a_noisy_table():
    """Measured on a busy machine (ms): 4 tokens timed below 3, 16 below 10 and 12. The fit never decreases,
    pools each dip with the sizes before it (their mean), and leaves a table that already rises alone."""
    measured = {1: 78.8, 2: 75.3, 3: 89.4, 4: 74.5, 5: 98.1, 10: 157.8, 12: 146.8, 16: 129.8, 20: 160.4}
    fitted = monotone_cost(measured)
    assert list(fitted) == list(measured)
    assert [round(fitted[n], 2) for n in measured] == [77.05, 77.05, 81.95, 81.95, 98.1, 144.8, 144.8, 144.8, 160.4]
    assert sum(fitted.values()) == pytest.approx(sum(measured.values()))  # least squares: pools keep their mean
    rising = {1: 1.0, 2: 1.5, 8: 3.0}
    assert monotone_cost(rising) == rising


def test_greedy_tree_pays_each_depth_its_own_drafting_time():
    """Sequential heads run one more head per depth: with drafting time per depth a second level that costs a
    whole forward more is not worth its 0.36 expected tokens, and an empty tree drafts (and pays) nothing."""
    accuracy, flat = [[0.6], [0.6]], {1: 1.0, 2: 1.0, 3: 1.0}
    assert greedy_tree(accuracy, flat, draft_cost=0.1)[0] == [[0], [0, 0]]  # one time for any depth
    choices, rate = greedy_tree(accuracy, flat, draft_cost=[0.1, 1.0])
    assert choices == [[0]] and rate == pytest.approx(1.6 / 1.1)
    assert greedy_tree(accuracy, flat, draft_cost=[5.0, 5.0]) == ([], 1.0)


def test_widen_choices_gives_expanded_nodes_their_top_siblings_and_leaves_none():
    assert widen_choices([[0], [0, 0], [1]], 3) == [[0], [1], [2], [0, 0], [0, 1], [0, 2]]
    assert widen_choices([[0], [1], [1, 0], [1, 0, 0]], 2) == [[0], [1], [1, 0], [1, 1], [1, 0, 0], [1, 0, 1]]
    assert widen_choices([[0], [0, 0], [1]], 1) == [[0], [1], [0, 0]]  # one sibling: the tree itself (sorted)
    assert widen_choices([[0], [5]], 2) == [[0], [1], [5]]  # what the tree had stays
    assert widen_choices([], 4) == []  # a tree that drafts nothing expands nothing
    assert widen_choices([[0]], 20) == [[r] for r in range(10)]  # ranks stop at the heads' top-10
    with pytest.raises(MtpkitError, match="at least one child"):
        widen_choices([[0]], 0)
