"""Token Recycling (arXiv 2408.08696): the target's own top-k, keyed by the token it followed.

Every verify forward tells the target's top-k next tokens at the pending token and at every draft node
(``Feedback.target_topk``). The tri-gram store keeps them keyed by the *bigram* state, which recurs
rarely in chat; Token Recycling keeps the newest row per *single* token (an adjacency matrix
``[vocab, k]``, each row replaced, not accumulated) and drafts a tree from it. That row is what the
target said last time after this token, whatever came before it, so it covers states the store has never
seen (on SmolLM2's held-out chat traces the true next token is in it at ~10% of the steps where no
other source offers it).

The tree is best-first over the adjacency with a fixed prior per rank (``rank_probs``): a node's
confidence is the product of its path's rank priors; the calibrator learns what that is worth.
Memory is fixed (``vocab * k`` int32) whatever requests send; rows are written without a lock (a torn row
is only a different candidate set, and every tree is lossless). The adjacency lives in the drafter's
process, shared by its requests; unlike the store it is not shared across replicas.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from actors.aded.tree import BestFirstConfig, best_first_paths


class RecycleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Draft from the target's recycled top-k rows (needs target_topk > 0).")
    rank_probs: tuple[float, ...] = Field(
        (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01), min_length=1, max_length=64,
        description="Prior P(the target's next token is the row's rank-j token), j = 1, 2, ...: orders the "
        "tree and seeds calibration (rows are used up to this length and target_topk).")
    search: BestFirstConfig = Field(
        default_factory=lambda: BestFirstConfig(max_nodes=32, max_depth=8, branch=8, min_prob=0.0),
        description="Best-first over the adjacency: nodes, depth, successors per node, smallest path prior.")


class Recycler:
    """The adjacency ``[vocab, k]`` (-1 = unknown) and the candidate tree below a pending token."""

    def __init__(self, config: RecycleConfig, vocab_size: int, k: int) -> None:
        self.config = config
        self.k = max(0, min(k, len(config.rank_probs)))
        self.rows = np.full((vocab_size, self.k), -1, np.int32)
        self._probs = list(config.rank_probs[: self.k])

    @property
    def active(self) -> bool:
        return self.config.enabled and self.k > 0

    def observe(self, pending: int, draft_tokens: np.ndarray, target_topk: torch.Tensor) -> None:
        """Row 0 of ``target_topk`` [1 + n, >= k] follows ``pending``, row ``i + 1`` follows node ``i``'s token;
        rows with no known id (the simulator's rejected branches) are skipped."""
        if not self.active:
            return
        given = target_topk[:, : self.k].numpy()
        top = np.full((len(given), self.k), -1, np.int32)  # a narrower row leaves nothing of the old one
        top[:, : given.shape[1]] = given
        keys = np.concatenate([[pending], np.asarray(draft_tokens, np.int64)])[: len(top)]
        known = (top >= 0).any(axis=1) & (keys >= 0) & (keys < len(self.rows))
        if known.any():
            self.rows[keys[known]] = top[known]  # later rows win, as the newest forward should

    def successors(self, _a: int, b: int) -> tuple[list[int], list[float]]:
        if not 0 <= b < len(self.rows):
            return [], []
        row = self.rows[b]
        keep = row >= 0
        return row[keep].tolist(), [p for p, k in zip(self._probs, keep) if k]

    def paths(self, pending: int) -> list[tuple[int, int, float]]:
        """Candidate nodes ``(parent, token, path prior)`` below ``pending``, parents first."""
        if not self.active:
            return []
        return best_first_paths(self.successors, -1, pending, self.config.search)
