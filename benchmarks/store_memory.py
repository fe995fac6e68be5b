"""Memory of the adaptive n-gram store after many random prompts, bounded (max_rows) and unbounded.

    python benchmarks/store_memory.py --prompts 10000 --tokens 512 --out runs/store_memory.json

Each prompt is ``--tokens`` uniform random ids over a SmolLM2-sized vocabulary, folded into a MemoryStore
as ADED folds a prompt (+0.04 per tri-gram): the worst case, every tri-gram new. Reported per variant: rows
kept, rows evicted, and the Python heap the store holds (tracemalloc, MiB), every ``--every`` prompts and at
the end. The unbounded variant runs ``--unbounded-prompts`` prompts only (it grows linearly: on 10,000
prompts of 8k tokens it would need gigabytes); its per-prompt growth is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared_state import MemoryStore, StoreConfig  # noqa: E402

VOCAB = 49_152


def run(max_rows: int | None, prompts: int, tokens: int, every: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = MemoryStore(StoreConfig(namespace="bench", max_rows=max_rows))
    t0, trace = time.perf_counter(), []
    for i in range(1, prompts + 1):
        t = rng.integers(0, VOCAB, tokens).tolist()
        store.add([(t[j], t[j + 1], t[j + 2], 0.04) for j in range(tokens - 2)])
        if i % every == 0 or i == prompts:
            mib = (tracemalloc.get_traced_memory()[0] - base) / 2**20
            trace.append({"prompts": i, "rows": len(store), "evicted": store.evicted, "heap_mib": round(mib, 1)})
    seconds = time.perf_counter() - t0
    tracemalloc.stop()
    last = trace[-1]
    return {"max_rows": max_rows, "prompts": prompts, "tokens_per_prompt": tokens, "seconds": round(seconds, 1),
            "final": last, "heap_mib_per_prompt": round(last["heap_mib"] / prompts, 4), "trace": trace}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--max-rows", type=int, default=StoreConfig.model_fields["max_rows"].default)
    ap.add_argument("--unbounded-prompts", type=int, default=500)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/store_memory.json")
    args = ap.parse_args()
    result = {"machine": platform.platform(), "python": platform.python_version(), "vocab": VOCAB,
              "bounded": run(args.max_rows, args.prompts, args.tokens, args.every, args.seed),
              "unbounded": run(None, args.unbounded_prompts, args.tokens,
                               max(1, min(args.every, args.unbounded_prompts)), args.seed)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v["final"] | {"heap_mib_per_prompt": v["heap_mib_per_prompt"]} if isinstance(v, dict)
                      and "final" in v else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
