"""What packing grouped-query heads saves in a widened verify step: row attention with each key/value
head's query heads packed as query rows (``actors.attention._packed_sdpa``, the default) against
transformers' path for more than one query (``repeat_kv``: the keys and values copied ``n_rep`` times).

    python benchmarks/gqa_packing.py --out results/gqa_packing.json

SmolLM2-135M (9 query heads on 3 key/value heads), 2 rows of ~300 and ~340 cached tokens, verify steps of
1, 2 and 4 tokens a row, the two attentions alternating step by step; medians reported. One token a row
takes transformers' own packed path either way. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import actors.attention as attention  # noqa: E402
from actors.draft import Draft  # noqa: E402
from actors.models import load_model  # noqa: E402
from actors.process import freeze_gc_heap  # noqa: E402
from actors.verifier import Verifier  # noqa: E402
from specd.bench.harness import machine  # noqa: E402


def _repeated(module, query, key, value, mask, **kwargs):
    """transformers' SDPA as it is called without the packing (repeat_kv for more than one query)."""
    return attention.sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per (width, attention)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    target = load_model("smollm2-135m")
    verifier = Verifier(target.model)
    rng = np.random.default_rng(0)
    seqs = [verifier.start(rng.integers(100, 20000, n).tolist()) for n in (300, 340)]
    packed = attention._packed_sdpa

    def step(width: int) -> float:
        draft = Draft.chain(rng.integers(100, 20000, width - 1)) if width > 1 else Draft.empty()
        t = time.perf_counter()
        verifier.verify([(s, draft) for s in seqs])
        dt = time.perf_counter() - t
        for s in seqs:
            verifier.commit(s, [], [int(rng.integers(100, 20000))])
        return dt

    freeze_gc_heap()
    times: dict[str, dict[int, list[float]]] = {"packed": {}, "repeat_kv": {}}
    for i in range(args.steps + 3):  # the first 3 rounds warm up
        for width in (1, 2, 4):
            for name, fn in (("packed", packed), ("repeat_kv", _repeated)):
                attention._packed_sdpa = fn
                dt = step(width)
                if i >= 3:
                    times[name].setdefault(width, []).append(dt)
    attention._packed_sdpa = packed
    medians = {name: {str(w): round(1e3 * float(np.median(v)), 2) for w, v in by.items()}
               for name, by in times.items()}
    saved = {w: round(100 * (1 - medians["packed"][w] / medians["repeat_kv"][w]), 1) for w in ("2", "4")}
    result = {"command": " ".join(sys.argv), "machine": machine(), "rows": 2, "contexts": [300, 340],
              "median_ms": medians, "saved_pct": saved}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median_ms", "saved_pct")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
