"""``specd bench --suite search``: ADED's n-gram searches side by side, in the engine and in the simulator.

Searches (``SEARCHES``): best-first, and MCTS with each backed-up value (``rollout``, the authors' form;
``path``, the expected accepted length). Everything else of ADED is the same, and so are the prompts
(MT-Bench and HumanEval, ``--limit`` / ``--offset``). ``--aded-simulations`` / ``--aded-depth`` set the
MCTS variants' simulations and depth.

1. **Engine** (greedy, this CPU): ar and one online drafter per search, interleaved per prompt
   (``specd.bench.run_bench``): tokens/s, tokens per forward, drafting ms per step, identity with ar.
2. **Simulator** (``actors.aded.simulator``): the target's greedy traces of the same prompts (recorded once
   with their top-k, cached in the output directory), and the traces shipped for the target on the tuning
   prompts (``tuning-chat`` / ``tuning-code``; none of them is in the matrix's corpus), replayed against a
   fresh drafter per search, under a
   flat cost curve (GPU-like: every node up to ``--max-nodes`` is free, so the tree's quality alone
   decides) and under the CPU curve the engine uses. No target forward is timed, so its tokens per
   forward do not depend on how busy the machine is (its drafting ms do).

Outputs in ``--out``: ``search.json`` (everything, with the command), ``search.md``, ``search.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from actors.aded.simulator import (Trace, load_traces, record_traces, replay, save_traces, shipped_traces,
                                   smollm2_cpu_cost)
from actors.cost import CostModel
from actors.drafter import NoDrafter
from actors.engine import Engine
from actors.kernels import kernels_of
from actors.models import LoadedModel, load_model
from actors.sampling import SamplingParams
from specd.bench.aded import run_bench
from specd.bench.harness import CpuSteal, EngineMethod, pct_text
from specd.bench.prompts import SUITES
from specd.common import UsageError

SEARCHES: dict[str, dict] = {
    "best_first": {"search": "best_first"},
    "mcts-rollout": {"search": "mcts", "mcts": {"value": "rollout"}},
    "mcts-path": {"search": "mcts", "mcts": {"value": "path"}},
}
MAX_NODES = 64


def search_configs(args) -> dict[str, dict]:
    """``SEARCHES`` with ``--aded-simulations`` / ``--aded-depth`` applied to the MCTS variants."""
    if getattr(args, "aded_search", None) or getattr(args, "aded_value", None):
        raise ValueError("--suite search runs every search and value; use --aded-simulations / --aded-depth only")
    out = json.loads(json.dumps(SEARCHES))
    for cfg in out.values():
        if cfg["search"] == "mcts":
            if args.aded_simulations is not None:
                cfg["mcts"]["simulations"] = args.aded_simulations
            if args.aded_depth is not None:
                cfg["mcts"]["max_depth"] = args.aded_depth
        elif args.aded_depth is not None:
            cfg["best_first"] = {"max_depth": args.aded_depth}
    return out


def run(args) -> int:
    from actors.aded import make_aded_drafter
    from actors.methods import aded_config, ensure_default_matrix

    if args.methods:
        raise UsageError("--suite search runs ar and every search; --methods does not apply")
    configs = {name: aded_config(c) for name, c in search_configs(args).items()}
    target = load_model(args.model or "smollm2-135m")
    ensure_default_matrix(target)
    end = None if args.limit is None else args.offset + args.limit
    prompts = {s: SUITES[s]()[args.offset:end] for s in ("mtbench", "humaneval")}
    params = SamplingParams(max_new_tokens=args.max_new_tokens or 128, seed=args.seed)
    encode = lambda text: target.encode(text, chat=True)  # noqa: E731

    engine = Engine(target)
    methods = [EngineMethod("ar", engine, NoDrafter())] + [
        EngineMethod(name, engine, make_aded_drafter(target, config=c)) for name, c in configs.items()]
    with CpuSteal() as steal:
        bench = run_bench(prompts, methods, encode, params, checkpoint=args.out / "partial.json",
                          no_warmup=frozenset(configs))  # online drafters meet the first prompt knowing nothing
    engine_summary = {s: _engine_summary([r for r in bench["records"] if r["suite"] == s], bench["summary"][s])
                      for s in prompts}

    curves = {"flat": CostModel.flat(), "cpu": smollm2_cpu_cost(kernels_of(target.model))}
    trace_sets = {suite: _traces(target, items, params.max_new_tokens, args.out / f"traces-{suite}.jsonl")
                  for suite, items in prompts.items()}
    trace_sets.update(_tuning_traces(target))
    simulator = {suite: {curve: {name: replay(make_aded_drafter(target, cost_model=cost, config=c), traces, cost,
                                              max_nodes=MAX_NODES).summary()
                                 for name, c in configs.items()}
                         for curve, cost in curves.items()}
                 for suite, traces in trace_sets.items()}
    timing = {suite: search_timing(target, load_traces(args.out / f"traces-{suite}.jsonl"), configs)
              for suite in prompts}
    result = {"engine": engine_summary, "simulator": simulator, "search_us": timing, "records": bench["records"],
              "config": {"model": target.name, "searches": {n: c.model_dump(mode="json") for n, c in configs.items()},
                         "offset": args.offset, "limit": args.limit, "max_new_tokens": params.max_new_tokens,
                         "max_nodes_simulated": MAX_NODES, "kernels": kernels_of(target.model),
                         "command": " ".join(sys.argv), "steal_pct": steal.pct}}  # over the engine runs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(result, indent=1))
    (args.out / "search.md").write_text(markdown(result))
    _plot(result, args.out / "search.png")
    print(markdown(result))
    print(json.dumps({"out": str(args.out)}), file=sys.stderr)
    return 0


def search_timing(target: LoadedModel, traces: list[Trace], configs: dict, every: int = 4) -> dict:
    """Median microseconds of one n-gram search call, compiled and Python reference, on the traces' states,
    the store changing between calls as the drafter changes it (the prompt's tri-grams folded at the start,
    the output's as it is decoded; not the target's top-k weights, which traces do not hold): the search
    alone, no trie or budget. The compiled call includes bringing its store mirror up to date."""
    import time

    import numpy as np

    from actors.aded.corpus import default_matrix_path
    from actors.aded.jit_search import CompiledSearch
    from actors.aded.mcts import mcts_paths
    from actors.aded.ngram import NGramModel, trigram_increments
    from actors.aded.tree import best_first_paths
    from actors.aded.trigram import TrigramMatrix
    from shared_state import MemoryStore, StoreConfig

    matrix = TrigramMatrix.load(default_matrix_path(target.identity))
    out = {}
    for name, c in configs.items():
        model = NGramModel(matrix, MemoryStore(StoreConfig(namespace=target.identity)), c.ngram)
        search = CompiledSearch(model)
        times: dict[str, list[float]] = {"compiled": [], "reference": []}
        for trace in traces:
            ctx = trace.prompt_ids + trace.output_ids
            model.store.add(trigram_increments(trace.prompt_ids, 0, c.adapt.verified_delta))
            folded = len(trace.prompt_ids)
            for i in range(len(trace.prompt_ids) + 1, len(ctx), every):
                a, b = ctx[i - 2], ctx[i - 1]
                model.store.add(trigram_increments(ctx[:i], folded, c.adapt.verified_delta))
                folded = i
                for kind in times:
                    t = time.perf_counter()
                    if kind == "compiled" and c.search == "best_first":
                        search.best_first(a, b, c.best_first)
                    elif kind == "compiled":
                        search.mcts(a, b, c.mcts, np.random.default_rng(i))
                    elif c.search == "best_first":
                        best_first_paths(model.memo(), a, b, c.best_first)
                    else:
                        mcts_paths(model.memo(), a, b, c.mcts, np.random.default_rng(i))
                    times[kind].append(time.perf_counter() - t)
        out[name] = {k: round(1e6 * float(np.median(v)), 1) if v else None for k, v in times.items()}
        out[name]["combined_rows_per_call"] = round(search.mirror.combined / max(1, search.calls), 1)
    return out


def _engine_summary(records: list[dict], summary: dict) -> dict:
    """``specd.bench.summarize``'s figures plus drafting ms per step (draft share x seconds / forwards)."""
    out = {}
    for name, s in summary.items():
        ms = [r["methods"][name] for r in records]
        forwards = sum(m["target_forwards"] or 0 for m in ms)
        draft_s = sum(m["draft_share"] * m["seconds"] for m in ms)
        out[name] = {k: s[k] for k in ("prompts", "tokens_per_second", "speedup_aggregate", "tokens_per_forward",
                                       "identical_to_baseline", "steal_pct")}
        out[name]["draft_ms_per_step"] = round(1e3 * draft_s / forwards, 3) if forwards else None
        out[name]["verify_ms_per_step"] = round(1e3 * (sum(m["seconds"] for m in ms) - draft_s) / forwards, 3) \
            if forwards else None
    return out


