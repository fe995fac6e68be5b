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
"""

from __future__ import annotations

import heapq

from abc import ABC, abstractmethod
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field

#: (a, b, c, delta): add ``delta`` to the weight of ``c`` following the bigram ``(a, b)``.
Increment = tuple[int, int, int, float]


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


class NGramStore(ABC):
    def __init__(self, config: StoreConfig) -> None:
        self.config = config

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


def evict_weakest(table: dict, max_rows: int | None) -> int:
    """Bound ``table`` (context -> {successor: weight}) to ``max_rows``, dropping the rows of least total weight.

    Runs only once the table is 10% over, then cuts it back to ``max_rows``: O(rows) per 10% of new rows, so
    O(10) per added row amortised. Returns the rows dropped.
    """
    if max_rows is None or len(table) <= max_rows + max_rows // 10:
        return 0
    extra = len(table) - max_rows
    for key in heapq.nsmallest(extra, table, key=lambda k: sum(table[k].values())):
        del table[key]
    return extra
