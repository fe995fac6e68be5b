"""The ``specd`` command line. Errors are one-line messages (exit 2), never tracebacks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from actors.models import DEFAULT_MODEL
from specd.aded_args import add_aded_arguments, aded_options_from_args, reject_remote
from specd.serve_cmd import add_serve_parser, generate_remote



class UsageError(Exception):
    """A problem with what the user asked for: reported as a message."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
        return _fail(f"invalid parameters: {errors}")
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"specd: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specd", description="Speculative decoding: generate, profile, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with the embedded engine")
    g.add_argument("prompts", nargs="*", help="prompt texts (or use --prompts-file)")
    g.add_argument("--prompts-file", type=Path, help="JSONL with a 'prompt' field per line, or plain text lines")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"target model name or path (default {DEFAULT_MODEL})")
    g.add_argument("--draft-model", help="auxiliary draft model for sd/mtad/mmtad (same tokenizer)")
    g.add_argument("--server", metavar="HOST:PORT", help="generate on a running `specd serve` over gRPC")
    g.add_argument("--method", default=None,
                   help="ar | sd | aded | mtad | mmtad (default ar; with --server the server's default); mtad/mmtad are APPROXIMATE: lower perplexity, "
                        "not the target's exact distribution (their stats say lossless: false)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--gamma", type=int, default=None, help="draft length for sd/mtad/mmtad (default 4)")
    g.add_argument("--beam-width", type=int, default=None, help="mtad/mmtad: beams per draft depth (default 4)")
    g.add_argument("--tau", type=float, default=None,
                   help="mtad/mmtad: accept the longest prefix with joint p/q > tau (default 0.5; larger accepts less)")
    g.add_argument("--max-draft-tokens", type=int, default=64, help="cap on draft nodes verified per step")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], or auto (a GPU when there is one)")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="shard the target over N local processes (DeepSpeed AutoTP; gloo on CPU: a correctness "
                        "check, slower than one process)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: on when the model has one)")
    g.add_argument("--stream", action="store_true", help="print text as it is accepted")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt (text, token_ids, stats)")
    add_aded_arguments(g)
    g.set_defaults(func=cmd_generate)

    add_serve_parser(sub)

    pr = sub.add_parser("profile", help="measure verify-forward latency for k = 1..64 tokens")
    pr.add_argument("--model", default=DEFAULT_MODEL)
    pr.add_argument("--out", type=Path, help="JSON output (default: the model's profile in the specd cache)")
    pr.add_argument("--repeats", type=int, default=5)
    pr.add_argument("--context-lengths", type=_int_list, default=None, help="e.g. 64,256,512")
    pr.add_argument("--k", type=_int_list, default=None, help="e.g. 1,2,4,8,16,32,64")
    pr.set_defaults(func=cmd_profile)

    b = sub.add_parser("bench", help="benchmark methods side by side (JSON, markdown, PNG)")
    b.add_argument("--suite", default="all", choices=["all", "mtbench", "humaneval", "mtad", "search"],
                   help="mtbench / humaneval / all: ADED vs AR vs HF; mtad: MTAD vs SD on the Qwen pair; "
                        "search: ADED's best-first vs MCTS (both values), engine and simulator")
    b.add_argument("--model", default=None, help="target (default: smollm2-135m; qwen2.5-coder-1.5b for mtad)")
    b.add_argument("--draft-model", default=None, help="auxiliary model (mtad suite; default qwen2.5-coder-0.5b)")
    b.add_argument("--methods", default=None, help="comma-separated subset of the suite's methods")
    b.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    b.add_argument("--offset", type=int, default=0, help="skip the first N prompts of each set")
    b.add_argument("--max-new-tokens", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--temperature", type=float, action="append", default=None,
                   help="mtad suite: sampling temperature, repeatable (default 1.0)")
    b.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    add_aded_arguments(b)
    b.set_defaults(func=cmd_bench)

    n = sub.add_parser("ngrams", help="tri-gram matrices for ADED")
    nsub = n.add_subparsers(dest="ngrams_command", required=True)
    nb = nsub.add_parser("build", help="build a tri-gram matrix from a corpus (default: the seed corpus)")
    nb.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer to count with")
    nb.add_argument("--source", action="append", type=Path, default=[],
                    help="text file, JSONL (text or prompt/response fields) or directory (repeatable)")
    nb.add_argument("--out", type=Path, help="output .safetensors (default: the model's default matrix)")
    nb.add_argument("--no-stdlib", action="store_true", help="leave Python's standard library out")
    nb.add_argument("--generate", action="store_true",
                    help="add the target's own answers to generic prompts (slow on a CPU; cached)")
    nb.add_argument("--top-k", type=int, default=12, help="successors kept per bigram")
    nb.set_defaults(func=cmd_ngrams_build)

    m = sub.add_parser("models", help="list or fetch models")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="known model names and whether they are cached").set_defaults(func=cmd_models_list)
    f = msub.add_parser("fetch", help="download and convert a model into the cache")
    f.add_argument("name")
    f.set_defaults(func=cmd_models_fetch)

    k = sub.add_parser("k8s", help="Kubernetes (KubeRay RayService) manifests")
    ksub = k.add_subparsers(dest="k8s_command", required=True)
    kr = ksub.add_parser("render", help="render k8s/overlays/*/rayservice.yaml and k8s/rendered/*.yaml")
    kr.add_argument("--overlay", action="append", choices=["dev", "prod"], help="overlay (repeatable; default all)")
    kr.set_defaults(func=cmd_k8s_render)
    return p


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError("expected increasing positive integers")
    return values


