"""ADED's searches compiled (numba): the same trees as the Python references, at a fraction of the cost.

``CompiledSearch`` runs ``jit_kernels.best_first`` / ``jit_kernels.mcts``. The kernels cannot call the
adaptive store (Python, possibly Redis-backed), so they read a packed copy of it, ``StoreMirror``, kept
current from the store's ``RowWatch``: each call first applies the rows changed since the previous call
(a verified step changes a few dozen), then searches once, combining static and adaptive rows in compiled
code as it meets states. The result equals the reference's on the store as it was at the call's start (the
search is a deterministic function of the rows and the uniforms); tests compare them on many seeds.

A Redis store refreshes the rows a replica reads (``successors`` marks them); a search that reads the
mirror tells it in bulk afterwards (``NGramStore.mark_read``, every state the call met).
"""

from __future__ import annotations

import threading

import numpy as np

from actors.aded import jit_kernels as K
from actors.aded import jit_rows as R
from actors.aded.mcts import MctsConfig
from actors.aded.ngram import NGramModel
from actors.aded.tree import BestFirstConfig

Paths = list[tuple[int, int, float]]


def _slots(rows: int) -> int:
    return 1 << max(4, int(2 * rows).bit_length())  # load factor <= 1/2


def _pairs_by_first(m) -> np.ndarray:
    """``[vocab + 1]``: where the pairs starting with each token begin in the matrix's sorted pair keys."""
    keys = np.asarray(m.pair_keys, np.int64)
    return np.searchsorted(keys, np.arange(m.vocab_size + 1, dtype=np.int64) * m.vocab_size).astype(np.int64)


def mirror_arrays(rows: int, arena: int) -> tuple:
    """An empty store mirror (layout: ``jit_rows``) with room for ``rows`` contexts and ``arena`` weights."""
    return (np.full(_slots(rows), -1, np.int64), np.zeros(_slots(rows), np.int64), np.zeros(rows, np.int64),
            np.zeros(rows, np.int64), np.zeros(arena, np.int64), np.zeros(arena), np.zeros(3, np.int64))


