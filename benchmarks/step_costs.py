"""What each decode step of an embedded batched run cost against what the budget's curve priced it at.

    python benchmarks/step_costs.py --set mtbench --concurrency 2 --out results/step_costs.json

The batch budget widens a step when the curve says the extra tokens pay; it is only as right as the curve
is for the steps the engine really runs. This runs ar and ADED over the same prompts (alternating, each
``--repeats`` times) and records every decode step's verify seconds beside ``CostModel.forward_seconds``
for its shape and the price the budget read (the curve corrected by the steps timed so far,
``actors.cost.TimedCost``), grouped by (rows, tokens per row), with the budget's expected tokens beside
the tokens the run produced. ``aded-curve`` is ADED on an engine whose budget reads the curve as measured
(``EngineConfig.budget_timing=False``). SmolLM2-135M, greedy, chat template. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.cost import CostModel  # noqa: E402
from actors.engine import Engine, EngineConfig  # noqa: E402
from actors.methods import make_drafter  # noqa: E402
from actors.models import load_model  # noqa: E402
from actors.process import freeze_gc_heap  # noqa: E402
from actors.profile import default_cost, profile_path  # noqa: E402
from actors.sampling import SamplingParams  # noqa: E402
from specd.bench.harness import machine  # noqa: E402
from specd.bench.prompts import humaneval_prompts, mtbench_prompts  # noqa: E402


def timed_run(engine: Engine, prompts: list, params: SamplingParams, method: str, concurrency: int) -> dict:
    steps = []
    verify = engine.verifier.verify

    def timed(batch):  # the engine's own verify, timed; its step shape is set just before it
        t = time.perf_counter()
        out = verify(batch)
        s = engine.last_step
        k, real = s.tokens // s.rows, time.perf_counter() - t
        steps.append((s.rows, k, real, engine.cost.forward_seconds(k, s.context, s.rows), s.expected,
                      engine.timed_cost.forward_seconds(k, s.context, s.rows)))
        return out

    engine.verifier.verify = timed
    try:
        freeze_gc_heap()
        t = time.perf_counter()
        outs = engine.run_many(prompts, params, make_drafter(method, engine.target), concurrency)
        wall = time.perf_counter() - t
    finally:
        engine.verifier.verify = verify
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": tokens, "tokens_per_second": round(tokens / wall, 3), "steps": steps}


def summarize(runs: list[dict]) -> dict:
    shapes: dict[str, list] = defaultdict(list)
    for run in runs:
        for rows, k, real, priced, _, timed in run["steps"]:
            shapes[f"{rows}x{k}"].append((real, priced, timed))
    steps = [s for run in runs for s in run["steps"]]
    return {
        "tokens_per_second": [r["tokens_per_second"] for r in runs],
        "steps": len(steps),
        "wide_steps": sum(1 for _, k, *_ in steps if k > 1),
        "verify_seconds": round(sum(s[2] for s in steps), 3),
        "priced_seconds": round(sum(s[3] for s in steps), 3),
        "timed_price_seconds": round(sum(s[5] for s in steps), 3),
        "expected_tokens": round(sum(s[4] for s in steps), 1),
        "decoded_tokens": sum(r["tokens"] for r in runs),
        "by_shape": {key: {"steps": len(v), **{name: round(1e3 * sum(x[i] for x in v) / len(v), 2) for i, name in
                                                enumerate(("real_ms", "priced_ms", "timed_price_ms"))}}
                     for key, v in sorted(shapes.items(), key=lambda kv: tuple(map(int, kv[0].split("x"))))},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", choices=("mtbench", "humaneval"), default="mtbench")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--curve", type=Path, help="a `specd profile` JSON (default: the one the engine reads)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    target = load_model("smollm2-135m")
    cost = CostModel.from_json(args.curve) if args.curve else default_cost(target)
    engine = Engine(target, EngineConfig(max_batch=args.concurrency), cost=cost)
    untimed = Engine(target, EngineConfig(max_batch=args.concurrency, budget_timing=False), cost=cost)
    rows = (mtbench_prompts() if args.set == "mtbench" else humaneval_prompts())[: args.limit]
    prompts = [target.encode(r["prompt"], chat=True) for r in rows]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    for method in ("ar", "aded"):  # warm-up: kernels, the tri-gram matrix, the compiled search
        engine.run_many(prompts[:2], SamplingParams(max_new_tokens=8), make_drafter(method, target), 2)
    runs: dict[str, list] = {"ar": [], "aded": [], "aded-curve": []}
    for _ in range(args.repeats):
        for name in runs:
            eng = untimed if name == "aded-curve" else engine
            runs[name].append(timed_run(eng, prompts, params, name.split("-")[0], args.concurrency))
    result = {"command": " ".join(sys.argv), "machine": machine(),
              "curve": str(args.curve or profile_path(target)), "args": {k: str(v) for k, v in vars(args).items()},
              "methods": {m: summarize(r) for m, r in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    totals = {m: {k: v for k, v in s.items() if k != "by_shape"} for m, s in result["methods"].items()}
    print(json.dumps(totals, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
