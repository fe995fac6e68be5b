"""The deepspeed verifier backend: tensor parallelism (AutoTP, gloo, tp=2) against the single-process engine.

Every rank is a real process (actors.tp.launch_local spawns them with a free port); rank 0 runs the engine
and writes what it saw to a file, the others follow. deepspeed is a test dependency: without it these
tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from actors.aded.drafter import AdedConfig, AdedDrafter
from actors.aded.trigram import build_matrix
from actors.cost import CostModel
from actors.draft import Draft
from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.methods import make_drafter
from actors.models import load_model
from actors.sampling import SamplingParams
from actors.tp import TPGroupError, follow, launch_local
from shared_state import MemoryStore, StoreConfig
from specd_testing import TreeDrafter

TP2 = EngineConfig(backend="deepspeed", tp_size=2)
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=1.0, seed=5)
TINY_PROMPTS = [[72, 101, 108, 108, 111, 32], [48, 49, 50, 51, 52, 53, 54, 55], list(range(97, 117))]


def _spawn(fn, tp_size: int, tmp_path, *args, timeout_s: float = 60.0) -> dict:
    out = tmp_path / "rank0.pt"
    launch_local(fn, tp_size, str(out), *args, timeout_s=timeout_s)
    return torch.load(out, weights_only=False)


def _random_tree(rng: np.random.Generator, n: int, vocab: int) -> Draft:
    return Draft(rng.integers(0, vocab, n), [int(rng.integers(-1, i)) for i in range(n)])


def _logit_gap(tp: Engine, plain: Engine, prompt: list[int], vocab: int) -> float:
    """Max |logit difference| over a prefill, two tree verifies and a tree-path commit in between."""
    rng, gap = np.random.default_rng(0), 0.0
    seqs = [tp.verifier.start(prompt), plain.verifier.start(prompt)]
    for _ in range(3):
        draft = _random_tree(rng, 7, vocab)
        a, b = (e.verifier.verify([(s, draft)])[0] for e, s in zip((tp, plain), seqs))
        gap = max(gap, (a - b).abs().max().item())
        path = draft.path_to(6)  # a root-to-leaf path, usually not a chain prefix: exercises keep_path
        tokens = [int(draft.tokens[i]) for i in path] + [int(b[0].argmax())]
        for e, s in zip((tp, plain), seqs):
            e.verifier.commit(s, path, tokens)
    for e, s in zip((tp, plain), seqs):
        e.verifier.finish(s)
    return gap


def _decode_all(engine: Engine, drafters: dict) -> dict:
    return {name: [engine.run(p, params, make()).token_ids for p in TINY_PROMPTS]
            for name, (params, make) in drafters.items()}


def _tiny_drafters(plain: Engine, target) -> dict:
    """Every kind of tree a method produces: none (AR), chains with q (SD, sampled too), ADED, hidden-path trees."""
    matrix = build_matrix([np.array(plain.run(p, GREEDY, NoDrafter()).token_ids) for p in TINY_PROMPTS[::-1]],
                          259, progress=False)
    draft = load_model("tiny-llama:1")
    return {
        "ar": (GREEDY, NoDrafter),
        "sd": (GREEDY, lambda: make_drafter("sd", target, draft, gamma=3)),
        "sd_sampled": (SAMPLED, lambda: make_drafter("sd", target, draft, gamma=3)),
        "aded": (GREEDY, lambda: AdedDrafter(matrix, MemoryStore(StoreConfig(namespace="tiny")),
                                             AdedConfig(), CostModel.flat())),
        "tree": (GREEDY, lambda: TreeDrafter(259, seed=2)),
        "tree_sampled": (SAMPLED, lambda: TreeDrafter(259, seed=3)),
        "mtad": (SAMPLED, lambda: make_drafter("mtad", target, draft, gamma=3)),
    }


def _tiny_rank(rank: int, out: str) -> None:
    for family in ("llama", "qwen2"):
        target = load_model(f"tiny-{family}")
        if rank:
            follow(target.model, 2)
            continue
        tp, plain = Engine(target, TP2), Engine(load_model(f"tiny-{family}"))
        result = {f"{family}_gap": max(_logit_gap(tp, plain, p, 259) for p in TINY_PROMPTS)}
        if family == "llama":
            drafters = _tiny_drafters(plain, target)
            result["tp"] = _decode_all(tp, drafters)
            result["plain"] = _decode_all(plain, drafters)
        tp.close()
        prev = torch.load(out, weights_only=False) if os.path.exists(out) else {}
        torch.save(prev | result, out)


def test_tiny_tp2_matches_single_process(tmp_path):
    r = _spawn(_tiny_rank, 2, tmp_path)
    assert r["llama_gap"] < 1e-4 and r["qwen2_gap"] < 1e-4, r
    assert r["tp"] == r["plain"]  # greedy AR/SD/ADED and seeded sampled SD, trees and MTAD: token for token
    assert all(len(ids) == GREEDY.max_new_tokens for runs in r["tp"].values() for ids in runs)


def _tp1_rank(rank: int, out: str) -> None:
    target = load_model("tiny-llama")
    ds, plain = Engine(target, EngineConfig(backend="deepspeed", tp_size=1)), Engine(load_model("tiny-llama"))
    gap = max(_logit_gap(ds, plain, p, 259) for p in TINY_PROMPTS)
    runs = {name: [e.run(p, GREEDY, TreeDrafter(259, seed=1)).token_ids for p in TINY_PROMPTS] for name, e in
            (("ds", ds), ("plain", plain))}
    torch.save({"gap": gap, **runs}, out)


def test_deepspeed_backend_at_tp1_equals_plain(tmp_path):
    r = _spawn(_tp1_rank, 1, tmp_path)
    assert r["gap"] < 1e-5 and r["ds"] == r["plain"]


def _smollm2_rank(rank: int, out: str) -> None:
    # torch's own linears on both sides: oneDNN's (kernels="auto") moves logits by ~1e-4 by itself, and the
    # sharded layers (DeepSpeed's Linear subclasses) keep torch's kernels; this compares sharding alone.
    target = load_model("smollm2-135m", kernels="torch")
    if rank:
        follow(target.model, 2)
        return
    tp, plain = Engine(target, TP2), Engine(load_model("smollm2-135m", kernels="torch"))
    tok = target.tokenizer
    prompts = [tok(p)["input_ids"] for p in ("def fibonacci(n):", "The capital of France is")]
    gap = max(_logit_gap(tp, plain, p, target.model.config.vocab_size) for p in prompts)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    runs = {}
    for name, e in (("tp", tp), ("plain", plain)):
        aded = make_drafter("aded", target)
        runs[name] = [[e.run(p, params, d).token_ids for p in prompts] for d in (NoDrafter(), aded)]
    tp.close()
    torch.save({"gap": gap, **runs}, out)


@pytest.mark.smollm2
def test_smollm2_tp2_matches_single_process(tmp_path):
    r = _spawn(_smollm2_rank, 2, tmp_path)
    assert r["gap"] < 1e-4, r["gap"]
    assert r["tp"] == r["plain"]  # greedy AR and ADED


def _dying_rank(rank: int, out: str) -> None:
    target = load_model("tiny-llama")
    if rank:  # a follower that dies mid-generation, the way a crashed process does
        threading.Thread(target=follow, args=(target.model, 2), daemon=True).start()
        time.sleep(3)
        os._exit(0)
    engine, long = Engine(target, TP2), SamplingParams(max_new_tokens=2000, ignore_eos=True)
    t0, steps, error = time.monotonic(), 0, None
    try:
        for _ in engine.generate(TINY_PROMPTS[0], long, NoDrafter()):
            steps += 1
    except TPGroupError as e:
        error = repr(e)
    failed_after = time.monotonic() - t0
    t1 = time.monotonic()
    try:
        engine.run(TINY_PROMPTS[1], GREEDY, NoDrafter())
        again = None
    except TPGroupError as e:
        again = repr(e)
    torch.save({"error": error, "steps": steps, "failed_after": failed_after, "again": again,
                "again_s": time.monotonic() - t1}, out)


def test_dead_follower_fails_requests_without_hanging(tmp_path):
    r = _spawn(_dying_rank, 2, tmp_path, timeout_s=20)
    assert r["error"] is not None and 0 < r["steps"] < 2000, r
    # Bounded by the group's 20 s collective timeout; only a hang (no timeout at all) reaches 300 s.
    assert r["failed_after"] < 300, r
    assert r["again"] is not None and "is broken" in r["again"], r  # refused before any collective runs


def test_cli_generate_tp2_prints_what_one_process_prints():
    cmd = [sys.executable, "-m", "specd.cli", "generate", "--model", "tiny-llama", "--no-chat", "--json",
           "--max-new-tokens", "16", "--method", "sd", "--draft-model", "tiny-llama:1", "hello", "0123"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run(cmd + ["--tp", "2"], capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    rows = [[json.loads(line) for line in r.stdout.splitlines()] for r in (one, two)]  # stdout: JSON only
    assert len(rows[0]) == 2 and [x["token_ids"] for x in rows[0]] == [x["token_ids"] for x in rows[1]]


@pytest.fixture(scope="module")
def served_tp2(tmp_path_factory):
    """`specd serve` with tp_size 2 from its config file: its own Ray (the serving tests' cluster may be up)."""
    import psutil
    import yaml

    from actors.process import free_port

    grpc_port = free_port()
    config = tmp_path_factory.mktemp("tp") / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": "tiny-llama", "default_method": "ar", "trigram_placement": "colocated", "trigram_methods": [],
        "tp_size": 2, "tp_timeout_s": 20, "torch_threads": 1, "grpc_port": grpc_port, "http_port": free_port(),
        "verifier": {"num_cpus": 0.2, "resources": {"verify_pool": 1}},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "specd.cli", "serve", "--config", str(config),
                             "--metrics-port", str(free_port())], stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "specd serving" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines[-40:])
        yield f"127.0.0.1:{grpc_port}", psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _followers(serve: "psutil.Process") -> list:  # noqa: F821
    return [p for p in serve.children(recursive=True) if "TPFollower" in " ".join(p.cmdline())]


