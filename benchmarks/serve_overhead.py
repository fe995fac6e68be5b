"""What serving costs: gRPC through Ray Serve vs the embedded engine, and a remote drafter vs a colocated one.

    python benchmarks/serve_overhead.py --model smollm2-135m --method aded --prompts 4 --max-tokens 64 \
        --out runs/serve_overhead.json

One local Ray cluster runs two apps of the same config that differ only in where the method's drafter
lives: ``remote`` (its own deployment on the draft pool, one round trip per step) and ``colocated``
(inside the verifier process). For each prompt, in interleaved order: the embedded engine in this
process, then each app over gRPC (unary Generate, timed at the client: proxy, routing and serialization
included), for the method and for plain ``ar``. All greedy: served tokens must equal embedded tokens.

Each side runs as it would be run: the embedded engine with ``--torch-threads`` (2: all of this machine),
the served replicas with ServeConfig's default (one fewer than the CPUs: Ray's processes need one).
Reported: tokens/s served / embedded (goal >= 0.9x), and the drafter's per-step time (the engine's
``draft_seconds / target_forwards``) remote vs colocated: the difference is the remote round trip.

``--concurrency N`` (N > 1) runs all the prompts as one closed loop of N requests in flight per side
(the batching suite's ``run_embedded`` / ``run_served``: ``Engine.run_many``; N client threads), the unit
being the whole prompt list: what a batched step's drafting costs when its N requests' drafts cross to
the pool. Drafters are not reset between repeats: ADED's second repeat drafts prompts it has decoded (a
memorized regime, 4-5 tokens per forward), so each unit's tokens/s is reported too
(``units_tokens_per_second``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from actors.engine import Engine, EngineConfig  # noqa: E402
from actors.methods import make_drafter  # noqa: E402
from actors.models import load_model  # noqa: E402
from actors.process import free_port  # noqa: E402
from actors.sampling import SamplingParams  # noqa: E402
from deploy import local  # noqa: E402
from deploy.app import build_app  # noqa: E402
from deploy.config import DeploymentOptions, ServeConfig  # noqa: E402
from deploy.drafters import build_drafters  # noqa: E402
from specd.bench.batching import run_embedded, run_served  # noqa: E402
from specd.client import SpecdClient  # noqa: E402
from specd.bench.prompts import humaneval_prompts, mtbench_prompts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft-model", help="for an auxiliary-pool method (sd/mtad/mmtad)")
    p.add_argument("--method", default="aded")
    p.add_argument("--prompts", type=int, default=4, help="half MT-Bench, half HumanEval (first N/2 of each)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight per side (see above)")
    p.add_argument("--torch-threads", type=int, default=2, help="the embedded engine's threads")
    p.add_argument("--served-threads", type=int, default=None,
                   help="the served replicas' threads (default: ServeConfig's, i.e. what `specd serve` uses)")
    p.add_argument("--out", type=Path, default=Path("runs/serve_overhead.json"))
    return p.parse_args(argv)


def configs(args) -> dict[str, ServeConfig]:
    """The two apps: the method's drafter on the draft pool, or inside the verifier."""
    base = dict(model=args.model, draft_model=args.draft_model, default_method="ar", torch_threads=args.served_threads,
                http_port=free_port(), grpc_port=free_port(), max_tokens_limit=max(2048, args.max_tokens),
                max_batch=max(8, args.concurrency), verifier=DeploymentOptions(num_cpus=0.5, resources={"verify_pool": 1}))
    aux = args.method in ServeConfig().aux_methods
    key = "aux_placement" if aux else "trigram_placement"
    other = "trigram_placement" if aux else "aux_placement"  # the other pool stays out of the way
    return {p: ServeConfig(name=p, **base, **{key: p, other: "colocated"}) for p in ("remote", "colocated")}


