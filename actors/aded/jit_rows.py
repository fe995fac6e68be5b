"""numba row lookups for ADED's compiled searches (``jit_kernels``): the per-call row table and the store mirror.

A state met for the first time gets its row in the per-call table (``RowTable`` arrays, see
``actors.aded.jit_search``) as ``NGramModel.successors`` gives it: the static matrix row (bigram backoff
when unseen) or, when the store holds adaptive weights for it, the two combined (``_combined_row``,
``NGramModel._combine`` line by line). The store's rows come from a mirror the caller keeps current
(``StoreMirror``), so one run of a search reads every row exactly. Layouts:

    per-call table, R rows of at most K successors, C = a power of two > R hash slots:
    slot_row [C] int64 (-1 free)   slot_key [C] int64     (a + 1) << 32 | b, open addressing
    row_key  [R] int64             row_ids [R, K] int64   row_probs [R, K] float64   row_len [R] int64
    used     [1] int64             rows taken

    store mirror, R' contexts, their weights packed in an arena of A entries (store order kept):
    slot_row [C'] int64, slot_key [C'] int64 (as above)
    start [R'] int64, length [R'] int64 (0: no adaptive weights now)   ids [A] int64   weights [A] float64
    counts [3] int64   rows taken, arena entries taken, combined rows built (a statistic)
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _pair_index(pair_keys, by_a, vocab, a, b):
    """``TrigramMatrix.pair_index``: the pair's row or -1. ``by_a[a]:by_a[a + 1]`` are the pairs starting
    with ``a`` (a dozen on average), so the binary search touches a cache line or two, not ~20 levels of
    the whole key array: after a verify forward has streamed the weights through the caches, every miss
    counts."""
    if not (0 <= a < vocab and 0 <= b < vocab):
        return -1
    lo, hi, key = by_a[a], by_a[a + 1], a * vocab + b
    j = lo + np.searchsorted(pair_keys[lo:hi], key)
    return j if j < hi and pair_keys[j] == key else -1


@njit(cache=True, nogil=True, inline="always")
def _static_span(mat, a, b, alpha, backoff):
    """Where the static row of ``(a, b)`` lies: ``(ids, probs, lo, hi, scale)``, the pair's row or, unseen,
    the bigram row of ``b`` (empty when ``b`` is outside the vocabulary), and its float32-rounded scale."""
    pair_keys, pair_offsets, pair_succ, pair_probs, pair_totals, bi_offsets, bi_succ, bi_probs, vocab, by_a = mat
    i = _pair_index(pair_keys, by_a, vocab, a, b)
    if i >= 0:
        total = np.float64(pair_totals[i])
        return pair_succ, pair_probs, pair_offsets[i], pair_offsets[i + 1], np.float32(total / (total + alpha))
    if 0 <= b < vocab:
        return bi_succ, bi_probs, bi_offsets[b], bi_offsets[b + 1], np.float32(backoff)
    return bi_succ, bi_probs, bi_offsets[0], bi_offsets[0], np.float32(backoff)


@njit(cache=True, nogil=True, inline="always")
def _static_row(mat, a, b, alpha, backoff, k, out_ids, out_probs):
    """The matrix row of ``(a, b)`` (bigram backoff when unseen) scaled as ``NGramModel._combine`` does:
    float32 probabilities times the float32-rounded scale (numpy 2 keeps float32 * python float in float32)."""
    ids, probs, lo, hi, scale = _static_span(mat, a, b, alpha, backoff)
    n = min(hi - lo, k)
    for j in range(n):
        out_ids[j] = ids[lo + j]
        out_probs[j] = np.float64(probs[lo + j] * scale)
    return n


@njit(cache=True, nogil=True, inline="always")
def _hash(a, b):
    """Mixes both tokens; every product stays below 2**63 (numba's signed overflow is undefined: LLVM
    optimised a wrapping multiplicative hash into a constant)."""
    h = ((a + 1) & 0x3FFFFFFF) * 0x9E3779B1 + (b & 0x3FFFFFFF) * 0x85EBCA6B  # < 2**63
    h ^= h >> 29
    h = (h & 0xFFFFFFFF) * 0x2C1B3C6D  # < 2**62
    return h ^ (h >> 31)


@njit(cache=True, nogil=True, inline="always")
def _probe(slot_row, slot_key, key, i):
    """Slot of ``key``: where it is, or the free slot where it goes (linear probing)."""
    mask = len(slot_row) - 1
    while slot_row[i] >= 0 and slot_key[i] != key:
        i = (i + 1) & mask
    return i


@njit(cache=True, nogil=True, inline="always")
def _insert(tab, mat, mir, alpha, backoff, k, a, b, key, i):
    """New row for ``(a, b)`` in free slot ``i``: static, or combined with the mirror's adaptive weights."""
    slot_row, slot_key, row_key, row_ids, row_probs, row_len, used = tab
    r = used[0]
    if r >= len(row_key):
        raise ValueError("row table full")  # sized from the search's bound on distinct states: never
    used[0] = r + 1
    slot_row[i], slot_key[i], row_key[r] = r, key, key
    m_slot_row = mir[0]
    m = m_slot_row[_probe(m_slot_row, mir[1], key, _hash(a, b) & (len(m_slot_row) - 1))]
    if m >= 0 and mir[3][m] > 0:
        row_len[r] = _combined_row(mat, mir, m, alpha, backoff, k, a, b, row_ids[r], row_probs[r])
    else:
        row_len[r] = _static_row(mat, a, b, alpha, backoff, k, row_ids[r], row_probs[r])
    return r


