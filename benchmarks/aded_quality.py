"""ADED's drafter quality in the offline simulator alone: tokens per forward under a flat cost curve.

    python benchmarks/aded_quality.py --out runs/aded_quality.json
    python benchmarks/aded_quality.py --config '{"recycle": {"enabled": false}}' --traces mtbench=traces.jsonl

The same replay as ``specd bench --suite search``'s simulator part (``actors.aded.simulator.replay``, a
fresh drafter per trace set, ``CostModel.flat()``, at most ``MAX_NODES`` = 64 nodes a step) without the
engine part, so it takes about a minute. No target forward runs and the replay is deterministic: the
figures do not depend on how busy the machine is. Trace sets: the target's shipped tuning traces
(``tuning-chat`` / ``tuning-code``), plus any ``NAME=PATH`` given (e.g. the ``traces-mtbench.jsonl`` /
``traces-humaneval.jsonl`` that ``specd bench --suite search`` records in its output directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from actors.aded.corpus import default_matrix_path  # noqa: E402
from actors.aded.drafter import AdedDrafter  # noqa: E402
from actors.aded.simulator import Trace, load_traces, replay, shipped_traces  # noqa: E402
from actors.aded.trigram import TrigramMatrix  # noqa: E402
from actors.cost import CostModel  # noqa: E402
from actors.methods import aded_config  # noqa: E402
from shared_state import MemoryStore, StoreConfig  # noqa: E402
from specd.bench.search import MAX_NODES, SEARCHES, split_tuning  # noqa: E402

SMOLLM2 = "237d1306abb03682"  # SmolLM2's tokenizer identity: its matrix and shipped traces


def trace_sets(identity: str, extra: list[str]) -> dict[str, list[Trace]]:
    """The shipped tuning traces (``tuning-chat`` / ``tuning-code``) and each ``NAME=PATH`` of ``extra``."""
    sets = {}
    shipped = shipped_traces(identity)
    if shipped is not None:
        sets.update(split_tuning(load_traces(shipped)))
    for item in extra:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--traces takes NAME=PATH, not {item!r}")
        sets[name] = load_traces(path)
    return sets


def load_matrix(identity: str) -> TrigramMatrix | None:
    """The target's default tri-gram matrix, or None (with a message) when it was never built."""
    path = default_matrix_path(identity)
    if not path.exists():
        print(f"no tri-gram matrix at {path}: build it with `specd ngrams build`", file=sys.stderr)
        return None
    return TrigramMatrix.load(path)


def write_result(result: dict, out: Path | None) -> None:
    """Print the JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identity", default=SMOLLM2, help="The target's tokenizer identity (matrix and traces).")
    ap.add_argument("--config", default=None, help="ADED options as JSON (AdedConfig's fields); default: every "
                    "search of `specd bench --suite search`.")
    ap.add_argument("--traces", nargs="*", default=[], help="Extra trace sets, NAME=PATH.")
    ap.add_argument("--out", type=Path, default=None, help="Write the JSON here too.")
    args = ap.parse_args(argv)
    matrix = load_matrix(args.identity)
    if matrix is None:
        return 2
    sets = trace_sets(args.identity, args.traces)
    configs = {"config": json.loads(args.config)} if args.config else SEARCHES
    flat = CostModel.flat()
    result = {"max_nodes": MAX_NODES, "cost_curve": "flat", "command": " ".join(sys.argv), "figures": {}}
    for name, options in configs.items():
        config = aded_config(options)
        result["figures"][name] = {
            suite: replay(AdedDrafter(matrix, MemoryStore(StoreConfig(namespace=args.identity)), config, flat),
                          traces, flat, max_nodes=MAX_NODES).summary()
            for suite, traces in sets.items()}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
