"""The store interface drafters use for adaptive tri-gram statistics.

Only the *adaptive* part lives in a store: ``(a, b) -> {c: weight}`` learned online from what the
target produced. A drafter adds it to its static corpus matrix. Keeping that split means a store
holds small, fast-changing numbers, and every replica shares the same static file.

Contract for implementations:
- ``add`` and ``successors`` never block on I/O: they are called on the decode hot path. A remote store
  buffers ``add`` and answers ``successors`` from a local view it refreshes in the background.
- Bounded: each weight stays in ``[0, cap]``; a context keeps at most ``top_k`` successors (the lowest
  weights are evicted).
- Thread-safe: many requests in one process share one store.

Both stores keep their local view in ``self._table`` (copy-on-write rows) under ``self._lock``; what
changes it (folds, evictions, pulled rows) is reported to the store's watches (``watch()``), so a consumer
that packs the rows for compiled code (``actors.aded.jit_search.StoreMirror``) can follow the store by
re-reading only the rows that changed.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from abc import ABC, abstractmethod
from typing import Iterable

import numpy as np

from pydantic import BaseModel, ConfigDict, Field

#: (a, b, c, delta): add ``delta`` to the weight of ``c`` following the bigram ``(a, b)``.
Increment = tuple[int, int, int, float]
Context = tuple[int, int]
Row = dict[int, float]


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = Field(..., min_length=1, description="Tokenizer/model identity; stores never mix namespaces.")
    cap: float = Field(3.0, gt=0, description="Upper bound of one successor's adaptive weight (ADED: 3.0).")
    top_k: int = Field(12, ge=1, le=1024, description="Successors kept per context (ADED: 12).")
    max_rows: int | None = Field(
        100_000, ge=1, description="Contexts kept in this process, and in a shared Redis namespace (about 0.4 KB each at "
        "top_k 12; benchmarks/store_memory.py): 10% past it the rows with the least total weight go. None: unbounded.")
    vocab_size: int | None = Field(
        None, ge=1, description="Token ids a shared row may name are below this; a row read from a shared store "
        "with others is dropped and counted (a poisoned row must never reach the verifier). None: unchecked.")


class RowWatch:
    """One consumer's record of the contexts whose local row changed since its last ``drain``. Bounded: past
    ``limit`` distinct contexts it stops recording and its next drain hands over the whole view instead."""

    def __init__(self, store: NGramStore, limit: int) -> None:
        self._store = store
        self.limit = limit
        self._changed: set[Context] = set()
        self._overflow = False

    def note(self, contexts: Iterable[Context]) -> None:
        """Called by the store, its lock held."""
        if not self._overflow:
            self._changed.update(contexts)
            if len(self._changed) > self.limit:
                self._changed, self._overflow = set(), True

    def drain(self) -> tuple[bool, dict[Context, Row]]:
        """``(reset, rows)``: the changed contexts' rows as they are now (empty: no row any more); with
        ``reset`` (the watch overflowed) every row of the view instead, and the consumer starts over."""
        store = self._store
        with store._lock:
            changed, reset = self._changed, self._overflow
            self._changed, self._overflow = set(), False
            table = store._table
            return reset, dict(table) if reset else {c: table.get(c, _EMPTY) for c in changed}


class NGramStore(ABC):
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._table: dict[Context, Row] = {}  # the local view; rows are replaced, never mutated
        self._lock = threading.Lock()  # guards writes to _table (readers take a row without it)
        self._watches: weakref.WeakSet[RowWatch] = weakref.WeakSet()

    @abstractmethod
    def add(self, increments: Iterable[Increment]) -> None:
        """Fold weight increments in (clipped to ``[0, cap]``, pruned to ``top_k``)."""

    @abstractmethod
    def successors(self, a: int, b: int) -> dict[int, float]:
        """The current weights after ``(a, b)``; empty if unseen. The caller must not mutate it."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of contexts held (locally)."""

    def close(self) -> None:
        """Flush what is buffered and release resources."""

    def watch(self, limit: int = 65536) -> RowWatch:
        """A record of the contexts whose row changes from now on (see ``RowWatch``); the store holds it weakly."""
        w = RowWatch(self, limit)
        with self._lock:
            w.note(self._table)  # the first drain hands over the whole view
            self._watches.add(w)
        return w

    def rows(self) -> dict[Context, Row]:
        """A snapshot of the local view."""
        with self._lock:
            return dict(self._table)

    def mark_read(self, a: np.ndarray, b: np.ndarray) -> None:
        """Contexts ``(a[i], b[i])`` were read without ``successors`` (from a packed copy of the rows): a store
        that refreshes what is read (Redis) refreshes them. The in-process store has nothing to do."""

    def _changed(self, contexts: Iterable[Context]) -> None:
        """Report changed rows to the watches; the lock held."""
        for w in self._watches:
            w.note(contexts)


def evict_weakest(table: dict, max_rows: int | None) -> list:
    """Bound ``table`` (context -> {successor: weight}) to ``max_rows``, dropping the rows of least total weight.

    Runs only once the table is 10% over, then cuts it back to ``max_rows``: O(rows) per 10% of new rows, so
    O(10) per added row amortised. Returns the contexts dropped.
    """
    if max_rows is None or len(table) <= max_rows + max_rows // 10:
        return []
    dropped = heapq.nsmallest(len(table) - max_rows, table, key=lambda k: sum(table[k].values()))
    for key in dropped:
        del table[key]
    return dropped


_EMPTY: Row = {}
