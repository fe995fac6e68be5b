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
import math
import sys
from pathlib import Path
from typing import Callable

from actors.drafter import NoDrafter
from actors.engine import Engine
from actors.kernels import kernels_of
from actors.models import load_model
from actors.sampling import SamplingParams
from specd.bench.harness import (WARMUP_PROMPT, CpuSteal, EngineMethod, HFMethod, Run, interleave, machine, pct_text,
                                 steal_fields, total_steal_pct, write_outputs)
from specd.bench.prompts import SUITES
from specd.common import UsageError

ALL_METHODS = ("ar", "aded-cold", "aded-online", "hf", "hf-lookup")


def run(args) -> int:
    from actors.aded import make_aded_drafter
    from actors.methods import aded_config
    from specd.aded_args import aded_options_from_args

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
    with CpuSteal() as steal:
        result = run_bench(prompts, methods, lambda text: target.encode(text, chat=True), params,
                           checkpoint=args.out / "partial.json",
                           no_warmup=frozenset({"aded-online"}))  # it must meet the first prompt knowing nothing
    result["config"] = {"model": target.name, "methods": names, "suites": suites, "offset": args.offset,
                        "limit": args.limit, "max_new_tokens": params.max_new_tokens, "greedy": True,
                        "kernels": kernels_of(target.model), "aded": aded.model_dump(mode="json"),
                        "machine": machine() | {"steal_pct": steal.pct},
                        "command": " ".join(sys.argv)}
    write_outputs(args.out, "bench", result, markdown_table(result["summary"], "ar"), plot)
    print(markdown_table(result["summary"], "ar"))
    print(json.dumps({"out": str(args.out)}), file=sys.stderr)
    return 0


def run_bench(suites: dict[str, list[dict]], methods: list, encode: Callable[[str], list[int]],
              params: SamplingParams, baseline: str = "ar", checkpoint: Path | None = None,
              no_warmup: frozenset[str] = frozenset()) -> dict:
    """Every method on every prompt (:func:`~specd.bench.harness.interleave`); per-prompt records and
    per-suite summaries. ``no_warmup``: methods that learn across prompts, so they skip the warm-up.
    With ``checkpoint``, the records so far are rewritten there after every prompt."""
    by_name = {m.name: m for m in methods}
    warm = params.model_copy(update={"max_new_tokens": min(32, params.max_new_tokens)})
    warm_ids = encode(WARMUP_PROMPT)
    items = [(suite, item, encode(item["prompt"])) for suite, prompts in suites.items() for item in prompts]
    records: list[dict] = []

    def done(i: int, entry: tuple, runs: dict) -> None:
        suite, item, ids = entry
        records.append(_record(suite, item, len(ids), runs, baseline))
        if checkpoint:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps({"records": records}))

    interleave(items, list(by_name), lambda entry, name: by_name[name].run(entry[2], params),
               lambda name: None if name in no_warmup else by_name[name].run(warm_ids, warm), done)
    return {"records": records, "summary": {s: summarize([r for r in records if r["suite"] == s], baseline)
                                            for s in suites}}


def _record(suite: str, item: dict, prompt_len: int, runs: dict[str, Run], baseline: str) -> dict:
    base = runs[baseline]
    out = {"suite": suite, "id": item["id"], "prompt_tokens": prompt_len, "methods": {}}
    for name, r in runs.items():
        n = len(r.token_ids)
        out["methods"][name] = {
            "new_tokens": n, "seconds": round(r.seconds, 4), "tokens_per_second": round(n / r.seconds, 3),
            "speedup": round((n / r.seconds) / (len(base.token_ids) / base.seconds), 4),
            "target_forwards": r.forwards,
            "tokens_per_forward": round(n / r.forwards, 4) if r.forwards else None,
            "accepted_per_position": r.accepted_per_position,
            "draft_share": round(r.draft_seconds / r.seconds, 4),
            "identical_to_baseline": r.token_ids == base.token_ids,
            **steal_fields(r.cpu),
        }
    return out


