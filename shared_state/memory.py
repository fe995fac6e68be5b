"""In-process store: the default when no Redis URL is configured."""

from __future__ import annotations

from typing import Iterable

from shared_state.base import Increment, NGramStore, StoreConfig, evict_weakest


def fold(table: dict[int, float], c: int, delta: float, cap: float, top_k: int) -> None:
    """Add ``delta`` to ``table[c]`` within ``[0, cap]``, then evict the weakest beyond ``top_k``."""
    w = min(cap, max(0.0, table.get(c, 0.0) + delta))
    if w <= 0.0:
        table.pop(c, None)
        return
    table[c] = w
    if len(table) > top_k:
        del table[min(table, key=table.__getitem__)]


class MemoryStore(NGramStore):
    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        self.evicted = 0  # rows dropped by the max_rows bound

    def add(self, increments: Iterable[Increment]) -> None:
        cap, top_k = self.config.cap, self.config.top_k
        with self._lock:
            touched = set()
            for a, b, c, delta in increments:
                # Copy-on-write: readers may hold the previous dict without the lock.
                row = dict(self._table.get((a, b), ()))
                fold(row, int(c), float(delta), cap, top_k)
                if row:
                    self._table[(a, b)] = row
                else:
                    self._table.pop((a, b), None)
                touched.add((a, b))
            dropped = evict_weakest(self._table, self.config.max_rows)
            self.evicted += len(dropped)
            self._changed(touched.union(dropped))

    def successors(self, a: int, b: int) -> dict[int, float]:
        return self._table.get((a, b), _EMPTY)

    def __len__(self) -> int:
        return len(self._table)


_EMPTY: dict[int, float] = {}
