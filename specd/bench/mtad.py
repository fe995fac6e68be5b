"""``specd bench --suite mtad``: MTAD and MMTAD against single-token sampling and standard SD, on HumanEval.

Target ``qwen2.5-coder-1.5b``, draft ``qwen2.5-coder-0.5b`` (same tokenizer). Every method runs on the same
prompts with the same seed (prompt ``i`` uses ``seed + i``), interleaved per prompt in a rotating order, so
the shared machine's drift hits all methods alike. Metrics, as the MTAD paper computes them:

* perplexity: the target rescoring each generated text with an UNFILTERED softmax (temperature 1, no top-k/p),
  ``exp(-mean over samples of the mean log p per generated token)``;
* block efficiency ``1 + accepted / iterations`` and acceptance rate ``accepted / (iterations * gamma)``
  (iterations = target verify forwards);
* tokens/s (wall clock, prefill included), and HumanEval pass@1: the code of the answer's first ```python
  block (the whole answer when there is none; the problem's prompt is prepended when the answer does not
  define the entry point) runs with the problem's tests in a subprocess with a timeout.

MTAD/MMTAD are approximate by design (their output is not the target's distribution); ar and sd are exact.
Writes ``bench_mtad.json``, ``bench_mtad.md`` and ``mtad.png`` under ``--out``, refreshed after every prompt.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from actors.engine import Engine
from actors.methods import METHODS, make_drafter
from actors.kernels import kernels_of
from actors.models import LoadedModel, load_model
from actors.sampling import SamplingParams
from specd.bench.harness import (WARMUP_PROMPT, CpuSteal, interleave, machine, steal_fields, total_steal_pct,
                                 write_outputs)
from specd.bench.prompts import humaneval_prompts
from specd.common import UsageError

ALL_METHODS = ("ar", "sd", "mtad", "mmtad")
GAMMA, BEAM_WIDTH, TAU = 4, 4, 0.5
DEFAULTS = {"model": "qwen2.5-coder-1.5b", "draft_model": "qwen2.5-coder-0.5b", "limit": 8, "max_new_tokens": 64}
STOP = ("\n```\n",)  # the end of the answer's code block: nothing after it is scored
TEST_TIMEOUT_S = 10.0


def run(args) -> int:
    methods = args.methods.split(",") if args.methods else list(ALL_METHODS)
    if unknown := [m for m in methods if m not in ALL_METHODS]:
        raise UsageError(f"mtad suite: unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    temperatures = args.temperature or [1.0]
    if any(t <= 0 for t in temperatures):
        raise UsageError("mtad suite: temperatures must be > 0 (MTAD needs sampling to differ from greedy)")
    limit = args.limit or DEFAULTS["limit"]
    max_new = args.max_new_tokens or DEFAULTS["max_new_tokens"]
    target = load_model(args.model or DEFAULTS["model"])
    draft = load_model(args.draft_model or DEFAULTS["draft_model"])
    items = humaneval_prompts()[args.offset : args.offset + limit]
    config = {"target": target.name, "draft": draft.name, "methods": methods, "temperatures": temperatures,
              "prompts": [it["id"] for it in items], "max_new_tokens": max_new, "seed": args.seed, "gamma": GAMMA,
              "beam_width": BEAM_WIDTH, "tau": TAU, "stop": STOP, "threads": torch.get_num_threads(),
              "kernels": kernels_of(target.model), "machine": machine(), "command": " ".join(sys.argv)}
    drafters = {m: make_drafter(m, target, draft, gamma=GAMMA, beam_width=BEAM_WIDTH, tau=TAU) for m in methods}
    engine = Engine(target)
    warm = target.encode(WARMUP_PROMPT, chat=True)
    # One entry per (prompt, temperature); prompt i samples with seed + i at every temperature.
    runs = [(item, target.encode(item["prompt"], chat=True),
             SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=args.seed + i, stop=STOP))
            for i, item in enumerate(items) for temperature in temperatures]
    records: list[dict] = []

    def measure(entry: tuple, name: str) -> dict:
        item, ids, params = entry
        record = _run(engine, name, drafters[name], item, ids, params)
        _progress(record)
        return record

    def done(i: int, entry: tuple, results: dict) -> None:
        records.extend(results.values())
        config["machine"]["steal_pct"] = whole.so_far()  # from the warm-ups to this checkpoint
        result = {"config": config, "records": records, "summary": summarize(records)}
        write_outputs(args.out, "bench_mtad", result, markdown_table(result["summary"]), plot)

    with CpuSteal() as whole:
        interleave(runs, methods, measure,
                   lambda name: engine.run(warm, SamplingParams(max_new_tokens=8, temperature=1.0, seed=args.seed),
                                           drafters[name]), done, desc="bench mtad")
    print(markdown_table(summarize(records)), flush=True)
    return 0


def _run(engine: Engine, name: str, drafter, item: dict, ids: list[int], params: SamplingParams) -> dict:
    with CpuSteal() as steal:
        t = time.perf_counter()
        out = engine.run(ids, params, drafter)
        seconds = time.perf_counter() - t
    s = out.stats
    return {
        "id": item["id"], "method": name, "temperature": params.temperature, "seed": params.seed,
        "new_tokens": len(out.token_ids), "seconds": round(seconds, 3), "target_forwards": s.target_forwards,
        "accepted_tokens": s.accepted_tokens, "drafted_tokens": s.drafted_tokens,
        "draft_seconds": round(s.draft_seconds, 3), "lossless": METHODS[name].lossless if name in METHODS else True,
        "mean_logp": mean_target_logp(engine.target, ids, out.token_ids),
        "passed": humaneval_passes(item, out.text), "text": out.text,
        **steal_fields(steal.delta),
    }


def _progress(r: dict) -> None:
    tqdm.write(f"{r['id']} T={r['temperature']} {r['method']:6s} {r['new_tokens']:3d} tok {r['seconds']:6.1f} s "
          f"{r['new_tokens'] / r['seconds']:.2f} tok/s, {r['target_forwards']} forwards, "
          f"{r['accepted_tokens']} accepted, mean log p {r['mean_logp']:.3f}, passed {r['passed']}", file=sys.stderr)


@torch.inference_mode()
def mean_target_logp(target: LoadedModel, prompt_ids: list[int], new_ids: list[int]) -> float:
    """Mean log p of the generated tokens under the target's plain softmax (temperature 1, no filtering)."""
    if not new_ids:
        return float("nan")
    logits = target.model(torch.tensor([prompt_ids + new_ids])).logits[0, len(prompt_ids) - 1 : -1]  # [n, V]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(new_ids)[:, None])
    return float(logp.mean())


