"""``specd bench --suite mtbench|humaneval|all``: ADED against AR and Hugging Face prompt lookup.

Methods, all greedy, same max new tokens, interleaved per prompt in one process:
- ``ar``: the specd engine with an empty draft (the baseline every speedup is relative to);
- ``aded-cold``: a fresh ADED drafter per prompt (seed matrix only, nothing learned);
- ``aded-online``: one ADED drafter for the whole run, prompts in order, so each prompt is measured
  with only what earlier prompts taught it (as a long-running server would be);
- ``hf`` / ``hf-lookup``: transformers ``generate`` plain and with ``prompt_lookup_num_tokens=10``.
"""

from __future__ import annotations

import json
import sys

from actors.drafter import NoDrafter
from actors.engine import Engine
from actors.kernels import kernels_of
from actors.models import load_model
from actors.sampling import SamplingParams
from specd.bench import EngineMethod, HFMethod, markdown_table, run_bench, write_outputs
from specd.prompts import SUITES

ALL_METHODS = ("ar", "aded-cold", "aded-online", "hf", "hf-lookup")


def cmd_bench_aded(args) -> int:
    from actors.aded import make_aded_drafter
    from actors.methods import aded_config
    from specd.aded_args import aded_options_from_args
    from specd.cli import UsageError, encode_prompt

    names = args.methods.split(",") if args.methods else list(ALL_METHODS)
    if unknown := set(names) - set(ALL_METHODS):
        raise UsageError(f"unknown bench methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    if "ar" not in names:
        names.insert(0, "ar")
    target = load_model(args.model or "smollm2-135m")
    engine = Engine(target)
    aded = aded_config(aded_options_from_args(args))  # --aded-search etc.
    online = make_aded_drafter(target, config=aded) if "aded-online" in names else None
    factories = {
        "ar": lambda: EngineMethod("ar", engine, NoDrafter()),
        "aded-cold": lambda: EngineMethod("aded-cold", engine, fresh_drafter=lambda: make_aded_drafter(target, config=aded)),
        "aded-online": lambda: EngineMethod("aded-online", engine, online),
        "hf": lambda: HFMethod("hf", target),
        "hf-lookup": lambda: HFMethod("hf-lookup", target, prompt_lookup_num_tokens=10),
    }
    methods = [factories[n]() for n in names]
    suites = ["mtbench", "humaneval"] if args.suite == "all" else [args.suite]
    end = None if args.limit is None else args.offset + args.limit
    prompts = {s: SUITES[s]()[args.offset:end] for s in suites}
    params = SamplingParams(max_new_tokens=args.max_new_tokens or 128, seed=args.seed)
    encode = lambda text: encode_prompt(target.tokenizer, text, chat=True)  # noqa: E731
    result = run_bench(prompts, methods, encode, params, checkpoint=args.out / "partial.json",
                       no_warmup=frozenset({"aded-online"}))  # it must meet the first prompt knowing nothing
    result["config"] = {"model": target.name, "methods": names, "suites": suites, "offset": args.offset,
                        "limit": args.limit, "max_new_tokens": params.max_new_tokens, "greedy": True,
                        "kernels": kernels_of(target.model), "aded": aded.model_dump(mode="json"),
                        "command": " ".join(sys.argv)}
    write_outputs(result, args.out, baseline="ar")
    print(markdown_table(result["summary"], "ar"))
    print(json.dumps({"out": str(args.out)}), file=sys.stderr)
    return 0
