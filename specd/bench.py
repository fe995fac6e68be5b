"""``specd bench``: every method on the same prompts, interleaved per prompt, in one process.

Timings on a shared 2-core machine drift, so methods are compared prompt by prompt (each prompt runs
every method back to back, in a rotating order) and only ratios measured in the same run are quoted.
Outputs: JSON (everything), a markdown table, and PNG plots.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from actors.drafter import Drafter
from actors.engine import Engine
from actors.models import LoadedModel
from actors.sampling import SamplingParams


@dataclass
class Run:
    token_ids: list[int]
    seconds: float
    forwards: int | None = None
    accepted_per_position: list[int] | None = None
    draft_seconds: float = 0.0


class EngineMethod:
    """A method of the specd engine; ``fresh_drafter`` (if given) builds a new drafter for every prompt."""

    def __init__(self, name: str, engine: Engine, drafter: Drafter | None = None,
                 fresh_drafter: Callable[[], Drafter] | None = None) -> None:
        self.name, self.engine, self.drafter, self.fresh = name, engine, drafter, fresh_drafter

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        drafter = self.fresh() if self.fresh else self.drafter
        t = time.perf_counter()
        out = self.engine.run(prompt_ids, params, drafter)
        s = out.stats
        return Run(out.token_ids, time.perf_counter() - t, s.target_forwards, s.accepted_per_position, s.draft_seconds)


class HFMethod:
    """Hugging Face ``generate`` on the same model (e.g. with ``prompt_lookup_num_tokens``)."""

    def __init__(self, name: str, target: LoadedModel, **generate_kwargs) -> None:
        self.name, self.target, self.kwargs = name, target, generate_kwargs

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        ids = torch.tensor([prompt_ids])
        t = time.perf_counter()
        out = self.target.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens, do_sample=False,
            eos_token_id=sorted(self.target.eos_ids), pad_token_id=self.target.tokenizer.pad_token_id, **self.kwargs)
        seconds = time.perf_counter() - t
        new = out[0, len(prompt_ids):].tolist()
        if new and new[-1] in self.target.eos_ids:
            new = new[:-1]
        return Run(new, seconds)


WARMUP_PROMPT = "Write two sentences about the sea."  # in neither MT-Bench nor HumanEval


def run_bench(suites: dict[str, list[dict]], methods: list, encode: Callable[[str], list[int]],
              params: SamplingParams, baseline: str = "ar", checkpoint: Path | None = None,
              no_warmup: frozenset[str] = frozenset()) -> dict:
    """Run every method on every prompt; returns per-prompt records and per-suite summaries.

    Every method but those in ``no_warmup`` (ones that learn across prompts) first decodes an unmeasured
    warm-up prompt: a process's first forwards pay one-time costs (allocator, oneDNN weight reorders and
    kernel selection) that would otherwise land on whichever method runs first.
    With ``checkpoint``, the records so far are rewritten there after every prompt (long runs on a
    shared machine can be cut short; what was measured survives).
    """
    warm_ids = encode(WARMUP_PROMPT)
    for m in methods:
        if m.name not in no_warmup:
            m.run(warm_ids, params.model_copy(update={"max_new_tokens": min(32, params.max_new_tokens)}))
    records = []
    total = sum(len(p) for p in suites.values())
    with tqdm(total=total * len(methods), desc="bench", unit="run") as bar:
        for suite, prompts in suites.items():
            for i, item in enumerate(prompts):
                ids = encode(item["prompt"])
                runs = {}
                for j in range(len(methods)):
                    m = methods[(i + j) % len(methods)]  # rotate who goes first
                    runs[m.name] = m.run(ids, params)
                    bar.update(1)
                records.append(_record(suite, item, len(ids), runs, baseline))
                if checkpoint:
                    checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    checkpoint.write_text(json.dumps({"records": records}))
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
                  " | draft share | identical to baseline |", "|---|---|---|---|---|---|---|---|---|"]
        for name, s in methods.items():
            tpf = f"{s['tokens_per_forward']:.2f}" if s["tokens_per_forward"] else "-"
            lines.append(f"| {name} | {s['prompts']} | {s['tokens_per_second']:.2f} | {s['speedup_aggregate']:.3f}x"
                         f" | {s['speedup_geomean']:.3f}x | {s['speedup_min']:.3f}x | {tpf}"
                         f" | {s['draft_share']:.1%} | {s['identical_to_baseline']}/{s['prompts']} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path, baseline: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench.md").write_text(markdown_table(result["summary"], baseline))
    _plot(result, out_dir, baseline)


def _plot(result: dict, out_dir: Path, baseline: str) -> None:
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
