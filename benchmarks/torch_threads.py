"""Why a process runs torch on one thread: the same forward on the thread that loaded the model, and on a
second thread after the first ran it.

    python benchmarks/torch_threads.py --out results/torch_threads.json

libgomp gives each thread that opens a parallel region a pool of its own and counts every pool's threads;
once they outnumber the CPUs it stops spinning at barriers and sleeps on a futex, so each of a forward's
hundreds of small parallel regions pays a wake-up. A serving replica that loaded its model on one thread
(Serve's init) and decoded on another (the engine loop) paid that on every step; ``actors.loop`` now builds
the engine on the loop's thread. Each case runs in a fresh process (the pools are process-wide):

- ``main``: load and run on the main thread (the embedded engine, ``specd generate``);
- ``second_thread``: load and run once on the main thread, then run on another thread (the old replica);
- ``loop_thread``: load and run on one non-main thread only (the replica now).

SmolLM2-135M, an 8-row decode forward over 128 cached tokens per row (the shape of a c=8 batch step),
``torch_threads`` threads; the median of ``--iters`` forwards. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("main", "second_thread", "loop_thread")


def child(case: str, iters: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from actors.kv import BatchKV, RowInput, causal_row
    from actors.models import load_model

    torch.set_num_threads(threads)
    out: dict = {}

    def load():
        out["model"] = load_model("smollm2-135m").model

    def measure():
        model = out["model"]
        kv = BatchKV(model)
        rng = np.random.default_rng(0)
        slots = [kv.add() for _ in range(8)]
        for s in slots:
            kv.forward([RowInput(s, *causal_row(0, rng.integers(0, 1000, 128).tolist()))], logits=False)
        def step() -> float:
            batch = [RowInput(s, *causal_row(len(s), [int(rng.integers(0, 1000))])) for s in slots]
            t = time.perf_counter()
            kv.forward(batch)
            t = time.perf_counter() - t
            for s in slots:
                kv.crop(s, 128)
            return t

        for _ in range(5):  # warm-up: the allocator, oneDNN's first calls
            step()
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        times = [step() for _ in range(iters)]
        cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
        cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
        out["result"] = {"forward_ms_median": round(1e3 * float(np.median(times)), 2),
                         "forward_ms_p90": round(1e3 * float(np.percentile(times, 90)), 2),
                         "cpu_pct": round(100 * cpu / wall, 1)}

    def on_thread(*fns):
        th = threading.Thread(target=lambda: [f() for f in fns])
        th.start()
        th.join()

    if case == "main":
        load(), measure()
    elif case == "second_thread":
        load()
        measure()  # the main thread's pool exists from here on, as after a replica's init
        on_thread(measure)
    else:
        on_thread(load, measure)
    return out["result"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3, help="each case this many times, cases alternating")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters, args.threads)))
        return 0
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    for _ in range(args.repeats):
        for case in CASES:
            proc = subprocess.run([sys.executable, __file__, "--child", case, "--iters", str(args.iters),
                                   "--threads", str(args.threads), "--out", str(args.out)],
                                  check=True, capture_output=True, text=True)
            runs[case].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(case, runs[case][-1], file=sys.stderr, flush=True)
    median = {c: sorted(r["forward_ms_median"] for r in rs)[len(rs) // 2] for c, rs in runs.items()}
    report = {"command": " ".join(["python", "benchmarks/torch_threads.py", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                          "torch_threads": args.threads},
              "runs": runs, "forward_ms": median,
              "second_thread_vs_main": round(median["second_thread"] / median["main"], 3),
              "loop_thread_vs_main": round(median["loop_thread"] / median["main"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("forward_ms", "second_thread_vs_main", "loop_thread_vs_main")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
