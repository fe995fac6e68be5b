"""Cost-aware draft budget: how many of the ranked candidate nodes to verify this step.

Verifying ``n`` draft nodes yields ``1 + E[accepted]`` tokens, where ``E[accepted]`` is the sum over
nodes of P(node on the accepted path), and costs ``cost(1 + n, ctx)`` seconds. With candidates sorted
by estimated acceptance (parents before children), the step keeps the prefix ``n`` maximising

    (1 + sum_{i < n} p_i) / cost(1 + n, ctx)

and ``n = 0`` (plain autoregressive step) when nothing beats it. The ``p_i`` come from a
:class:`Calibrator`: the drafter's raw confidence (path probability, visit share, suffix match length
and depth) is bucketed, and each bucket's acceptance rate is learned online from ``Feedback``.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.cost import CostModel

#: Candidate sources; each has its own buckets, because their confidences mean different things.
NGRAM, MCTS, SUFFIX, HISTORY, RECYCLE = 0, 1, 2, 3, 4
N_SOURCES = 5


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    conf_bins: int = Field(24, ge=2, le=64, description="Half-octave bins of a confidence in (0, 1] (last = below).")
    suffix_match_bins: int = Field(8, ge=1, le=64, description="Suffix match lengths told apart (longer = last).")
    suffix_depth_bins: int = Field(16, ge=1, le=256, description="Suffix depths told apart (deeper = last).")
    suffix_prior: tuple[float, ...] = Field(
        (0.15, 0.35, 0.55, 0.6, 0.75, 0.75, 0.8, 0.9), description="Prior per-token acceptance of a "
        "per-request suffix chain by match length (SmolLM2 on generic prompts); depth d starts at prior**d.")
    history_prior: tuple[float, ...] = Field(
        (0.05, 0.2, 0.3, 0.45, 0.5, 0.6, 0.65, 0.7), description="The same for chains from earlier requests.")
    ngram_prior_scale: float = Field(0.8, gt=0.0, le=1.0, description="Prior of an n-gram bucket: this times "
                                     "its confidence (corpus statistics overrate themselves on a new model).")
    mcts_prior_scale: float = Field(0.5, gt=0.0, le=1.0,
                                    description="Prior of an MCTS bucket: this times its visit share.")
    recycle_prior_scale: float = Field(0.8, gt=0.0, le=1.0, description="Prior of a recycled top-k bucket "
                                       "(actors.aded.recycle): this times its path's rank prior.")
    agree_prior_factor: float = Field(1.0, gt=0.0, le=1.0, description="Prior of a node several sources "
                                      "propose: its best source's prior p becomes 1 - (1 - p) * this.")
    prior_strength: float = Field(8.0, gt=0.0, description="Pseudo-observations behind each prior.")
    ema_decay: float = Field(0.995, gt=0.0, le=1.0, description="Per-update decay of a bucket's counts (recency).")
    request_prior_strength: float = Field(
        2.0, gt=0.0, description="Pseudo-nodes behind a request's own correction factor: the shared estimates "
        "are scaled by (realised + s) / (predicted + s) over the request's drafts, so a request the statistics "
        "suit badly stops drafting after a few misses.")
    request_decay: float = Field(0.9, gt=0.0, le=1.0, description="Per-step decay of a request's sums.")
    min_gain: float = Field(0.0, ge=0.0, description="A draft must beat plain decoding by this relative margin.")
    max_nodes: int = Field(64, ge=0, le=1024, description="Hard cap on nodes per step (the engine's cap also applies).")
    ctx_step: int = Field(64, ge=1, description="Context-length granularity of the cached cost curve.")


class Calibrator:
    """Online P(node accepted) per (source, confidence bucket); thread-safe, shared by all requests."""

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        c = config
        centres = 2.0 ** (-(np.arange(c.conf_bins) + 0.5) / 2)
        priors = [c.ngram_prior_scale * centres, c.mcts_prior_scale * centres,
                  self._match_prior(c.suffix_prior), self._match_prior(c.history_prior),
                  c.recycle_prior_scale * centres]
        self.offsets = np.cumsum([0] + [len(p) for p in priors])  # [N_SOURCES + 1]
        solo = np.concatenate(priors)
        #: Nodes several sources agree on are calibrated in a second table of the same layout.
        self.agree_offset = len(solo)
        self.prior = np.concatenate([solo, 1.0 - (1.0 - solo) * c.agree_prior_factor])
        self.hits = np.zeros_like(self.prior)
        self.trials = np.zeros_like(self.prior)
        self._lock = threading.Lock()

    def _match_prior(self, per_match: tuple[float, ...]) -> np.ndarray:
        """[match bins * depth bins] prior of a chain node: per-token prior ** depth."""
        c = self.config
        per_token = np.array([per_match[min(m, len(per_match)) - 1] for m in range(1, c.suffix_match_bins + 1)])
        depth = np.arange(1, c.suffix_depth_bins + 1)
        return (per_token[:, None] ** depth[None, :]).ravel()

    @property
    def n_buckets(self) -> int:
        return len(self.prior)

    def conf_bucket(self, source: int, conf: float) -> int:
        """Bucket of a confidence in (0, 1] for the NGRAM, MCTS or RECYCLE source (half-octave bins)."""
        b = int(-2.0 * math.log2(max(conf, 1e-30))) if conf < 1.0 else 0
        return int(self.offsets[source]) + min(b, self.config.conf_bins - 1)

    def chain_bucket(self, source: int, match_len: int, depth: int) -> int:
        """Bucket of a SUFFIX or HISTORY chain node by its match length and depth."""
        m = min(match_len, self.config.suffix_match_bins) - 1
        d = min(depth, self.config.suffix_depth_bins) - 1
        return int(self.offsets[source]) + m * self.config.suffix_depth_bins + d

    def estimates(self) -> np.ndarray:
        """[n_buckets] current P(accepted): the EMA counts shrunk toward the prior."""
        k0 = self.config.prior_strength
        return (self.hits + k0 * self.prior) / (self.trials + k0)

    def update(self, buckets: np.ndarray, accepted: np.ndarray) -> None:
        """Fold outcomes: ``buckets`` [m] bucket ids (< 0 ignored), ``accepted`` [m] bool."""
        keep = buckets >= 0
        buckets, accepted = buckets[keep], accepted[keep].astype(np.float64)
        if not len(buckets):
            return
        touched = np.unique(buckets)
        with self._lock:
            self.hits[touched] *= self.config.ema_decay
            self.trials[touched] *= self.config.ema_decay
            np.add.at(self.hits, buckets, accepted)
            np.add.at(self.trials, buckets, 1.0)


class CostTable:
    """``relative(ctx)[n]`` = cost of verifying n draft nodes / cost of a plain decode step, cached per ctx step."""

    def __init__(self, cost: CostModel, max_nodes: int, ctx_step: int) -> None:
        self.cost = cost
        self.max_nodes = max_nodes
        self.ctx_step = ctx_step
        self._cache: dict[int, np.ndarray] = {}

    def relative(self, context_len: int) -> np.ndarray:
        key = context_len // self.ctx_step
        row = self._cache.get(key)
        if row is None:
            ctx = key * self.ctx_step + self.ctx_step // 2
            sec = np.array([self.cost.forward_seconds(1 + n, ctx) for n in range(self.max_nodes + 1)])
            row = self._cache[key] = sec / sec[0]
        return row


def choose_budget(probs: np.ndarray, relative_cost: np.ndarray, min_gain: float = 0.0) -> int:
    """Nodes to keep from ``probs`` [m] (estimated P(accepted), in draft order) under ``relative_cost``.

    ``relative_cost[n]`` is the cost of a forward over 1 + n tokens relative to n = 0.
    """
    m = min(len(probs), len(relative_cost) - 1)
    if m <= 0:
        return 0
    expected = 1.0 + np.concatenate([[0.0], np.cumsum(probs[:m])])  # [m + 1] tokens per step
    rate = expected / relative_cost[: m + 1]
    n = int(np.argmax(rate))
    return n if rate[n] > rate[0] * (1.0 + min_gain) else 0
