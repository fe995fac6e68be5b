"""Per-request context matching (prompt lookup / SuffixDecoding's per-request tree).

The tri-gram state is only two tokens; code and answers that quote the prompt repeat much longer
spans of the request's own prompt + output. For the last tokens of the context we find earlier
occurrences, longest match first (most recent first among equals), and return what followed each as a
candidate chain. No index is kept: one vectorised scan over the context costs tens of microseconds at
the context lengths served here, and needs no per-request memory or invalidation.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SuffixConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Match the request's own context at all.")
    max_match: int = Field(8, ge=1, le=64, description="Longest suffix compared (longer matches rank equal).")
    min_match: int = Field(1, ge=1, description="Shortest suffix match that yields a chain.")
    max_chains: int = Field(4, ge=1, le=64, description="Distinct continuations kept per step.")
    max_depth: int = Field(16, ge=1, le=256, description="Tokens per chain.")
    window: int = Field(4096, ge=16, description="Only the last this many context tokens are searched.")


def suffix_chains(context: np.ndarray, config: SuffixConfig) -> list[tuple[int, np.ndarray]]:
    """``[(match_len, continuation)]``: earlier occurrences of the context's suffix and what followed.

    Ranked by match length, then recency; continuations that repeat an earlier chain's are dropped.
    """
    if len(context) < 2 or not config.enabled:
        return []
    ctx = context[max(0, len(context) - config.window):]
    cand = np.flatnonzero(ctx[:-1] == ctx[-1])  # [m] positions p < n - 1 with ctx[p] == ctx[-1]
    return match_chains(ctx, cand, ctx, config)


def match_chains(hay: np.ndarray, cand: np.ndarray, query: np.ndarray,
                 config: SuffixConfig) -> list[tuple[int, np.ndarray]]:
    """Chains from ``hay`` after the candidate positions ``cand`` (where ``hay[p] == query[-1]``).

    A candidate's match length counts how far back ``hay`` agrees with ``query`` (up to ``max_match``);
    a continuation stops at the end of ``hay`` or at a negative id (a separator between documents).
    """
    if not len(cand):
        return []
    n = len(query)
    match = np.ones(len(cand), np.int64)
    alive = np.ones(len(cand), bool)
    for k in range(1, min(config.max_match, n)):
        prev = cand - k
        alive &= prev >= 0
        alive[alive] = hay[prev[alive]] == query[n - 1 - k]
        if not alive.any():
            break
        match += alive
    order = np.lexsort((-cand, -match))
    chains: list[tuple[int, np.ndarray]] = []
    seen: set[tuple[int, ...]] = set()
    for i in order[: 8 * config.max_chains]:  # bounded: long repeats give many identical continuations
        m = int(match[i])
        if m < config.min_match:
            break
        start = int(cand[i]) + 1
        cont = hay[start: start + config.max_depth]
        stop = np.flatnonzero(cont < 0)
        if len(stop):
            cont = cont[: stop[0]]
        key = tuple(cont.tolist())
        if not key or key in seen:
            continue
        seen.add(key)
        chains.append((m, cont))
        if len(chains) == config.max_chains:
            break
    return chains
