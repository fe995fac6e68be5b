"""Faults, load and fuzz against a served specd app (gRPC from the specd_api.v1 stubs, plain HTTP); JSON out.

    python benchmarks/faults.py --out runs/faults.json            # the full run (issue 14, item 10)
    python benchmarks/faults.py --requests 40 --concurrency 8 --fuzz 200 --cancels 10 --out runs/faults-small.json

One local Ray + Serve (deploy.local, as `specd serve` starts it) serves tiny-llama with tiny-llama:1 as
the draft model (``--model smollm2-135m --draft-model ...`` for a real one), the tri-gram drafter on its own
replica and the n-gram store in a real redis-server (tests/redis_server.py). In order:

- load: ``--requests`` at ``--concurrency`` over gRPC and HTTP, methods ar / aded / sd / mtad; greedy ones
  must equal the target's own greedy output (computed here, embedded), sampled ones must finish.
- drafter kill: the same load while the TrigramDrafter replica actor is ray.kill-ed; every request finishes,
  greedy outputs still equal AR, and the load goes on until the replacement rebuilt request states.
- Redis kill: the load while redis-server is SIGKILLed and restarted empty on its port; 0 failed requests,
  and the store's keys come back (counts resume).
- cancels: ``--cancels`` streams (gRPC and SSE) dropped after two chunks; then no live request, KV slot or
  drafter session is left.
- fuzz: ``--fuzz`` random and mutated requests (benchmarks/fuzz_cases.py); every answer is OK or
  INVALID_ARGUMENT / 200 or 400; health after; RSS of the app's replica and proxy processes before / after.

tests/test_faults.py runs the same scenarios, smaller, on the test session's Serve node.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import psutil  # noqa: E402
import requests  # noqa: E402

import fuzz_cases  # noqa: E402
from actors.process import free_port  # noqa: E402
from specd.client import SpecdClient  # noqa: E402

PROMPTS = ("hello world", "the quick brown fox", "0123456789", "speculative decoding is", "def add(a, b):")
METHODS = ("ar", "aded", "sd", "mtad")
WAIT_S = 600  # bounds for something really stuck (a replica that never comes back), never for speed


@dataclass
class App:
    """A served app as the scenarios see it: where to reach it and what it answers for each prompt."""

    name: str
    grpc_port: int
    http_port: int
    route_prefix: str
    reference: dict[str, tuple[list[int], str]]  # prompt -> greedy (token ids, text) of the embedded engine
    max_tokens: int  # of a load request
    max_tokens_long: int = 256  # of a stream that is cancelled mid-way
    redis: object | None = None  # tests/redis_server.RedisServer behind --redis-url
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}{self.route_prefix.rstrip('/')}"

    def client(self, timeout: float = 300) -> SpecdClient:
        return SpecdClient(f"127.0.0.1:{self.grpc_port}", application=self.name, timeout=timeout)

    def deployment(self, name: str):
        from ray import serve

        return serve.get_deployment_handle(name, self.name)

    def call(self, deployment: str, method: str, timeout_s: float = 30.0):
        return getattr(self.deployment(deployment), method).remote().result(timeout_s=timeout_s)


def reference(model: str, max_tokens: int) -> dict[str, tuple[list[int], str]]:
    """Greedy AR output of the embedded engine per prompt: what every greedy served request must return."""
    from actors.drafter import NoDrafter
    from actors.engine import Engine
    from actors.models import load_model
    from actors.sampling import SamplingParams

    target = load_model(model)
    engine, params = Engine(target), SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    out = {}
    for p in PROMPTS:
        g = engine.run(target.encode(p, chat=False), params, NoDrafter())
        out[p] = (g.token_ids, g.text)
    return out


# ---- one request, either protocol ----------------------------------------------------------------


def one_request(app: App, i: int, methods=METHODS) -> dict:
    """Request ``i`` of a load: protocol, method, prompt and greedy-or-sampled follow from i."""
    prompt, method = PROMPTS[i % len(PROMPTS)], methods[(i // 2) % len(methods)]
    sampled = i % 5 == 4
    kw = dict(max_tokens=app.max_tokens, ignore_eos=True, method=method,
              temperature=0.8 if sampled else 0.0, seed=i if sampled else None)
    row = {"i": i, "protocol": "grpc" if i % 2 == 0 else "http", "method": method, "sampled": sampled}
    try:
        if row["protocol"] == "grpc":
            with app.client() as c:
                r = c.generate(prompt, **kw)
            tokens, text, drafted = list(r.token_ids), r.text, r.stats.drafted_tokens
        else:
            body = {"prompt": prompt, **{k: v for k, v in kw.items() if v is not None}}
            resp = app.http.post(f"{app.base}/v1/completions", json=body, timeout=300)
            if resp.status_code != 200:
                return row | {"ok": False, "error": f"HTTP {resp.status_code}: {resp.text[:200]}"}
            j = resp.json()
            tokens, text, drafted = None, j["choices"][0]["text"], j["specd"]["drafted_tokens"]
    except Exception as e:  # noqa: BLE001 - every failure is a result to report
        return row | {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    want_ids, want_text = app.reference[prompt]
    equal = None if sampled else (text == want_text and (tokens is None or tokens == want_ids))
    return row | {"ok": sampled or equal, "greedy_equal_ar": equal, "drafted": drafted,
                  "tokens": len(tokens) if tokens is not None else None}


def summarize(rows: list[dict], seconds: float) -> dict:
    greedy = [r for r in rows if r.get("greedy_equal_ar") is not None]
    return {"requests": len(rows), "errors": sum(not r["ok"] for r in rows), "seconds": round(seconds, 2),
            "greedy_requests": len(greedy), "greedy_equal_ar": sum(r["greedy_equal_ar"] for r in greedy),
            "by_method": {m: sum(r["method"] == m for r in rows) for m in METHODS},
            "by_protocol": {p: sum(r["protocol"] == p for r in rows) for p in ("grpc", "http")},
            "failures": [r for r in rows if not r["ok"]][:10]}


def load(app: App, n: int, concurrency: int) -> dict:
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(lambda i: one_request(app, i), range(n)))
    return summarize(rows, time.perf_counter() - t)


class BackgroundLoad:
    """Requests at ``concurrency`` until stopped; the fault scenarios run it across their fault."""

    def __init__(self, app: App, concurrency: int, methods=METHODS) -> None:
        self.app, self.methods, self.rows, self._next = app, methods, [], 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]
        for th in self._threads:
            th.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                i, self._next = self._next, self._next + 1
            row = one_request(self.app, i, self.methods) | {"t": round(time.perf_counter() - self._t0, 2)}
            with self._lock:
                self.rows.append(row)

    def done(self) -> int:
        with self._lock:
            return len(self.rows)

    def started(self) -> int:
        with self._lock:
            return self._next

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.rows)

    def wait_done(self, n: int, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.done() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {self.done()} of {n} requests after {WAIT_S} s")
            time.sleep(0.1)

    def stop(self) -> dict:
        """Every in-flight request finishes (or fails, which is counted); returns the summary."""
        self._stop.set()
        for th in self._threads:
            th.join(WAIT_S)
        return summarize(self.rows, time.perf_counter() - self._t0)


def wait_for(check, what: str, poll_s: float = 0.5):
    """Poll ``check()`` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - a replica not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {WAIT_S} s")
        time.sleep(poll_s)