def test_served_tp2_gives_the_embedded_tokens(served_tp2):
    from specd.client import SpecdClient

    addr, serve = served_tp2
    assert len(_followers(serve)) == 1  # rank 1 of the replica's group, in its placement group
    target = load_model("tiny-llama")
    plain = Engine(target)
    with SpecdClient(addr, timeout=120) as c:
        for prompt in ("hello world", "the quick brown fox"):
            want = plain.run(target.tokenizer(prompt)["input_ids"], GREEDY, NoDrafter()).token_ids
            assert list(c.generate(prompt, max_tokens=24, ignore_eos=True).token_ids) == want
            assert [t for ch in c.stream(prompt, max_tokens=24, ignore_eos=True) for t in ch.token_ids] == want


def test_served_dead_follower_fails_the_stream_and_serve_replaces_the_group(served_tp2):
    import grpc

    from specd.client import SpecdClient

    addr, serve = served_tp2
    with SpecdClient(addr, timeout=120) as c:
        stream = c.stream("hello", max_tokens=2000, ignore_eos=True)
        next(stream)
        (follower,) = _followers(serve)
        follower.kill()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 30  # failed by the broken collective, not hung
        deadline, ok = time.monotonic() + 120, None
        while time.monotonic() < deadline and ok is None:  # health check fails -> Serve rebuilds the group
            try:
                ok = c.generate("hello", max_tokens=8, ignore_eos=True)
            except grpc.RpcError:
                time.sleep(2)
        assert ok is not None and len(ok.token_ids) == 8
        assert len(_followers(serve)) == 1 and _followers(serve)[0].pid != follower.pid


def test_serve_config_packs_one_bundle_per_rank():
    from ray.serve.schema import ServeDeploySchema

    from deploy.config import DeploymentOptions, ServeConfig, render_serve_config

    cfg = ServeConfig(tp_size=2, verifier=DeploymentOptions(num_cpus=0.5, num_gpus=1, num_replicas=3,
                                                            resources={"verify_pool": 1}))
    opts = cfg.serve_options("Verifier")
    assert opts["placement_group_bundles"] == [{"CPU": 0.5, "GPU": 1, "verify_pool": 1}] * 2
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert cfg.pool_sizes()["verify_pool"] == 6  # 3 replicas x 2 ranks
    assert cfg.engine_config().backend == "deepspeed" and cfg.engine_config().tp_size == 2
    ServeDeploySchema.model_validate(render_serve_config(cfg))
    assert "placement_group_bundles" not in ServeConfig().serve_options("Verifier")
    with pytest.raises(ValueError):
        EngineConfig(tp_size=2)  # the plain backend cannot shard
