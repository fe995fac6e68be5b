"""How far ADED's candidate sources could go: at every replayed step, is the target's continuation in them?

    python benchmarks/aded_ceiling.py --out runs/aded_ceiling.json
    python benchmarks/aded_ceiling.py --config '{"recycle": {"enabled": false}, "target_topk": 4}'

The replay is ``benchmarks/aded_quality.py``'s (flat curve, <= 64 nodes, the drafter learning as it goes);
at each step, before the feedback, it asks (all figures are per step, averaged):

- ``accepted``: draft nodes the engine accepted (tokens per forward = 1 + this);
- ``trie_oracle``: what the whole candidate trie would accept (every source, before the 64-node cut), and
  ``trie_nodes`` its size;
- ``ngram_chain_k{k}``: depth reached along the true continuation while each true token is among the
  n-gram model's top-k for its true bigram state (unbounded nodes);
- ``union_chain``: the same while each true token is offered by *any* source (n-gram top-12, the recycled
  row after the previous token, a suffix / history chain still matching): the ceiling of the sources with
  unbounded nodes;
- ``first_*``: the next token alone, per source, and ``first_any`` for their union.

Nothing here peeks into the drafter's choices: it reads the same state the drafter drafts from.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from aded_quality import SMOLLM2, load_matrix, trace_sets, write_result  # noqa: E402

from actors.aded.drafter import AdedDrafter  # noqa: E402
from actors.aded.simulator import Trace, _topk_rows, accepted_path  # noqa: E402
from actors.aded.suffix import suffix_chains  # noqa: E402
from actors.cost import CostModel  # noqa: E402
from actors.drafter import Feedback  # noqa: E402
from actors.methods import aded_config  # noqa: E402
from actors.sampling import SamplingParams  # noqa: E402
from shared_state import MemoryStore, StoreConfig  # noqa: E402

KS = (1, 4, 8, 12)
DEPTH = 16  # continuation tokens compared per step


def _in_trie(trie, truth: np.ndarray) -> int:
    """Depth of ``truth``'s longest prefix that is a root path of ``trie``."""
    index = {(p, t): i for i, (p, t) in enumerate(zip(trie.parents, trie.tokens))}
    parent, n = -1, 0
    for t in truth.tolist():
        if (parent, t) not in index:
            break
        parent, n = index[(parent, t)], n + 1
    return n


def _chain(drafter: AdedDrafter, ctx: np.ndarray, truth: np.ndarray, k: int, chains: list[list[int]]) -> int:
    """Depth reached along ``truth`` while each token is offered (n-gram top-k, recycled row, live chains)."""
    a, b, n = int(ctx[-2]), int(ctx[-1]), 0
    for j, t in enumerate(truth.tolist()):
        offered = t in drafter.model.successors(a, b)[0][:k]
        if chains is not None:
            offered = offered or t in drafter.recycler.successors(a, b)[0] or any(
                len(c) > j and c[j] == t for c in chains)
            chains = [c for c in chains if len(c) > j and c[j] == t]
        if not offered:
            break
        a, b, n = b, t, n + 1
    return n


def _step(drafter: AdedDrafter, rid: str, ctx: np.ndarray, truth: np.ndarray, sums: collections.Counter) -> None:
    state = drafter._requests[rid]
    trie = drafter._candidates(ctx, state, drafter.calibrators[state.greedy])
    sums["trie_oracle"] += _in_trie(trie, truth)
    sums["trie_nodes"] += len(trie)
    chains = [c.tolist() for _, c in suffix_chains(ctx, drafter.config.suffix) + drafter.history.chains(ctx)]
    for k in KS:
        sums[f"ngram_chain_k{k}"] += _chain(drafter, ctx, truth, k, None)
    sums["union_chain"] += _chain(drafter, ctx, truth, 12, chains)
    t0, (a, b) = int(truth[0]), (int(ctx[-2]), int(ctx[-1]))
    ngram = drafter.model.successors(a, b)[0]
    for k in KS:
        sums[f"first_ngram_k{k}"] += t0 in ngram[:k]
    recycled = drafter.recycler.successors(a, b)[0]
    sums["first_recycled"] += t0 in recycled
    sums["first_suffix_or_history"] += any(c[:1] == [t0] for c in chains)
    sums["first_any"] += t0 in ngram or t0 in recycled or any(c[:1] == [t0] for c in chains)
    sums["first_trie"] += _in_trie(trie, truth[:1])


def ceiling(drafter: AdedDrafter, traces: list[Trace]) -> dict:
    sums: collections.Counter = collections.Counter()
    for i, trace in enumerate(traces):
        rid, out = f"c{i}", np.asarray(trace.output_ids, np.int64)
        context = np.asarray(trace.prompt_ids + trace.output_ids, np.int64)
        drafter.start(rid, trace.prompt_ids, SamplingParams())
        pos = 1
        while pos < len(out):
            ctx = context[: len(trace.prompt_ids) + pos]
            draft = drafter.propose(rid, ctx, 64)
            _step(drafter, rid, ctx, out[pos: pos + DEPTH], sums)
            path = accepted_path(draft, out[pos:])
            sums["steps"] += 1
            sums["accepted"] += len(path)
            new = out[pos: pos + len(path) + 1].tolist()
            drafter.observe(rid, Feedback(draft, path, new, _topk_rows(trace, draft, pos, path, drafter.target_topk)))
            pos += len(new)
        drafter.finish(rid)
    steps = max(1, sums.pop("steps"))
    return {"steps": steps, "tokens_per_forward": round(1 + sums["accepted"] / steps, 3),
            **{k: round(v / steps, 3) for k, v in sums.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identity", default=SMOLLM2, help="The target's tokenizer identity (matrix and traces).")
    ap.add_argument("--config", default="{}", help="ADED options as JSON (AdedConfig's fields).")
    ap.add_argument("--traces", nargs="*", default=[], help="Extra trace sets, NAME=PATH.")
    ap.add_argument("--out", type=Path, default=None, help="Write the JSON here too.")
    args = ap.parse_args(argv)
    matrix = load_matrix(args.identity)
    if matrix is None:
        return 2
    config, flat = aded_config(json.loads(args.config)), CostModel.flat()
    result = {"config": json.loads(args.config), "command": " ".join(sys.argv), "ceiling": {
        name: ceiling(AdedDrafter(matrix, MemoryStore(StoreConfig(namespace=args.identity)), config, flat), traces)
        for name, traces in trace_sets(args.identity, args.traces).items()}}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
