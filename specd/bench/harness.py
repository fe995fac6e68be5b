"""The one benchmark harness: every method on the same prompts, interleaved per prompt, in one process.

Timings on a shared machine drift, so methods are compared prompt by prompt (each prompt runs every
method back to back, in a rotating order) and only ratios measured in the same run are quoted. Every
method first decodes an unmeasured warm-up prompt. Outputs: JSON (everything), a markdown table, PNG plots.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

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


Item = TypeVar("Item")


def machine() -> dict:
    """What a reader needs to judge the run's figures: CPU, cores, memory, versions, load when it started."""
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "memory_gib": round(int(mem) / 2**20, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1m_start": round(os.getloadavg()[0], 2)}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def interleave(items: Sequence[Item], names: Sequence[str], measure: Callable[[Item, str], object],
               warm_up: Callable[[str], None], done: Callable[[int, Item, dict[str, object]], None],
               desc: str = "bench") -> None:
    """Warm every method up, then run every method on every item, back to back, rotating who goes first.

    ``warm_up(name)`` decodes the unmeasured :data:`WARMUP_PROMPT` (or nothing, for a method that must meet
    the first item knowing nothing): a process's first forwards pay one-time costs (allocator, oneDNN
    weight reorders and kernel selection) that would otherwise land on whichever method runs first.
    ``measure(item, name)`` runs one method on one item; ``done(i, item, {name: result})`` gets each item's
    results, keyed in ``names`` order, as soon as they exist (checkpoints: what was measured survives a
    run cut short).
    """
    for name in names:
        warm_up(name)
    with tqdm(total=len(items) * len(names), desc=desc, unit="run") as bar:
        for i, item in enumerate(items):
            results = {}
            for j in range(len(names)):
                name = names[(i + j) % len(names)]
                results[name] = measure(item, name)
                bar.update(1)
            done(i, item, {name: results[name] for name in names})  # in the given order, whoever ran first


def write_outputs(out_dir: Path, stem: str, result: dict, markdown: str, plot: Callable[[dict, Path], None]) -> None:
    """``stem.json`` (everything) and ``stem.md`` (the table) under ``out_dir``; ``plot`` adds the PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown)
    plot(result, out_dir)
