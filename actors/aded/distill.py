"""Distil the target's own next-token choices into tri-gram counts (teacher forcing, no generation).

A corpus tri-gram ``(a, b, c)`` says what a *human* wrote after ``(a, b)``; the drafter needs what the
*target* predicts there. Running the target over corpus text in large batched forwards gives, at every
position, the target's top-k after the bigram state ``(x[t-1], x[t])`` in a real context. Prefill
throughput is one to two orders of magnitude above generation on a CPU, so this labels far more
contexts per second than generating text. The weighted counts join ``build_matrix`` through
``weighted_trigrams``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm


def _windows(streams: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Fixed-length windows cut from each stream (the short tail of a stream is dropped)."""
    for s in streams:
        s = np.asarray(s, np.int64)
        for i in range(0, len(s) - seq_len + 1, seq_len):
            yield s[i: i + seq_len]


@torch.no_grad()
def distill_trigrams(model, streams: Iterable[np.ndarray], vocab_size: int, top_k: int = 2, seq_len: int = 256,
                     batch_size: int = 8, max_positions: int | None = None,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(keys [m] int64 ``(a * V + b) * V + c``, weights [m] float64 = the target's probability of c).

    ``c`` ranges over the target's ``top_k`` tokens after ``(x[t-1], x[t])`` at every window position
    ``t >= 1``; the first position of a window has no bigram state and is skipped.
    """
    keys, weights, done = [], [], 0
    bar = tqdm(total=max_positions, unit="pos", unit_scale=True, desc="distilling", disable=not progress)
    batch: list[np.ndarray] = []
    for window in _windows(streams, seq_len):
        batch.append(window)
        if len(batch) < batch_size:
            continue
        k, w = _label(model, np.stack(batch), vocab_size, top_k)
        keys.append(k)
        weights.append(w)
        batch = []
        done += len(k) // top_k
        bar.update(len(k) // top_k)
        if max_positions is not None and done >= max_positions:
            break
    bar.close()
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(keys), np.concatenate(weights)


def _label(model, x: np.ndarray, vocab_size: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and probabilities of the target's top-k for a [B, T] batch of windows."""
    logits = model(torch.from_numpy(x)).logits[:, 1:, :vocab_size].float()  # [B, T - 1, V]
    probs, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)  # [B, T - 1, k]
    pair = torch.from_numpy(x[:, :-1] * vocab_size + x[:, 1:])  # [B, T - 1] state (x[t-1], x[t])
    keys = pair.unsqueeze(-1) * vocab_size + ids
    return keys.reshape(-1).numpy(), probs.reshape(-1).double().numpy()
