"""ADED's Monte Carlo tree search over bigram states, in compact arrays.

A node is a bigram state ``(prev, cur)``; the root is ``(context[-2], pending token)`` and is not a
draft node. Each simulation descends by the MuZero form of PUCT

    score = Q/n + (c1 + ln((N + c2 + 1) / c2)) * p * sqrt(N) / (1 + n)     (unvisited: +inf)

(Q the child's total value, n its visits, N the parent's, p its n-gram probability), expands the leaf
with all its successors, rolls out ``rollout_len`` tokens sampled from the normalised n-gram
probabilities and backs up a value (``MctsConfig.value``):

- ``rollout`` (the authors' form): ``1 + sum of the sampled tokens' normalised probabilities``, how
  predictable a random continuation is. (The authors' code reads the wrong entry, so their value is ~1
  and the search follows the prior.)
- ``path``: what verification rewards, the expected accepted length of the drafted chain
  ``1 + sum_d prod_{j <= d} p_j`` over the tree path and the rollout, with ``p_j`` each token's n-gram
  probability (the acceptance estimate the budget ranks by, before calibration).

The candidates are the ``top_paths`` nodes by visits (with their ancestors), each extended by
``extend`` greedy tokens; their confidence is the visit share, which never grows from parent to child.

This module is the reference (and test oracle) of ``actors.aded.jit_search``, which runs the same
search compiled; both consume ``simulations * rollout_len`` uniforms per call from the generator.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.aded.tree import Lookup


class MctsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    simulations: int = Field(150, ge=1, le=100_000, description="Simulations per step (ADED: 150).")
    max_depth: int = Field(3, ge=1, le=32, description="Tree depth below the root (ADED: 3).")
    c1: float = Field(32.0, ge=0.0, description="PUCT exploration constant c1 (ADED: 32).")
    c2: float = Field(8.0, gt=0.0, description="PUCT constant c2 (ADED: 8).")
    rollout_len: int = Field(4, ge=0, le=64, description="Tokens sampled per rollout (ADED: 4).")
    top_paths: int = Field(24, ge=1, le=1024, description="Paths kept, ranked by visit count (ADED: 24).")
    extend: int = Field(1, ge=0, le=16, description="Greedy n-gram tokens appended to each kept path (ADED: 1).")
    value: Literal["rollout", "path"] = Field(
        "rollout", description="Backed-up value: 'rollout' = 1 + the sampled tokens' normalised probabilities "
        "(ADED's form); 'path' = the expected accepted length of the drafted chain under the n-gram probabilities.")


class _Tree:
    """Struct of arrays; children of a node are contiguous (added together on expansion)."""

    def __init__(self, capacity: int) -> None:
        self.prev = np.zeros(capacity, np.int64)
        self.tok = np.zeros(capacity, np.int64)
        self.parent = np.full(capacity, -1, np.int64)
        self.depth = np.zeros(capacity, np.int64)
        self.prior = np.zeros(capacity, np.float64)
        self.path_prob = np.ones(capacity, np.float64)  # product of the priors from the root
        self.visits = np.zeros(capacity, np.float64)
        self.value = np.zeros(capacity, np.float64)
        self.child_lo = np.full(capacity, -1, np.int64)  # -1 = not expanded
        self.child_hi = np.zeros(capacity, np.int64)
        self.size = 1

    def expand(self, node: int, ids: list[int], probs: list[float]) -> None:
        lo = self.size
        hi = min(lo + len(ids), len(self.prev))
        k = hi - lo
        self.child_lo[node], self.child_hi[node] = lo, hi
        self.prev[lo:hi] = self.tok[node]
        self.tok[lo:hi] = ids[:k]
        self.prior[lo:hi] = probs[:k]
        self.path_prob[lo:hi] = self.path_prob[node] * self.prior[lo:hi]
        self.parent[lo:hi] = node
        self.depth[lo:hi] = self.depth[node] + 1
        self.size = hi


def _select_child(t: _Tree, node: int, c1: float, c2: float) -> int:
    lo, hi = t.child_lo[node], t.child_hi[node]
    n = t.visits[lo:hi]
    big_n = t.visits[node]
    explore = (c1 + math.log((big_n + c2 + 1.0) / c2)) * math.sqrt(big_n)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(n > 0, t.value[lo:hi] / n + explore * t.prior[lo:hi] / (1.0 + n), np.inf)
    return int(lo + np.argmax(score))


def _rollout(lookup: Lookup, prev: int, tok: int, length: int, rng: np.random.Generator, value: float = 1.0,
             path_prob: float | None = None) -> float:
    """``value`` plus what ``length`` tokens sampled below state ``(prev, tok)`` add: their normalised n-gram
    probabilities (``path_prob`` None), else the chain's path probabilities continuing from ``path_prob``."""
    for u in rng.random(length):
        ids, probs = lookup(prev, tok)
        if not ids:
            break
        total = sum(probs)
        acc, pick = 0.0, len(ids) - 1
        for j, p in enumerate(probs):  # inverse CDF over the renormalised successors
            acc += p
            if u * total < acc:
                pick = j
                break
        if path_prob is None:
            value += probs[pick] / total
        else:
            path_prob *= probs[pick]
            value += path_prob
        prev, tok = tok, ids[pick]
    return value