def summarize(records: list[dict], baseline: str) -> dict:
    if not records:
        return {}
    names = records[0]["methods"].keys()
    base_tps = _aggregate_tps(records, baseline)
    out = {}
    for name in names:
        ms = [r["methods"][name] for r in records]
        forwards = [m["target_forwards"] for m in ms if m["target_forwards"]]
        app = _sum_lists([m["accepted_per_position"] for m in ms if m["accepted_per_position"]])
        steps = sum(forwards) if forwards else 0
        out[name] = {
            "prompts": len(ms),
            "tokens_per_second": round(_aggregate_tps(records, name), 3),
            "speedup_aggregate": round(_aggregate_tps(records, name) / base_tps, 4),
            "speedup_geomean": round(math.exp(sum(math.log(m["speedup"]) for m in ms) / len(ms)), 4),
            "speedup_min": min(m["speedup"] for m in ms),
            "tokens_per_forward": round(sum(m["new_tokens"] for m in ms) / steps, 4) if steps else None,
            "acceptance_per_position": [round(a / steps, 4) for a in app] if steps else None,
            "draft_share": round(sum(m["draft_share"] * m["seconds"] for m in ms) / sum(m["seconds"] for m in ms), 4),
            "identical_to_baseline": sum(m["identical_to_baseline"] for m in ms),
            "steal_pct": total_steal_pct([m["cpu_jiffies"] for m in ms]),  # over this method's timed runs
        }
    return out


def _aggregate_tps(records: list[dict], name: str) -> float:
    ms = [r["methods"][name] for r in records]
    return sum(m["new_tokens"] for m in ms) / sum(m["seconds"] for m in ms)


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out: list[int] = []
    for lst in lists:
        out += [0] * (len(lst) - len(out))
        for i, v in enumerate(lst):
            out[i] += v
    return out


def markdown_table(summary: dict, baseline: str) -> str:
    lines = []
    for suite, methods in summary.items():
        lines += [f"### {suite}", "",
                  f"| method | prompts | tok/s | speedup vs {baseline} (aggregate) | geomean | min | tokens/forward"
                  " | draft share | identical to baseline | steal |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in methods.items():
            tpf = f"{s['tokens_per_forward']:.2f}" if s["tokens_per_forward"] else "-"
            lines.append(f"| {name} | {s['prompts']} | {s['tokens_per_second']:.2f} | {s['speedup_aggregate']:.3f}x"
                         f" | {s['speedup_geomean']:.3f}x | {s['speedup_min']:.3f}x | {tpf}"
                         f" | {s['draft_share']:.1%} | {s['identical_to_baseline']}/{s['prompts']}"
                         f" | {pct_text(s['steal_pct'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, out_dir: Path, baseline: str = "ar") -> None:
    """``speedup.png`` (per prompt) and ``acceptance.png`` (per draft depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(result["summary"])
    fig, axes = plt.subplots(1, len(suites), figsize=(7 * len(suites), 4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        recs = [r for r in result["records"] if r["suite"] == suite]
        for name in recs[0]["methods"]:
            if name != baseline:
                ax.plot([r["methods"][name]["speedup"] for r in recs], marker=".", lw=0.8, label=name)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(title=f"{suite}: speedup vs {baseline} per prompt", xlabel="prompt", ylabel="speedup")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "speedup.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(suites), figsize=(7 * len(suites), 4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for name, s in result["summary"][suite].items():
            if s.get("acceptance_per_position"):
                ax.plot(range(1, len(s["acceptance_per_position"]) + 1), s["acceptance_per_position"],
                        marker="o", label=name)
        ax.set(title=f"{suite}: P(draft token at depth d accepted) per step", xlabel="depth", ylabel="rate")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "acceptance.png", dpi=110)
    plt.close(fig)
