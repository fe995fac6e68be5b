"""`specd serve` (a local Ray + Serve) and `specd generate --server HOST:PORT` (a gRPC client)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve over gRPC and OpenAI-compatible HTTP (local Ray Serve)")
    s.add_argument("--config", type=Path, help="ServeConfig YAML/JSON (flags below override it)")
    s.add_argument("--model", help="target model (default smollm2-135m)")
    s.add_argument("--draft-model", help="auxiliary draft model: enables sd/mtad/mmtad on the draft pool")
    s.add_argument("--method", dest="default_method", help="default method (default aded; ar until aded is built)")
    s.add_argument("--placement", dest="trigram_placement", choices=["remote", "colocated"],
                   help="tri-gram drafter on the draft pool (remote, default) or inside the verifier")
    s.add_argument("--aux-placement", choices=["remote", "colocated"],
                   help="auxiliary draft model on the draft pool (remote, default) or inside the verifier")
    s.add_argument("--redis-url", help="share the adaptive n-gram store through Redis (default: in memory)")
    s.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights and activations (default auto: bfloat16 on a GPU, float32 on a CPU)")
    s.add_argument("--max-batch", type=int, help="requests a verifier replica decodes together (default 16)")
    s.add_argument("--host", dest="http_host", help="HTTP bind address (default 127.0.0.1)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 9000)")
    s.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    s.add_argument("--num-cpus", type=float, default=2, help="CPUs Ray may use (default 2)")
    s.add_argument("--metrics-port", type=int, default=8080,
                   help="Prometheus endpoint of this node (ray_specd_* metrics; default 8080)")
    s.add_argument("--print-serve-config", action="store_true",
                   help="print the plain `serve run` / KubeRay serveConfigV2 YAML for this config and exit")
    s.add_argument("--demo", action="store_true", help="send one demo request once the server is up")
    from specd.aded_args import add_aded_arguments

    add_aded_arguments(s)
    s.set_defaults(func=cmd_serve)


def serve_config(args):
    from deploy.config import load_config

    fields = ("model", "draft_model", "default_method", "trigram_placement", "aux_placement", "redis_url", "http_host",
              "grpc_port", "http_port", "dtype", "max_batch")
    from specd.aded_args import serve_drafter_options

    return load_config(args.config, **{f: getattr(args, f) for f in fields}, **serve_drafter_options(args))


def cmd_serve(args) -> int:
    cfg = serve_config(args)
    if args.print_serve_config:
        import yaml

        from deploy.config import render_serve_config

        print(yaml.safe_dump(render_serve_config(cfg), sort_keys=False), end="")
        return 0
    from deploy import local

    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    say(f"preparing {cfg.model} (default method {cfg.default_method})…")
    local.prepare(cfg, say)
    say(local.describe(cfg, args.num_cpus))
    # SIGTERM (docker stop, kill) shuts down like Ctrl-C; set again after ray.init, which installs its own
    # handler (a native stack dump, no shutdown).
    on_term = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt())  # noqa: E731
    signal.signal(signal.SIGTERM, on_term)
    try:
        local.start(cfg, num_cpus=args.num_cpus, metrics_port=args.metrics_port)
        signal.signal(signal.SIGTERM, on_term)
        say("Ray is up; deploying: waiting until every replica has loaded its model…")
        local.deploy(cfg)
        grpc_addr = f"{cfg.http_host}:{cfg.grpc_port}"
        _announce_methods(cfg, grpc_addr)
        print(f"specd serving {cfg.model}: gRPC {grpc_addr} (specd.v1.Specd, grpc.health.v1), "
              f"HTTP http://{cfg.http_host}:{cfg.http_port} (/v1/completions, /v1/chat/completions, /health). "
              f"Metrics http://127.0.0.1:{args.metrics_port}/metrics. Ctrl-C to stop.", file=sys.stderr, flush=True)
        if args.demo:
            _demo(grpc_addr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down…", file=sys.stderr, flush=True)
    finally:
        # A second Ctrl-C (or the SIGTERM that follows it) must not cut the shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        local.stop()
    return 0


def _announce_methods(cfg, target: str) -> None:
    from specd.client import SpecdClient

    with SpecdClient(target, application=cfg.name) as c:
        m = c.models()
    note = "" if m.default_method == cfg.default_method else f" ({cfg.default_method} cannot run: see the replica logs)"
    print(f"methods: {', '.join(x.name for x in m.methods)}; default {m.default_method}{note}", file=sys.stderr,
          flush=True)


def _demo(target: str) -> None:
    from specd.client import SpecdClient

    with SpecdClient(target) as c:
        prompt = "Write a Python function that reverses a string."
        messages = [{"role": "user", "content": prompt}] if c.models().chat else None
        r = c.generate(None if messages else prompt, messages=messages, max_tokens=64)
        print(f"demo> {prompt}\n{r.text}\n[{r.stats.method}] {_summary(r.stats)}", file=sys.stderr, flush=True)


def generate_remote(args, prompts: list[str]) -> int:
    """`specd generate --server HOST:PORT`: the same output as the embedded engine, over gRPC."""
    import grpc

    from actors.drafter import DraftOptions
    from specd.client import SpecdClient

    draft_options = {name: getattr(args, name) for name in DraftOptions.model_fields}
    with SpecdClient(args.server) as c:
        try:
            chat = c.models().chat if args.chat is None else args.chat
            for prompt in prompts:
                kwargs = dict(max_tokens=args.max_new_tokens, method=args.method or "", temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                              max_draft_tokens=args.max_draft_tokens, **draft_options)
                if chat:
                    kwargs["messages"] = [{"role": "user", "content": prompt}]
                _one(c, None if chat else prompt, args, kwargs, prompt)
        except grpc.RpcError as e:
            raise ValueError(f"{args.server}: {e.code().name}: {e.details()}") from None
    return 0


def _one(c, prompt, args, kwargs, label: str) -> None:
    if args.stream and not args.json:
        chunks = []
        for chunk in c.stream(prompt, **kwargs):
            print(chunk.text, end="", flush=True)
            chunks.append(chunk)
        print(flush=True)
        text, ids = "".join(ch.text for ch in chunks), [t for ch in chunks for t in ch.token_ids]
        reason, stats = chunks[-1].finish_reason, chunks[-1].stats
    else:
        r = c.generate(prompt, **kwargs)
        text, ids, reason, stats = r.text, list(r.token_ids), r.finish_reason, r.stats
    from google.protobuf.json_format import MessageToDict

    from deploy.convert import FINISH_NAME

    if args.json:
        d = MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        print(json.dumps({"prompt": label, "text": text, "token_ids": ids, "finish_reason": FINISH_NAME[reason],
                          "stats": d}), flush=True)
        return
    if not args.stream:
        print(text, flush=True)
    print(f"[{stats.method}] {_summary(stats)}", file=sys.stderr, flush=True)


def _summary(s) -> str:
    tps = s.new_tokens / s.seconds if s.seconds else 0.0
    return (f"{s.new_tokens} tokens in {s.seconds:.2f} s: {tps:.1f} tok/s, {s.tokens_per_forward:.2f} tokens/forward, "
            f"{s.target_forwards} target forwards" + ("" if s.lossless else " (approximate method)"))