class RowTable:
    """The kernels' successor rows for one call (layout: ``jit_rows``)."""

    def __init__(self, rows: int, width: int) -> None:
        self.arrays = (np.full(_slots(rows), -1, np.int64), np.zeros(_slots(rows), np.int64), np.zeros(rows, np.int64),
                       np.empty((rows, width), np.int64), np.empty((rows, width)), np.zeros(rows, np.int64),
                       np.zeros(1, np.int64))

    def states(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` of every state the call met."""
        keys = self.arrays[2][: int(self.arrays[6][0])]
        return (keys >> 32) - 1, keys & 0xFFFFFFFF


class StoreMirror:
    """The store's adaptive rows packed for the kernels (layout: ``jit_rows``), following the store through
    a ``RowWatch``. Not thread-safe: ``CompiledSearch`` syncs and searches under one lock."""

    def __init__(self, model: NGramModel, rows: int = 1024, arena: int = 16384) -> None:
        self.store = model.store
        self.watch = self.store.watch()  # its first drain is the whole view
        self._allocate(rows, arena)

    def _allocate(self, rows: int, arena: int) -> None:
        self.arrays = mirror_arrays(rows, arena)

    @property
    def combined(self) -> int:
        """Rows the kernels built with adaptive weights, since this mirror was made (a statistic)."""
        return int(self.arrays[6][2])

    def sync(self) -> None:
        reset, rows = self.watch.drain()
        if not rows and not reset:
            return
        counts = self.arrays[6]
        entries = sum(map(len, rows.values()))
        if reset or counts[0] + len(rows) > len(self.arrays[2]) or counts[1] + entries > len(self.arrays[4]):
            # Out of room (dead arena entries, emptied rows): start over from the whole view, with room to grow.
            if not reset:
                self.watch.drain()  # what it holds now is in the view read next
                rows = self.store.rows()
                entries = sum(map(len, rows.values()))
            made = self.combined
            self._allocate(max(1024, 2 * len(rows)), max(16384, 2 * entries))
            self.arrays[6][2] = made
        keys = np.fromiter((((int(a) + 1) << 32) | int(b) for a, b in rows), np.int64, len(rows))
        lens = np.fromiter(map(len, rows.values()), np.int64, len(rows))
        ids = np.fromiter((c for row in rows.values() for c in row), np.int64, entries)
        weights = np.fromiter((w for row in rows.values() for w in row.values()), np.float64, entries)
        R.mirror_put(self.arrays, keys, lens, ids, weights)


class CompiledSearch:
    """Best-first and MCTS over one ``NGramModel`` (matrix + store), compiled; thread-safe (one call at a time)."""

    def __init__(self, model: NGramModel) -> None:
        m = model.matrix
        self.model = model
        self.mat = (np.ascontiguousarray(m.pair_keys, np.int64), np.ascontiguousarray(m.pair_offsets, np.int64),
                    np.ascontiguousarray(m.pair_succ, np.int32), np.ascontiguousarray(m.pair_probs, np.float32),
                    np.ascontiguousarray(m.pair_totals, np.float32), np.ascontiguousarray(m.bi_offsets, np.int64),
                    np.ascontiguousarray(m.bi_succ, np.int32), np.ascontiguousarray(m.bi_probs, np.float32),
                    np.int64(m.vocab_size), _pairs_by_first(m))
        c = model.config
        self.row_args = (float(c.pair_alpha), float(c.backoff), int(c.max_successors))
        self.mirror = StoreMirror(model)
        self.calls = 0
        self._lock = threading.Lock()
        self.warm_up()

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels now, not on a request's first step."""
        mirror = mirror_arrays(16, 16)
        R.mirror_put(mirror, np.ones(1, np.int64), np.ones(1, np.int64), np.zeros(1, np.int64), np.ones(1))
        table = RowTable(64, self.row_args[2])
        R.lookup(self.mat, table.arrays, mirror, *self.row_args, 0, 0)
        K.best_first(self.mat, table.arrays, mirror, *self.row_args, 0, 0, 2, 2, 2, 0.0)
        K.mcts(self.mat, table.arrays, mirror, *self.row_args, 0, 0, 2, 2, 1.0, 1.0, 1, 2, 1, True, np.zeros(2))

    def static_row(self, a: int, b: int) -> tuple[list[int], list[float]]:
        """The kernels' row for a state without adaptive weights (tests compare it with NGramModel's)."""
        table = RowTable(1, self.row_args[2])
        r = R.lookup(self.mat, table.arrays, mirror_arrays(16, 16), *self.row_args, a, b)
        n = int(table.arrays[5][r])
        return table.arrays[3][r, :n].tolist(), table.arrays[4][r, :n].tolist()

    def best_first(self, a: int, b: int, config: BestFirstConfig) -> Paths:
        return self._run(1 + config.max_nodes, lambda t, mir: K.best_first(
            self.mat, t, mir, *self.row_args, a, b, config.max_nodes, config.max_depth, config.branch, config.min_prob))

    def mcts(self, a: int, b: int, config: MctsConfig, rng: np.random.Generator) -> Paths:
        uniforms = rng.random(config.simulations * config.rollout_len)  # what the reference draws, in order
        bound = 1 + config.simulations * (1 + config.rollout_len) + config.top_paths * config.extend
        return self._run(bound, lambda t, mir: K.mcts(
            self.mat, t, mir, *self.row_args, a, b, config.simulations, config.max_depth, config.c1, config.c2,
            config.rollout_len, config.top_paths, config.extend, config.value == "path", uniforms))

    def _run(self, bound: int, kernel) -> Paths:
        """``bound``: most distinct states one run of ``kernel`` can meet (sizes the table)."""
        table = RowTable(bound, self.row_args[2])
        with self._lock:
            self.mirror.sync()
            parents, tokens, conf = kernel(table.arrays, self.mirror.arrays)
            self.calls += 1
        self.model.store.mark_read(*table.states())
        return list(zip(parents.tolist(), tokens.tolist(), conf.tolist()))