def read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += load_prompts_file(args.prompts_file)
    if not prompts:
        raise UsageError("no prompt given: pass prompt text or --prompts-file")
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt")
    return prompts


def load_prompts_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"prompts file not found: {path}")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not (path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))):
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise UsageError(f"{path}:{n}: expected an object with a string 'prompt' field")
        prompts.append(obj["prompt"])
    return prompts


def cmd_generate(args) -> int:
    from actors.engine import EngineConfig
    from actors.methods import METHODS
    from actors.sampling import SamplingParams

    if args.server:
        reject_remote(args)
        return generate_remote(args, read_prompts(args))
    args.method = args.method or "ar"
    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    if args.tp < 1:
        raise UsageError("--tp must be >= 1")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
    )
    prompts = read_prompts(args)
    config = EngineConfig(max_draft_tokens=args.max_draft_tokens, backend="deepspeed" if args.tp > 1 else "plain",
                          tp_size=args.tp)
    if args.tp == 1:
        return _generate(args, prompts, params, config)
    from torch.multiprocessing import ProcessRaisedException

    from actors.tp import launch_local

    try:
        launch_local(_generate_rank, args.tp, args, prompts, params, config)
    except ProcessRaisedException as e:
        raise RuntimeError(f"tensor-parallel rank failed: {str(e).strip().splitlines()[-1]}") from None
    return 0


def _generate_rank(rank: int, args, prompts: list[str], params, config) -> None:
    """One rank of `specd generate --tp N`: rank 0 generates and prints, the others follow."""
    from actors.models import load_model
    from actors.tp import follow

    if rank:
        follow(load_model(args.model).model, args.tp)
        return
    _generate(args, prompts, params, config)