# ---- faults ---------------------------------------------------------------------------------------


def replica_actors(app: App, deployment: str) -> list[tuple[str, str]]:
    """(name, namespace) of the live replica actors of ``deployment``."""
    import ray

    tag = f"{app.name}#{deployment}#"
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True) if tag in a["name"]]


def drafter_kill(app: App, concurrency: int, warm: int) -> dict:
    """Kill the tri-gram drafter replica under aded load; go on until requests draft on its replacement."""
    import ray

    (name, namespace), = replica_actors(app, "TrigramDrafter")
    bg = BackgroundLoad(app, concurrency, methods=("aded",))
    try:
        bg.wait_done(warm, "before the kill")
        in_flight = bg.started() - bg.done()
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        t_kill = time.monotonic()
        new = wait_for(lambda: [r for r in replica_actors(app, "TrigramDrafter") if r[0] != name], "a new replica")
        first_after = bg.started()  # requests from here on started with the replacement in place
        wait_for(lambda: any(r["i"] >= first_after and r.get("drafted") for r in bg.snapshot()),
                 "a request drafted by the replacement")
        recovered_s = time.monotonic() - t_kill
    finally:
        summary = bg.stop()
    after = [r for r in bg.rows if r["i"] >= first_after]
    return summary | {"in_flight_at_kill": in_flight, "recovered_seconds": round(recovered_s, 1),
                      "new_replica": new[0][0], "link": app.call("Verifier", "stats")["links"].get("trigram"),
                      "rebuilds_on_new_replica": app.call("TrigramDrafter", "stats")["rebuilds"],
                      "requests_after_recovery": len(after),
                      "drafted_after_recovery": sum(bool(r.get("drafted")) for r in after)}


def redis_keys(app: App) -> int:
    with app.redis.client() as c:
        return sum(1 for _ in c.scan_iter(match="specd:ngram:*", count=1000))


def redis_restart(app: App, concurrency: int, warm: int) -> dict:
    """SIGKILL redis-server under aded load, serve on local statistics, restart it empty: counts resume."""
    bg = BackgroundLoad(app, concurrency, methods=("aded",))
    try:
        bg.wait_done(warm, "before the Redis kill")
        keys_before = wait_for(lambda: redis_keys(app), "store keys in Redis before the kill")
        app.redis.kill()
        down_at = bg.done()
        bg.wait_done(down_at + warm, "while Redis is down")
        served_while_down = bg.done() - down_at
        app.redis.start()
        keys_after = wait_for(lambda: redis_keys(app), "store keys in Redis after the restart")
    finally:
        summary = bg.stop()
    return summary | {"keys_before_kill": keys_before, "requests_while_down": served_while_down,
                      "keys_after_restart": keys_after}


