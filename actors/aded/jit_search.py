"""ADED's searches compiled (numba): the same trees as the Python references, at a fraction of the cost.

``CompiledSearch`` runs ``jit_kernels.best_first`` / ``jit_kernels.mcts`` over a row table. The kernels
cannot call the adaptive store (Python, possibly Redis-backed), so a call goes in rounds:

1. the kernel searches; every state it meets for the first time gets its static matrix row, provisional;
2. Python asks the store about each provisional state (``store.successors``, which is also what tells a
   Redis store which rows to pull) and writes the combined row (``NGramModel.successors``) of those that
   have adaptive weights; the others' static rows are already exact;
3. if any row changed, the search runs again from scratch with the same uniforms.

A round that changes nothing ran on exact rows only, so the result equals the reference's (the search
is a deterministic function of the rows and the uniforms). Rounds are bounded (``max_rounds``); the
last round's tree is used either way (any tree is lossless), and ``inexact`` counts such calls.

A request keeps its table across steps (``SearchCache``; its next tree overlaps its last one): at the
start of a call every row is checked against the store again (one ``successors`` call and an identity
test per row: stores replace a row object whenever it changes), so rows are exact at every step and
most calls need one round.
"""

from __future__ import annotations

import numpy as np

from actors.aded import jit_kernels as K
from actors.aded.mcts import MctsConfig
from actors.aded.ngram import NGramModel
from actors.aded.tree import BestFirstConfig

Paths = list[tuple[int, int, float]]
State = tuple[int, int]
Known = tuple[dict, np.ndarray, np.ndarray, int]  # (store row it reflects, [K] ids, [K] probs, length)


class RowTable:
    """The kernels' successor rows for one call (layout: ``jit_kernels``)."""

    def __init__(self, rows: int, width: int) -> None:
        slots = 1 << max(4, int(2 * rows).bit_length())  # load factor <= 1/2
        self.arrays = (np.full(slots, -1, np.int64), np.zeros(slots, np.int64), np.zeros(rows, np.int64),
                       np.zeros(rows, np.int8), np.empty((rows, width), np.int64), np.empty((rows, width)),
                       np.zeros(rows, np.int64), np.zeros(1, np.int64))
        self.checked = 0  # rows [0, checked) are final

    @property
    def free(self) -> int:
        return len(self.arrays[2]) - int(self.arrays[7][0])

    def settle(self, model: NGramModel, found: dict[State, Known]) -> bool:
        """Check the provisional rows against the store; True if any had adaptive weights: those rows are
        written and added to ``found``."""
        row_key, row_kind, used = self.arrays[2], self.arrays[3], int(self.arrays[7][0])
        start, self.checked = self.checked, used
        if start == used:
            return False
        keys = row_key[start:used]
        row_kind[start:used] = K.FINAL
        successors = model.store.successors
        changed = False
        for r, a, b in zip(range(start, used), ((keys >> 32) - 1).tolist(), (keys & 0xFFFFFFFF).tolist()):
            src = successors(a, b)
            if src:
                ids, probs = model.successors(a, b)
                self.arrays[6][r] = n = len(ids)
                self.arrays[4][r, :n] = ids
                self.arrays[5][r, :n] = probs
                found[(a, b)] = (src, self.arrays[4][r].copy(), self.arrays[5][r].copy(), n)
                changed = True
        return changed

    def preload(self, known: dict[State, Known]) -> None:
        """Write ``known`` rows (final) in one kernel call."""
        if not known:
            return
        states = np.array(list(known), np.int64).reshape(-1, 2)
        rows = list(known.values())
        K.preload(self.arrays, states[:, 0], states[:, 1], np.stack([r[1] for r in rows]),
                  np.stack([r[2] for r in rows]), np.array([r[3] for r in rows], np.int64))
        self.checked = int(self.arrays[7][0])


class SearchCache:
    """What one request's searches learnt about the store: the states that had adaptive weights at its
    last step, with their rows (its next tree overlaps its last one). Re-checked against the store at
    every call (stores replace a row object whenever it changes), so it never makes a row stale."""

    def __init__(self, max_states: int = 4096) -> None:
        self.known: dict[State, Known] = {}
        self.max_states = max_states

    def current(self, model: NGramModel) -> dict[State, Known]:
        successors = model.store.successors
        out: dict[State, Known] = {}
        for (a, b), row in self.known.items():
            src = successors(a, b)
            if src is row[0]:
                out[(a, b)] = row
            elif src:
                ids, probs = model.successors(a, b)
                width = len(row[1])
                out[(a, b)] = (src, np.pad(np.asarray(ids, np.int64), (0, width - len(ids))),
                               np.pad(np.asarray(probs, np.float64), (0, width - len(ids))), len(ids))
        return out


