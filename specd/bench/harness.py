"""The one benchmark harness: every method on the same prompts, interleaved per prompt, in one process.

Timings on a shared machine drift, so methods are compared prompt by prompt (each prompt runs every
method back to back, in a rotating order) and only ratios measured in the same run are quoted. Every
method first decodes an unmeasured warm-up prompt. Outputs: JSON (everything), a markdown table, PNG plots.

The host of a KVM guest can steal CPU time in bursts of seconds, and a fixed forward's time moves with the
steal share, so every timed unit also records the steal over it (:class:`CpuSteal`): a ratio between runs
whose steal differs a lot measures the host, not the methods.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence, TypeVar

import torch
from tqdm import tqdm

from actors.drafter import Drafter
from actors.engine import Engine
from actors.models import LoadedModel
from actors.profile import cpu_model
from actors.sampling import SamplingParams


class CpuTimes(NamedTuple):
    """Jiffies of /proc/stat's aggregate ``cpu`` line, summed over every CPU."""

    total: int  # the first 8 fields: user nice system idle iowait irq softirq steal (guest time is in user)
    steal: int  # the 8th: time the hypervisor ran something else while this guest wanted a CPU


def parse_cpu_line(line: str) -> CpuTimes | None:
    """The first line of /proc/stat as :class:`CpuTimes`; None when it is not one or has no steal field."""
    fields = line.split()
    if len(fields) < 9 or fields[0] != "cpu" or not all(f.isdigit() for f in fields[1:9]):
        return None
    values = [int(f) for f in fields[1:9]]
    return CpuTimes(sum(values), values[7])


def cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    """A snapshot to diff; None on a system without /proc/stat or without its steal field."""
    text = _read(path)
    return parse_cpu_line(text.splitlines()[0]) if text else None


def cpu_delta(start: CpuTimes | None, end: CpuTimes | None) -> CpuTimes | None:
    return None if start is None or end is None else CpuTimes(end.total - start.total, end.steal - start.steal)


def add_times(deltas: Sequence[CpuTimes | None]) -> CpuTimes | None:
    """Several intervals as one (None if any is unknown or there are none)."""
    if not deltas or any(d is None for d in deltas):
        return None
    return CpuTimes(sum(d.total for d in deltas), sum(d.steal for d in deltas))


def steal_pct(delta: CpuTimes | None) -> float | None:
    """Steal as a percent of all CPU time in the interval, 1 decimal; None when unknown or no tick elapsed
    (jiffies are 10 ms per CPU, so an interval under ~5 ms on 2 CPUs may hold none)."""
    return round(100 * delta.steal / delta.total, 1) if delta is not None and delta.total > 0 else None


def total_steal_pct(jiffies: Sequence[dict | None]) -> float | None:
    """The steal share over several timed units, from their JSON ``cpu_jiffies`` (:func:`cpu_json`)."""
    return steal_pct(add_times([None if j is None else CpuTimes(**j) for j in jiffies]))


def cpu_json(delta: CpuTimes | None) -> dict | None:
    return None if delta is None else delta._asdict()


def steal_fields(delta: CpuTimes | None) -> dict:
    """A timed unit's JSON keys for its steal: ``steal_pct`` and the ``cpu_jiffies`` behind it."""
    return {"steal_pct": steal_pct(delta), "cpu_jiffies": cpu_json(delta)}


def pct_text(value: float | None) -> str:
    return "-" if value is None else f"{value}%"


def steal_share(start: CpuTimes | None, end: CpuTimes | None) -> float | None:
    return steal_pct(cpu_delta(start, end))


class CpuSteal:
    """``with CpuSteal() as s: ...``; then ``s.delta`` (jiffies) and ``s.pct`` (percent) over the block;
    ``s.so_far()`` inside it. Both None where ``path`` cannot be read or has no steal field."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self.path = path

    def __enter__(self) -> CpuSteal:
        self.start, self.delta = cpu_times(self.path), None
        return self

    def __exit__(self, *exc) -> None:
        self.delta = cpu_delta(self.start, cpu_times(self.path))

    @property
    def pct(self) -> float | None:
        return steal_pct(self.delta)

    def so_far(self) -> float | None:
        return steal_share(self.start, cpu_times(self.path))


@dataclass
class Run:
    token_ids: list[int]
    seconds: float
    forwards: int | None = None
    accepted_per_position: list[int] | None = None
    draft_seconds: float = 0.0
    cpu: CpuTimes | None = None  # /proc/stat jiffies over the timed run (None: not measurable here)


class EngineMethod:
    """A method of the specd engine; ``fresh_drafter`` (if given) builds a new drafter for every prompt."""

    def __init__(self, name: str, engine: Engine, drafter: Drafter | None = None,
                 fresh_drafter: Callable[[], Drafter] | None = None) -> None:
        self.name, self.engine, self.drafter, self.fresh = name, engine, drafter, fresh_drafter

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        drafter = self.fresh() if self.fresh else self.drafter
        with CpuSteal() as steal:
            t = time.perf_counter()
            out = self.engine.run(prompt_ids, params, drafter)
            seconds = time.perf_counter() - t
        s = out.stats
        return Run(out.token_ids, seconds, s.target_forwards, s.accepted_per_position, s.draft_seconds, steal.delta)


class HFMethod:
    """Hugging Face ``generate`` on the same model (e.g. with ``prompt_lookup_num_tokens``)."""

    def __init__(self, name: str, target: LoadedModel, **generate_kwargs) -> None:
        self.name, self.target, self.kwargs = name, target, generate_kwargs

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        ids = torch.tensor([prompt_ids])
        with CpuSteal() as steal:
            t = time.perf_counter()
            out = self.target.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens, do_sample=False,
                eos_token_id=sorted(self.target.eos_ids), pad_token_id=self.target.tokenizer.pad_token_id,
                **self.kwargs)
            seconds = time.perf_counter() - t
        new = out[0, len(prompt_ids):].tolist()
        if new and new[-1] in self.target.eos_ids:
            new = new[:-1]
        return Run(new, seconds, cpu=steal.delta)


WARMUP_PROMPT = "Write two sentences about the sea."  # in neither MT-Bench nor HumanEval


Item = TypeVar("Item")


def machine() -> dict:
    """What a reader needs to judge the run's figures: CPU, cores, memory, versions, load when it started."""
    import transformers

    cpu = cpu_model()
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
