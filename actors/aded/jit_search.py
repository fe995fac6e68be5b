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
Packed = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # a [m], b [m], ids [m, K], probs [m, K], lens [m]


class RowTable:
    """The kernels' successor rows for one call (layout: ``jit_kernels``)."""

    def __init__(self, rows: int, width: int) -> None:
        slots = 1 << max(4, int(2 * rows).bit_length())  # load factor <= 1/2
        self.arrays = (np.full(slots, -1, np.int64), np.zeros(slots, np.int64), np.zeros(rows, np.int64),
                       np.zeros(rows, np.int8), np.empty((rows, width), np.int64), np.empty((rows, width)),
                       np.zeros(rows, np.int64), np.zeros(1, np.int64))
        self.checked = 0  # rows [0, checked) are final
        self.adaptive: list[int] = []  # rows holding adaptive weights (store rows combined in), in order

    @property
    def free(self) -> int:
        return len(self.arrays[2]) - int(self.arrays[7][0])

    def settle(self, model: NGramModel, sources: dict[State, dict]) -> bool:
        """Check the provisional rows against the store; True if any had adaptive weights: those rows are
        written, and the store row each reflects is added to ``sources``."""
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
                sources[(a, b)] = src
                self.adaptive.append(r)
                changed = True
        return changed

    def adaptive_rows(self, limit: int) -> Packed:
        """The rows holding adaptive weights, packed for ``preload``; the newest ``limit``."""
        rows = np.array(self.adaptive[-limit:], np.int64)
        keys = self.arrays[2][rows]
        return (keys >> 32) - 1, keys & 0xFFFFFFFF, self.arrays[4][rows], self.arrays[5][rows], self.arrays[6][rows]

    def preload(self, rows: Packed | None) -> None:
        """Write known rows (final) in one kernel call."""
        if rows is None or not len(rows[0]):
            return
        start = int(self.arrays[7][0])
        K.preload(self.arrays, *rows)
        self.checked = int(self.arrays[7][0])
        self.adaptive.extend(range(start, self.checked))


class SearchCache:
    """What one request's searches learnt about the store: the adaptive rows of its last call's table (those
    it was preloaded with and those it found), packed as the kernels read them (its next tree overlaps its
    last one).
    Re-checked against the store at every call (stores replace a row object whenever it changes), so it
    never makes a row stale."""

    def __init__(self, max_states: int = 4096) -> None:
        self.max_states = max_states
        self.states: list[State] = []
        self.sources: list[dict] = []  # the store row each state's packed row reflects
        self.rows: Packed | None = None

    def __len__(self) -> int:
        return len(self.states)

    def current(self, model: NGramModel) -> tuple[dict[State, dict], Packed | None]:
        """The cached states still adaptive, with their store rows, and their rows as they are now."""
        if not self.states:
            return {}, None
        successors = model.store.successors
        keep, changed, sources = [], [], {}
        for i, ((a, b), src) in enumerate(zip(self.states, self.sources)):
            now = successors(a, b)
            if now is src:
                keep.append(i)
            elif now:
                changed.append(i)
            else:
                continue
            sources[(a, b)] = now
        order = keep + changed
        a_, b_, ids, probs, lens = (x[order] for x in self.rows)  # fancy indexing: copies
        for j, i in enumerate(changed, start=len(keep)):
            new_ids, new_probs = model.successors(*self.states[i])
            lens[j] = n = len(new_ids)
            ids[j, :n], probs[j, :n] = new_ids, new_probs
        return sources, (a_, b_, ids, probs, lens)

    def keep(self, sources: dict[State, dict], table: RowTable) -> None:
        """Remember the table's adaptive rows (the newest ``max_states``) as the table holds them."""
        self.rows = table.adaptive_rows(self.max_states)
        self.states = list(zip(self.rows[0].tolist(), self.rows[1].tolist()))
        self.sources = [sources[s] for s in self.states]


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
        sources, rows = cache.current(self.model) if cache is not None else ({}, None)
        table = None
        self.calls += 1
        for _ in range(self.max_rounds):
            if table is None or table.free < bound:  # a table too full for a whole run starts afresh
                if table is not None:  # keeping the adaptive rows found so far
                    rows = table.adaptive_rows(len(table.adaptive))
                table = RowTable(2 * bound + len(sources), self.row_args[2])
                table.preload(rows)
            self.rounds += 1
            parents, tokens, conf = kernel(table.arrays)
            if not table.settle(self.model, sources):
                break
        else:
            self.inexact += 1
        if cache is not None:
            cache.keep(sources, table)
        return list(zip(parents.tolist(), tokens.tolist(), conf.tolist()))