class CompiledSearch:
    """Best-first and MCTS over one ``NGramModel`` (matrix + store), compiled; thread-safe (per-call state)."""

    def __init__(self, model: NGramModel, max_rounds: int = 16) -> None:
        m = model.matrix
        self.model = model
        self.max_rounds = max_rounds
        self.mat = (np.ascontiguousarray(m.pair_keys, np.int64), np.ascontiguousarray(m.pair_offsets, np.int64),
                    np.ascontiguousarray(m.pair_succ, np.int32), np.ascontiguousarray(m.pair_probs, np.float32),
                    np.ascontiguousarray(m.pair_totals, np.float32), np.ascontiguousarray(m.bi_offsets, np.int64),
                    np.ascontiguousarray(m.bi_succ, np.int32), np.ascontiguousarray(m.bi_probs, np.float32),
                    np.int64(m.vocab_size))
        c = model.config
        self.row_args = (float(c.pair_alpha), float(c.backoff), int(c.max_successors))
        self.calls = self.rounds = self.inexact = 0
        self.warm_up()

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels now, not on a request's first step."""
        table = RowTable(64, self.row_args[2])
        K.lookup(self.mat, table.arrays, *self.row_args, 0, 0)
        K.preload(table.arrays, np.zeros(1, np.int64), np.ones(1, np.int64), np.zeros((1, self.row_args[2]), np.int64),
                  np.zeros((1, self.row_args[2])), np.zeros(1, np.int64))
        K.best_first(self.mat, table.arrays, *self.row_args, 0, 0, 2, 2, 2, 0.0)
        K.mcts(self.mat, table.arrays, *self.row_args, 0, 0, 2, 2, 1.0, 1.0, 1, 2, 1, True, np.zeros(2))

    def static_row(self, a: int, b: int) -> tuple[list[int], list[float]]:
        """The kernels' row for a state without adaptive weights (tests compare it with NGramModel's)."""
        table = RowTable(1, self.row_args[2])
        r = K.lookup(self.mat, table.arrays, *self.row_args, a, b)
        n = int(table.arrays[6][r])
        return table.arrays[4][r, :n].tolist(), table.arrays[5][r, :n].tolist()

    def best_first(self, a: int, b: int, config: BestFirstConfig, cache: SearchCache | None = None) -> Paths:
        bound = 1 + config.max_nodes
        return self._rounds(bound, cache, lambda t: K.best_first(
            self.mat, t, *self.row_args, a, b, config.max_nodes, config.max_depth, config.branch, config.min_prob))

    def mcts(self, a: int, b: int, config: MctsConfig, rng: np.random.Generator,
             cache: SearchCache | None = None) -> Paths:
        uniforms = rng.random(config.simulations * config.rollout_len)  # what the reference draws, in order
        bound = 1 + config.simulations * (1 + config.rollout_len) + config.top_paths * config.extend
        return self._rounds(bound, cache, lambda t: K.mcts(
            self.mat, t, *self.row_args, a, b, config.simulations, config.max_depth, config.c1, config.c2,
            config.rollout_len, config.top_paths, config.extend, config.value == "path", uniforms))

    def _rounds(self, bound: int, cache: SearchCache | None, kernel) -> Paths:
        """``bound``: most distinct states one run of ``kernel`` can meet (sizes the table)."""
        known = cache.current(self.model) if cache is not None else {}
        table = None
        self.calls += 1
        for _ in range(self.max_rounds):
            if table is None or table.free < bound:  # a table too full for a whole run starts afresh
                table = RowTable(2 * bound + len(known), self.row_args[2])
                table.preload(known)
            self.rounds += 1
            parents, tokens, conf = kernel(table.arrays)
            if not table.settle(self.model, known):
                break
        else:
            self.inexact += 1
        if cache is not None:
            cache.known = dict(list(known.items())[-cache.max_states:]) if len(known) > cache.max_states else known
        return list(zip(parents.tolist(), tokens.tolist(), conf.tolist()))
