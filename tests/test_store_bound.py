"""The adaptive n-gram store is bounded: past max_rows the rows of least total weight go first."""

from __future__ import annotations

import time

import numpy as np

from redis_server import RedisServer
from shared_state import MemoryStore, RedisStore, StoreConfig

FAST = {"flush_interval_s": 0.02, "refresh_interval_s": 0.05, "retry_interval_s": 0.05, "half_life_s": None}


def _random_prompt_increments(rng, n_tokens: int, vocab: int = 49_152):
    t = rng.integers(0, vocab, n_tokens).tolist()
    return [(t[i], t[i + 1], t[i + 2], 0.04) for i in range(n_tokens - 2)]


def test_memory_store_stays_under_its_cap_and_keeps_the_strong_rows():
    store = MemoryStore(StoreConfig(namespace="t", max_rows=1000))
    store.add([(1, 2, 3, 1.0)] * 3)  # a row that proved useful: weight 3.0
    rng = np.random.default_rng(0)
    for _ in range(50):  # 50 random 500-token prompts: ~25k one-off rows of weight 0.04
        store.add(_random_prompt_increments(rng, 500))
        assert len(store) <= 1100
    assert store.successors(1, 2) == {3: 3.0}
    assert store.evicted > 20_000


def test_unbounded_when_asked():
    store = MemoryStore(StoreConfig(namespace="t", max_rows=None))
    store.add(_random_prompt_increments(np.random.default_rng(1), 5000))
    assert len(store) > 4900


def test_redis_store_local_view_is_bounded():
    with RedisServer() as srv:
        store = RedisStore(StoreConfig(namespace="t", max_rows=500), srv.url, **FAST)
        rng = np.random.default_rng(2)
        for _ in range(10):
            store.add(_random_prompt_increments(rng, 500))
            assert len(store) <= 550
        assert store.stats()["evicted_rows"] > 4000
        store.close()


def test_store_prompts_false_keeps_prompts_out_of_the_store():
    from actors.models import load_tokenizer
    from actors.sampling import SamplingParams
    from deploy.config import ServeConfig
    from deploy.drafters import build_drafters

    target = load_tokenizer("tiny-llama")
    prompt = list(range(40, 140))
    for share, expect_rows in ((True, True), (False, False)):
        drafter = build_drafters(ServeConfig(model="tiny-llama", store_prompts=share), ("aded",), target, None)["aded"]
        drafter.start("r", prompt, SamplingParams())
        assert (len(drafter.store) > 0) == expect_rows


def _server_rows(srv: RedisServer, namespace: str) -> set[bytes]:
    with srv.client() as c:
        return set(c.scan_iter(match=f"specd:ngram:v1:{{{namespace}}}:c:*", count=1000))


def test_redis_server_rows_are_bounded_with_two_writers():
    """Two replicas writing at once: the server never holds more than max_rows + 10% rows, the heavy ones stay."""
    with RedisServer() as srv:
        config = StoreConfig(namespace="t", max_rows=500)
        a, b = (RedisStore(config, srv.url, **FAST) for _ in range(2))
        a.add([(1, 2, 3, 1.0)] * 3)  # heavy rows (3.0), one learned by each replica
        b.add([(4, 5, 6, 1.0)] * 3)
        rng, contexts = np.random.default_rng(3), {(1, 2), (4, 5)}
        for _ in range(10):  # ~10k one-off rows of weight 0.04, both replicas flushing concurrently
            for store in (a, b):
                increments = _random_prompt_increments(rng, 500)
                contexts.update((x, y) for x, y, _, _ in increments)
                store.add(increments)
            assert len(_server_rows(srv, "t")) <= 550
        assert a.refresh() and b.refresh()
        rows = _server_rows(srv, "t")
        assert 500 <= len(rows) <= 550
        assert {b"specd:ngram:v1:{t}:c:1:2", b"specd:ngram:v1:{t}:c:4:5"} <= rows
        with srv.client() as c:
            assert c.zcard("specd:ngram:v1:{t}:rows") <= 550
        evicted = a.stats()["server_evicted_rows"] + b.stats()["server_evicted_rows"]
        assert evicted + len(rows) == len(contexts) > 9000  # every row written was either kept or evicted
        a.close(), b.close()


def test_redis_server_evicts_by_decayed_weight():
    """A row heavy long ago weighs less now than a fresh light one: it is the one evicted."""
    with RedisServer() as srv:
        store = RedisStore(StoreConfig(namespace="t", max_rows=10), srv.url, **{**FAST, "half_life_s": 1.0})
        store.add([(1, 2, 3, 1.0)] * 3)  # 3.0 now, at most 3.0 / 2**3 once 3 half-lives have passed
        assert store.refresh()
        time.sleep(3.0)  # a slower machine only sleeps longer: the row decays further
        store.add([(10 + i, 0, 1, 0.5) for i in range(12)])
        assert store.refresh()
        rows = _server_rows(srv, "t")
        assert len(rows) == 10 and b"specd:ngram:v1:{t}:c:1:2" not in rows
        assert store.stats()["server_evicted_rows"] == 3
        store.close()


def test_redis_rows_index_drops_ghosts_and_foreign_members():
    """Rows gone by TTL or maxmemory, and members that are not our row keys, leave the index; nothing else is
    deleted through it."""
    with RedisServer() as srv:
        store = RedisStore(StoreConfig(namespace="t", max_rows=1000), srv.url, **FAST)
        store.add([(1, 2, 3, 1.0)])
        assert store.refresh()
        index = "specd:ngram:v1:{t}:rows"
        with srv.client() as c:
            c.delete("specd:ngram:v1:{t}:c:1:2")  # as an expiry would
            c.set("specd:other", "kept")
            c.zadd(index, {"specd:other": -100.0})
        store.add([(4, 5, 6, 1.0)])
        assert store.refresh()
        with srv.client() as c:
            assert c.zrange(index, 0, -1) == [b"specd:ngram:v1:{t}:c:4:5"]
            assert c.get("specd:other") == b"kept"
        store.close()