@njit(cache=True, nogil=True)
def _combined_row(mat, mir, m, alpha, backoff, k, a, b, out_ids, out_probs):
    """``NGramModel._combine`` with the store's weights (mirror row ``m``): the whole static row scaled, the
    weights added, the ``k`` largest kept by a stable sort (static order, then the store row's), over
    ``1 + sum of weights``. The same float operations in the same order."""
    start, length, m_ids, m_weights, counts = mir[2], mir[3], mir[4], mir[5], mir[6]
    counts[2] += 1
    succ, probs, lo, hi, scale = _static_span(mat, a, b, alpha, backoff)
    ns, lo_m, nm = hi - lo, start[m], length[m]
    ids, vals = np.empty(ns + nm, np.int64), np.empty(ns + nm)
    for j in range(ns):
        ids[j], vals[j] = succ[lo + j], np.float64(probs[lo + j] * scale)
    n, weight = ns, 0.0
    for t in range(nm):
        c, w = m_ids[lo_m + t], m_weights[lo_m + t]
        weight += w
        found = -1
        for j in range(ns):
            if ids[j] == c:
                found = j
                break
        if found >= 0:
            vals[found] += w
        else:
            ids[n], vals[n] = c, w
            n += 1
    norm = 1.0 + weight
    taken = np.zeros(n, np.bool_)
    out = min(k, n)
    for o in range(out):  # repeated maximum, first one on ties: Python's stable sort by -value
        best = -1
        for j in range(n):
            if not taken[j] and (best < 0 or vals[j] > vals[best]):
                best = j
        taken[best] = True
        out_ids[o], out_probs[o] = ids[best], vals[best] / norm
    return out


@njit(cache=True, nogil=True)
def mirror_put(mir, keys, lens, ids, weights):
    """Set the mirror's row of each context ``keys[j]`` (packed as in the table) to the next ``lens[j]``
    entries of ``ids``/``weights``: new rows go to the end of the arena, their old entries are left dead
    (the caller rebuilds the mirror when it runs out of room, which drops them)."""
    slot_row, slot_key, start, length, m_ids, m_weights, counts = mir
    mask = len(slot_row) - 1
    p = 0
    for j in range(len(keys)):
        key, n = keys[j], lens[j]
        i = _probe(slot_row, slot_key, key, _hash((key >> 32) - 1, key & 0xFFFFFFFF) & mask)
        r = slot_row[i]
        if r < 0 and n > 0:
            r = counts[0]
            counts[0] = r + 1
            slot_row[i], slot_key[i] = r, key
        if r >= 0:
            start[r], length[r] = counts[1], n
            for t in range(n):
                m_ids[counts[1] + t], m_weights[counts[1] + t] = ids[p + t], weights[p + t]
            counts[1] += n
        p += n


@njit(cache=True, nogil=True)
def lookup(mat, tab, mir, alpha, backoff, k, a, b):
    """Row index of state ``(a, b)``, adding its row if new. (The kernels inline this.)"""
    slot_row, slot_key = tab[0], tab[1]
    key = ((a + 1) << 32) | b
    i = _probe(slot_row, slot_key, key, _hash(a, b) & (len(slot_row) - 1))
    r = slot_row[i]
    return r if r >= 0 else _insert(tab, mat, mir, alpha, backoff, k, a, b, key, i)