def _tuning_traces(target: LoadedModel) -> dict[str, list[Trace]]:
    """The target's shipped traces on ``TUNING_PROMPTS`` (kept out of the matrix corpus), split chat / code."""
    path = shipped_traces(target.identity)
    return {} if path is None else split_tuning(load_traces(path))


def split_tuning(traces: list[Trace]) -> dict[str, list[Trace]]:
    """The shipped tuning traces as ``tuning-chat`` / ``tuning-code`` (by their prompts' openings)."""
    code = [t for t in traces if t.name.startswith(("Write a Python", "Complete this"))]
    return {"tuning-chat": [t for t in traces if t not in code], "tuning-code": code}


def _traces(target: LoadedModel, items: list[dict], max_new_tokens: int, path: Path) -> list[Trace]:
    """The target's greedy traces of ``items``, from ``path`` when it holds exactly these (else recorded)."""
    names = [str(item["id"]) for item in items]
    if path.exists():
        traces = load_traces(path)
        if [t.name for t in traces] == names and all(len(t.output_ids) <= max_new_tokens for t in traces):
            return traces
    print(f"recording {len(items)} greedy traces for the simulator -> {path}", file=sys.stderr)
    traces = record_traces(target.model, target.tokenizer, [item["prompt"] for item in items], max_new_tokens)
    for t, name in zip(traces, names):
        t.name = name
    save_traces(traces, path)
    return traces


