"""By hand: where one compiled MCTS call's time goes (cache re-check, kernel rounds, settle, keep), on the recorded
traces, as `specd bench --suite search` times a call. Usage: probe.py {mtbench,humaneval} {rollout,path}"""
import sys, time, json
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import numpy as np
from actors.models import load_model
from actors.aded.drafter import AdedConfig
from actors.aded.corpus import default_matrix_path
from actors.aded import jit_search as J
from actors.aded.ngram import NGramModel, trigram_increments
from actors.aded.trigram import TrigramMatrix
from shared_state import MemoryStore, StoreConfig

target = load_model("smollm2-135m")
traces = [json.loads(l) for l in open(ROOT / "results/2026-12-07r-search" / f"traces-{sys.argv[1]}.jsonl")]
c = AdedConfig(search="mcts", mcts={"value": sys.argv[2]})
matrix = TrigramMatrix.load(default_matrix_path(target.identity))
model = NGramModel(matrix, MemoryStore(StoreConfig(namespace=target.identity)), c.ngram)
search = J.CompiledSearch(model)
acc = {"current": 0.0, "kernel": 0.0, "settle": 0.0, "keep": 0.0, "total": 0.0}
def wrap(obj, name, key):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[key] += time.perf_counter() - t; return r
    setattr(obj, name, g)
wrap(J.SearchCache, "current", "current"); wrap(J.RowTable, "settle", "settle"); wrap(J.SearchCache, "keep", "keep")
wrap(J.K, "mcts", "kernel")
calls = 0; sizes = []
for tr in traces:
    p, o = tr["prompt_ids"], tr["output_ids"]; ctx = p + o
    model.store.add(trigram_increments(p, 0, c.adapt.verified_delta))
    cache = J.SearchCache()
    for i in range(len(p) + 1, len(ctx), 4):
        t = time.perf_counter()
        search.mcts(ctx[i-2], ctx[i-1], c.mcts, np.random.default_rng(i), cache)
        acc["total"] += time.perf_counter() - t; calls += 1; sizes.append(len(cache))
out = {"traces": sys.argv[1], "value": sys.argv[2], "calls": calls,
       "us_per_call": {k: round(1e6 * v / calls, 1) for k, v in acc.items()},
       "rounds_per_call": round(search.rounds / search.calls, 3), "cache_states_mean": round(float(np.mean(sizes)), 1)}
print(json.dumps(out))
