"""The static tri-gram matrix: ``(a, b) -> top-K successors`` as compact numpy arrays.

Layout (CSR over sorted pair keys), P pairs and E <= P * K edges:

    pair_keys    [P]     int64    a * V + b, strictly increasing
    pair_offsets [P + 1] int64    successors of pair i are edges[pair_offsets[i]:pair_offsets[i + 1]]
    pair_succ    [E]     int32    successor ids, most probable first
    pair_probs   [E]     float32  count(a, b, c) / count(a, b, *): normalised over *all* successors, so
                                   the pruned tail keeps its mass and a pair seen once is not "certain"
    pair_totals  [P]     float32  count(a, b, *), how much evidence stands behind the pair

and the same for the bigram backoff ``b -> top-K`` indexed directly by ``b`` (``bi_offsets`` [V + 1]).
Files are safetensors (no pickle) and load in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

_EMPTY_IDS = np.zeros(0, np.int32)
_EMPTY_PROBS = np.zeros(0, np.float32)


@dataclass(frozen=True)
class TrigramMatrix:
    vocab_size: int
    top_k: int
    pair_keys: np.ndarray
    pair_offsets: np.ndarray
    pair_succ: np.ndarray
    pair_probs: np.ndarray
    pair_totals: np.ndarray
    bi_offsets: np.ndarray
    bi_succ: np.ndarray
    bi_probs: np.ndarray
    identity: str = ""

    @property
    def num_pairs(self) -> int:
        return len(self.pair_keys)

    def pair_index(self, a: int, b: int) -> int:
        """Row of the bigram ``(a, b)`` in the pair arrays, or -1 if the corpus never saw it."""
        if not (0 <= a < self.vocab_size and 0 <= b < self.vocab_size):
            return -1
        key = a * self.vocab_size + b
        i = int(np.searchsorted(self.pair_keys, key))
        return i if i < len(self.pair_keys) and self.pair_keys[i] == key else -1

    def pair_row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.pair_offsets[i], self.pair_offsets[i + 1]
        return self.pair_succ[lo:hi], self.pair_probs[lo:hi]

    def pair_successors(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """([k] int32 ids, [k] float32 probs) after the bigram ``(a, b)``; empty if never seen."""
        i = self.pair_index(a, b)
        return self.pair_row(i) if i >= 0 else (_EMPTY_IDS, _EMPTY_PROBS)

    def bigram_successors(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """([k] ids, [k] probs) after the single token ``b`` (the backoff for unseen pairs)."""
        if not 0 <= b < self.vocab_size:
            return _EMPTY_IDS, _EMPTY_PROBS
        lo, hi = self.bi_offsets[b], self.bi_offsets[b + 1]
        return self.bi_succ[lo:hi], self.bi_probs[lo:hi]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            name: np.ascontiguousarray(getattr(self, name))
            for name in ("pair_keys", "pair_offsets", "pair_succ", "pair_probs", "pair_totals",
                         "bi_offsets", "bi_succ", "bi_probs")
        }
        meta = {"vocab_size": str(self.vocab_size), "top_k": str(self.top_k), "identity": self.identity}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(arrays, str(tmp), metadata=meta)
        tmp.chmod(0o644)  # safetensors writes 0600; a cache shared across users (or pods) must be readable
        tmp.replace(path)  # readers never see a half-written file

    @classmethod
    def load(cls, path: str | Path) -> TrigramMatrix:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        arrays = load_file(str(path))
        return cls(vocab_size=int(meta["vocab_size"]), top_k=int(meta["top_k"]),
                   identity=meta.get("identity", ""), **arrays)

    def describe(self) -> str:
        return json.dumps({"identity": self.identity, "vocab_size": self.vocab_size, "top_k": self.top_k,
                           "pairs": self.num_pairs, "edges": int(len(self.pair_succ)),
                           "bigram_edges": int(len(self.bi_succ))})


def _count_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, int64 counts) of one chunk."""
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq, counts.astype(np.int64)


