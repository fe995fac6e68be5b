"""The batch's draft budget: how many of each request's proposed nodes one verify forward takes.

A step over B requests feeds a ``[B, 1 + L]`` batch (rows padded to the longest), so its cost is the
measured ``t(B, 1 + L, ctx)`` and it yields ``B + sum_r E[accepted_r]`` tokens, where a request's
expectation is the sum of its verified nodes' calibrated acceptance estimates (``Draft.p_accept``,
ranked so that every prefix of a draft is a tree). For each depth L of the padded batch, every request
takes its best ``min(L, m_r)`` nodes (padding is computed anyway); the step keeps the L maximising

    (B + sum_r sum_{i < n_r(L)} p_ri) / t(B, 1 + L, ctx)

so speculation shrinks as the batch makes every extra column expensive and grows when it is cheap,
read off the measured curve, with no batch-size table. L = 0 is plain batched decoding. Drafts that
carry no estimates (a draft model's chains) are verified whole and fix the smallest L.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from actors.cost import StepCost
from actors.draft import Draft


class EstimateCorrection:
    """How the drafters' estimates compare with what verification realised, over the batch's recent steps.

    The budget reads ``p * factor`` (at most 1) with ``factor = (realised + s) / (predicted + s)`` over the
    verified nodes that carried estimates, both sums decayed per step: a drafter that overrates itself
    (a cold calibrator on a new workload) stops buying padded columns within a few steps.
    """

    def __init__(self, strength: float, decay: float) -> None:
        self.strength, self.decay = strength, decay
        self.predicted = self.realised = 0.0

    @property
    def factor(self) -> float:
        return min(1.0, (self.realised + self.strength) / (self.predicted + self.strength))

    def update(self, predicted: float, realised: float) -> None:
        """Fold one step: the summed estimates of the verified nodes and how many of them were accepted."""
        self.predicted = self.predicted * self.decay + predicted
        self.realised = self.realised * self.decay + realised


def choose_batch_budget(drafts: Sequence[Draft], context_len: int, cost: StepCost, min_gain: float = 0.0,
                        factor: float = 1.0) -> list[int]:
    """Nodes to verify per draft (a prefix of each) for one batched step after ``context_len`` tokens;
    ``factor`` scales every estimate (:class:`EstimateCorrection`)."""
    rows = len(drafts)
    fixed = [len(d) for d in drafts if d.p_accept is None]
    ranked = [_corrected(d.p_accept, factor) for d in drafts if d.p_accept is not None]
    lo = max(fixed, default=0)
    hi = max([lo] + [len(p) for p in ranked])
    if hi == lo:
        return [len(d) for d in drafts]
    cum = [np.concatenate([[0.0], np.cumsum(p)]) for p in ranked]  # [m_r + 1] expected accepted by prefix
    levels = np.arange(lo, hi + 1)
    gain = rows + np.array([sum(c[min(level, len(c) - 1)] for c in cum) for level in levels])
    seconds = np.array([cost.forward_seconds(1 + int(level), context_len, rows) for level in levels])
    rate = gain / seconds
    best = int(np.argmax(rate))
    level = int(levels[best]) if rate[best] > rate[0] * (1.0 + min_gain) else lo
    return [len(d) if d.p_accept is None else min(level, len(d)) for d in drafts]


def expected_tokens(drafts: Sequence[Draft], keep: Sequence[int], factor: float = 1.0) -> float:
    """What a step is expected to yield: one token per row plus its kept nodes' estimates, scaled as
    ``choose_batch_budget`` scales them (nodes without an estimate count none)."""
    return len(drafts) + sum(float(_corrected(d.p_accept[:n], factor).sum())
                             for d, n in zip(drafts, keep) if d.p_accept is not None)


def _corrected(p_accept: np.ndarray, factor: float) -> np.ndarray:
    """Estimates as the budget reads them: scaled by the correction factor, at most 1."""
    return np.minimum(1.0, factor * np.asarray(p_accept, np.float64))


class DraftGate:
    """Whether drafting pays for itself for one request once its own time is counted.

    The budget weighs verifying the drafts it is given; it cannot see what producing them cost (a draft
    model's forwards, ADED's search and feedback), which in a busy batch can exceed what they add. Over
    the request's recent drafted steps (sums decayed per step) this compares its accepted draft tokens
    with that time in tokens of plain decoding: ``rows * (its drafting + feedback + the verify its nodes
    added) / plain step``. While drafting falls short, its steps go undrafted; a probe step drafts after
    1, 2, 4, ... ``max_skip`` undrafted ones, so a request whose text turns predictable is noticed. The
    first ``warmup`` drafted steps are never judged.
    """

    def __init__(self, decay: float = 0.9, max_skip: int = 32, warmup: int = 4) -> None:
        self.decay, self.max_skip, self.warmup = decay, max_skip, warmup
        self.gained = self.cost = 0.0
        self.drafted = self.skip = self.wait = 0

    def should_draft(self) -> bool:
        """Asked once per step: False while the gate holds drafting back."""
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def update(self, rows: int, gained: float, overhead_s: float, added_verify_s: float, plain_s: float) -> None:
        """Fold one drafted step: accepted draft tokens, this request's drafting + feedback seconds, the verify
        seconds its nodes added, and the seconds a plain step of the batch's ``rows`` takes."""
        self.gained = self.gained * self.decay + gained
        self.cost = self.cost * self.decay + rows * (overhead_s + added_verify_s) / max(plain_s, 1e-9)
        self.drafted += 1
        if self.drafted <= self.warmup or self.gained >= self.cost:
            self.skip = 0
        else:
            self.skip = self.wait = min(self.max_skip, max(1, 2 * self.skip))
