"""``specd bench --suite batching``: aggregate tokens/s and per-request latency against concurrency, embedded
and served.

    specd bench --suite batching --concurrency 1,2,4,8,16 --served-concurrency 1,8,16 --limit 16 \
        --max-new-tokens 48 --out results/batching

For each concurrency level, closed loop: ``c`` requests in flight, the next prompt starts when one
finishes. SmolLM2-135M, greedy, MT-Bench and HumanEval prompts (the first ``--prompts`` of each, chat
template). Embedded: one ``Engine`` batch (``Engine.run_many``). Served: ``specd serve``'s app on local
Ray Serve, ``c`` client threads over gRPC (unary Generate). ADED adapts online, and every level decodes
the same prompts, so each level starts from a fresh drafter (embedded) or a freshly deployed app
(served): no level learns from another's outputs. Every output is compared with the same method at
concurrency 1 (greedy identity under batching) and ADED's with AR's. The budget reads the target's
``specd profile`` curve when there is one (run ``specd profile`` first), else the shipped fallback.
``--repeats R`` runs each embedded level R times, the methods alternating within a repeat, and reports the
median run (every run's tokens/s beside it): on a 2-vCPU guest the same run moves by up to a quarter.
Every run also records the host's CPU steal over it (``steal_pct``, from /proc/stat): compare runs whose
steal was alike. Each served run is paired with an embedded run of the same prompts just before it
(``paired/...`` in the JSON), and served vs embedded is the median of those pairs' ratios.

Memory: 16 requests of ~1k prompt tokens decoded together: KV bytes per held token and peak RSS.
Writes ``<out>/batching.json`` and ``<out>/batching.png``.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from actors.engine import Engine, EngineConfig
from actors.methods import make_drafter
from actors.models import load_model
from actors.process import free_port, freeze_gc_heap
from actors.sampling import SamplingParams
from actors.stats import StepInfo
from specd.bench.harness import CpuSteal, pct_text, steal_fields
from specd.bench.prompts import humaneval_prompts, mtbench_prompts
from specd.common import UsageError

DEFAULT_METHODS = ("ar", "aded")


def _summary(rows: list[dict], wall: float) -> dict:
    lat = sorted(r["seconds"] for r in rows)
    tokens = sum(len(r["tokens"]) for r in rows)
    return {"tokens": tokens, "wall_seconds": round(wall, 3), "tokens_per_second": round(tokens / wall, 3),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
            "tokens_per_forward": round(tokens / max(1, sum(r["forwards"] for r in rows)), 3)}


def step_fields(steps: list[StepInfo]) -> dict:
    """The decode steps' shape: rows per step, how often the budget kept nodes, and what it expected of
    them (tokens per unit cost against a plain step, from the cost curve and the corrected estimates)."""
    n = max(1, len(steps))
    return {"steps": len(steps), "mean_rows_per_step": round(sum(s.rows for s in steps) / n, 3),
            "speculative_steps_pct": round(100 * sum(s.verified > 0 for s in steps) / n, 1),
            "budget_expected_speedup": round(sum(s.expected_speedup for s in steps) / n, 3)}


def full_batch_fields(timed: list[tuple[float, StepInfo]], start: float, c: int) -> dict:
    """Tokens/s over the steps that decoded ``c`` rows, each step timed from the one before (prefill steps
    between included): what a server kept at ``c`` requests sees. The aggregate also counts the drain
    at the end of a closed loop, when fewer than ``c`` prompts are left, which favours a method whose
    requests all finish together (ar with equal-length answers) over one whose requests run at
    different speeds (ADED's last request decodes alone)."""
    tokens = seconds = 0.0
    for (t, info), before in zip(timed, [start] + [t for t, _ in timed]):
        if info.rows == c:
            tokens, seconds = tokens + info.produced, seconds + t - before
    return {"full_batch_tokens_per_second": round(tokens / seconds, 3) if seconds else None,
            "full_batch_steps_pct": round(100 * sum(i.rows == c for _, i in timed) / max(1, len(timed)), 1)}


def run_embedded(engine: Engine, drafter, inputs: list[list[int]], params: SamplingParams, c: int) -> dict:
    timed: list[tuple[float, StepInfo]] = []
    with CpuSteal() as steal:
        t = time.perf_counter()
        outs = engine.run_many(inputs, params, drafter, concurrency=c,
                               on_step=lambda info: timed.append((time.perf_counter(), info)))
        wall = time.perf_counter() - t
    bad = [o for o in outs if isinstance(o, BaseException)]
    if bad:
        raise bad[0]
    rows = [{"tokens": o.token_ids, "seconds": o.stats.seconds, "forwards": o.stats.target_forwards,
             "draft_seconds": o.stats.draft_seconds} for o in outs]
    steps = [info for _, info in timed]
    return {"rows": rows, **_summary(rows, wall), **step_fields(steps), **full_batch_fields(timed, t, c),
            **steal_fields(steal.delta)}


def run_served(client_factory, inputs: list[list[int]], method: str, max_tokens: int, c: int) -> dict:
    rows: list[dict | None] = [None] * len(inputs)
    nxt, lock = [0], threading.Lock()

    def worker():
        client = client_factory()
        while True:
            with lock:
                i, nxt[0] = nxt[0], nxt[0] + 1
            if i >= len(inputs):
                return
            t = time.perf_counter()
            r = client.generate(inputs[i], max_tokens=max_tokens, method=method, temperature=0.0)
            rows[i] = {"tokens": list(r.token_ids), "seconds": time.perf_counter() - t,
                       "forwards": r.stats.target_forwards, "draft_seconds": r.stats.draft_seconds}

    with CpuSteal() as steal:  # the whole guest's steal: the client threads and the Ray workers alike
        t = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(c)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
    return {"rows": rows, **_summary(rows, wall), **steal_fields(steal.delta)}


def median_run(runs: list[dict]) -> dict:
    """Repeats of one (set, method, level) as one result: the run with the median tokens/s, every run's
    tokens/s and steal beside it, and how many repeats' outputs differ from the first's (greedy: none should)."""
    mid = sorted(runs, key=lambda r: r["tokens_per_second"])[len(runs) // 2]
    return mid | {"runs_tokens_per_second": [r["tokens_per_second"] for r in runs],
                  "runs_full_batch_tokens_per_second": [r.get("full_batch_tokens_per_second") for r in runs],
                  "runs_steal_pct": [r["steal_pct"] for r in runs],
                  "repeats_differing": sum(_tokens(r) != _tokens(runs[0]) for r in runs[1:])}


def _tokens(run: dict) -> list[list[int]]:
    return [row["tokens"] for row in run["rows"]]


def measure_embedded(args, target, sets, levels, methods) -> dict:
    params = SamplingParams(max_new_tokens=args.max_tokens)
    engine = Engine(target, EngineConfig(max_batch=max(levels)))
    for method in methods:  # warm-up (allocator, oneDNN reorders, matrix load): unmeasured
        engine.run_many(sets["mtbench"][:2], params.model_copy(update={"max_new_tokens": 8}), make_drafter(method, target), 2)
    runs: dict[str, list[dict]] = {}
    for c in levels:
        for _ in range(args.repeats):  # methods alternate within a repeat: drift hits both alike
            drafters = {m: make_drafter(m, target) for m in methods}  # fresh per run: no cross-run learning
            freeze_gc_heap()  # their tables too, as a serving replica does after startup
            for name, inputs in sets.items():
                for m in methods:
                    r = run_embedded(engine, drafters[m], inputs, params, c)
                    runs.setdefault(f"{name}/{m}/{c}", []).append(r)
                    print(f"embedded {name} {m} c={c}: {_progress(r)}", file=sys.stderr, flush=True)
    return {key: median_run(rs) for key, rs in runs.items()}


def _progress(r: dict) -> str:
    return f"{r['tokens_per_second']} tok/s, steal {pct_text(r['steal_pct'])}"


def measure_served(args, target, sets, levels, methods) -> dict:
    """Served runs, each paired with an embedded run of the same prompts just before it (``paired/...``):
    the host's steal moves in bursts of seconds, so served vs embedded is read pair by pair, never between
    runs minutes apart. Each level and repeat gets fresh replicas, and its embedded twin a fresh drafter per
    method that learns from the same requests in the same order (warm-up included) as the replica's does."""
    from ray import serve

    from deploy import local
    from deploy.app import build_app
    from deploy.config import DeploymentOptions, ServeConfig
    from specd.client import SpecdClient

    cfg = ServeConfig(model=args.model, default_method="ar", http_port=free_port(), grpc_port=free_port(),
                      max_batch=max(levels), torch_threads=args.served_torch_threads, verifier=DeploymentOptions(num_cpus=0.5, resources={"verify_pool": 1}))
    params = SamplingParams(max_new_tokens=args.max_tokens)
    warm = SamplingParams(max_new_tokens=8)
    engine = Engine(target, EngineConfig(max_batch=max(levels)))
    runs: dict[str, list[dict]] = {}
    local.start(cfg, extra_resources={"verify_pool": 1})
    factory = lambda: SpecdClient(f"127.0.0.1:{cfg.grpc_port}", application=cfg.name, timeout=1200)  # noqa: E731
    try:
        for c in levels:
            for _ in range(args.repeats):
                # Fresh replicas and twins for every repeat: a drafter that decoded these prompts before drafts
                # them from memory (4-6 tokens per forward), a regime no cold embedded run is in.
                serve.run(build_app(cfg.model_dump(mode="json")), name=cfg.name, route_prefix="/")
                twins = {m: make_drafter(m, target) for m in methods}
                for m in methods:  # warm-up, both sides alike
                    run_served(factory, sets["mtbench"][:2], m, 8, 2)
                    engine.run_many(sets["mtbench"][:2], warm, twins[m], 2)
                freeze_gc_heap()
                for name, inputs in sets.items():
                    for m in methods:
                        pair = {"paired": run_embedded(engine, twins[m], inputs, params, c),
                                "served": run_served(factory, inputs, m, args.max_tokens, c)}
                        for side, r in pair.items():
                            runs.setdefault(f"{side}/{name}/{m}/{c}", []).append(r)
                        print(f"served {name} {m} c={c}: {_progress(pair['served'])}; embedded beside it: "
                              f"{_progress(pair['paired'])}", file=sys.stderr, flush=True)
                serve.delete(cfg.name)
    finally:
        local.stop()
    return {key: median_run(rs) for key, rs in runs.items()}


def pair_ratios(served: dict, paired: dict) -> list[float]:
    """Served over embedded tokens/s, run pair by pair (repeat i of each)."""
    return [round(s / e, 3) for s, e in zip(served["runs_tokens_per_second"], paired["runs_tokens_per_second"])]


def measure_memory(target) -> dict:
    """16 requests of ~1k prompt tokens each, decoded together (ar, 16 new tokens each)."""
    texts = [r["prompt"] for r in mtbench_prompts()]
    ids = target.tokenizer(" ".join(texts))["input_ids"]
    prompts = [ids[i * 97 : i * 97 + 1000] for i in range(16)]
    engine = Engine(target, EngineConfig(max_batch=16, prefill_chunk=512))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(p, params, make_drafter("ar", target), f"m{i}")
    peak_bytes = most_tokens = bytes_at_most = 0
    while engine.has_work():
        engine.step()
        kv = engine.verifier.kv
        peak_bytes = max(peak_bytes, kv.nbytes())
        if kv.tokens_held() > most_tokens:  # every prompt cached: what the buffers hold per live token
            most_tokens, bytes_at_most = kv.tokens_held(), kv.nbytes()
    cfg = target.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    return {"requests": 16, "prompt_tokens_each": 1000, "kv_bytes_per_token_model": per_token,
            "kv_peak_bytes": peak_bytes, "kv_most_tokens_held": most_tokens, "kv_bytes_then": bytes_at_most,
            "kv_bytes_per_held_token": round(bytes_at_most / max(1, most_tokens), 1),
            "full_context_bytes_per_slot": per_token * cfg.max_position_embeddings,
            "peak_rss_mb_before": round(rss_before / 1024, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def compare(results: dict, levels, methods) -> dict:
    """Greedy identity: every level's outputs against the same method at c=1, and aded against ar."""
    out = {}
    for key, r in results.items():
        side, name, m, c = key.split("/")
        base = results.get(f"{side}/{name}/{m}/1") or results.get(f"embedded/{name}/{m}/1")
        ar = results.get(f"embedded/{name}/ar/1")
        out[key] = {"requests_differing_from_c1": sum(a["tokens"] != b["tokens"] for a, b in zip(r["rows"], base["rows"])),
                    "requests_differing_from_ar": sum(a["tokens"] != b["tokens"] for a, b in zip(r["rows"], ar["rows"]))
                    if ar else None}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("mtbench", "humaneval")):
        for key, r in sorted(report["summary"].items()):
            side, s, m = key.split("/")
            if s == name and side != "paired":
                levels = sorted(int(c) for c in r)
                ax.plot(levels, [r[str(c)]["tokens_per_second"] for c in levels], marker="o",
                        linestyle="-" if side == "embedded" else "--", label=f"{m} {side}")
        ax.set(title=f"{name}: aggregate tokens/s", xlabel="concurrent requests", xscale="log", ylabel="tok/s")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> int:
    levels = list(args.concurrency or (1, 2, 4, 8, 16))
    served_levels = list(args.served_concurrency) if args.served_concurrency is not None else [1, 8, 16]
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    if "ar" not in methods or not set(methods) <= {"ar", "aded"}:
        raise UsageError("batching suite methods: ar (always) and aded")
    if levels[0] != 1 or (served_levels and not set(served_levels) <= set(levels)):
        raise UsageError("--concurrency must start at 1 and include every --served-concurrency level")
    args.prompts, args.max_tokens = args.limit or 16, args.max_new_tokens or 48
    args.repeats = args.repeats or 1
    args.model = args.model or "smollm2-135m"
    target = load_model(args.model)
    sets = {"mtbench": [target.encode(r["prompt"], chat=True) for r in mtbench_prompts()[: args.prompts]],
            "humaneval": [target.encode(r["prompt"], chat=True) for r in humaneval_prompts()[: args.prompts]]}
    with CpuSteal() as steal:
        results = {f"embedded/{k}": v for k, v in measure_embedded(args, target, sets, levels, methods).items()}
        if served_levels:
            results |= measure_served(args, target, sets, served_levels, methods)
    summary: dict = {}
    for key, r in results.items():
        side, name, m, c = key.split("/")
        summary.setdefault(f"{side}/{name}/{m}", {})[c] = {k: v for k, v in r.items() if k != "rows"}
    ratios = {}
    for name in sets:
        ar1 = summary[f"embedded/{name}/ar"]["1"]
        for c in levels:
            ar = summary[f"embedded/{name}/ar"][str(c)]
            row = {"ar_vs_ar1": _ratio(ar, ar1, "tokens_per_second"),
                   "ar_vs_ar1_full_batch": _ratio(ar, ar1, "full_batch_tokens_per_second")}
            if "aded" in methods:
                aded = summary[f"embedded/{name}/aded"][str(c)]
                row["aded_vs_ar"] = _ratio(aded, ar, "tokens_per_second")
                row["aded_vs_ar_full_batch"] = _ratio(aded, ar, "full_batch_tokens_per_second")
            for m in methods:
                served = summary.get(f"served/{name}/{m}", {}).get(str(c))
                if served is not None:  # the median of the pairs' ratios (see measure_served)
                    pairs = pair_ratios(served, summary[f"paired/{name}/{m}"][str(c)])
                    row[f"served_vs_embedded_{m}"] = round(statistics.median(pairs), 3)
                    row[f"served_vs_embedded_{m}_pairs"] = pairs
            ratios[f"{name}/{c}"] = row
    report = {"command": " ".join(["specd", *sys.argv[1:]]), "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                          "served_torch_threads": served_threads(args), "steal_pct": steal.pct},
              "summary": summary, "ratios": ratios, "identity": compare(results, levels, methods)}
    if not args.no_memory:
        report["memory"] = measure_memory(target)
    report["cost_curve"] = engine_cost_source(target)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "batching.png")
    print(json.dumps({"ratios": ratios, "memory": report.get("memory")}, indent=1))
    return 0


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None


def served_threads(args) -> int:
    from deploy.config import ServeConfig

    return ServeConfig(model=args.model, torch_threads=args.served_torch_threads).threads()


def engine_cost_source(target) -> str:
    from actors.profile import profile_path

    path = profile_path(target)
    return str(path) if path.exists() else "fallback (no specd profile for this target)"