def _top_k_csr(ctx: np.ndarray, succ: np.ndarray, counts: np.ndarray, top_k: int):
    """Group (ctx, succ, count) rows by ctx (sorted), keep the top_k successors by count.

    Returns (unique ctx [P], offsets [P + 1], succ [E] int32, probs [E] float32, totals [P] float32).
    """
    order = np.lexsort((-counts, ctx))  # by ctx, then most frequent first
    ctx, succ, counts = ctx[order], succ[order], counts[order]
    uniq, start, group_size = np.unique(ctx, return_index=True, return_counts=True)
    totals = np.add.reduceat(counts, start) if len(ctx) else np.zeros(0, np.int64)
    rank = np.arange(len(ctx)) - np.repeat(start, group_size)
    keep = rank < top_k
    kept_per_group = np.minimum(group_size, top_k)
    offsets = np.concatenate([[0], np.cumsum(kept_per_group)]).astype(np.int64)
    probs = counts[keep] / np.repeat(totals, group_size)[keep]
    return uniq, offsets, succ[keep].astype(np.int32), probs.astype(np.float32), totals.astype(np.float32)


def _stream_chunks(token_streams: Iterable[np.ndarray], vocab_size: int, chunk_tokens: int, progress: bool):
    """Yield (tri-gram keys, bigram keys) per ~chunk_tokens tokens; n-grams never cross stream ends."""
    tri, bi, size = [], [], 0
    bar = tqdm(unit="tok", unit_scale=True, desc="counting n-grams", disable=not progress)
    for stream in token_streams:
        s = np.asarray(stream, dtype=np.int64)
        if len(s) >= 2:
            if s.min() < 0 or s.max() >= vocab_size:
                raise ValueError(f"token ids must lie in [0, {vocab_size})")
            bi.append(s[:-1] * vocab_size + s[1:])
        if len(s) >= 3:
            tri.append((s[:-2] * vocab_size + s[1:-1]) * vocab_size + s[2:])
        size += len(s)
        bar.update(len(s))
        if size >= chunk_tokens:
            yield _cat(tri), _cat(bi)
            tri, bi, size = [], [], 0
    bar.close()
    if tri or bi:
        yield _cat(tri), _cat(bi)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def build_matrix(token_streams: Iterable[np.ndarray], vocab_size: int, top_k: int = 12, identity: str = "",
                 chunk_tokens: int = 20_000_000, progress: bool = True,
                 weighted_trigrams: tuple[np.ndarray, np.ndarray] | None = None) -> TrigramMatrix:
    """Count tri-grams and bigrams over ``token_streams`` (each an id sequence) with numpy sorts.

    ``weighted_trigrams``: extra ``(keys (a * V + b) * V + c, weights)`` added to the tri-gram counts,
    e.g. the target's own predictions from ``actors.aded.distill``. Memory is bounded by
    ``chunk_tokens`` per pass plus the unique n-grams; tens of millions of tokens take seconds.
    """
    if vocab_size ** 3 >= 2 ** 63:
        raise ValueError("vocab too large for int64 tri-gram keys")
    tri_parts, bi_parts = [], []
    for tri, bi in _stream_chunks(token_streams, vocab_size, chunk_tokens, progress):
        tri_parts.append(_count_keys(tri))
        bi_parts.append(_count_keys(bi))
    if weighted_trigrams is not None:
        tri_parts.append(weighted_trigrams)
    tri_keys, tri_counts = _merge(tri_parts)
    bi_keys, bi_counts = _merge(bi_parts)
    pair_keys, pair_offsets, pair_succ, pair_probs, pair_totals = _top_k_csr(
        tri_keys // vocab_size, tri_keys % vocab_size, tri_counts, top_k)
    b_ids, b_off, bi_succ, bi_probs, _ = _top_k_csr(bi_keys // vocab_size, bi_keys % vocab_size, bi_counts, top_k)
    # Dense bigram offsets over the whole vocabulary: tokens never seen get an empty range.
    per_token = np.zeros(vocab_size, np.int64)
    per_token[b_ids] = np.diff(b_off)
    bi_offsets = np.concatenate([[0], np.cumsum(per_token)]).astype(np.int64)
    return TrigramMatrix(vocab_size, top_k, pair_keys.astype(np.int64), pair_offsets, pair_succ, pair_probs,
                         pair_totals, bi_offsets, bi_succ, bi_probs, identity)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys over all parts: (sorted unique keys, float64 counts)."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq))  # float64: weights may be fractional