def run_mcts(lookup: Lookup, a: int, b: int, config: MctsConfig, rng: np.random.Generator) -> _Tree:
    """Search below the state ``(a, b)``; returns the tree (node 0 = root)."""
    capacity = 1 + config.simulations * 64
    t = _Tree(capacity)
    t.prev[0], t.tok[0] = a, b
    for _ in range(config.simulations):
        node, path = 0, [0]
        while t.child_lo[node] >= 0 and t.child_hi[node] > t.child_lo[node]:
            node = _select_child(t, node, config.c1, config.c2)
            path.append(node)
        if t.child_lo[node] < 0 and t.depth[node] < config.max_depth and t.size < capacity:
            ids, probs = lookup(int(t.prev[node]), int(t.tok[node]))
            t.expand(node, ids, probs)
        if config.value == "path":
            value = 1.0
            for n in path[1:]:  # the tree part of the chain (sequential sums: the compiled search adds alike)
                value += float(t.path_prob[n])
            value = _rollout(lookup, int(t.prev[node]), int(t.tok[node]), config.rollout_len, rng, value,
                             float(t.path_prob[node]))
        else:
            value = _rollout(lookup, int(t.prev[node]), int(t.tok[node]), config.rollout_len, rng)
        t.visits[path] += 1.0
        t.value[path] += value
    return t


def mcts_paths(lookup: Lookup, a: int, b: int, config: MctsConfig,
               rng: np.random.Generator) -> list[tuple[int, int, float]]:
    """Candidate nodes ``(parent, token, confidence)``, parents first; confidence = visit share."""
    t = run_mcts(lookup, a, b, config, rng)
    visited = np.flatnonzero(t.visits[1: t.size] > 0) + 1
    keep = visited[np.argsort(-t.visits[visited], kind="stable")][: config.top_paths]
    chosen: set[int] = set()
    for node in keep.tolist():  # a path brings its ancestors (they have at least its visits)
        while node > 0 and node not in chosen:
            chosen.add(node)
            node = int(t.parent[node])
    order = sorted(chosen, key=lambda i: (t.depth[i], -t.visits[i], i))
    local = {0: -1}
    out: list[tuple[int, int, float]] = []
    root_visits = max(1.0, t.visits[0])
    for node in order:
        local[node] = len(out)
        out.append((local[int(t.parent[node])], int(t.tok[node]), t.visits[node] / root_visits))
    for node in keep.tolist():
        _extend(lookup, out, local[node], int(t.prev[node]), int(t.tok[node]), config.extend)
    return out


def _extend(lookup: Lookup, out: list[tuple[int, int, float]], idx: int, prev: int, tok: int, steps: int) -> None:
    """Append ``steps`` greedy n-gram tokens below node ``idx``; confidence decays by their probability."""
    conf = out[idx][2]
    for _ in range(steps):
        ids, probs = lookup(prev, tok)
        if not ids:
            return
        conf *= probs[0]
        out.append((idx, ids[0], conf))
        idx, prev, tok = len(out) - 1, tok, ids[0]
