"""Faults, load and fuzz against a served app (issue 14, item 10): benchmarks/faults.py's scenarios, smaller.

The app (benchmarks.faults.serve_config): tiny-llama, tiny-llama:1 as the draft model, every drafter remote,
the n-gram store in a real redis-server. Counts are small and every wait is bounded only against something
really stuck; nothing here is timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import faults  # noqa: E402
import fuzz_cases  # noqa: E402
from redis_server import RedisServer  # noqa: E402

CONCURRENCY = 8


@pytest.fixture(scope="module")
def app(serve_node):
    from ray import serve

    from deploy import local

    redis = RedisServer().start()
    cfg = faults.serve_config("tiny-llama", "tiny-llama:1", redis.url, serve_node.grpc_port, serve_node.http_port,
                              name="faults", route_prefix="/faults", draft_pool="faults_draft_pool",
                              verify_pool="faults_verify_pool", max_tokens_limit=256)
    local.prepare(cfg, print)  # the tri-gram matrix, built once per cache
    local.deploy(cfg)
    try:
        yield faults.App(cfg.name, cfg.grpc_port, cfg.http_port, cfg.route_prefix,
                         faults.reference("tiny-llama", 16), 16, cfg.max_tokens_limit, redis)
    finally:
        serve.delete(cfg.name)
        redis.close()


def test_load_over_grpc_and_http_mixed_methods(app):
    r = faults.load(app, 40, CONCURRENCY)
    assert r["errors"] == 0, r["failures"]
    assert r["greedy_equal_ar"] == r["greedy_requests"] >= 24
    assert all(r["by_method"][m] >= 8 for m in faults.METHODS) and r["by_protocol"] == {"grpc": 20, "http": 20}


def test_killed_trigram_drafter_costs_plain_steps_not_requests(app):
    r = faults.drafter_kill(app, CONCURRENCY, warm=CONCURRENCY)
    assert r["errors"] == 0, r["failures"]
    assert r["greedy_equal_ar"] == r["greedy_requests"] > 0
    assert r["in_flight_at_kill"] > 0 and r["link"]["failures"] >= 1  # steps failed, the requests went on
    assert r["drafted_after_recovery"] > 0  # then the replacement drafted


def test_redis_killed_and_restarted_under_load(app):
    r = faults.redis_restart(app, CONCURRENCY, warm=CONCURRENCY)
    assert r["errors"] == 0, r["failures"]
    assert r["requests_while_down"] >= CONCURRENCY and r["keys_before_kill"] > 0
    assert r["keys_after_restart"] > 0  # the empty restarted server is filled again: counts resume


def test_cancelled_streams_leave_nothing_behind(app):
    r = faults.cancels(app, 10)
    assert r["read_two_chunks"] == 10
    assert r["live_requests"] == r["engine_requests"] == r["kv_slots"] == 0
    assert r["drafter_sessions"] == {"TrigramDrafter": 0, "AuxDrafter": 0}


def test_fuzz_answers_ok_or_invalid_argument_and_the_server_stays_up(app):
    r = fuzz_cases.fuzz(app, 200, seed=14, concurrency=CONCURRENCY)
    assert sum(n for k, n in r["codes"].items() if k.startswith("grpc")) > 60
    assert r["health_after"] == "SERVING" and r["http_health_after"] == 200
    assert r["greedy_request_after_equals_ar"]
    # Memory stays bounded: the second hundred cases (the first ones' high-water mark reached) grow no
    # replica or proxy by more than a few buffers.
    growth = r["rss_growth_second_half_bytes"]
    assert growth and all(g < 64 << 20 for g in growth.values()), (r["rss_growth_first_half_bytes"], growth)
    assert r["bad_answers"] == 0, "\n".join(f"{n} x {k}\n    e.g. {r['bad_examples'][k]}"
                                           for k, n in r["bad_answers_by_kind"].items())