def markdown(result: dict) -> str:
    lines = ["## Engine (greedy, this CPU)", "",
             "| suite | method | tok/s | speedup vs ar | tokens/forward | draft ms/step | verify ms/step | identical"
             " | steal |", "|---|---|---|---|---|---|---|---|---|"]
    for suite, methods in result["engine"].items():
        for name, s in methods.items():
            tpf = f"{s['tokens_per_forward']:.2f}" if s["tokens_per_forward"] else "-"
            lines.append(f"| {suite} | {name} | {s['tokens_per_second']:.2f} | {s['speedup_aggregate']:.3f}x | {tpf}"
                         f" | {s['draft_ms_per_step']} | {s['verify_ms_per_step']} |"
                         f" {s['identical_to_baseline']}/{s['prompts']} | {pct_text(s['steal_pct'])} |")
    lines += ["", f"## Simulator (held-out greedy traces, <= {result['config']['max_nodes_simulated']} nodes)", "",
              "| suite | cost curve | search | tokens/forward | nodes/forward | est. speedup (verify only) |"
              " draft ms/step |", "|---|---|---|---|---|---|---|"]
    for suite, curves in result["simulator"].items():
        for curve, searches in curves.items():
            for name, s in searches.items():
                lines.append(f"| {suite} | {curve} | {name} | {s['tokens_per_forward']:.3f} | {s['nodes_per_forward']}"
                             f" | {s['verify_speedup']:.3f}x | {s['draft_ms_per_step']} |")
    lines += ["", "## One search call (median us; the search alone)", "",
              "| suite | search | compiled | Python reference | adaptive rows combined per call |", "|---|---|---|---|---|"]
    for suite, searches in result["search_us"].items():
        for name, s in searches.items():
            lines.append(f"| {suite} | {name} | {s['compiled']} | {s['reference']} | {s['combined_rows_per_call']} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("engine tokens/forward", lambda su, n: result["engine"][su][n]["tokens_per_forward"] or 0.0),
              ("engine draft ms/step", lambda su, n: result["engine"][su][n]["draft_ms_per_step"] or 0.0),
              ("engine speedup vs ar", lambda su, n: result["engine"][su][n]["speedup_aggregate"]),
              ("simulator tokens/forward, flat curve",
               lambda su, n: result["simulator"][su]["flat"][n]["tokens_per_forward"]),
              ("simulator tokens/forward, CPU curve",
               lambda su, n: result["simulator"][su]["cpu"][n]["tokens_per_forward"])]
    suites = list(result["engine"])
    names = list(result["config"]["searches"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.8 / len(names)
    for ax, (title, value) in zip(axes, panels):
        for j, name in enumerate(names):
            ax.bar([i + j * width for i in range(len(suites))], [value(s, name) for s in suites], width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(suites))], suites)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
