"""Hybrid drafting: several drafters' candidates merged into one tree per step, verified in one base forward.

The invariants of tests/test_decoding.py hold for any mix of drafters: greedy output is plain greedy output
token for token (with drafters that are always right, always wrong, or right off the first branch), and sampled
output follows the base's warped distribution.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mtpkit.config import CORPUS_NAME, HeadsConfig
from mtpkit.decoding import (HeadsDrafter, MaskBuffer, SpeculativeDecoder, greedy_generate, rejection_walk,
                             verify_mask)
from mtpkit.drafting.base import Candidates
from mtpkit.drafting.lookup import PromptLookup
from mtpkit.drafting.merge import best_path, cut_depth, merge_candidates, select_tree
from mtpkit.draft_sources import build_decoder, corpus_index, corpus_path, make_drafters
from mtpkit.drafting.suffix import SuffixDrafter, SuffixIndex
from mtpkit.errors import MtpkitError

from tests.test_decoding import _exact_marginals, _total_variations, prompt_ids, random_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

FREE = {1: 1.0, 64: 1.0}  # a forward over 64 tokens costs what one over 1 does: select every candidate
HEADS_TREE = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]


class Oracle:
    """Proposes the next ``depth`` tokens of a known sequence (the base's greedy output): always right.

    ``wrong_first`` adds, before each right token, a wrong sibling with a higher confidence, so the accepted path
    leaves the tree's first branch (the kept KV entries are index-selected, not just cropped).
    """

    def __init__(self, sequence: list[int], depth: int = 5, wrong_first: bool = False, name: str = "oracle"):
        self.sequence, self.depth, self.wrong_first, self.name = sequence, depth, wrong_first, name

    def start(self, prompt_ids):
        pass

    def update(self, accepted_ids):
        pass

    def propose(self, context_ids, budget):
        at = len(context_ids)
        assert list(context_ids) == self.sequence[:at]  # the decoder hands over exactly what was committed
        tokens, parents, confidences = [], [], []
        parent = -1
        for token in self.sequence[at:at + self.depth]:
            if self.wrong_first:
                tokens.append((token + 1) % 300)
                parents.append(parent)
                confidences.append(0.9)
            tokens.append(token)
            parents.append(parent)
            confidences.append(0.5)
            parent = len(tokens) - 1
        size = min(budget, len(tokens))
        return Candidates(tuple(tokens[:size]), tuple(parents[:size]), tuple(confidences[:size]),
                          (self.name,) * size)


class Wrong:
    """Proposes a chain and a branch of tokens the base never emits next: every draft is rejected."""

    name = "wrong"

    def __init__(self, sequence: list[int]):
        self.sequence = sequence

    def start(self, prompt_ids):
        pass

    def update(self, accepted_ids):
        pass

    def propose(self, context_ids, budget):
        at = len(context_ids)
        truth = self.sequence[at] if at < len(self.sequence) else 0
        tokens = ((truth + 1) % 300, (truth + 2) % 300, 7, (truth + 3) % 300)
        size = min(budget, 4)
        return Candidates(tokens[:size], (-1, 0, 1, -1)[:size], (1.0, 1.0, 1.0, 0.8)[:size], ("wrong",) * size)


class Fixed:
    """Proposes the same candidates every step."""

    def __init__(self, candidates: Candidates, name: str):
        self.candidates, self.name = candidates, name

    def start(self, prompt_ids):
        pass

    def update(self, accepted_ids):
        pass

    def propose(self, context_ids, budget):
        return self.candidates


def reference_run(backbone, new_tokens: int = 40):
    ids = prompt_ids(backbone)
    reference = greedy_generate(backbone, ids, new_tokens)
    return ids, reference, ids[0].tolist() + reference.tokens


def decode(heads, drafters, ids, new_tokens, **options):
    steps = []
    decoder = SpeculativeDecoder(heads, drafters=drafters, cost=FREE, **options)
    return decoder.generate(ids, new_tokens, trace=steps.append), steps


# ----------------------------------------------------------------------------- greedy: exact for any drafter mix


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_hybrid_greedy_equals_plain_greedy(tiny_backbone, style):
    ids, reference, sequence = reference_run(tiny_backbone)
    heads = random_heads(tiny_backbone, style)
    corpus = SuffixIndex.from_documents([[5, 6, 7, 8] * 4, sequence[len(sequence) // 2:]])
    mixes = {
        "heads": lambda: [HeadsDrafter(heads, HEADS_TREE)],
        "lookup": lambda: [PromptLookup()],
        "suffix": lambda: [SuffixDrafter(corpus, learn=False), SuffixDrafter()],
        "oracle": lambda: [Oracle(sequence)],
        "oracle-off-first-branch": lambda: [Oracle(sequence, wrong_first=True)],
        "wrong": lambda: [Wrong(sequence)],
        "all": lambda: [HeadsDrafter(heads, HEADS_TREE), PromptLookup(), SuffixDrafter(corpus, learn=False),
                        SuffixDrafter(), Oracle(sequence, depth=3, wrong_first=True), Wrong(sequence)],
    }
    for name, drafters in mixes.items():
        result, steps = decode(heads, drafters(), ids, 40)
        assert result.tokens == reference.tokens, name
        assert result.text == reference.text, name
        assert result.forward_passes == len(result.accepted_lengths) + 1, name
        assert sum(result.accepted_lengths) + 1 == len(result.tokens), name
        if name.startswith("oracle"):
            assert result.mean_accepted_tokens > 4.0, name  # 5 right drafts a step: ~6 tokens per forward
        if name == "wrong":
            assert result.mean_accepted_tokens == 1.0  # every draft rejected, the bonus token still exact
            assert all(step["draft_sources"] and step["rejected_node"] is not None for step in steps)
        if name == "suffix":  # the corpus holds the second half of the output: long acceptances there
            assert max(result.accepted_lengths) >= 6
        if name == "oracle-off-first-branch":
            assert all(step["accepted_nodes"] != list(range(len(step["accepted_nodes"]))) for step in steps[:-1])


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_heads_as_the_only_drafter_step_like_heads_only_decoding(tiny_backbone, style):
    """With every candidate verified (free forwards), the heads behind the drafter interface accept what the
    heads' static tree accepts, step by step: the drafts, their order and eagle's draft cache all carry over."""
    ids = prompt_ids(tiny_backbone)
    heads = random_heads(tiny_backbone, style)
    static = SpeculativeDecoder(heads, HEADS_TREE).generate(ids, 40)
    result, steps = decode(heads, [HeadsDrafter(heads, HEADS_TREE)], ids, 40)
    assert result.tokens == static.tokens
    assert result.accepted_lengths == static.accepted_lengths
    # a draft whose calibrated chance is 0 adds nothing and is left out; the others are all verified
    full = sum(len(step["draft_tokens"]) == len(HEADS_TREE) + 1 for step in steps)
    assert full >= 0.75 * len(steps) and all(len(step["draft_tokens"]) <= len(HEADS_TREE) + 1 for step in steps)
    assert max(static.accepted_lengths) >= 2  # random heads get some drafts right: the comparison has teeth


def test_heads_drafter_proposes_the_static_tree_with_softmax_confidences(tiny_backbone):
    heads = random_heads(tiny_backbone, "sequential", num_heads=3)
    drafter = HeadsDrafter(heads, HEADS_TREE)
    ids = prompt_ids(tiny_backbone)
    with torch.no_grad():
        hidden = tiny_backbone.hidden(ids).last_hidden_state[0]
        drafter.start(ids[0].tolist())
        drafter.condition(hidden, ids[0, 1:].tolist() + [9])
        candidates = drafter.propose(ids[0].tolist() + [9], budget=10)
        # the same drafts as heads-only decoding's, parent indices shifted past the root
        tokens = drafter.plan.tokens.clone()
        tokens[0] = 9
        confidences = drafter.draft(drafter.plan, tokens, tracing=True)
        state = heads.state(1, hidden[-1:], None, torch.tensor([9]))
        first = torch.softmax(heads.draft_logits(1, state)[0].float(), -1)[0]
    assert candidates.tokens == tuple(tokens[1:].tolist())
    assert candidates.parents == (-1, -1, 0, 0, 2)
    assert candidates.sources == ("heads",) * 5
    assert candidates.confidences == pytest.approx(confidences)
    top2 = first.topk(2)
    assert candidates.tokens[:2] == tuple(top2.indices.tolist())
    assert candidates.confidences[:2] == pytest.approx(top2.values.tolist(), rel=1e-4)
    assert len(drafter.propose(ids[0].tolist() + [9], budget=2)) == 2  # cut to the budget, parents first


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_hybrid_heads_offer_the_top_siblings_of_each_expanded_node(tiny_backbone, style):
    """``make_drafters`` widens the heads' static tree: the root's top-4 of the first head (its softmax
    probabilities as confidences), and decoding with the widened heads stays plain greedy."""
    ids, reference, _ = reference_run(tiny_backbone)
    heads = random_heads(tiny_backbone, style, num_heads=3)
    (drafter,) = make_drafters(("heads",), heads, None, [[0], [0, 0], [1]])
    assert [list(c) for c in drafter.tree.choices] == [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [0, 3]]
    prompt = ids[0].tolist()
    with torch.no_grad():
        hidden = tiny_backbone.hidden(ids).last_hidden_state[0]
        drafter.start(prompt)
        drafter.condition(hidden, prompt[1:] + [9])
        candidates = drafter.propose(prompt + [9], budget=31)
        static = HeadsDrafter(heads, [[0], [0, 0], [1]])
        static.start(prompt)
        static.condition(hidden, prompt[1:] + [9])
        narrow = static.propose(prompt + [9], budget=31)
    assert candidates.parents == (-1, -1, -1, -1, 0, 0, 0, 0)
    root = candidates.confidences[:4]
    assert list(root) == sorted(root, reverse=True) and sum(root) <= 1.0 + 1e-6
    # the static tree's nodes are among them, with the same tokens and confidences
    assert candidates.tokens[:2] == narrow.tokens[:2] and candidates.tokens[4] == narrow.tokens[2]
    assert candidates.confidences[4] == pytest.approx(narrow.confidences[2], rel=1e-5)
    assert len(set(candidates.tokens[:4])) == 4 and len(set(candidates.tokens[4:])) == 4
    result, _ = decode(heads, make_drafters(("heads",), heads, None, [[0], [0, 0], [1]]), ids, 40)
    assert result.tokens == reference.tokens


# ----------------------------------------------------------------------------- the per-step tree, by hand


LOOKUP = Candidates((5, 6, 7), (-1, 0, 1), (0.9, 0.8, 0.5), ("lookup",) * 3)
SUFFIX = Candidates((5, 9, 4), (-1, 0, -1), (0.6, 0.2, 0.1), ("suffix",) * 3)


def test_merged_tree_buffers_by_hand():
    draft = select_tree(merge_candidates([LOOKUP, SUFFIX]), root_token=3, cost=FREE, max_nodes=8)
    # depth by depth, siblings by confidence: root 3; 5 (both), 4 (suffix); under 5: 6 (lookup), 9 (suffix); 7
    assert draft.tokens.tolist() == [3, 5, 4, 6, 9, 7]
    assert draft.tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert draft.tree.position_offsets.tolist() == [0, 1, 1, 2, 2, 3]
    assert draft.sources == ((), ("lookup", "suffix"), ("suffix",), ("lookup",), ("suffix",), ("lookup",))
    assert draft.tree.ancestor_mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1]]
    assert draft.tree.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert draft.path_probabilities == pytest.approx((1.0, 0.9, 0.1, 0.72, 0.18, 0.36))
    # a model that verifies chains only gets the most confident path: 5 (0.9), 6 (0.8), 7
    chain = best_path(merge_candidates([LOOKUP, SUFFIX]))
    assert (chain.tokens, chain.parents, chain.confidences) == ((5, 6, 7), (-1, 0, 1), (0.9, 0.8, 0.5))
    # near the context's end only the shallow part may be verified: the trie cut to depth 2
    shallow = cut_depth(merge_candidates([LOOKUP, SUFFIX]), 2)
    assert (shallow.tokens, shallow.parents) == ((5, 6, 9, 4), (-1, 0, 0, -1))
    assert shallow.sources == (("lookup", "suffix"), ("lookup",), ("suffix",), ("suffix",))


@pytest.mark.parametrize("windows", [{"full_attention": None}, {"full_attention": None, "sliding_attention": 3}])
def test_shared_mask_buffer_equals_fresh_masks(windows):
    """One preallocated buffer, rewritten in place step after step (a bigger tree, then smaller ones over its
    stale rows), gives the masks ``verify_mask`` builds afresh; the 3-deep chain's last node is past a window
    of 3 from the root's own key (the window's tree columns are exercised)."""
    dtype = torch.float32
    masks = MaskBuffer(windows, max_nodes=8, capacity=20, dtype=dtype, device=torch.device("cpu"))
    big = select_tree(merge_candidates([LOOKUP, SUFFIX]), 3, FREE, max_nodes=8).tree
    small = select_tree(merge_candidates([SUFFIX]), 3, FREE, max_nodes=8).tree
    chain = select_tree(merge_candidates([LOOKUP]), 3, FREE, max_nodes=8).tree  # node 2 sees node 1: big's did not
    for tree, prefix in ((big, 7), (small, 12), (chain, 5), (big, 4)):
        got = masks.fill(tree.ancestor_mask, tree.position_offsets, tree.position_offsets.tolist(), prefix)
        want = verify_mask(windows, tree.ancestor_mask, tree.position_offsets, prefix, dtype)
        if isinstance(want, dict):
            assert set(got) == set(want)
            for kind in want:
                assert torch.equal(got[kind], want[kind]), (kind, prefix)
        else:
            assert torch.equal(got, want), prefix
    before = [buffer.data_ptr() for buffer in masks.buffers.values()]
    masks.fill(big.ancestor_mask, big.position_offsets, big.position_offsets.tolist(), 9)
    assert [buffer.data_ptr() for buffer in masks.buffers.values()] == before


def test_decoder_verifies_the_merged_tree_and_traces_sources(tiny_backbone):
    ids, reference, sequence = reference_run(tiny_backbone, 12)
    heads = random_heads(tiny_backbone, "medusa")
    drafters = [Fixed(LOOKUP, "lookup"), Fixed(SUFFIX, "suffix")]
    result, steps = decode(heads, drafters, ids, 12, max_nodes=8)
    assert result.tokens == reference.tokens
    first = steps[0]
    assert first["draft_tokens"] == [reference.tokens[0], 5, 4, 6, 9, 7]
    assert first["draft_parents"] == [-1, 0, 0, 1, 1, 3]
    assert first["draft_sources"] == [["lookup", "suffix"], ["suffix"], ["lookup"], ["suffix"], ["lookup"]]
    assert first["draft_confidences"] == pytest.approx([0.9, 0.1, 0.8, 0.2, 0.5])
    assert first["draft_seconds"] > 0 and result.draft_seconds >= sum(step["draft_seconds"] for step in steps) - 1e-9
    # a budget of 3 nodes keeps the root and the two most probable drafts
    result, steps = decode(heads, drafters, ids, 12, max_nodes=3)
    assert result.tokens == reference.tokens
    assert steps[0]["draft_tokens"][1:] == [5, 6] and steps[0]["draft_parents"] == [-1, 0, 1]


def test_calibrator_learns_that_a_source_is_wrong(tiny_backbone):
    ids, reference, sequence = reference_run(tiny_backbone, 30)
    heads = random_heads(tiny_backbone, "medusa")
    decoder = SpeculativeDecoder(heads, drafters=[Wrong(sequence), Oracle(sequence)], cost=FREE)
    assert decoder.generate(ids, 30).tokens == reference.tokens
    wrong = [r for r in decoder.calibrator.acceptance_rates("wrong") if r is not None]
    right = [r for r in decoder.calibrator.acceptance_rates("oracle") if r is not None]
    assert wrong and max(wrong) == 0.0
    assert right and min(right) == 1.0
    # raw 1.0 but never accepted, against raw 0.5 and always accepted: the calibrated order flips
    assert decoder.calibrator.calibrate("wrong", 1.0) < 0.5 < decoder.calibrator.calibrate("oracle", 0.5)


# ----------------------------------------------------------------------------- sampling: lossless


class BaseTopDrafter:
    """Deterministic drafts from the base itself: its top-2 next tokens, and under each a greedy chain to depth 3;
    a chain proposed twice (under another name) is merged. Often right at depth 1, often wrong deeper."""

    def __init__(self, backbone, name: str, width: int = 2, depth: int = 3):
        self.backbone, self.name, self.width, self.depth = backbone, name, width, depth

    def start(self, prompt_ids):
        pass

    def update(self, accepted_ids):
        pass

    def propose(self, context_ids, budget):
        with torch.no_grad():
            first = self.backbone.model(input_ids=torch.tensor([context_ids])).logits[0, -1]
        tokens, parents = [], []
        for token in first.topk(self.width).indices.tolist():
            tokens.append(token)
            parents.append(-1)
            chain = list(context_ids) + [token]
            for _ in range(self.depth - 1):
                with torch.no_grad():
                    chain.append(self.backbone.model(input_ids=torch.tensor([chain])).logits[0, -1].argmax().item())
                tokens.append(chain[-1])
                parents.append(len(tokens) - 2)
        size = min(budget, len(tokens))
        return Candidates(tuple(tokens[:size]), tuple(parents[:size]), (0.5,) * size, (self.name,) * size)


def _hybrid_marginals(decoder, ids, positions: int, samples: int):
    counts = [Counter() for _ in range(positions)]
    rejections, deep = 0, 0
    for _ in range(samples):
        steps = []
        for position, token in enumerate(decoder.generate(ids, positions, trace=steps.append).tokens):
            counts[position][token] += 1
        rejections += steps[0]["rejected_node"] is not None
        deep = max(deep, max(len(step["accepted_nodes"]) for step in steps))
    return counts, rejections / samples, deep


@pytest.mark.parametrize("family", ["qwen2"])
def test_hybrid_sampling_matches_the_base_distribution(tiny_backbone, monkeypatch):
    """Depth-3 merged trees of deterministic drafts (two drafters proposing overlapping chains, and prompt lookup),
    a temperature and top-p: the first emitted tokens follow the base's warped distribution exactly, and only
    because rejected drafts are taken out of the distribution the next token is drawn from."""
    ids = prompt_ids(tiny_backbone)
    tiny_backbone.model.generation_config.eos_token_id = None
    temperature, top_p, samples = 0.7, 0.4, 800
    exact = _exact_marginals(tiny_backbone, ids, 3, temperature, top_p)
    heads = random_heads(tiny_backbone, "medusa")

    def drafters():
        return [BaseTopDrafter(tiny_backbone, "top"), BaseTopDrafter(tiny_backbone, "top-1", width=1),
                PromptLookup(min_ngram=1)]

    decoder = SpeculativeDecoder(heads, drafters=drafters(), cost=FREE, temperature=temperature, top_p=top_p,
                                 seed=0)
    counts, rejected, deep = _hybrid_marginals(decoder, ids, 3, samples)
    assert 0.2 < rejected < 0.95  # drafts are often wrong, not always
    assert deep >= 3  # two drafts and the bonus accepted in one step: the tree is verified deep
    assert max(_total_variations(counts, exact)) < 0.08

    # the power to catch a sampler that, after rejections, keeps the rejected drafts in the distribution
    import mtpkit.decoding.acceptance as decoding

    def walk_keeping_rejected_drafts(children, child_probs, uniform):
        nodes, _ = rejection_walk(children, child_probs, uniform)
        return nodes, []

    monkeypatch.setattr(decoding, "rejection_walk", walk_keeping_rejected_drafts)
    decoder = SpeculativeDecoder(heads, drafters=drafters(), cost=FREE, temperature=temperature, top_p=top_p,
                                 seed=0)
    counts, _, _ = _hybrid_marginals(decoder, ids, 3, samples // 2)
    assert max(_total_variations(counts, exact)) > 0.12


# ----------------------------------------------------------------------------- where the suffix corpus comes from


def _write_corpus(path, responses):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt_ids": [[1, 2]] * len(responses), "response_ids": responses})
    pq.write_table(table, path)


def test_corpus_is_carried_or_named_or_absent(tmp_path, tiny_backbone):
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    config = HeadsConfig(style="medusa", num_heads=2, num_layers=1, hidden_size=64, vocab_size=300,
                         base_model="x", base_fingerprint="y")
    assert corpus_path(heads_dir, config) is None
    config.corpus = "../corpus/base.parquet"
    assert corpus_path(heads_dir, config) is None  # named, not built yet: no error, no corpus
    (tmp_path / "corpus").mkdir()
    _write_corpus(tmp_path / "corpus" / "base.parquet", [[10, 11, 12, 13], [10, 11, 14]])
    named = corpus_path(heads_dir, config)
    assert named == (tmp_path / "corpus" / "base.parquet").resolve()
    _write_corpus(heads_dir / CORPUS_NAME, [[20, 21, 22]])
    assert corpus_path(heads_dir, config) == heads_dir / CORPUS_NAME  # the directory's own corpus comes first

    index = corpus_index(named)
    assert corpus_index(named) is index  # built once per process
    assert index.next_counts([10, 11]) == {12: 1, 14: 1}
    assert index.count([1, 2]) == 0  # responses only
    assert corpus_index(named, with_prompts=True).count([1, 2, 10]) == 2
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(MtpkitError, match="cannot read the corpus"):
        corpus_index(tmp_path / "broken.parquet")

    heads = random_heads(tiny_backbone, "medusa", num_heads=2)
    kinds = [(type(d).__name__, getattr(d, "learn", None)) for d in make_drafters(("suffix",), heads, heads_dir)]
    assert kinds == [("SuffixDrafter", False), ("SuffixDrafter", True)]
    assert make_drafters(("suffix",), heads, heads_dir)[0].index is corpus_index(heads_dir / CORPUS_NAME)
    assert len(make_drafters(("suffix",), heads, tmp_path)) == 1  # no corpus: this run's outputs only


def test_suffix_decoder_from_a_heads_directory_corpus(tmp_path, tiny_backbone):
    ids, reference, sequence = reference_run(tiny_backbone, 40)
    heads = random_heads(tiny_backbone, "medusa", num_heads=2)
    _write_corpus(tmp_path / CORPUS_NAME, [[5, 6, 7], reference.tokens])  # the base said this before
    decoder = build_decoder(heads, tmp_path, "suffix")
    result = decoder.generate(ids, 40)
    assert result.tokens == reference.tokens
    assert result.mean_accepted_tokens > 3.0  # ~1 without the corpus; tree sizes follow this machine's costs
    # without the corpus, the suffix drafter learns from its own outputs: the second run drafts from the first
    alone = build_decoder(heads, tmp_path / "elsewhere", "suffix")
    first, second = alone.generate(ids, 40), alone.generate(ids, 40)
    assert first.tokens == second.tokens == reference.tokens
    assert second.mean_accepted_tokens > 4.0 > first.mean_accepted_tokens


def test_hybrid_needs_a_cost_table_and_a_drafter(tiny_backbone):
    heads = random_heads(tiny_backbone, "medusa", num_heads=2)
    with pytest.raises(MtpkitError, match="cost table"):
        SpeculativeDecoder(heads, drafters=[PromptLookup()])
    with pytest.raises(MtpkitError, match="at least one drafter"):
        SpeculativeDecoder(heads, drafters=[], cost=FREE)
    with pytest.raises(MtpkitError, match="unknown --draft"):
        build_decoder(heads, None, "everything")


def test_shipped_heads_name_the_shipped_corpus():
    from pathlib import Path

    import mtpkit

    heads_dir = Path(mtpkit.__file__).parent / "trained" / "smollm2-135m-sequential"
    config = json.loads((heads_dir / "mtp_config.json").read_text())
    assert config["corpus"] == "../corpus/smollm2-135m-wide.parquet"
    assert config["training"]["data"] == ["mtpkit/trained/corpus/smollm2-135m-wide.parquet"]  # what they trained on
    assert (heads_dir / config["corpus"]).parent.resolve() == (heads_dir.parent / "corpus").resolve()


def test_hybrid_near_the_end_of_the_context(tiny_backbone):
    ids = torch.arange(5, 5 + 505).remainder(tiny_backbone.vocab_size).unsqueeze(0)
    tiny_backbone.model.generation_config.eos_token_id = None
    reference = greedy_generate(tiny_backbone, ids, 50)
    sequence = ids[0].tolist() + reference.tokens
    heads = random_heads(tiny_backbone, "medusa")
    # the prompt counts up, so prompt lookup (one token matched) drafts 10 deep: past the context's end
    result, steps = decode(heads, [PromptLookup(min_ngram=1), Oracle(sequence, depth=6)], ids, 50)
    assert result.tokens == reference.tokens and len(result.tokens) <= 512 - 505
    # no node is verified at or past the model's last position, but the drafts that fit are: the oracle's 6
    depths = [len(step["accepted_nodes"]) - 1 for step in steps]
    assert all(step["prefix_length"] + _depth(step["draft_parents"]) < 512 for step in steps)
    assert steps[0]["prefix_length"] == 505 and depths[0] == 6 and len(steps) == 1


def _depth(parents: list[int]) -> int:
    depth = [0] * len(parents)
    for node, parent in enumerate(parents[1:], start=1):
        depth[node] = depth[parent] + 1
    return max(depth)


def test_models_without_tree_attention_verify_the_best_chain(tiny_backbone, monkeypatch):
    import mtpkit.decoding.masks as masks
    import mtpkit.decoding.speculative as speculative

    ids, reference, sequence = reference_run(tiny_backbone, 30)
    heads = random_heads(tiny_backbone, "medusa")
    monkeypatch.setattr(speculative, "tree_attention_problem", lambda backbone: "a probe tree differs")
    monkeypatch.setattr(masks, "_WARNED", set())
    with pytest.warns(UserWarning, match="most confident chain"):
        decoder = SpeculativeDecoder(heads, drafters=[Wrong(sequence), Oracle(sequence, wrong_first=True)], cost=FREE)
    steps = []
    result = decoder.generate(ids, 30, trace=steps.append)
    assert result.tokens == reference.tokens
    assert all(step["draft_parents"] == list(range(-1, len(step["draft_parents"]) - 1)) for step in steps)
    assert max(result.accepted_lengths) >= 2  # the calibrator learns the oracle's lower-ranked drafts are right
