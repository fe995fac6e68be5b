"""The small commands: ``specd profile``, ``specd ngrams build``, ``specd models list|fetch``, ``specd k8s render``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from actors.models import DEFAULT_MODEL
from specd.common import UsageError, int_list


def add_profile_parser(sub) -> None:
    pr = sub.add_parser("profile", help="measure verify-forward latency over batch rows x tokens per row x context")
    pr.add_argument("--model", default=DEFAULT_MODEL)
    pr.add_argument("--out", type=Path, help="JSON output (default: the model's profile in the specd cache)")
    pr.add_argument("--repeats", type=int, default=5)
    pr.add_argument("--context-lengths", type=int_list, default=None, help="e.g. 64,256,512")
    pr.add_argument("--k", type=int_list, default=None, help="tokens per row, e.g. 1,2,4,8,16,32,64")
    pr.add_argument("--batch", type=int_list, default=None, help="rows per forward, e.g. 1,2,4,8,16")
    pr.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto: the curve is keyed by it")
    pr.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="as served (auto: bfloat16 on CUDA, float32 on the CPU): the curve is keyed by it")
    pr.set_defaults(func=cmd_profile)


def add_ngrams_parser(sub) -> None:
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


def add_models_parser(sub) -> None:
    m = sub.add_parser("models", help="list or fetch models")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="known model names and whether they are cached").set_defaults(func=cmd_models_list)
    f = msub.add_parser("fetch", help="download and convert a model into the cache")
    f.add_argument("name")
    f.set_defaults(func=cmd_models_fetch)


def add_k8s_parser(sub) -> None:
    k = sub.add_parser("k8s", help="Kubernetes (KubeRay RayService) manifests")
    ksub = k.add_subparsers(dest="k8s_command", required=True)
    kr = ksub.add_parser("render", help="render k8s/overlays/*/rayservice.yaml and k8s/rendered/*.yaml")
    kr.add_argument("--overlay", action="append", choices=["dev", "prod"], help="overlay (repeatable; default all)")
    kr.set_defaults(func=cmd_k8s_render)


def cmd_profile(args) -> int:
    from actors.models import load_model
    from actors.profile import DEFAULT_BATCH, DEFAULT_CONTEXTS, DEFAULT_K, measure_verify_cost, profile_path

    target = load_model(args.model, device=args.device, dtype=args.dtype)
    result = measure_verify_cost(
        target, args.k or DEFAULT_K, args.context_lengths or DEFAULT_CONTEXTS, args.batch or DEFAULT_BATCH,
        repeats=args.repeats, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    out = args.out or profile_path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


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
    from actors.model_cache import REGISTRY, list_models

    for name, cached in list_models().items():
        print(f"{name:20s} {'cached' if cached else 'not cached':11s} {REGISTRY[name].description}")
    return 0


def cmd_models_fetch(args) -> int:
    from actors.model_cache import fetch_model

    path = fetch_model(args.name)
    print(f"{args.name}: cached at {path}")
    return 0


def cmd_k8s_render(args) -> int:
    from deploy.k8s import OVERLAYS, render

    for path in render(overlays=tuple(args.overlay or OVERLAYS)):
        print(f"wrote {path}")
    return 0