def _generate(args, prompts: list[str], params, config) -> int:
    from actors.engine import Engine
    from actors.drafter import with_options
    from actors.methods import METHODS, make_drafter
    from actors.models import load_model

    device = args.device if args.tp == 1 else "cpu"  # DeepSpeed moves each rank's shard itself
    target = load_model(args.model, device=device)
    engine = Engine(target, config)  # with tp > 1: collective, the follower ranks shard alongside
    try:
        draft = load_model(args.draft_model, device=device) if args.draft_model else None
        try:
            drafter = with_options(make_drafter(args.method, target, draft, **aded_options_from_args(args, args.method)), gamma=args.gamma,
                                   beam_width=args.beam_width, tau=args.tau)
        except ValueError as e:
            raise UsageError(f"--method {args.method}: {e}") from None
        chat = target.is_chat if args.chat is None else args.chat
        if chat and not target.is_chat:
            raise UsageError(f"{target.name} has no chat template; use --no-chat")
        for prompt in prompts:
            ids = encode_prompt(target.tokenizer, prompt, chat)
            result = _run_one(engine, ids, params, drafter, stream=args.stream and not args.json)
            stats = result.stats.as_dict() | {"method": args.method, "lossless": METHODS[args.method][0]}
            if args.json:
                print(json.dumps({"prompt": prompt, "text": result.text, "token_ids": result.token_ids,
                                  "finish_reason": result.finish_reason, "stats": stats}), flush=True)
            else:
                if not args.stream:
                    print(result.text, flush=True)
                print(_summary(stats), file=sys.stderr, flush=True)
    finally:
        engine.close()
    return 0


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _run_one(engine, ids, params, drafter, stream: bool):
    if not stream:
        return engine.run(ids, params, drafter)
    from actors.engine import Generation

    tokens, text, reason, stats = [], [], "length", None
    for out in engine.generate(ids, params, drafter):
        print(out.text, end="", flush=True)
        tokens += out.token_ids
        text.append(out.text)
        reason, stats = out.finish_reason or reason, out.stats
    print(flush=True)
    return Generation(tokens, "".join(text), reason, stats)


def _summary(s: dict) -> str:
    return (f"[{s['method']}] {s['new_tokens']} tokens in {s['seconds']:.2f} s: {s['tokens_per_second']:.1f} tok/s, "
            f"{s['tokens_per_forward']:.2f} tokens/forward, {s['target_forwards']} target forwards"
            + ("" if s["lossless"] else " (approximate method: not the target's exact distribution)"))


def cmd_profile(args) -> int:
    from actors.models import load_model
    from actors.profile import DEFAULT_CONTEXTS, DEFAULT_K, measure_verify_cost, profile_path

    target = load_model(args.model)
    result = measure_verify_cost(
        target, args.k or DEFAULT_K, args.context_lengths or DEFAULT_CONTEXTS, repeats=args.repeats,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    out = args.out or profile_path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.suite == "mtad":
        from specd.bench_mtad import cmd_bench_mtad

        return cmd_bench_mtad(args)
    if args.suite == "search":
        from specd.bench_search import cmd_bench_search

        return cmd_bench_search(args)
    from specd.bench_aded import cmd_bench_aded

    return cmd_bench_aded(args)


def cmd_ngrams_build(args) -> int:
    from actors.aded.corpus import build_default_matrix, default_matrix_path, hf_chat_generate_fn
    from actors.models import load_model

    for src in args.source:
        if not src.exists():
            raise UsageError(f"corpus source not found: {src}")
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    target = load_model(args.model)
    out = args.out or default_matrix_path(target.identity)
    generate = hf_chat_generate_fn(target.model, target.tokenizer) if args.generate else None
    matrix = build_default_matrix(target.tokenizer, target.identity, args.source, out,
                                  include_stdlib=not args.no_stdlib, generate_fn=generate, top_k=args.top_k)
    print(f"wrote {out} ({matrix.num_pairs} bigram contexts)", file=sys.stderr)
    return 0


def cmd_models_list(args) -> int:
    from actors.models import REGISTRY, list_models

    for name, cached in list_models().items():
        print(f"{name:20s} {'cached' if cached else 'not cached':11s} {REGISTRY[name].description}")
    return 0


def cmd_models_fetch(args) -> int:
    from actors.models import fetch_model

    path = fetch_model(args.name)
    print(f"{args.name}: cached at {path}")
    return 0


def cmd_k8s_render(args) -> int:
    from deploy.k8s import OVERLAYS, render

    for path in render(overlays=tuple(args.overlay or OVERLAYS)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