def cancels(app: App, n: int) -> dict:
    """``n`` streams (gRPC and SSE, methods mixed) dropped after two chunks; then nothing is left behind."""
    def cancel_one(i: int) -> bool:
        method, prompt = METHODS[i % len(METHODS)], PROMPTS[i % len(PROMPTS)]
        if i % 2 == 0:
            with app.client() as c:
                stream = c.stream(prompt, max_tokens=app.max_tokens_long, ignore_eos=True, method=method)
                got = [next(stream), next(stream)]
                stream.close()  # cancels the RPC
            return len(got) == 2
        body = {"prompt": prompt, "max_tokens": app.max_tokens_long, "temperature": 0, "ignore_eos": True,
                "method": method, "stream": True}
        with requests.post(f"{app.base}/v1/completions", json=body, stream=True, timeout=300) as resp:
            lines = resp.iter_lines()
            got = [line for line, _ in zip((x for x in lines if x), range(2))]
        return len(got) == 2  # leaving the block closes the connection mid-stream

    with ThreadPoolExecutor(min(n, 8)) as pool:
        started = sum(pool.map(cancel_one, range(n)))
    left = lambda: app.call("Verifier", "stats")  # noqa: E731
    verifier = wait_for(lambda: (s := left())["live_requests"] == 0 and s["kv_slots"] == 0 and s, "streams freed")
    pools = {d: wait_for(lambda d=d: (s := app.call(d, "stats"))["sessions"] == 0 and s, f"{d} sessions dropped")
             for d in ("TrigramDrafter", "AuxDrafter")}
    return {"cancelled": n, "read_two_chunks": started, "live_requests": verifier["live_requests"],
            "engine_requests": verifier["engine_requests"], "kv_slots": verifier["kv_slots"],
            "drafter_sessions": {d: s["sessions"] for d, s in pools.items()}}


# ---- the served app -------------------------------------------------------------------------------


def serve_config(model: str, draft_model: str, redis_url: str, grpc_port: int, http_port: int, name: str = "specd",
                 route_prefix: str = "/", draft_pool: str = "draft_pool", verify_pool: str = "verify_pool",
                 max_tokens_limit: int = 256):
    """The app under test: every drafter remote (the tri-gram one alone on its replica), Redis-backed store."""
    from deploy.config import DeploymentOptions, ServeConfig

    return ServeConfig(
        name=name, route_prefix=route_prefix, model=model, draft_model=draft_model, default_method="aded",
        redis_url=redis_url, grpc_port=grpc_port, http_port=http_port, torch_threads=1,
        max_tokens_limit=max_tokens_limit,
        verifier=DeploymentOptions(num_cpus=0.2, resources={verify_pool: 1}),
        trigram_drafter=DeploymentOptions(num_cpus=0.1, max_ongoing_requests=64, resources={draft_pool: 1}),
        aux_drafter=DeploymentOptions(num_cpus=0.1, max_ongoing_requests=32, resources={draft_pool: 1}))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--draft-model", default="tiny-llama:1")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24, help="per load request (greedy ones checked against AR)")
    p.add_argument("--cancels", type=int, default=50)
    p.add_argument("--fuzz", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/faults.json"))
    return p.parse_args(argv)


def run_all(app: App, args) -> dict:
    """The five scenarios in order; each result is a dict of counts (see the module doc)."""
    out = {"load": load(app, args.requests, args.concurrency)}
    print("load done", file=sys.stderr, flush=True)
    out["drafter_kill"] = drafter_kill(app, args.concurrency, warm=args.concurrency)
    print("drafter kill done", file=sys.stderr, flush=True)
    out["redis_restart"] = redis_restart(app, args.concurrency, warm=args.concurrency)
    print("redis restart done", file=sys.stderr, flush=True)
    out["cancels"] = cancels(app, args.cancels)
    out["fuzz"] = fuzz_cases.fuzz(app, args.fuzz, args.seed, args.concurrency)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from deploy import local
    from redis_server import RedisServer

    redis = RedisServer().start()
    cfg = serve_config(args.model, args.draft_model, redis.url, free_port(), free_port())
    app = App(cfg.name, cfg.grpc_port, cfg.http_port, cfg.route_prefix, reference(args.model, args.max_tokens),
              args.max_tokens, cfg.max_tokens_limit, redis)
    local.prepare(cfg, lambda m: print(m, file=sys.stderr, flush=True))
    t = time.perf_counter()
    local.start(cfg)
    try:
        local.deploy(cfg)
        startup = time.perf_counter() - t
        results = run_all(app, args)
    finally:
        local.stop()
        redis.close()
    report = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "cpus": psutil.cpu_count()},
              "startup_seconds": round(startup, 1), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if not isinstance(vv, (list, dict))}
                      for k, v in results.items()}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
