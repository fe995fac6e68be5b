"""Random and mutated requests for benchmarks/faults.py (gRPC payloads and HTTP bodies as raw bytes), and the
fuzz run that sends them to a served app.

Every case is ``(kind, payload)``: ``("grpc", bytes)`` goes to ``/specd.v1.Specd/Generate`` or
``GenerateStream`` with no client-side serialization (so bytes that are not protobuf, or strings that
are not UTF-8, reach the server); ``("http", (path, bytes, content_type))`` is POSTed as is. The cases
come from a seeded generator, so a run is reproducible from its seed. Generation stays small: the
max_tokens of a case that may be accepted is capped (``max_tokens``), so a case costs a few steps.
"""

from __future__ import annotations

import json
import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import requests

from specd_api.v1 import specd_pb2 as pb

METHODS = ("ar", "aded", "sd", "mtad", "mmtad", "", "nope", "AR", "aded\x00")
HUGE_INTS = (0, -1, 1, 2**31 - 1, -(2**31), 2**31, 2**63 - 1, -(2**63), 2**63, 2**64, 10**30)
ODD_FLOATS = (0.0, -0.0, -1.0, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"), 0.5, 2.0)
TEXTS = ("hello", "", " ", "\x00", "é" * 50, "🙂" * 20, "a" * 5000, "\ufffd", "<|endoftext|>", "\n" * 100)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers: two's complement, ten bytes, as protobuf writes int64
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, body: bytes) -> bytes:
    return _varint(number << 3 | wire) + body


def _len_field(number: int, body: bytes) -> bytes:
    return _field(number, 2, _varint(len(body)) + body)


def valid_request(rng: random.Random, max_tokens: int) -> pb.GenerateRequest:
    """A request the server should serve (or refuse for a reason it names)."""
    req = pb.GenerateRequest(method=rng.choice(("ar", "aded", "sd", "mtad")), max_tokens=rng.randint(1, max_tokens))
    kind = rng.random()
    if kind < 0.6:
        req.prompt = rng.choice(("hello world", "the quick brown fox", "0123456789", "def f(x):"))
    elif kind < 0.8:
        req.prompt_ids.ids.extend(rng.randrange(0, 259) for _ in range(rng.randint(1, 12)))
    else:
        req.chat.messages.add(role="user", content="hi there")
    if rng.random() < 0.5:
        req.sampling.temperature = rng.choice((0.0, 0.7, 1.0))
        req.sampling.seed = rng.randrange(0, 2**31)
    return req


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.3 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.5 and b:
            del b[rng.randrange(len(b)):]  # truncated
        elif op < 0.7:
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.85:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif b:
            at = rng.randrange(len(b))
            b[at:at] = b[at : at + rng.randint(1, 8)]  # duplicated span
    return bytes(b)


