"""The measured cost of one verify forward as a function of batch rows, tokens per row and context.

On a GPU that cost is nearly flat until the batch's total tokens make the forward compute-bound; on a
CPU it rises from the first extra token. Any draft budget must read this curve. It comes from ``specd
profile`` (actors/profile.py) and is saved as JSON:

    {"batch": [1, 2, ...], "k": [1, 2, ...], "context_lengths": [64, 256, ...],
     "seconds": [[[t(rows, k, ctx) for k] for rows] for ctx], "device": ..., "dtype": ..., ...}

A profile without a ``batch`` axis (one row) is read as ``t(rows, k) = t(1, rows * k)``: the linears
see rows x k tokens either way, which is what dominates a small model's forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np


def _interp(x: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """Piecewise linear through (xs, ys), extrapolated linearly past the last point, clamped below."""
    if len(xs) == 1 or x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(ys[-1] + slope * (x - xs[-1]))


class StepCost(Protocol):
    """What a budget reads: the price in seconds of one verify forward of a given shape."""

    def forward_seconds(self, n_tokens: int, context_len: int, rows: int = 1) -> float: ...


@dataclass(frozen=True)
class CostModel:
    k: np.ndarray  # [K] tokens per row in one forward (the pending token + draft nodes), increasing
    context_lengths: np.ndarray  # [C] increasing
    seconds: np.ndarray  # [C, B, K]
    batch: np.ndarray = field(default_factory=lambda: np.array([1.0]))  # [B] rows, increasing

    @classmethod
    def from_profile(cls, profile: dict) -> CostModel:
        k = np.asarray(profile["k"], dtype=np.float64)
        ctx = np.asarray(profile["context_lengths"], dtype=np.float64)
        sec = np.asarray(profile["seconds"], dtype=np.float64)
        batch = np.asarray(profile.get("batch", [1]), dtype=np.float64)
        if sec.ndim == 2:
            sec = sec[:, None, :]
        if (sec.shape != (len(ctx), len(batch), len(k)) or np.any(np.diff(k) <= 0) or np.any(np.diff(ctx) <= 0)
                or np.any(np.diff(batch) <= 0)):
            raise ValueError("profile needs increasing batch, k and context_lengths and "
                             "seconds[len(ctx)][len(batch)][len(k)]")
        return cls(k, ctx, sec, batch)

    @classmethod
    def from_json(cls, path: str | Path) -> CostModel:
        return cls.from_profile(json.loads(Path(path).read_text()))

    @classmethod
    def flat(cls, seconds: float = 1.0) -> CostModel:
        """A GPU-like curve (cost independent of tokens): useful as a neutral default in tests."""
        return cls(np.array([1.0, 1024.0]), np.array([0.0, 1e6]), np.full((2, 1, 2), seconds))

    def forward_seconds(self, n_tokens: int, context_len: int, rows: int = 1) -> float:
        """Predicted seconds for ``rows`` rows of ``n_tokens`` tokens each (pending + draft nodes) after
        ``context_len`` cached tokens (the longest row's: shorter rows are padded to it)."""
        if len(self.batch) == 1:  # one-row profile: rows x k tokens through the same linears
            rows, n_tokens = 1, rows * n_tokens
        per_ctx = [_interp(rows, self.batch, [_interp(n_tokens, self.k, b_row) for b_row in c_row])
                   for c_row in self.seconds]
        return float(np.interp(context_len, self.context_lengths, per_ctx))

    def relative(self, n_tokens: int, context_len: int) -> float:
        """Cost of ``n_tokens`` as a multiple of a plain one-token decode step at the same context."""
        return self.forward_seconds(n_tokens, context_len) / self.forward_seconds(1, context_len)


class TimedCost:
    """The curve, corrected per step shape by the verify forwards this process has timed.

    A profile is the fastest of a few forwards taken at another moment of a shared host, of shapes that only
    approximate a served batch's (its ragged rows are one token apart; real rows carry rolled-back
    drafts). On this 2-core CPU it priced a plain two-row step 9% high and the widened ones within 3%
    (results/2026-12-07k-step-costs), so widening looked cheaper than it was and ADED lost to ar. Per
    shape (rows, tokens per row) this keeps a decayed mean of log(real / priced), shrunk toward 0 by
    ``strength`` pseudo-steps, each step's log clipped to +-``clip`` (a GC pause or a preempted step moves
    it little), and prices the shape at the curve's seconds times ``exp(mean)``. A widened shape's mean is
    shrunk toward the pooled mean of every widened shape with its rows (a curve off for one width is
    usually off for its neighbours, and most widths are run a few times only), a plain one's toward 0. A
    shape never run keeps that prior: when the curve overprices the plain steps (always run) widening
    looks dearer and speculation backs off; when it underprices them, widening looks cheaper, the wide
    steps run and get timed. Context is the curve's alone (the correction is one factor per shape).
    """

    def __init__(self, curve: CostModel, strength: float = 4.0, decay: float = 0.95, clip: float = 0.5) -> None:
        self.curve, self.strength, self.decay, self.clip = curve, strength, decay, clip
        self._cells: dict[tuple[int, int], tuple[float, float]] = {}  # (rows, n_tokens) -> (sum log, weight)
        self._wide: dict[int, tuple[float, float]] = {}  # rows -> the same over every n_tokens > 1

    def factor(self, n_tokens: int, rows: int = 1) -> float:
        """The learnt real / priced ratio of a shape (1 for a plain one never timed)."""
        prior = self._mean(self._wide.get(rows), 0.0) if n_tokens > 1 else 0.0
        return float(np.exp(self._mean(self._cells.get((rows, n_tokens)), prior)))

    def _mean(self, cell: tuple[float, float] | None, prior: float) -> float:
        total, weight = cell or (0.0, 0.0)
        return (total + self.strength * prior) / (weight + self.strength)

    def forward_seconds(self, n_tokens: int, context_len: int, rows: int = 1) -> float:
        return self.curve.forward_seconds(n_tokens, context_len, rows) * self.factor(n_tokens, rows)

    def observe(self, n_tokens: int, context_len: int, rows: int, seconds: float) -> None:
        """Fold one timed verify forward of ``rows`` x ``n_tokens`` tokens after ``context_len``."""
        priced = self.curve.forward_seconds(n_tokens, context_len, rows)
        if not (seconds > 0 and priced > 0):
            return
        x = float(np.clip(np.log(seconds / priced), -self.clip, self.clip))
        for table, key in [(self._cells, (rows, n_tokens))] + ([(self._wide, rows)] if n_tokens > 1 else []):
            total, weight = table.get(key, (0.0, 0.0))
            table[key] = (total * self.decay + x, weight * self.decay + 1.0)


#: SmolLM2-135M's measured CPU curves, one per linear kernel, with the machine and how they were measured.
SMOLLM2_CPU_COST_PATH = Path(__file__).parent / "data" / "smollm2-135m-cpu-verify-cost.json"


@lru_cache(maxsize=1)
def _smollm2_cpu_profiles() -> dict[str, dict]:
    return json.loads(SMOLLM2_CPU_COST_PATH.read_text())["kernels"]


def smollm2_cpu_cost(kernels: str = "torch") -> CostModel:
    """SmolLM2-135M's curve for these linear kernels (the torch one for kernels never measured): the ADED
    budget's fallback when ``specd profile`` has not been run for the target. A steeper curve than the
    target's only makes the budget cautious, never slower than plain decoding."""
    profiles = _smollm2_cpu_profiles()
    return CostModel.from_profile(profiles[kernels if kernels in profiles else "torch"])
