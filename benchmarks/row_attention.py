"""What batch-invariant attention costs: a decode forward of ragged rows with one SDPA call per row length
(``actors.attention``, the default) against one SDPA call over the batch's padded keys.

    python benchmarks/row_attention.py --out results/row_attention.json

SmolLM2-135M, rows of 100-300 cached tokens, each feeding 1 or 4 tokens; the two attentions alternate
forward by forward, medians reported. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.attention import ROW_EXACT  # noqa: E402
from actors.draft import Draft  # noqa: E402
from actors.kv import BatchKV, RowInput, causal_row, tree_row  # noqa: E402
from actors.models import load_model  # noqa: E402


def measure(model, rows: int, k: int, iters: int, rng) -> dict:
    kv = BatchKV(model)
    vocab = model.config.vocab_size
    slots = []
    for _ in range(rows):
        s = kv.add()
        kv.forward([RowInput(s, *causal_row(0, rng.integers(0, vocab, int(rng.integers(100, 300))).tolist()))],
                   logits=False)
        slots.append(s)
    draft = Draft.chain(list(range(1, k))) if k > 1 else Draft.empty()
    base = [len(s) for s in slots]
    times: dict[str, list[float]] = {ROW_EXACT: [], "sdpa": []}
    for i in range(iters):
        mode = "sdpa" if i % 2 else ROW_EXACT
        model.config._attn_implementation, kv._row_exact = mode, mode == ROW_EXACT
        batch = [RowInput(s, *tree_row(len(s), 5, draft.tokens, draft.parents, draft.depths())) for s in slots]
        t = time.perf_counter()
        kv.forward(batch)
        times[mode].append(time.perf_counter() - t)
        for s, n in zip(slots, base):
            kv.crop(s, n)
    model.config._attn_implementation = ROW_EXACT
    med = {m: float(np.median(v)) for m, v in times.items()}
    return {"rows": rows, "tokens_per_row": k, "row_exact_ms": round(1e3 * med[ROW_EXACT], 2),
            "one_call_ms": round(1e3 * med["sdpa"], 2), "cost": round(med[ROW_EXACT] / med["sdpa"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", default="runs/row_attention.json")
    args = ap.parse_args()
    model = load_model("smollm2-135m").model
    rng = np.random.default_rng(0)
    runs = [measure(model, rows, k, args.iters, rng) for rows, k in ((1, 1), (4, 1), (8, 1), (8, 4), (16, 1))]
    out = {"command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
           "torch_threads": torch.get_num_threads(), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
