"""``specd profile``: measure the target's verify-forward latency over batch rows x tokens per row x context.

The result feeds :class:`actors.cost.CostModel`, which the batch budget reads. Each point is the fastest
of ``repeats`` timed forwards through the engine's own path (a ``BatchKV`` of ``rows`` sequences, each
fed its pending token plus a chain of ``k - 1`` nodes), after a warm-up, with the caches rolled back
between runs. The rows hold ``context`` minus 0, 1, 2, ... tokens: a served batch is ragged, and batch
invariance runs an attention call per run of rows whose key lengths round alike (actors.attention),
which shows most at one token a row. Timed on equal rows, a curve priced a plain many-row step below
what the engine paid when every row was its own call (8 rows vs 1: 1.4-2.1x ragged, 1.1-1.4x equal;
results/2026-12-07f-profile vs -d). Rows this close share key buckets: a batch spread wider makes a few
more calls than timed here. Rounds sweep every (rows, k) in turn, so a burst of load on a shared
machine lands on all points alike rather than on a few; the saved curve is then made non-decreasing in
k and in rows (``seconds_raw`` keeps the raw points), so noise never makes a bigger step look cheaper.
The fastest, not the median: load on a shared host only ever adds time, and a burst that outlasts a
round made a median high at one point, which the fill then lifted every bigger step to (on this CPU a
one-row plain step read 74 ms among 58-65 ms neighbours and priced every plain step ~15% high,
results/2026-12-07m-profile); the engine corrects the level online (actors.cost.TimedCost). A
profile is keyed by model, tokenizer, device, dtype and kernels: a CUDA target is never budgeted with a
CPU curve.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from actors.cost import CostModel, smollm2_cpu_cost
from actors.kernels import kernels_of
from actors.kv import BatchKV, RowInput, causal_row, tree_row
from actors.model_cache import models_dir
from actors.models import LoadedModel

DEFAULT_K = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
DEFAULT_BATCH = (1, 2, 4, 8, 16)
DEFAULT_CONTEXTS = (64, 256, 1024)
MAX_TOKENS_PER_STEP = 512  # rows x k beyond this is not measured (extrapolated): no budget goes there

log = logging.getLogger(__name__)


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_verify_cost(
    target: LoadedModel,
    k_values=DEFAULT_K,
    context_lengths=DEFAULT_CONTEXTS,
    batch_sizes=DEFAULT_BATCH,
    repeats: int = 5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    rng = np.random.default_rng(seed)
    vocab = target.model.config.vocab_size
    k_values, batch_sizes = list(k_values), list(batch_sizes)
    seconds, raw = [], []
    for ctx in context_lengths:
        kv = BatchKV(target.model)
        slots = [kv.add() for _ in range(max(batch_sizes))]
        lengths = [max(1, ctx - i) for i in range(len(slots))]  # ragged, as a served batch is; the longest is ctx
        for slot, n in zip(slots, lengths):
            kv.forward([RowInput(slot, *causal_row(0, rng.integers(0, vocab, n).tolist()))], logits=False)
        points = [(b, k) for b in batch_sizes for k in k_values if b * k <= MAX_TOKENS_PER_STEP or k == 1]
        times: dict[tuple[int, int], list[float]] = {p: [] for p in points}
        for r in range(repeats + 1):  # round 0 warms up allocator and kernels
            for b, k in points:
                rows = [RowInput(s, *tree_row(n, int(rng.integers(vocab)), rng.integers(0, vocab, k - 1),
                                              np.arange(k - 1) - 1, np.arange(1, k)))
                        for s, n in zip(slots[:b], lengths)]
                t = time.perf_counter()
                kv.forward(rows)
                if r:
                    times[(b, k)].append(time.perf_counter() - t)
                for s, n in zip(slots[:b], lengths):
                    kv.crop(s, n)
        grid = _fill([[min(times[(b, k)]) if (b, k) in times else np.nan for k in k_values]
                      for b in batch_sizes], batch_sizes, k_values)
        if progress:
            for b, row in zip(batch_sizes, grid):
                progress(f"ctx={ctx:5d} rows={b:3d}  " + " ".join(f"k{k}={t * 1e3:.0f}ms" for k, t in zip(k_values, row)))
        raw.append(grid.tolist())
        seconds.append(np.maximum.accumulate(np.maximum.accumulate(grid, axis=1), axis=0).tolist())
    return {
        "model": target.name,
        "identity": target.identity,
        "device": target.model.device.type,
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "kernels": kernels_of(target.model),
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
                    "cpus": os.cpu_count()},
        "repeats": repeats,
        "rows": "ragged",  # each row one token shorter than the last (curves without this field: equal rows)
        "batch": batch_sizes,
        "k": k_values,
        "context_lengths": list(context_lengths),
        "seconds": seconds,
        "seconds_raw": raw,
        "relative_to_k1": [[[round(t / row[0], 3) for t in row] for row in per_ctx] for per_ctx in seconds],
    }


def _fill(grid: list[list[float]], batch_sizes: list[int], k_values: list[int]) -> np.ndarray:
    """Points not measured (rows x k over the cap) extrapolated along k from the row's last two points."""
    g = np.array(grid, dtype=np.float64)
    for i in range(len(batch_sizes)):
        known = np.flatnonzero(~np.isnan(g[i]))
        if len(known) < len(k_values):
            xs, ys = np.array(k_values, float)[known], g[i, known]
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(known) > 1 else ys[-1] / xs[-1]
            for j in np.flatnonzero(np.isnan(g[i])):
                g[i, j] = ys[-1] + slope * (k_values[j] - xs[-1])
    return g


def profile_path(target: LoadedModel) -> Path:
    """Where ``specd profile`` saves a model's curve by default and the engine looks for it."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in target.name)
    # The curve belongs to the device, dtype and kernels measured (a tokenizer-only target names its verifier's).
    return (models_dir().parent / "profiles"
            / f"{safe}-{target.identity}-{target.device_type}-{target.dtype_name}-{target.kernels}.json")


def fallback_cost(target: LoadedModel) -> CostModel:
    """The curve budgets use before ``specd profile`` ran: flat on an accelerator (verifying a few more
    tokens is nearly free there), SmolLM2's measured CPU curve on a CPU (a steep curve only makes the
    budget cautious, never slower than plain decoding)."""
    if target.device_type != "cpu":
        return CostModel.flat()
    return smollm2_cpu_cost(target.kernels)


def default_cost(target: LoadedModel) -> CostModel:
    """The target's ``specd profile`` curve for its device, dtype and kernels, else the fallback."""
    path = profile_path(target)
    if not path.exists():
        return fallback_cost(target)
    # Another CPU's curve is lossless but mis-tunes the budget (two 2-core guests of this project's differed
    # in which steps speculation pays): say so rather than budget silently with it.
    profile = json.loads(path.read_text())
    measured = profile.get("machine", {}).get("cpu_model")
    if target.device_type == "cpu" and measured not in (None, cpu_model()):
        log.warning("verify-cost curve %s was measured on %r, this machine is %r: run `specd profile` here",
                    path, measured, cpu_model())
    return CostModel.from_profile(profile)
