"""Candidate trees: merging sources into one trie, ranking it, and the best-first n-gram tree.

Every source (n-gram search, MCTS, suffix chains) adds root-to-node paths to one :class:`CandidateTrie`
keyed by (parent, token), so agreeing sources share nodes. Each node remembers, per source, the
calibration bucket it came from; its acceptance estimate is the best of its sources' estimates, made
monotone along paths (a node is never likelier than its parent), so sorting by it puts parents before
children and any prefix of the order is a valid subtree for the budget.
"""

from __future__ import annotations

import heapq
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.aded.budget import N_SOURCES

Lookup = Callable[[int, int], tuple[list[int], list[float]]]


class CandidateTrie:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.buckets: list[list[int]] = []  # [n][N_SOURCES], -1 = not proposed by that source
        self._index: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, source: int, bucket: int) -> int:
        """Node for ``token`` below ``parent`` (-1 = the pending token), created if new."""
        key = (parent, token)
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.buckets.append([-1] * N_SOURCES)
        if self.buckets[i][source] < 0:  # a source's first (most confident) claim stands
            self.buckets[i][source] = bucket
        return i

    def ranked(self, estimates: np.ndarray, agree_offset: int) -> tuple[np.ndarray, ...]:
        """(tokens, parents, probs, bucket) in decreasing estimated acceptance, parents first.

        ``estimates`` [n_buckets] P(accepted) per calibration bucket. A node one source proposed takes
        that source's bucket; a node several sources agree on takes the bucket of its most confident
        source shifted by ``agree_offset`` into a table of its own, so agreement (which is accepted more
        often) neither inflates the single-source estimates nor is underrated by them.
        """
        n = len(self.tokens)
        if n == 0:
            z = np.zeros(0, np.int64)
            return z, z, np.zeros(0), z
        buckets = np.asarray(self.buckets, np.int64)  # [n, N_SOURCES]
        solo = np.where(buckets >= 0, estimates[np.maximum(buckets, 0)], -1.0)
        best = buckets[np.arange(n), solo.argmax(axis=1)]  # [n]
        bucket = np.where((buckets >= 0).sum(axis=1) > 1, best + agree_offset, best)
        probs = self._consistent(estimates[bucket], np.asarray(self.parents, np.int64))
        parents = np.asarray(self.parents, np.int64)
        order = np.argsort(-probs, kind="stable")  # ties keep creation order: parents first
        new_index = np.empty(n, np.int64)
        new_index[order] = np.arange(n)
        old_parents = parents[order]
        new_parents = np.where(old_parents >= 0, new_index[np.maximum(old_parents, 0)], -1)
        return np.asarray(self.tokens, np.int64)[order], new_parents, probs[order], bucket[order]


    @staticmethod
    def _consistent(raw: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """[n] estimates obeying the tree: siblings are exclusive, so their sum is scaled down to at most
        their parent's estimate (1 for the first level), and no node exceeds its parent."""
        n = len(raw)
        sibling_sum = np.bincount(parents + 1, weights=raw, minlength=n + 1)  # [n + 1], index 0 = first level
        out = np.empty(n)
        for i in range(n):  # parents precede children in creation order
            p = int(parents[i])
            cap = out[p] if p >= 0 else 1.0
            out[i] = min(raw[i] * min(1.0, cap / sibling_sum[p + 1]), cap)
        return out


class BestFirstConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_nodes: int = Field(24, ge=0, le=1024, description="Nodes expanded per step (the budget keeps a prefix).")
    max_depth: int = Field(8, ge=1, le=64, description="Deepest node below the pending token.")
    branch: int = Field(4, ge=1, le=64, description="Successors considered per node.")
    min_prob: float = Field(0.04, ge=0.0, le=1.0, description="Paths less probable than this are not drafted "
                          "(on a CPU a node this unlikely never pays for its verification).")


#: Best-first on a flat (GPU-like) cost curve, where every node up to the budget's cap is verified for
#: free: on held-out SmolLM2 traces (simulator, flat curve, <= 64 nodes) 64 nodes accepted 8% (chat) and
#: 17% (code) more per forward than the CPU-tuned 24 (`specd bench --suite search` measures both).
FLAT_CURVE_BEST_FIRST = BestFirstConfig(max_nodes=64, max_depth=10, branch=8, min_prob=0.0)


def best_first_paths(lookup: Lookup, a: int, b: int, config: BestFirstConfig) -> list[tuple[int, int, float]]:
    """The ``max_nodes`` most probable paths under the n-gram model below the state ``(a, b)``.

    Returns nodes ``(parent, token, path_prob)`` in pop order (parents first). Expected accepted length
    is the sum of path probabilities, so the most probable nodes are the best tree for a node count
    if the model is right; a heap over the frontier finds them with one lookup per node.
    """
    nodes: list[tuple[int, int, float]] = []
    heap: list[tuple[float, int, int, int, int]] = []  # (-prob, tiebreak, parent, prev token, token)
    tick = 0
    ids, probs = lookup(a, b)
    for c, p in zip(ids[: config.branch], probs[: config.branch]):
        if p >= config.min_prob:
            heap.append((-p, tick, -1, b, c))
            tick += 1
    heapq.heapify(heap)
    depth: list[int] = []
    while heap and len(nodes) < config.max_nodes:
        neg, _, parent, prev, tok = heapq.heappop(heap)
        idx = len(nodes)
        nodes.append((parent, tok, -neg))
        depth.append(1 if parent < 0 else depth[parent] + 1)
        if depth[idx] >= config.max_depth:
            continue
        ids, probs = lookup(prev, tok)
        for c, p in zip(ids[: config.branch], probs[: config.branch]):
            q = -neg * p
            if q >= config.min_prob:
                heapq.heappush(heap, (-q, tick, idx, tok, c))
                tick += 1
    return nodes