def _raw_grpc(rng: random.Random, max_tokens: int) -> bytes:
    """Wire-level requests that no protobuf library would write: bad UTF-8, huge varints, lying lengths."""
    choice = rng.randrange(9)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))  # noise
    if choice == 1:  # a string field (prompt, method, model or request_id) that is not UTF-8
        return _len_field(rng.choice((1, 2, 5, 9)), rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80")))
    if choice == 2:  # max_tokens as a huge or negative varint
        return _len_field(2, b"hi") + _field(6, 0, _varint(rng.choice(HUGE_INTS)))
    if choice == 3:  # a length prefix longer than the message
        return _field(2, 2, _varint(rng.choice((10, 2**31, 2**60)))) + b"short"
    if choice == 4:  # sampling.seed (int64) and top_k (int32) at the extremes
        sampling = _field(4, 0, _varint(rng.choice(HUGE_INTS))) + _field(3, 0, _varint(rng.choice(HUGE_INTS)))
        return _len_field(2, b"hi") + _field(6, 0, _varint(4)) + _len_field(7, sampling)
    if choice == 5:  # temperature / top_p as raw doubles (nan, inf, denormals)
        sampling = _field(1, 1, struct.pack("<d", rng.choice(ODD_FLOATS)))
        sampling += _field(2, 1, struct.pack("<d", rng.choice(ODD_FLOATS)))
        return _len_field(2, b"hi") + _field(6, 0, _varint(4)) + _len_field(7, sampling)
    if choice == 6:  # prompt_ids outside the vocabulary and at int64's ends
        ids = b"".join(_field(1, 0, _varint(rng.choice(HUGE_INTS))) for _ in range(rng.randint(1, 5)))
        return _len_field(4, ids) + _field(6, 0, _varint(4))
    if choice == 7:  # a wire type that does not match the field, or an unknown group
        return _field(rng.choice((2, 6, 7)), rng.choice((1, 3, 4, 5, 6, 7)), bytes(rng.randrange(256) for _ in range(8)))
    return _mutate_bytes(rng, valid_request(rng, max_tokens).SerializeToString())


def _bad_fields(rng: random.Random, max_tokens: int) -> bytes:
    """Valid protobuf, bad values: what validation must refuse with a message."""
    req = valid_request(rng, max_tokens)
    choice = rng.randrange(8)
    if choice == 0:
        req.max_tokens = rng.choice((0, -1, -(2**31), 2**31 - 1))
    elif choice == 1:
        req.sampling.seed = rng.choice((-1, -(2**63), 2**63 - 1))
    elif choice == 2:
        req.sampling.temperature = rng.choice(ODD_FLOATS)
        req.sampling.top_p = rng.choice(ODD_FLOATS)
    elif choice == 3:
        many = rng.random() < 0.5  # many short stop strings, or a few of any length (messages stay < 1 MB)
        req.sampling.stop.extend(rng.choice(("ab", "\x00", "é")) if many else rng.choice(TEXTS)
                                 for _ in range(rng.choice((1000, 50_000)) if many else rng.randint(1, 20)))
    elif choice == 4:
        req.request_id = rng.choice(("x" * 100_000, "\x00", "é" * 1000, ""))
    elif choice == 5:
        req.drafting.gamma = rng.choice(HUGE_INTS[:5])  # int32 fields
        req.drafting.beam_width = rng.choice(HUGE_INTS[:5])
        req.drafting.tau = rng.choice(ODD_FLOATS)
    elif choice == 6:
        req.method = rng.choice(METHODS)
        req.model = rng.choice(("", "tiny-llama", "gpt-5", "\x00" * 10))
    else:
        req.ClearField("input")
        req.chat.messages.add(role=rng.choice(("user", "wizard", "", "system")), content=rng.choice(TEXTS))
    return req.SerializeToString()


def _http_body(rng: random.Random, max_tokens: int) -> tuple[str, bytes, str]:
    chat = rng.random() < 0.4
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hello world"}
    body |= {"max_tokens": rng.randint(1, max_tokens), "temperature": 0, "method": rng.choice(("ar", "aded", "sd"))}
    choice = rng.randrange(10)
    if choice == 0:
        return path, bytes(rng.randrange(256) for _ in range(rng.randint(0, 100))), "application/json"  # not JSON
    if choice == 1:
        return path, b'{"prompt": "\xff\xfe", "max_tokens": 4}', "application/json"  # not UTF-8
    if choice == 2:  # wrong types
        key = rng.choice(("prompt", "messages", "max_tokens", "temperature", "stop", "seed", "stream", "method", "n"))
        body[key] = rng.choice((None, [], {}, [1, [2]], "x", 3.5, True, {"a": 1}, [None]))
    elif choice == 3:  # huge or negative numbers
        key = rng.choice(("max_tokens", "seed", "top_k", "max_draft_tokens", "gamma", "beam_width", "n"))
        body[key] = rng.choice(HUGE_INTS)
    elif choice == 4:  # odd floats (json.dumps writes NaN / Infinity, which Python's parser accepts)
        body[rng.choice(("temperature", "top_p", "tau"))] = rng.choice(ODD_FLOATS)
    elif choice == 5:  # token ids outside the vocabulary
        body.pop("messages", None)
        path, body["prompt"] = "/v1/completions", [rng.choice(HUGE_INTS) for _ in range(rng.randint(1, 4))]
    elif choice == 6:  # chat roles and shapes
        path = "/v1/chat/completions"
        body.pop("prompt", None)
        body["messages"] = rng.choice(([{"role": "wizard", "content": "x"}], [], [{"content": "x"}],
                                       [{"role": "user", "content": 5}], [{"role": "user", "content": "x", "z": 1}]))
    elif choice == 7:  # stop lists and strings
        many = rng.random() < 0.5
        body["stop"] = [rng.choice(("ab", "é")) if many else rng.choice(TEXTS)
                        for _ in range(rng.choice((1000, 50_000)) if many else rng.randint(1, 20))]
    elif choice == 8:  # unknown fields, deep nesting
        body[rng.choice(("foo", "logprobs", "best_of"))] = json.loads("[" * 50 + "]" * 50)
    else:
        raw = json.dumps(body).encode()
        return path, _mutate_bytes(rng, raw), rng.choice(("application/json", "text/plain"))
    return path, json.dumps(body).encode(), "application/json"


def cases_for(n: int, seed: int, max_tokens: int) -> list[tuple[str, object]]:
    """``n`` cases, about half gRPC (raw wire bytes, mutated and bad-valued messages) and half HTTP."""
    rng = random.Random(seed)
    out: list[tuple[str, object]] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            out.append(("grpc", _raw_grpc(rng, max_tokens)))
        elif r < 0.5:
            out.append(("grpc", _bad_fields(rng, max_tokens)))
        else:
            out.append(("http", _http_body(rng, max_tokens)))
    return out


# ---- fuzz -----------------------------------------------------------------------------------------

GRPC_OK = {grpc.StatusCode.OK.name, grpc.StatusCode.INVALID_ARGUMENT.name}


def app_rss(app) -> dict[str, int]:
    """RSS (bytes) of this cluster's replica processes of the app and its Serve proxies, by deployment.

    Pids come from this cluster's actor table (other Ray clusters on the machine are not counted)."""
    from ray._private.state import actors

    out: dict[str, int] = {}
    for info in actors(actor_state_name="ALIVE").values():
        name = info["Name"] or ""
        if f"::{app.name}#" in name:
            key = name.split("#")[1]  # SERVE_REPLICA::<app>#<deployment>#<id>
        elif name.startswith("SERVE_PROXY_ACTOR"):
            key = "proxy"
        else:
            continue
        try:
            out[key] = out.get(key, 0) + psutil.Process(info["Pid"]).memory_info().rss
        except psutil.Error:
            continue  # gone between the table read and now
    return out


def fuzz_one(app, channel: grpc.Channel, case: tuple[str, object], i: int) -> dict:
    kind, payload = case
    if kind == "grpc":
        path = "/specd.v1.Specd/" + ("Generate" if i % 2 else "GenerateStream")
        meta = (("application", app.name),)
        try:
            if i % 2:
                channel.unary_unary(path)(payload, metadata=meta, timeout=300)
            else:
                list(channel.unary_stream(path)(payload, metadata=meta, timeout=300))
            code, detail = grpc.StatusCode.OK.name, ""
        except grpc.RpcError as e:
            code, detail = e.code().name, e.details() or ""
        ok = code in GRPC_OK and "Traceback" not in detail and (code == "OK" or bool(detail))
    else:
        path, body, ctype = payload
        try:
            resp = app.http.post(app.base + path, data=body, headers={"content-type": ctype}, timeout=300)
            code, detail = str(resp.status_code), resp.text[:300]
        except requests.RequestException as e:
            code, detail = type(e).__name__, str(e)[:300]
        ok = code in ("200", "400") and "Traceback" not in detail
    return {"i": i, "kind": kind, "code": code, "ok": ok, "detail": detail[:600],
            "case": repr(payload)[:300]}


def fuzz(app, n: int, seed: int, concurrency: int) -> dict:
    """``n`` cases in two halves: RSS before, between and after, so growth that goes on (a leak) can be told from
    a first use's high-water mark (allocator arenas, proxy buffers sized by the largest message)."""
    cases = list(enumerate(cases_for(n, seed, max_tokens=4)))
    probe = next(iter(app.reference))  # a greedy request after the run must still equal AR
    rss = [app_rss(app)]
    t, rows = time.perf_counter(), []
    with grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel, ThreadPoolExecutor(concurrency) as pool:
        for half in (cases[: n // 2], cases[n // 2 :]):
            rows += pool.map(lambda ic: fuzz_one(app, channel, ic[1], ic[0]), half)
            rss.append(app_rss(app))
    seconds = time.perf_counter() - t
    with app.client(timeout=60) as c:
        health = c.health()
        after = c.generate(probe, max_tokens=app.max_tokens, ignore_eos=True, method="aded", temperature=0)
    http_health = app.http.get(f"{app.base}/health", timeout=60).status_code
    codes: dict[str, int] = {}
    bad: dict[str, int] = {}  # the distinct bad answers (kind, code, start of the message), with counts
    examples: dict[str, dict] = {}  # one case of each, to reproduce it
    for r in rows:
        codes[f"{r['kind']}:{r['code']}"] = codes.get(f"{r['kind']}:{r['code']}", 0) + 1
        if not r["ok"]:
            key = f"{r['kind']}:{r['code']}: {r['detail'][:90]}"
            bad[key] = bad.get(key, 0) + 1
            examples.setdefault(key, {k: r[k] for k in ("i", "detail", "case")})
    return {"cases": n, "seed": seed, "seconds": round(seconds, 1), "bad_answers": sum(not r["ok"] for r in rows),
            "codes": codes, "bad_answers_by_kind": bad, "bad_examples": examples,
            "health_after": health, "http_health_after": http_health,
            "greedy_request_after_equals_ar": list(after.token_ids) == app.reference[probe][0],
            "rss_before": rss[0], "rss_after": rss[2],
            "rss_growth_first_half_bytes": {k: rss[1].get(k, 0) - v for k, v in rss[0].items()},
            "rss_growth_second_half_bytes": {k: rss[2].get(k, 0) - v for k, v in rss[1].items()}}
