"""The adaptive n-gram store is bounded: past max_rows the rows of least total weight go first."""

from __future__ import annotations

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
