"""Resident memory of a drafter-pool replica's body: the target loaded whole, or its tokenizer only.

    python benchmarks/pool_memory.py --model smollm2-135m --out runs/pool_memory.json

Each variant runs in a fresh process (so neither inherits the other's heap): it builds what
``deploy.pool.DrafterPool`` builds for the tri-gram role (target, the adaptive store, the ADED drafter,
the DrafterHost) with the target from ``load_model`` (``full``: what the pool did before) or from
``load_tokenizer`` (``tokenizer``: what it does now), and reports RSS before and after plus the peak
(``ru_maxrss``), in MiB, and the seconds the build took. Run it once first so the model is converted
and the tri-gram matrix built (both cached), or the first variant's time includes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

import torch
from actors.models import load_model, load_tokenizer
from deploy.config import ServeConfig
from deploy.drafters import DrafterHost, build_drafters

before = rss_mib()
t0 = time.perf_counter()
cfg = ServeConfig(model={model!r}, torch_threads=1)
torch.set_num_threads(1)
target = (load_model if {variant!r} == "full" else load_tokenizer)(cfg.model)
host = DrafterHost(build_drafters(cfg, cfg.trigram_methods, target, None), max_sessions=cfg.drafter_sessions)
seconds = time.perf_counter() - t0
print(json.dumps({{"rss_before_mib": round(before, 1), "rss_after_mib": round(rss_mib(), 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "build_seconds": round(seconds, 2), "methods": sorted(host.drafters)}}))
"""


def measure(model: str, variant: str) -> dict:
    code = CHILD.format(root=str(ROOT), model=model, variant=variant)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="runs/pool_memory.json")
    args = ap.parse_args()
    result = {"model": args.model, "machine": platform.platform(), "python": platform.python_version(),
              "variants": {v: measure(args.model, v) for v in ("full", "tokenizer")}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
