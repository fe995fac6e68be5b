"""numba kernels of ADED's searches: best-first and MCTS (PUCT), over the rows of ``jit_rows``.

Each kernel is a line-by-line port of its reference (``actors.aded.tree.best_first_paths``,
``actors.aded.mcts.mcts_paths``): the same float operations in the same order, the same tie-breaks, the
same uniforms, so the outputs are equal, not just close (tests compare them on many seeds).

Performance note: numba reference-counts every array handed to a function that has control flow; with
~20 arrays that cost ~0.6 us a call, more than the search itself. So the hot loops take their arrays
unpacked once per kernel, probe the table inline (``_probe``: two arrays) and only the rare miss path
(``_insert``) takes the rest.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from actors.aded.jit_rows import _hash, _insert, _probe


@njit(cache=True, nogil=True, inline="always")
def _heap_less(neg, ints, i, j):
    return neg[i] < neg[j] or (neg[i] == neg[j] and ints[i, 0] < ints[j, 0])


@njit(cache=True, nogil=True, inline="always")
def _heap_swap(neg, ints, i, j):
    neg[i], neg[j] = neg[j], neg[i]
    for c in range(4):
        ints[i, c], ints[j, c] = ints[j, c], ints[i, c]


@njit(cache=True, nogil=True)
def _heap_push(neg, ints, size, neg_p, tick, parent, prev, tok):
    """Heap of (-prob, tick) keys: ``neg`` [cap], ``ints`` [cap, 4] = (tick, parent, prev token, token)."""
    i = size
    neg[i] = neg_p
    ints[i, 0], ints[i, 1], ints[i, 2], ints[i, 3] = tick, parent, prev, tok
    while i > 0:
        up = (i - 1) // 2
        if not _heap_less(neg, ints, i, up):
            break
        _heap_swap(neg, ints, i, up)
        i = up
    return size + 1


@njit(cache=True, nogil=True)
def _heap_pop(neg, ints, size):
    """Moves the minimum to index ``size - 1``; returns the new size."""
    last = size - 1
    _heap_swap(neg, ints, 0, last)
    i = 0
    while True:
        lo, hi, best = 2 * i + 1, 2 * i + 2, i
        if lo < last and _heap_less(neg, ints, lo, best):
            best = lo
        if hi < last and _heap_less(neg, ints, hi, best):
            best = hi
        if best == i:
            return last
        _heap_swap(neg, ints, i, best)
        i = best


@njit(cache=True, nogil=True)
def best_first(mat, tab, mir, alpha, backoff, k, a, b, max_nodes, max_depth, branch, min_prob):
    """``tree.best_first_paths``: (parents, tokens, path probs) in pop order."""
    slot_row, slot_key, row_ids, row_probs, row_len = tab[0], tab[1], tab[3], tab[4], tab[5]
    mask = len(slot_row) - 1
    cap = branch * (max_nodes + 1) + 1
    neg, ints = np.empty(cap), np.empty((cap, 4), np.int64)
    out_parent, out_tok = np.empty(max_nodes, np.int64), np.empty(max_nodes, np.int64)
    out_prob, depth = np.empty(max_nodes), np.empty(max_nodes, np.int64)
    size, tick, n = 0, 0, 0
    parent, prev, tok, p_node = -1, a, b, 1.0  # the root: only its successors are pushed
    while True:
        if n == 0 or depth[n - 1] < max_depth:
            key = ((prev + 1) << 32) | tok
            i = _probe(slot_row, slot_key, key, _hash(prev, tok) & mask)
            r = slot_row[i]
            if r < 0:
                r = _insert(tab, mat, mir, alpha, backoff, k, prev, tok, key, i)
            for j in range(min(branch, row_len[r])):
                q = p_node * row_probs[r, j] if n > 0 else row_probs[r, j]
                if q >= min_prob:
                    size = _heap_push(neg, ints, size, -q, tick, n - 1, tok, row_ids[r, j])
                    tick += 1
        if size == 0 or n >= max_nodes:
            break
        size = _heap_pop(neg, ints, size)
        p_node, parent, prev, tok = -neg[size], ints[size, 1], ints[size, 2], ints[size, 3]
        out_parent[n], out_tok[n], out_prob[n] = parent, tok, p_node
        depth[n] = 1 if parent < 0 else depth[parent] + 1
        n += 1
    return out_parent[:n], out_tok[:n], out_prob[:n]


@njit(cache=True, nogil=True)
def mcts(mat, tab, mir, alpha, backoff, k, a, b, simulations, max_depth, c1, c2, rollout_len, top_paths, extend,
         use_path, uniforms):
    """``mcts.mcts_paths``: (parents, tokens, confidences), parents first. ``uniforms`` [simulations *
    rollout_len]: simulation s uses ``uniforms[s * rollout_len:(s + 1) * rollout_len]``."""
    slot_row, slot_key, row_ids, row_probs, row_len = tab[0], tab[1], tab[3], tab[4], tab[5]
    mask = len(slot_row) - 1
    # The reference's capacity (1 + simulations * 64) is never reached: each simulation expands at most
    # one node by at most k children. This one is not reached either, and costs less to allocate.
    cap = 2 + simulations * k
    prev, tok = np.zeros(cap, np.int64), np.zeros(cap, np.int64)
    parent, depth = np.full(cap, -1, np.int64), np.zeros(cap, np.int64)
    prior, path_prob = np.zeros(cap), np.ones(cap)
    visits, value = np.zeros(cap), np.zeros(cap)
    child_lo, child_hi = np.full(cap, -1, np.int64), np.zeros(cap, np.int64)
    prev[0], tok[0], size = a, b, 1
    path = np.empty(max_depth + 2, np.int64)
    for s in range(simulations):
        node, plen = 0, 1
        path[0] = 0
        while child_lo[node] >= 0 and child_hi[node] > child_lo[node]:  # PUCT descent
            big_n = visits[node]
            explore = (c1 + math.log((big_n + c2 + 1.0) / c2)) * math.sqrt(big_n)
            best, best_score = child_lo[node], -np.inf
            for c in range(child_lo[node], child_hi[node]):
                n = visits[c]
                score = value[c] / n + explore * prior[c] / (1.0 + n) if n > 0 else np.inf
                if score > best_score:  # strict: the first maximum wins, as np.argmax
                    best, best_score = c, score
            node = best
            path[plen] = node
            plen += 1
        if child_lo[node] < 0 and depth[node] < max_depth and size < cap:  # expansion
            key = ((prev[node] + 1) << 32) | tok[node]
            i = _probe(slot_row, slot_key, key, _hash(prev[node], tok[node]) & mask)
            r = slot_row[i]
            if r < 0:
                r = _insert(tab, mat, mir, alpha, backoff, k, prev[node], tok[node], key, i)
            lo = size
            hi = min(lo + row_len[r], cap)
            child_lo[node], child_hi[node] = lo, hi
            for j in range(hi - lo):
                c = lo + j
                prev[c], tok[c], prior[c] = tok[node], row_ids[r, j], row_probs[r, j]
                path_prob[c] = path_prob[node] * prior[c]
                parent[c], depth[c] = node, depth[node] + 1
            size = hi
        v, pp = 1.0, path_prob[node]
        if use_path:
            for d in range(1, plen):
                v += path_prob[path[d]]
        pv, tk = prev[node], tok[node]
        for t in range(rollout_len):  # rollout: inverse CDF over the renormalised successors
            key = ((pv + 1) << 32) | tk
            i = _probe(slot_row, slot_key, key, _hash(pv, tk) & mask)
            r = slot_row[i]
            if r < 0:
                r = _insert(tab, mat, mir, alpha, backoff, k, pv, tk, key, i)
            m = row_len[r]
            if m == 0:
                break
            u = uniforms[s * rollout_len + t]
            total = 0.0
            for j in range(m):
                total += row_probs[r, j]
            acc, pick = 0.0, m - 1
            for j in range(m):
                acc += row_probs[r, j]
                if u * total < acc:
                    pick = j
                    break
            if use_path:
                pp *= row_probs[r, pick]
                v += pp
            else:
                v += row_probs[r, pick] / total
            pv, tk = tk, row_ids[r, pick]
        for d in range(plen):
            visits[path[d]] += 1.0
            value[path[d]] += v
    return _paths(mat, tab, mir, alpha, backoff, k, simulations, top_paths, extend, size, prev, tok, parent, depth,
                  visits)


@njit(cache=True, nogil=True)
def _paths(mat, tab, mir, alpha, backoff, k, simulations, top_paths, extend, size, prev, tok, parent, depth, visits):
    """The kept nodes with their ancestors (by depth, then visits, then index), then greedy extensions."""
    slot_row, slot_key, row_ids, row_probs, row_len = tab[0], tab[1], tab[3], tab[4], tab[5]
    mask = len(slot_row) - 1
    cap = len(prev)
    keys = np.empty(size, np.int64)
    m = 0
    for i in range(1, size):  # by visits (descending), ties by index: a stable sort
        if visits[i] > 0:
            keys[m] = (simulations - np.int64(visits[i])) * cap + i
            m += 1
    keep = np.sort(keys[:m])[:top_paths] % cap
    chosen = np.zeros(size, np.bool_)
    n_chosen = 0
    for node in keep:  # a path brings its ancestors (they have at least its visits)
        while node > 0 and not chosen[node]:
            chosen[node] = True
            n_chosen += 1
            node = parent[node]
    order = np.empty(n_chosen, np.int64)
    m = 0
    for i in range(1, size):
        if chosen[i]:
            order[m] = (depth[i] * (simulations + 1) + simulations - np.int64(visits[i])) * cap + i
            m += 1
    order = np.sort(order) % cap
    n_out = n_chosen + len(keep) * extend
    out_parent, out_tok, out_conf = np.empty(n_out, np.int64), np.empty(n_out, np.int64), np.empty(n_out)
    local = np.full(size, -1, np.int64)
    root_visits = max(1.0, visits[0])
    for j in range(n_chosen):
        node = order[j]
        local[node] = j
        out_parent[j], out_tok[j], out_conf[j] = local[parent[node]], tok[node], visits[node] / root_visits
    n = n_chosen
    for node in keep:  # greedy extensions, confidence decaying by their probability
        idx, conf, pv, tk = local[node], out_conf[local[node]], prev[node], tok[node]
        for _ in range(extend):
            key = ((pv + 1) << 32) | tk
            i = _probe(slot_row, slot_key, key, _hash(pv, tk) & mask)
            r = slot_row[i]
            if r < 0:
                r = _insert(tab, mat, mir, alpha, backoff, k, pv, tk, key, i)
            if row_len[r] == 0:
                break
            conf *= row_probs[r, 0]
            out_parent[n], out_tok[n], out_conf[n] = idx, row_ids[r, 0], conf
            idx, pv, tk = n, tk, row_ids[r, 0]
            n += 1
    return out_parent[:n], out_tok[:n], out_conf[:n]
