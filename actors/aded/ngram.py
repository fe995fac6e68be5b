"""The drafter's n-gram picture of the target: static corpus matrix + adaptive store, and what it learns.

``P(c | a, b)`` combines the two sources as one smoothed estimate:

    P(c | a, b) = (s * p_static(c) + w(c)) / (1 + W),    W = sum of the store's weights after (a, b)

where ``s = total / (total + alpha)`` shrinks pairs seen only a few times in the corpus (a pair seen
once would otherwise claim certainty), ``p_static`` falls back to the bigram row scaled by
``backoff`` for pairs the corpus never saw, and the denominator keeps the pruned tail's mass, so the
numbers stay probabilities the budget can add up.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from actors.aded.trigram import TrigramMatrix
from shared_state.base import Increment, NGramStore


class NGramConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pair_alpha: float = Field(1.0, ge=0.0, description="Pseudo-count shrinking corpus pairs with little evidence.")
    backoff: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the bigram row when the pair is unseen.")
    max_successors: int = Field(12, ge=1, le=64, description="Successors kept per bigram state after combining.")
    cache_size: int = Field(200_000, ge=0, description="Combined rows cached across steps (cleared when full).")


class AdaptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    verified_delta: float = Field(0.04, ge=0.0, description="Added once per verified tri-gram (ADED: 0.04).")
    fold_prompt: bool = Field(True, description="Fold the prompt's tri-grams on start (ADED folds the context).")
    topk_weights: tuple[float, ...] = Field(
        (0.6, 0.1, 0.05, 0.03), description="Added to the target's rank-j token at every verified node "
        "(Token Recycling). Rank 1 outweighs any static probability at once, so the target's own argmax "
        "leads a state after one observation; lower ranks give the tree its alternatives.")


class NGramModel:
    """Successor lookups over matrix + store. Cheap to create; make one memo per drafting step."""

    def __init__(self, matrix: TrigramMatrix, store: NGramStore, config: NGramConfig) -> None:
        self.matrix = matrix
        self.store = store
        self.config = config
        # (a, b) -> (the store's row it was combined with, result). Stores replace a row on every change
        # (copy-on-write), so an identical row object means the cached combination is still right.
        self._cache: dict[tuple[int, int], tuple[dict, tuple[list[int], list[float]]]] = {}

    def successors(self, a: int, b: int) -> tuple[list[int], list[float]]:
        """Successor ids after ``(a, b)`` and their probabilities, most probable first."""
        adaptive = self.store.successors(a, b)
        hit = self._cache.get((a, b))
        if hit is not None and hit[0] is adaptive:
            return hit[1]
        if len(self._cache) >= self.config.cache_size:
            self._cache.clear()
        result = self._combine(a, b, adaptive)
        self._cache[(a, b)] = (adaptive, result)
        return result

    def _combine(self, a: int, b: int, adaptive: dict[int, float]) -> tuple[list[int], list[float]]:
        i = self.matrix.pair_index(a, b)
        if i >= 0:
            ids, probs = self.matrix.pair_row(i)
            total = float(self.matrix.pair_totals[i])
            scale = total / (total + self.config.pair_alpha)
        else:
            ids, probs = self.matrix.bigram_successors(b)
            scale = self.config.backoff
        k = self.config.max_successors
        if not adaptive:
            return ids[:k].tolist(), (probs[:k] * scale).tolist()
        merged = dict(zip(ids.tolist(), (probs * scale).tolist()))
        for c, w in adaptive.items():
            merged[c] = merged.get(c, 0.0) + w
        norm = 1.0 + sum(adaptive.values())
        best = sorted(merged.items(), key=lambda kv: -kv[1])[:k]
        return [c for c, _ in best], [x / norm for _, x in best]

    def memo(self) -> MemoLookup:
        return MemoLookup(self)


class MemoLookup:
    """Per-step cache of ``successors``: a search revisits the same states many times."""

    def __init__(self, model: NGramModel) -> None:
        self._model = model
        self._cache: dict[tuple[int, int], tuple[list[int], list[float]]] = {}

    def __call__(self, a: int, b: int) -> tuple[list[int], list[float]]:
        key = (a, b)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._model.successors(a, b)
        return hit


def trigram_increments(tokens: Sequence[int], start: int, delta: float) -> list[Increment]:
    """``+delta`` for every tri-gram of ``tokens`` that *ends* at index >= ``start`` (each one once)."""
    first = max(2, start)
    return [(int(tokens[i - 2]), int(tokens[i - 1]), int(tokens[i]), delta) for i in range(first, len(tokens))]


def topk_increments(pending_context: tuple[int, int], draft_tokens: np.ndarray, draft_parents: np.ndarray,
                    target_topk: torch.Tensor, weights: Sequence[float]) -> list[Increment]:
    """The target's top-k at every verified node, keyed by that node's bigram state.

    Row 0 is the pending token, whose state is ``pending_context = (context[-2], context[-1])``; row
    ``i + 1`` is node ``i``, whose state is (its parent's token, its token). Ids < 0 (unknown) are skipped.
    """
    topk = target_topk.tolist()
    pending = pending_context[1]
    states = [pending_context] + [
        (pending if p < 0 else int(draft_tokens[p]), int(t)) for t, p in zip(draft_tokens, draft_parents)]
    out: list[Increment] = []
    for (a, b), row in zip(states, topk):
        for c, w in zip(row, weights):
            if c >= 0 and w > 0:
                out.append((a, b, int(c), w))
    return out
