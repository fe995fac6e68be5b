"""Redis-backed store: every replica learns from what all replicas' targets wrote.

The hot path (``add``, ``successors``) touches only a local view, as ``MemoryStore`` does. A daemon
thread sends the buffered deltas in batches through one Lua script (capped increments and top-K pruning
happen server-side, atomically, so concurrent replicas lose no counts and stay bounded) and pulls back
the rows of the contexts this replica recently read. The local view of a pulled context is then
``server row + deltas not yet flushed``: the server is the source of truth.

Key layout (a namespace's keys share the hash tag ``{ns}``, so one script call stays in one Cluster slot;
``ns`` is the percent-encoded ``StoreConfig.namespace``):

    specd:ngram:v1:{ns}:meta      hash  schema=1, namespace, cap, top_k (written once, checked on connect)
    specd:ngram:v1:{ns}:c:<a>:<b> hash  <c> -> weight (decimal), "_t" -> server time the weights are as of
    specd:ngram:v1:{ns}:rows      zset  row key -> log2(row's total weight) + _t / half_life_s

The ``rows`` index bounds the server too: the flush script updates a row's score in the same atomic call
that folds its deltas, and once the index holds more than ``max_rows`` + 10% it pops the lowest scores and
deletes their rows (ZPOPMIN + DEL), so concurrent replicas can never push it past that. The score orders
rows by their weight *now* (decay is a common factor ``2 ** (-now / half_life_s)``), without a scan. A row
gone another way (TTL, ``maxmemory``) leaves a ghost entry; each call checks a few random entries and
drops those whose row is gone. The smallest ``max_rows`` among the writers is the one that holds.

Only decimal ids and numbers are stored, and both scripts parse what they find strictly: a foreign
field, a non-numeric or non-finite value, or a key of another type is ignored and counted (our own
successor fields holding garbage are rewritten by the next flush), never fatal, never unpickled. The pull
script returns packed doubles, so the client parses one buffer per round trip, not a reply per field.

Decay is lazy, per row, in server time: weights halve every ``half_life_s``. The flush script brings a
row's weights to "now" before adding (when at least 1% of a half-life has passed, so the error is
< 0.7%) and stamps ``_t``; a reader scales what it pulls by ``0.5 ** ((TIME - _t) / half_life_s)``, so
rows nobody writes any more still read as decayed, and idle rows expire after ``key_ttl_s``. No scan.

Delivery is at-least-once: a batch whose reply is lost (timeout after the script ran) is sent again.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import OrderedDict
from typing import Iterable
from urllib.parse import quote

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared_state.base import Increment, NGramStore, StoreConfig, evict_weakest
from shared_state.memory import fold
from shared_state.redis_lua import FLUSH_LUA, PULL_LUA

log = logging.getLogger(__name__)

SCHEMA = 1
Context = tuple[int, int]


class RedisOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    flush_interval_s: float = Field(0.2, gt=0, description="Period of sending buffered deltas.")
    refresh_interval_s: float = Field(1.0, gt=0, description="Period of pulling rows of recently read contexts.")
    retry_interval_s: float = Field(1.0, gt=0, description="Period of reconnect attempts during an outage.")
    half_life_s: float | None = Field(6 * 3600.0, gt=0, description="Weights halve every this many seconds; None: no decay.")
    min_weight: float = Field(1e-3, ge=0, description="Weights decayed below this are deleted.")
    key_ttl_s: int | None = Field(7 * 86400, gt=0, description="A context row untouched this long expires; None: never.")
    max_pending: int = Field(200_000, ge=1, description="Buffered tri-gram deltas kept in an outage; oldest contexts dropped beyond.")
    max_tracked: int = Field(4096, ge=1, description="Recently read contexts whose rows each refresh pulls.")
    batch_size: int = Field(256, ge=1, description="Tri-gram deltas per script call: bounds one call's time in Redis and in this process.")
    pull_chunk: int = Field(128, ge=1, description="Rows per pull script call: bounds one call's time in Redis and in this process.")
    socket_timeout_s: float = Field(0.5, gt=0, description="Connect and read timeout; only the background thread waits on it.")
    close_timeout_s: float = Field(2.0, ge=0, description="How long close() waits for the final flush.")


def key_prefix(namespace: str) -> str:
    return f"specd:ngram:v{SCHEMA}:{{{quote(namespace, safe='')}}}:"


def unpack_rows(reply: bytes, n_keys: int, config: StoreConfig, options: RedisOptions) -> tuple[list, int]:
    """Decode a ``PULL_LUA`` reply: per key a row decayed to the server's time (None: a key of another
    type), and the number of rejected fields. A reply of the wrong shape raises ValueError."""
    vals = np.frombuffer(reply, dtype="<f8").tolist()
    now, p, rejected, rows = vals[0], 1, 0, []
    half_life, cap, top_k = options.half_life_s, config.cap, config.top_k
    vocab = config.vocab_size or float("inf")
    for _ in range(n_keys):
        n, stamp, bad = vals[p:p + 3]
        n, p = int(n), p + 3
        if n < 0:
            rows.append(None)
            continue
        rejected += int(bad)
        factor = 0.5 ** ((now - stamp) / half_life) if half_life and 0 <= stamp < now else 1.0
        pairs = list(zip(vals[p:p + 2 * n:2], vals[p + 1:p + 2 * n:2]))
        valid = [(c, w) for c, w in pairs if 0 <= c < vocab and c == int(c)]  # ids this tokenizer has
        rejected += len(pairs) - len(valid)
        row = {int(c): min(w, cap) * factor for c, w in valid if w * factor >= options.min_weight and w > 0}
        p += 2 * n
        if len(row) > top_k:  # written by something else than this schema's flush
            row = dict(sorted(row.items(), key=lambda cw: -cw[1])[:top_k])
        rows.append(row)
    if p != len(vals):
        raise ValueError(f"malformed pull reply: {len(vals)} numbers, expected {p}")
    return rows, rejected


class RedisStore(NGramStore):
    """``RedisStore(config, "redis://:pw@host:6379/0", flush_interval_s=0.05)``; see ``RedisOptions``."""

    def __init__(self, config: StoreConfig, url: str, *, options: RedisOptions | None = None, **overrides) -> None:
        super().__init__(config)
        self.options = o = RedisOptions(**{**(options.model_dump() if options else {}), **overrides})
        self._client = redis.Redis.from_url(
            url, socket_timeout=o.socket_timeout_s, socket_connect_timeout=o.socket_timeout_s,
            retry=Retry(NoBackoff(), 0), client_name="specd-ngram")
        kw = self._client.connection_pool.connection_kwargs
        self.where = f"{url.split(':', 1)[0]}://{kw.get('host', kw.get('path'))}:{kw.get('port', '')}/{kw.get('db', 0)}"
        self._prefix = key_prefix(config.namespace)
        self._flush_script = self._client.register_script(FLUSH_LUA)
        self._pull_script = self._client.register_script(PULL_LUA)
        # Contexts packed as a << 32 | b (token ids < 2**32): ints, which the cyclic GC never tracks.
        self._pending: OrderedDict[int, dict[int, float]] = OrderedDict()  # summed deltas, oldest first
        self._n_pending = 0
        self._reads: dict[int, None] = {}  # packed contexts read since the thread last swapped it out
        self._tracked: OrderedDict[int, None] = OrderedDict()  # background thread only; most recent last
        self._counts = dict.fromkeys(
            ("flushed_increments", "failed_flushes", "pulls", "pulled_rows", "outages", "rejected_fields",
             "rejected_keys", "dropped_increments", "evicted_rows", "server_evicted_rows"), 0)
        self._healthy = False
        self._outage_since: float | None = None
        self._started = self._done = 0
        self._cycle = threading.Condition()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"redis-store:{config.namespace}", daemon=True)
        self._thread.start()

    # Hot path: no I/O.

    def add(self, increments: Iterable[Increment]) -> None:
        cap, top_k = self.config.cap, self.config.top_k
        with self._lock:  # also guards _pending
            table, pending, touched = self._table, self._pending, set()
            for a, b, c, delta in increments:
                a, b, c, delta = int(a), int(b), int(c), float(delta)
                row = dict(table.get((a, b), ()))
                fold(row, c, delta, cap, top_k)
                if row:
                    table[(a, b)] = row
                else:
                    table.pop((a, b), None)
                touched.add((a, b))
                packed = a << 32 | b
                buf = pending.get(packed)
                if buf is None:
                    buf = pending[packed] = {}
                if c not in buf:
                    self._n_pending += 1
                buf[c] = buf.get(c, 0.0) + delta
            self._drop_overflow()
            # The local view; the server's rows are bounded by the flush script (the rows index).
            dropped = evict_weakest(table, self.config.max_rows)
            self._counts["evicted_rows"] += len(dropped)
            self._changed(touched.union(dropped))

    def successors(self, a: int, b: int) -> dict[int, float]:
        self._reads[int(a) << 32 | int(b)] = None  # int(): a numpy int32 would overflow the shift
        return self._table.get((a, b), _EMPTY)

    def mark_read(self, a: np.ndarray, b: np.ndarray) -> None:
        self._reads.update(dict.fromkeys(((a.astype(np.int64) << 32) | b).tolist()))

    def __len__(self) -> int:
        return len(self._table)

    def stats(self) -> dict[str, int | bool]:
        return {**self._counts, "connected": self._healthy, "pending_increments": self._n_pending,
                "contexts": len(self._table), "tracked_contexts": len(self._tracked)}

    def refresh(self, timeout: float = 5.0) -> bool:
        """Run one flush + pull cycle now and wait for it; True if it reached Redis. For tests and tools."""
        with self._cycle:
            target = self._started + 1
            self._wake.set()
            self._cycle.wait_for(lambda: self._done >= target or self._closed, timeout)
            return self._done >= target and self._healthy

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(self.options.close_timeout_s)
        if self._thread.is_alive():
            log.warning("Redis store %s: close timed out; %d buffered increments not flushed",
                        self.where, self._n_pending)
        else:
            self._client.close()

    # Background thread.

    def _run(self) -> None:
        next_pull = 0.0
        while not self._stop.is_set():
            with self._cycle:  # atomically with refresh(): a requested cycle always pulls
                forced = self._wake.is_set()
                self._wake.clear()
                self._started += 1
            pull = forced or time.monotonic() >= next_pull
            if self._sync(pull) and pull:
                next_pull = time.monotonic() + self.options.refresh_interval_s
            with self._cycle:
                self._done += 1
                self._cycle.notify_all()
            self._wake.wait(self.options.flush_interval_s if self._healthy else self.options.retry_interval_s)
        self._sync(pull=False)
        with self._cycle:
            self._cycle.notify_all()

    def _sync(self, pull: bool) -> bool:
        self._track_reads()
        try:
            if not self._healthy:
                self._client.ping()
                self._check_meta()
            self._flush()
            if pull:
                self._pull()
        except Exception as exc:  # noqa: BLE001 - any failure: keep drafting on local statistics
            if self._n_pending:
                self._counts["failed_flushes"] += 1
            if self._healthy or self._outage_since is None:
                self._counts["outages"] += 1
                self._outage_since = time.monotonic()
                log.warning("Redis store %s unavailable (%s: %s); drafting continues on local statistics, "
                            "retrying every %.1fs", self.where, type(exc).__name__, exc, self.options.retry_interval_s)
            self._healthy = False
            return False
        if not self._healthy:
            if self._outage_since is not None and self._counts["outages"]:
                log.info("Redis store %s reconnected after %.1fs; flushing resumed (%d increments dropped so far)",
                         self.where, time.monotonic() - self._outage_since, self._counts["dropped_increments"])
            self._healthy, self._outage_since = True, None
        return True

    def _check_meta(self) -> None:
        meta = self._prefix + "meta"
        try:
            pipe = self._client.pipeline(transaction=False)
            for field, value in (("schema", SCHEMA), ("namespace", self.config.namespace),
                                 ("cap", self.config.cap), ("top_k", self.config.top_k)):
                pipe.hsetnx(meta, field, value)
            pipe.hgetall(meta)
            found = pipe.execute()[-1]
        except redis.ResponseError:  # WRONGTYPE: foreign data under our meta key
            found = None
        if found is None or found.get(b"schema") != str(SCHEMA).encode():
            self._counts["rejected_keys"] += 1
            log.warning("Redis store %s: %s holds foreign data; ignoring it", self.where, meta)
        elif found.get(b"cap") != str(self.config.cap).encode() or found.get(b"top_k") != str(self.config.top_k).encode():
            log.warning("Redis store %s: namespace %r was created with cap=%s top_k=%s, this replica uses %s/%s",
                        self.where, self.config.namespace, found.get(b"cap"), found.get(b"top_k"),
                        self.config.cap, self.config.top_k)

    def _flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            batch, self._pending, self._n_pending = self._pending, OrderedDict(), 0
        items = list(batch.items())
        o = self.options
        head = [self.config.cap, self.config.top_k, o.half_life_s or 0, o.min_weight, o.key_ttl_s or 0,
                self.config.max_rows or 0, self._prefix + "c:"]
        sent = 0
        try:
            while sent < len(items):
                keys, args, n = [self._prefix + "rows"], list(head), 0
                for packed, deltas in items[sent:]:
                    if n and n + len(deltas) > o.batch_size:
                        break
                    keys.append(f"{self._prefix}c:{packed >> 32}:{packed & 0xFFFFFFFF}")
                    flat = [x for cd in deltas.items() for x in cd]
                    args.append(struct.pack(f"<{len(flat)}d", *flat))
                    n += len(deltas)
                applied, bad_keys, bad_fields, evicted = self._flush_script(keys=keys, args=args)
                sent += len(keys) - 1
                self._counts["server_evicted_rows"] += int(evicted)
                self._counts["flushed_increments"] += int(applied)
                self._counts["rejected_keys"] += int(bad_keys)
                self._counts["rejected_fields"] += int(bad_fields)
                _yield_gil()
        except BaseException:
            self._requeue(items[sent:])
            raise

    def _requeue(self, items: list[tuple[int, dict[int, float]]]) -> None:
        """Put unsent deltas back in front of what arrived meanwhile (an error path: O(pending))."""
        with self._lock:
            merged = OrderedDict((key, dict(deltas)) for key, deltas in items)
            for key, deltas in self._pending.items():
                buf = merged.setdefault(key, {})
                for c, d in deltas.items():
                    buf[c] = buf.get(c, 0.0) + d
            self._pending = merged
            self._n_pending = sum(map(len, merged.values()))
            self._drop_overflow()

    def _drop_overflow(self) -> None:
        while self._n_pending > self.options.max_pending and self._pending:
            _, deltas = self._pending.popitem(last=False)
            self._n_pending -= len(deltas)
            self._counts["dropped_increments"] += len(deltas)

    def _track_reads(self) -> None:
        reads, self._reads = self._reads, {}  # a read racing the swap is marked again next time
        tracked = self._tracked
        for i, key in enumerate(reads):
            tracked[key] = None
            tracked.move_to_end(key)
            if i % 4096 == 4095:
                _yield_gil()
        while len(tracked) > self.options.max_tracked:
            tracked.popitem(last=False)

    def _pull(self) -> None:
        contexts = list(self._tracked)
        chunk_size = self.options.pull_chunk
        for i in range(0, len(contexts), chunk_size):
            chunk = contexts[i:i + chunk_size]
            reply = self._pull_script(keys=[f"{self._prefix}c:{k >> 32}:{k & 0xFFFFFFFF}" for k in chunk])
            rows, rejected = unpack_rows(reply, len(chunk), self.config, self.options)
            self._counts["rejected_fields"] += rejected
            self._counts["rejected_keys"] += rows.count(None)
            for packed, row in zip(chunk, rows):
                if row is None:
                    continue
                key = (packed >> 32, packed & 0xFFFFFFFF)
                with self._lock:  # per row: a descheduled holder must not stall add() for long
                    for c, d in self._pending.get(packed, {}).items():
                        fold(row, c, d, self.config.cap, self.config.top_k)
                    if row:
                        self._table[key] = row
                    else:
                        self._table.pop(key, None)
                    self._changed((key,))
            self._counts["pulls"] += 1
            self._counts["pulled_rows"] += len(chunk)
            _yield_gil()


def _yield_gil() -> None:
    """Sleep briefly between units of background work: a thread that only releases the GIL for I/O can
    keep a decode thread waiting a whole switch interval (5 ms)."""
    time.sleep(0.0002)


_EMPTY: dict[int, float] = {}
