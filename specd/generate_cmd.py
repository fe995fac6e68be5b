"""``specd generate``: the embedded engine (or, with ``--server``, a running ``specd serve`` over gRPC).

The flags come in groups, one function each (prompts, sampling, drafting, device, output): a new group is
one more ``_add_*_flags`` function called from :func:`add_generate_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from actors.drafter import DraftOptions
from actors.models import DEFAULT_MODEL
from specd.aded_args import add_aded_arguments, aded_options_from_args, reject_remote
from specd.common import UsageError
from specd.serve_cmd import generate_remote


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text with the embedded engine")
    for add in (_add_prompt_flags, _add_sampling_flags, _add_drafting_flags, add_aded_arguments, _add_device_flags,
                _add_output_flags):
        add(g)
    g.set_defaults(func=cmd_generate)


def _add_prompt_flags(g) -> None:
    g.add_argument("prompts", nargs="*", help="prompt texts (or use --prompts-file)")
    g.add_argument("--prompts-file", type=Path, help="JSONL with a 'prompt' field per line, or plain text lines")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"target model name or path (default {DEFAULT_MODEL})")
    g.add_argument("--server", metavar="HOST:PORT", help="generate on a running `specd serve` over gRPC")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: on when the model has one)")


def _add_sampling_flags(g) -> None:
    s = g.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_drafting_flags(g) -> None:
    d = g.add_argument_group("drafting")
    d.add_argument("--method", default=None,
                   help="ar | sd | aded | mtad | mmtad (default ar; with --server the server's default); mtad/mmtad "
                        "are APPROXIMATE: lower perplexity, not the target's exact distribution (their stats say "
                        "lossless: false)")
    d.add_argument("--draft-model", help="auxiliary draft model for sd/mtad/mmtad (same tokenizer)")
    for name, field in DraftOptions.model_fields.items():  # --gamma, --beam-width, --tau
        kind = next(t for t in typing.get_args(field.annotation) if t is not type(None))
        d.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=field.description)
    d.add_argument("--max-draft-tokens", type=int, default=64, help="cap on draft nodes verified per step")


def _add_device_flags(g) -> None:
    d = g.add_argument_group("device")
    d.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], or auto (a GPU when there is one)")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on the CPU)")
    d.add_argument("--tp", type=int, default=1, metavar="N",
                   help="shard the target over N local processes (DeepSpeed AutoTP; gloo on CPU: a correctness "
                        "check, slower than one process)")


def _add_output_flags(g) -> None:
    o = g.add_argument_group("output")
    o.add_argument("--stream", action="store_true", help="print text as it is accepted")
    o.add_argument("--json", action="store_true", help="one JSON object per prompt (text, token_ids, stats)")
    o.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="decode up to N prompts together in one batch (results print in prompt order)")
    o.add_argument("--no-batch-invariance", dest="batch_invariant", action="store_false",
                   help="one attention call over the batch instead of one per row length: faster with "
                        "--concurrency, but a greedy near-tie may then flip with the batch's make-up")


def draft_options(args) -> dict:
    """The per-request drafting options the flags set (None = the drafter's default)."""
    return {name: getattr(args, name) for name in DraftOptions.model_fields}


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
    from actors.engine_config import EngineConfig
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
    if args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if not args.batch_invariant and args.tp > 1:
        raise UsageError("--no-batch-invariance is for one process (--tp 1)")
    if args.concurrency > 1 and args.stream:
        raise UsageError("--stream prints one prompt at a time; use --json or plain output with --concurrency")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
    )
    prompts = read_prompts(args)
    config = EngineConfig(max_draft_tokens=args.max_draft_tokens, backend="deepspeed" if args.tp > 1 else "plain",
                          tp_size=args.tp, max_batch=max(args.concurrency, 1), batch_invariant=args.batch_invariant)
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
    from actors.drafter import with_options
    from actors.engine import Engine
    from actors.process import freeze_gc_heap
    from actors.methods import METHODS, make_drafter
    from actors.models import load_model

    device = args.device if args.tp == 1 else "cpu"  # DeepSpeed moves each rank's shard itself
    target = load_model(args.model, device=device, dtype=args.dtype)
    engine = Engine(target, config)  # with tp > 1: collective, the follower ranks shard alongside
    try:
        draft = load_model(args.draft_model, device=device, dtype=args.dtype) if args.draft_model else None
        try:
            aded = aded_options_from_args(args, args.method)  # --aded-search etc.
            drafter = with_options(make_drafter(args.method, target, draft, **aded), **draft_options(args))
        except ValueError as e:
            raise UsageError(f"--method {args.method}: {e}") from None
        freeze_gc_heap()  # the drafter's tables too
        chat = target.is_chat if args.chat is None else args.chat
        if chat and not target.is_chat:
            raise UsageError(f"{target.name} has no chat template; use --no-chat")
        ids = [target.encode(prompt, chat) for prompt in prompts]
        if args.concurrency > 1:
            results = engine.run_many(ids, params, drafter, concurrency=args.concurrency)
        else:
            results = (_run_one(engine, i, params, drafter, stream=args.stream and not args.json) for i in ids)
        for prompt, result in zip(prompts, results):
            if isinstance(result, BaseException):
                raise RuntimeError(f"prompt {prompt[:40]!r}: {result}")
            stats = result.stats.as_dict() | {"method": args.method, "lossless": METHODS[args.method].lossless}
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


def _run_one(engine, ids, params, drafter, stream: bool):
    if not stream:
        return engine.run(ids, params, drafter)
    from actors.stats import Generation

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
