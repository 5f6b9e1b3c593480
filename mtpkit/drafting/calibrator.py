"""How far to trust each drafter's confidence: acceptance rates measured in bins of raw confidence.

A drafter's raw confidence (a head's softmax probability, a lookup's match frequency) is rarely
the real chance that the base accepts the token. Per *agreement* (the set of sources that proposed
the node: ``heads`` alone, or ``heads+suffix`` when both did), per depth in the tree (1, 2, 3, 4 and
deeper) and per bin of raw confidence (the largest of the agreeing sources') the calibrator counts
proposed nodes that were tried (their parent was accepted) and accepted; the calibrated probability
is that rate, pulled toward a prior by ``prior_weight`` pseudo-trials. A single source's prior is its
raw confidence; an agreement's prior is the best calibrated value of its sources alone. Agreements are
counted apart because they are not alike: measured on chat and writing prompts, a token both the heads
and the suffix index proposed was accepted 45% of the time, one the suffix index proposed alone 14%;
counted per source, each source's rate mixed the two and overrated its lone proposals by 2x. Depth
matters because a node's chance given its parent's acceptance is not the same at every depth: a copy
that held for three tokens tends to hold for a fourth (a lookup's raw confidence is 1.0 at every depth
of a single match), while a head further ahead is less sure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from mtpkit.errors import MtpkitError

if TYPE_CHECKING:
    from mtpkit.drafting.merge import DraftTree


MAX_DEPTH_BUCKET = 4  # depths 1, 2, 3 and 4-or-deeper are calibrated apart
STATE_VERSION = 2  # 2: counted per agreement (1 counted each source of a shared node, and is not read)


def agreement(sources: Sequence[str]) -> str:
    """The name of the set of sources that proposed a node: ``heads+suffix``."""
    return "+".join(sorted(set(sources)))


def _key(source: str, depth: int) -> str:
    return f"{source}@{min(max(depth, 1), MAX_DEPTH_BUCKET)}"


@dataclass
class ConfidenceCalibrator:
    num_bins: int = 10
    prior_weight: float = 4.0
    _tried: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)
    _accepted: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.num_bins < 1 or self.prior_weight <= 0:
            raise MtpkitError("the calibrator needs num_bins >= 1 and prior_weight > 0")

    def bin(self, raw: float) -> int:
        return min(self.num_bins - 1, max(0, int(raw * self.num_bins)))

    def calibrate(self, source: str, raw: float, depth: int = 1, prior: float | None = None) -> float:
        """P(accepted | parent accepted) for a node ``source`` (one source or an ``agreement``) proposed at
        ``depth`` with confidence ``raw``; with no measurements it is ``prior`` (default: ``raw``)."""
        b, key = self.bin(raw), _key(source, depth)
        tried = self._tried.get(key, [0] * self.num_bins)[b]
        accepted = self._accepted.get(key, [0] * self.num_bins)[b]
        return (accepted + self.prior_weight * (raw if prior is None else prior)) / (tried + self.prior_weight)

    def calibrate_node(self, sources: Sequence[str], raws: Sequence[float], depth: int = 1) -> float:
        """P(accepted | parent accepted) for a node the ``sources`` proposed with confidences ``raws``."""
        if len(sources) == 1:
            return self.calibrate(sources[0], raws[0], depth)
        alone = max(self.calibrate(s, r, depth) for s, r in zip(sources, raws))
        return self.calibrate(agreement(sources), max(raws), depth, prior=alone)

    def record(self, source: str, raw: float, accepted: bool, depth: int = 1) -> None:
        b, key = self.bin(raw), _key(source, depth)
        self._tried.setdefault(key, [0] * self.num_bins)[b] += 1
        self._accepted.setdefault(key, [0] * self.num_bins)[b] += int(accepted)

    def observe(self, draft: "DraftTree", accepted_nodes: Sequence[int]) -> None:
        """Learn from one verification: ``accepted_nodes`` are the tree's accepted node indices, root first.

        Only nodes whose parent was accepted were put to the test; the others say nothing.
        """
        accepted = set(accepted_nodes)
        parents = draft.tree.parents.tolist()
        depths = [0] * len(parents)
        for node in range(1, len(parents)):
            depths[node] = depths[parents[node]] + 1
            if parents[node] in accepted:
                self.record(agreement(draft.sources[node]), max(draft.raw_confidences[node]), node in accepted,
                            depths[node])

    def weighed_as(self, trials: int) -> "ConfidenceCalibrator":
        """A copy whose counts weigh as at most ``trials`` trials per bin, each bin's rate kept (to the nearest
        count): a prior that a prompt's own acceptances soon outweigh."""
        if trials < 1:
            raise MtpkitError(f"a prior weighs as at least one trial per bin (got {trials})")
        prior = ConfidenceCalibrator(self.num_bins, self.prior_weight)
        for key, tried in self._tried.items():
            accepted = self._accepted.get(key, [0] * self.num_bins)
            kept = [min(t, trials) for t in tried]
            prior._tried[key] = kept
            prior._accepted[key] = [round(a * k / t) if t else 0 for a, k, t in zip(accepted, kept, tried)]
        return prior

    def acceptance_rates(self, source: str, depth: int = 1) -> list[float | None]:
        """Measured acceptance rate per bin at ``depth`` (None where nothing was tried)."""
        key = _key(source, depth)
        tried = self._tried.get(key, [0] * self.num_bins)
        accepted = self._accepted.get(key, [0] * self.num_bins)
        return [a / t if t else None for a, t in zip(accepted, tried)]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "num_bins": self.num_bins, "prior_weight": self.prior_weight,
                "tried": {s: list(v) for s, v in self._tried.items()},
                "accepted": {s: list(v) for s, v in self._accepted.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ConfidenceCalibrator":
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"calibrator state version {state.get('version')!r}, expected {STATE_VERSION}")
        calibrator = cls(int(state["num_bins"]), float(state["prior_weight"]))
        calibrator._tried = {s: [int(x) for x in v] for s, v in state.get("tried", {}).items()}
        calibrator._accepted = {s: [int(x) for x in v] for s, v in state.get("accepted", {}).items()}
        return calibrator
