"""Cross-request output history: SuffixDecoding's global tree, as a bounded token buffer.

A small target model writes the same phrases across answers ("Here's a Python function that ...").
Finished requests (prompt + output) are appended to one buffer shared by all requests; each step
matches the current context's suffix in it, like the per-request matcher, but candidates must agree
on the last *two* tokens: a one-token match across documents is right only a few percent of the time,
and the bigram filter keeps the scan to one vectorised comparison over the buffer.

Readers never lock: an append builds new arrays and swaps one reference (copy-on-write).
"""

from __future__ import annotations

import threading
from typing import Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.aded.suffix import SuffixConfig, match_chains

_SEP = -1  # between documents: no continuation crosses it


class HistoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Match earlier requests' prompts and outputs.")
    max_tokens: int = Field(100_000, ge=16, description="Buffer size; the oldest documents are dropped first.")
    match: SuffixConfig = Field(default_factory=lambda: SuffixConfig(min_match=2, max_match=12, max_chains=3),
                                description="Matching settings (min_match >= 2: candidates share a bigram).")


class History:
    def __init__(self, config: HistoryConfig, vocab_size: int) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self._tokens = np.full(1, _SEP, np.int64)  # [T] documents separated by _SEP
        self._pairs = np.zeros(0, np.int64)  # [T - 1] tokens[i] * V + tokens[i + 1]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tokens)

    def extend(self, documents: Iterable[np.ndarray]) -> None:
        """Append documents (id arrays), then drop the oldest beyond ``max_tokens``."""
        docs = [np.asarray(d, np.int64) for d in documents if len(d)]
        if not docs or not self.config.enabled:
            return
        with self._lock:
            parts = [self._tokens]
            for d in docs:
                parts += [d, np.full(1, _SEP, np.int64)]
            tokens = np.concatenate(parts)
            excess = len(tokens) - self.config.max_tokens
            if excess > 0:  # cut at a separator so no document starts mid-way
                seps = np.flatnonzero(tokens == _SEP)
                cut = seps[np.searchsorted(seps, excess)]  # the buffer ends with a separator
                tokens = tokens[cut:]
            pairs = np.where((tokens[:-1] >= 0) & (tokens[1:] >= 0), tokens[:-1] * self.vocab_size + tokens[1:], -1)
            self._tokens, self._pairs = tokens, pairs

    def chains(self, context: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``[(match_len, continuation)]`` from the buffer for the context's suffix (match_len >= 2)."""
        if not self.config.enabled or len(context) < 2:
            return []
        tokens, pairs = self._tokens, self._pairs  # one consistent snapshot
        key = int(context[-2]) * self.vocab_size + int(context[-1])
        cand = np.flatnonzero(pairs[:-1] == key) + 1  # p: tokens[p - 1 : p + 1] == context[-2:], p + 1 < T
        return match_chains(tokens, cand, context, self.config.match)