def extract_code(answer: str) -> str:
    """The first fenced python block of a chat answer (an unterminated one counts); else the whole answer."""
    m = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", answer, re.DOTALL)
    return m.group(1) if m else answer


def humaneval_passes(item: dict, answer: str, timeout_s: float = TEST_TIMEOUT_S) -> bool:
    """Run the problem's tests against the answer's code in a fresh interpreter; True when they pass in time."""
    code = extract_code(answer)
    if not re.search(rf"def\s+{re.escape(item['entry_point'])}\s*\(", code):
        code = item["code_prompt"] + code  # the answer only gave the body
    program = f"{code}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program)
        try:
            done = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def summarize(records: list[dict]) -> dict:
    """``{temperature: {method: metrics}}``, plus ratios to ar and sd measured in the same run."""
    out: dict = {}
    for temperature in sorted({r["temperature"] for r in records}):
        rows = [r for r in records if r["temperature"] == temperature]
        by = {}
        for name in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == name]
            iters, acc = sum(r["target_forwards"] for r in rs), sum(r["accepted_tokens"] for r in rs)
            logps = [r["mean_logp"] for r in rs if not math.isnan(r["mean_logp"])]
            by[name] = {
                "samples": len(rs), "lossless": rs[0]["lossless"],
                "new_tokens": sum(r["new_tokens"] for r in rs),
                "tokens_per_second": sum(r["new_tokens"] for r in rs) / sum(r["seconds"] for r in rs),
                "perplexity": math.exp(-sum(logps) / len(logps)) if logps else float("nan"),
                "block_efficiency": 1 + acc / iters if iters else float("nan"),
                "acceptance_rate": acc / (iters * GAMMA) if iters and name != "ar" else None,
                "pass_at_1": sum(r["passed"] for r in rs) / len(rs),
                "draft_share": sum(r["draft_seconds"] for r in rs) / sum(r["seconds"] for r in rs),
                "steal_pct": total_steal_pct([r["cpu_jiffies"] for r in rs]),  # over this method's timed runs
            }
        for name, s in by.items():
            for ref in ("ar", "sd"):
                if ref in by and ref != name:
                    s[f"speed_vs_{ref}"] = s["tokens_per_second"] / by[ref]["tokens_per_second"]
            if "ar" in by and name != "ar":
                s["perplexity_change_vs_ar"] = s["perplexity"] / by["ar"]["perplexity"] - 1
        out[str(temperature)] = by
    return out


def markdown_table(summary: dict) -> str:
    lines = []
    for temperature, by in summary.items():
        lines += [f"### T = {temperature}", "",
                  "| method | lossless | samples | tok/s | vs ar | vs sd | perplexity | ppl vs ar | block eff. "
                  "| accept rate | pass@1 | draft share |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in by.items():
            def fmt(key, spec):
                return format(s[key], spec) if s.get(key) is not None else "-"

            lines.append(f"| {name} | {'yes' if s['lossless'] else 'NO'} | {s['samples']}"
                         f" | {fmt('tokens_per_second', '.3f')} | {fmt('speed_vs_ar', '.3f')}"
                         f" | {fmt('speed_vs_sd', '.3f')} | {fmt('perplexity', '.3f')}"
                         f" | {fmt('perplexity_change_vs_ar', '+.1%')} | {fmt('block_efficiency', '.3f')}"
                         f" | {fmt('acceptance_rate', '.3f')} | {fmt('pass_at_1', '.3f')}"
                         f" | {fmt('draft_share', '.1%')} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, out_dir: Path) -> None:
    """``mtad.png``: speed, perplexity, block efficiency and pass@1 per method and temperature."""
    summary, path = result["summary"], out_dir / "mtad.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokens_per_second", "tokens / s"), ("perplexity", "perplexity (target, unfiltered)"),
              ("block_efficiency", "block efficiency"), ("pass_at_1", "HumanEval pass@1")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.8 / max(1, len(summary))
    for ax, (key, label) in zip(axes, panels):
        for k, (temperature, by) in enumerate(summary.items()):
            names = list(by)
            ax.bar([x + k * width for x in range(len(names))], [by[n][key] for n in names], width,
                   label=f"T = {temperature}")
            ax.set_xticks([x + width * (len(summary) - 1) / 2 for x in range(len(names))], names)
        ax.set_title(label, fontsize=10)
        if key == "perplexity":
            ax.set_ylim(bottom=1.0)  # the floor of any perplexity: bars from 0 would hide the differences
        if key == "pass_at_1":
            ax.set_ylim(0.0, 1.0)
    axes[0].legend(fontsize=8)
    fig.suptitle("MTAD / MMTAD (approximate) vs ar and sd (exact): qwen2.5-coder 1.5B target, 0.5B draft", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
