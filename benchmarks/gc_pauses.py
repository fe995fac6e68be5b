"""Cyclic-GC pauses during batched ADED decoding, with the startup heap frozen or not.

``actors.process.freeze_gc_heap`` moves the objects alive after startup (modules, tokenizers, drafter
tables) out of the collector's reach. This measures what that buys: every collection's duration (through
``gc.callbacks``) over the same batched runs, frozen and unfrozen alternating. Writes JSON to ``--out``.

    python benchmarks/gc_pauses.py --repeats 2 --tokens 128 --out results/2026-12-02-gc/gc_pauses.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from actors.engine import Engine, EngineConfig
from actors.methods import make_drafter
from actors.models import load_model
from actors.process import freeze_gc_heap
from actors.sampling import SamplingParams
from specd.bench.prompts import mtbench_prompts


class Pauses:
    def __init__(self) -> None:
        self.durations: list[tuple[int, float]] = []  # (generation, seconds)
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.durations.append((info["generation"], time.perf_counter() - self._t))


def run_once(target, inputs, frozen: bool, concurrency: int, tokens: int) -> dict:
    engine = Engine(target, EngineConfig(max_batch=concurrency))
    drafter = make_drafter("aded", target)
    freeze_gc_heap()
    if not frozen:
        gc.unfreeze()  # back into the oldest generation: full collections walk it again
    pauses = Pauses()
    gc.callbacks.append(pauses)
    try:
        t = time.perf_counter()
        engine.run_many(inputs, SamplingParams(max_new_tokens=tokens), drafter, concurrency=concurrency)
        wall = time.perf_counter() - t
    finally:
        gc.callbacks.remove(pauses)
        tracked = len(gc.get_objects())  # what a full collection walks
        freeze_gc_heap()
    full = [d for g, d in pauses.durations if g == 2]
    return {"frozen": frozen, "wall_seconds": round(wall, 3), "collections": len(pauses.durations),
            "full_collections": len(full), "gc_seconds": round(sum(d for _, d in pauses.durations), 4),
            "longest_pause_ms": round(1e3 * max((d for _, d in pauses.durations), default=0.0), 1),
            "tracked_objects": tracked}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    target = load_model("smollm2-135m")
    inputs = [target.encode(p["prompt"], chat=True) for p in mtbench_prompts()[: args.prompts]]
    runs = [run_once(target, inputs, frozen, args.prompts, args.tokens)
            for _ in range(args.repeats) for frozen in (False, True)]
    report = {"command": " ".join(["python", *sys.argv]), "frozen_heap_objects": gc.get_freeze_count(), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
