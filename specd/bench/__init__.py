"""``specd bench``: benchmark suites, one module each, sharing one harness (:mod:`specd.bench.harness`).

A suite is a module with ``run(args) -> int`` named in :data:`SUITES`; adding one is a module and one
line here (``--suite`` takes its choices from the table). Suite modules load torch and models, so they
are imported only when their suite runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from specd.aded_args import add_aded_arguments
from specd.common import UsageError, int_list


@dataclass(frozen=True)
class Suite:
    module: str  # a module of this package with ``run(args) -> int``
    help: str


SUITES: dict[str, Suite] = {
    "all": Suite("specd.bench.aded", "mtbench and humaneval"),
    "mtbench": Suite("specd.bench.aded", "ADED vs AR vs HF on MT-Bench"),
    "humaneval": Suite("specd.bench.aded", "ADED vs AR vs HF on HumanEval"),
    "mtad": Suite("specd.bench.mtad", "MTAD vs SD on the Qwen pair"),
    "search": Suite("specd.bench.search", "ADED's best-first vs MCTS (both values), engine and simulator"),
    "batching": Suite("specd.bench.batching", "ar and aded at --concurrency levels, embedded and served"),
}


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark methods side by side (JSON, markdown, PNG)")
    b.add_argument("--suite", default="all", choices=list(SUITES),
                   help="; ".join(f"{name}: {s.help}" for name, s in SUITES.items()))
    b.add_argument("--model", default=None, help="target (default: smollm2-135m; qwen2.5-coder-1.5b for mtad)")
    b.add_argument("--draft-model", default=None, help="auxiliary model (mtad suite; default qwen2.5-coder-0.5b)")
    b.add_argument("--methods", default=None, help="comma-separated subset of the suite's methods")
    b.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    b.add_argument("--offset", type=int, default=0, help="skip the first N prompts of each set")
    b.add_argument("--max-new-tokens", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--temperature", type=float, action="append", default=None,
                   help="mtad suite: sampling temperature, repeatable (default 1.0)")
    b.add_argument("--concurrency", type=int_list, default=None,
                   help="batching suite: concurrent requests per level (default 1,2,4,8,16)")
    b.add_argument("--served-concurrency", type=_levels_or_none, default=None,
                   help="batching suite: levels also measured through specd serve (default 1,8,16; 'none')")
    b.add_argument("--repeats", type=int, default=None,
                   help="batching suite: embedded runs per level, methods alternating; the median is reported")
    b.add_argument("--served-torch-threads", type=int, default=None,
                   help="batching suite: the served verifier's torch threads (default: ServeConfig's, every CPU)")
    b.add_argument("--no-memory", action="store_true", help="batching suite: skip the 16 x 1k-token memory run")
    b.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    add_aded_arguments(b)
    b.set_defaults(func=cmd_bench)


def _levels_or_none(text: str) -> list[int]:
    return [] if text == "none" else int_list(text)


def cmd_bench(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    return importlib.import_module(SUITES[args.suite].module).run(args)