def prompts(n: int) -> list[str]:
    half = max(1, n // 2)
    return [r["prompt"] for r in mtbench_prompts()[:half]] + [r["prompt"] for r in humaneval_prompts()[: n - half]]


def chat_ids(target, prompt: str) -> list[int]:
    return target.encode(prompt, chat=True) if target.is_chat else target.encode(prompt, chat=False)[:200]  # tiny


def summarize(units: list[dict]) -> dict:
    rows = [r for u in units for r in u["rows"]]
    n = sum(len(r["tokens"]) for r in rows)
    secs = sum(u["wall_seconds"] for u in units)
    fwd = sum(r["forwards"] for r in rows)
    return {"tokens": n, "seconds": round(secs, 3), "tokens_per_second": round(n / secs, 3),
            "units_tokens_per_second": [u["tokens_per_second"] for u in units],
            "tokens_per_forward": round(n / fwd, 3) if fwd else 0.0,
            "draft_ms_per_step": round(1e3 * sum(r["draft_seconds"] for r in rows) / fwd, 3) if fwd else 0.0}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    cfgs = configs(args)
    target = load_model(args.model)
    draft = load_model(args.draft_model) if args.draft_model else None
    engine = Engine(target, EngineConfig(max_batch=max(8, args.concurrency)))
    local_drafters = build_drafters(cfgs["colocated"], [args.method], target, draft)
    if args.method not in local_drafters:
        raise SystemExit(f"method {args.method!r} cannot run here (see the warning above)")
    embedded = {"ar": make_drafter("ar", target), args.method: local_drafters[args.method]}
    texts = prompts(args.prompts)
    inputs = [chat_ids(target, p) for p in texts]

    local.start(cfgs["remote"], extra_resources={"verify_pool": 1})
    try:
        for cfg in cfgs.values():
            from ray import serve

            serve.run(build_app(cfg.model_dump(mode="json")), name=cfg.name, route_prefix=f"/{cfg.name}")
        rows = measure(args, cfgs, engine, embedded, inputs)
    finally:
        local.stop()
    report = build_report(args, rows, texts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def measure(args, cfgs, engine, embedded, inputs) -> dict[str, list[dict]]:
    """Units (one prompt at c=1, the whole list at c > 1) per side, interleaved: embedded, then each app."""
    units: dict[str, list[dict]] = {}
    port = cfgs["remote"].grpc_port
    factories = {name: (lambda name=name: SpecdClient(f"127.0.0.1:{port}", application=name, timeout=600))
                 for name in cfgs}
    c, params = args.concurrency, SamplingParams(max_new_tokens=args.max_tokens)
    batches = [[ids] for ids in inputs] if c == 1 else [inputs]
    warm = [ids[:16] for ids in inputs[:c]]
    for f in factories.values():  # warm-up: first-call costs (routing tables, allocator) stay out
        run_served(f, warm, args.method, 4, c)
    run_embedded(engine, embedded[args.method], warm, SamplingParams(max_new_tokens=4), c)
    for rep in range(args.repeats):
        for i, batch in enumerate(batches):
            for method in (args.method, "ar"):
                units.setdefault(f"embedded/{method}", []).append(
                    run_embedded(engine, embedded[method], batch, params, c))
                for name, f in factories.items():
                    if method == "ar" and name == "colocated":
                        continue  # ar has no drafter: one served placement is enough
                    units.setdefault(f"served-{name}/{method}", []).append(
                        run_served(f, batch, method, args.max_tokens, c))
            print(f"repeat {rep + 1} unit {i + 1}/{len(batches)} done", file=sys.stderr, flush=True)
    return units


def build_report(args, rows, texts) -> dict:
    summary = {k: summarize(v) for k, v in rows.items()}
    m = args.method
    emb = summary[f"embedded/{m}"]["tokens_per_second"]
    flat = {k: [r for u in v for r in u["rows"]] for k, v in rows.items()}
    identical = {k: all(r["tokens"] == e["tokens"] for r, e in zip(v, flat[f"embedded/{k.split('/')[1]}"]))
                 for k, v in flat.items() if k.startswith("served")}
    summary["ratios"] = {
        f"served-remote/{m} vs embedded": round(summary[f"served-remote/{m}"]["tokens_per_second"] / emb, 3),
        f"served-colocated/{m} vs embedded": round(summary[f"served-colocated/{m}"]["tokens_per_second"] / emb, 3),
        "served/ar vs embedded": round(summary["served-remote/ar"]["tokens_per_second"]
                                       / summary["embedded/ar"]["tokens_per_second"], 3),
    }
    summary["remote_drafter_overhead_ms_per_step"] = round(
        summary[f"served-remote/{m}"]["draft_ms_per_step"] - summary[f"served-colocated/{m}"]["draft_ms_per_step"], 3)
    summary["greedy_outputs_identical"] = identical
    return {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
            "prompts": texts, "summary": summary,
            "runs": {k: [{"seconds": u["wall_seconds"], "rows": [{**r, "tokens": len(r["tokens"])} for r in u["rows"]]}
                         for u in v] for k, v in rows.items()}}


if __name__ == "__main__":
    sys.exit(main())
