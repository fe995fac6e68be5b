"""``specd profile``: measure the target's verify-forward latency for k tokens at several context lengths.

The result feeds :class:`actors.cost.CostModel`, which draft budgets read. Each point is the median of
``repeats`` timed forwards through the same code path the engine uses (tree mask, KV cache), after a
warm-up, with the cache rolled back between runs. Rounds sweep every k in turn, so a burst of load on
a shared machine lands on all k alike rather than on a few; the saved curve is then made
non-decreasing in k (``seconds_raw`` keeps the medians), so noise never makes a bigger draft look cheaper.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from actors.draft import Draft
from actors.kv import KVSequence
from actors.kernels import kernels_of
from actors.models import LoadedModel, models_dir

DEFAULT_K = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
DEFAULT_CONTEXTS = (64, 256, 512)


def measure_verify_cost(
    target: LoadedModel,
    k_values=DEFAULT_K,
    context_lengths=DEFAULT_CONTEXTS,
    repeats: int = 5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    rng = np.random.default_rng(seed)
    vocab = target.model.config.vocab_size
    seconds, raw = [], []
    for ctx in context_lengths:
        kv = KVSequence(target.model)
        kv.extend(rng.integers(0, vocab, ctx).tolist())
        drafts = [Draft.chain(rng.integers(0, vocab, k - 1)) for k in k_values]
        times: list[list[float]] = [[] for _ in k_values]
        for r in range(repeats + 1):  # round 0 warms up allocator and kernels
            for i, draft in enumerate(drafts):
                t = time.perf_counter()
                kv.extend_tree(int(rng.integers(vocab)), draft.tokens, draft.parents, draft.depths())
                if r:
                    times[i].append(time.perf_counter() - t)
                kv.crop(ctx)
        row = [statistics.median(ts) for ts in times]
        if progress:
            for k, t in zip(k_values, row):
                progress(f"ctx={ctx:5d} k={k:3d}  {t * 1e3:8.1f} ms")
        raw.append(row)
        seconds.append(np.maximum.accumulate(row).tolist())
    return {
        "model": target.name,
        "identity": target.identity,
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "kernels": kernels_of(target.model),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "repeats": repeats,
        "k": list(k_values),
        "context_lengths": list(context_lengths),
        "seconds": seconds,
        "seconds_raw": raw,
        "relative_to_k1": [[round(t / row[0], 3) for t in row] for row in seconds],
    }


def profile_path(target: LoadedModel) -> Path:
    """Where ``specd profile`` saves a model's curve by default and drafters look for it."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in target.name)
    # The curve belongs to the kernels measured (a tokenizer-only target names those its verifier runs).
    return models_dir().parent / "profiles" / f"{safe}-{target.identity}-{target.kernels}.json"
