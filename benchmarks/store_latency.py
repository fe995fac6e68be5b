"""What the n-gram store costs a decode step, and what Redis holds per million tri-grams.

    python benchmarks/store_latency.py --out runs/store_latency.json

Latency: each step makes one ``add`` of 40 increments (ADED's +0.04 on the step's new tri-grams) and
200 ``successors`` lookups (an MCTS over bigram states), timed on the calling thread, for MemoryStore
and for RedisStore with its background flush (0.2 s) and pull (1 s, up to 4096 tracked rows) running.
Between steps the thread sleeps ``--gap-ms`` (the verify forward, which releases the GIL). The two stores
run in alternating rounds (``--rounds``), pooled, so both see the same drift in the machine's load.
Memory: ``INFO memory`` before/after flushing N distinct tri-grams, scaled to one million.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from redis_server import RedisServer  # noqa: E402
from shared_state import MemoryStore, NGramStore, RedisStore, StoreConfig  # noqa: E402

VOCAB = 32_000


def percentiles(ns: list[int]) -> dict[str, float]:
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return {"p50_us": round(float(np.percentile(us, 50)), 2), "p99_us": round(float(np.percentile(us, 99)), 2),
            "max_us": round(float(us.max()), 1)}


def workload(steps: int, adds: int, lookups: int, seed: int):
    """Per step: ``adds`` tri-grams from a Zipf token stream, ``lookups`` contexts around recent ones."""
    rng = np.random.default_rng(seed)
    stream = (rng.zipf(1.3, size=steps * adds + 2) % VOCAB).tolist()
    for s in range(steps):
        window = stream[s * adds:(s + 1) * adds + 2]
        incs = [(window[i], window[i + 1], window[i + 2], 0.04) for i in range(adds)]
        pairs = rng.integers(0, adds + 1, size=lookups)
        fresh = rng.random(lookups) < 0.3  # an MCTS also expands into contexts it has not seen
        ctx = [(window[p], window[p + 1]) if not f else (int(rng.zipf(1.3)) % VOCAB, window[p + 1])
               for p, f in zip(pairs.tolist(), fresh.tolist())]
        yield incs, ctx


def measure(store: NGramStore, args) -> dict:
    add_ns, get_ns, step_ns = [], [], []
    clock = time.perf_counter_ns
    for incs, ctx in workload(args.steps, args.adds, args.lookups, args.seed):
        t0 = clock()
        store.add(incs)
        t1 = clock()
        add_ns.append(t1 - t0)
        for a, b in ctx:
            t = clock()
            store.successors(a, b)
            get_ns.append(clock() - t)
        step_ns.append(clock() - t0)
        time.sleep(args.gap_ms / 1e3)
    return {"add_40": add_ns, "successors": get_ns, "step": step_ns}


def memory_per_million(srv: RedisServer, n: int, per_context: int) -> dict:
    """Flush ``n`` distinct tri-grams (``per_context`` successors per context) and read INFO memory."""
    ns = f"mem{per_context}"
    with srv.client() as c:
        before = c.info("memory")["used_memory"]
        store = RedisStore(StoreConfig(namespace=ns, top_k=max(12, per_context)), srv.url,
                           max_pending=n + 1, half_life_s=None)
        t0 = time.perf_counter()
        for i in range(0, n, 10_000):
            store.add((j // per_context, 7, j % per_context, 1.0) for j in range(i, min(n, i + 10_000)))
        assert store.refresh(timeout=300) and store.stats()["pending_increments"] == 0
        seconds = time.perf_counter() - t0
        store.close()
        after = c.info("memory")["used_memory"]
        keys = sum(1 for _ in c.scan_iter(f"specd:ngram:v1:{{{ns}}}:c:*", count=10_000))
    return {"tri_grams": n, "successors_per_context": per_context, "context_keys": keys,
            "bytes_per_tri_gram": round((after - before) / n, 1),
            "mib_per_million_tri_grams": round((after - before) / n * 1e6 / 2**20, 1),
            "flush_tri_grams_per_s": round(n / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/store_latency.json")
    ap.add_argument("--url", help="an existing Redis (its database is written to); default: a throwaway server")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--adds", type=int, default=40)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=2.0, help="sleep between steps (the forward pass)")
    ap.add_argument("--memory-tri-grams", type=int, default=240_000)
    ap.add_argument("--rounds", type=int, default=2, help="alternating MemoryStore/RedisStore runs, pooled")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    srv = None if args.url else RedisServer().start()
    url = args.url or srv.url
    config = StoreConfig(namespace="bench")
    result: dict = {"workload": {k: getattr(args, k) for k in ("steps", "adds", "lookups", "gap_ms", "rounds")},
                    "load_average_1m_start": os.getloadavg()[0]}
    samples: dict[str, list] = {"memory_store": [], "redis_store": []}
    for r in range(args.rounds):  # alternate, so both see the same drift in the machine's load
        for name in samples if r % 2 == 0 else reversed(samples):
            store = MemoryStore(config) if name == "memory_store" else RedisStore(config, url)
            samples[name].append(measure(store, args))
            store.close()
            if name == "redis_store":
                result["redis_store_stats"] = store.stats()
    for name, runs in samples.items():
        result[name] = {what: percentiles([ns for run in runs for ns in run[what]]) for what in runs[0]}
    result["added_step_p99_us"] = round(result["redis_store"]["step"]["p99_us"] - result["memory_store"]["step"]["p99_us"], 2)
    result["load_average_1m"] = os.getloadavg()[0]
    if srv is not None:
        with srv.client() as c:
            info = c.info("server") | c.info("memory")
        result["redis_server"] = {"version": info["redis_version"], "allocator": info["mem_allocator"],
                                  "binary": srv.executable}
        result["memory"] = [memory_per_million(srv, args.memory_tri_grams, k) for k in (12, 1)]
        srv.close()
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
