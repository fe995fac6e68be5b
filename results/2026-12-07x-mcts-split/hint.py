"""By hand: does seeding a request's SearchCache with its prompt's adaptive rows (what its start folds) save rounds and time?
Usage: hint.py {mtbench,humaneval} {rollout,path} {hint,none}; prints one line (the lines are in hint.txt)."""
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
name, value, hint = sys.argv[1], sys.argv[2], sys.argv[3] == "hint"
traces = [json.loads(l) for l in open(ROOT / "results/2026-12-07r-search" / f"traces-{name}.jsonl")]
c = AdedConfig(search="mcts", mcts={"value": value})
matrix = TrigramMatrix.load(default_matrix_path(target.identity))
model = NGramModel(matrix, MemoryStore(StoreConfig(namespace=target.identity)), c.ngram)
search = J.CompiledSearch(model)
W = c.ngram.max_successors
def seed(cache, states):
    states = [s for s in dict.fromkeys(states) if model.store.successors(*s)]
    n = len(states)
    ids = np.zeros((n, W), np.int64); probs = np.zeros((n, W)); lens = np.zeros(n, np.int64)
    for i, (a, b) in enumerate(states):
        x, p = model.successors(a, b); lens[i] = len(x); ids[i, :len(x)] = x; probs[i, :len(x)] = p
    cache.rows = (np.array([a for a, _ in states], np.int64), np.array([b for _, b in states], np.int64), ids, probs, lens)
    cache.states = states
    cache.sources = [model.store.successors(*s) for s in states]
times, hint_t = [], 0.0
for tr in traces:
    p, o = tr["prompt_ids"], tr["output_ids"]; ctx = p + o
    model.store.add(trigram_increments(p, 0, c.adapt.verified_delta))
    cache = J.SearchCache()
    if hint:
        t = time.perf_counter(); seed(cache, [(p[i-2], p[i-1]) for i in range(2, len(p))]); hint_t += time.perf_counter() - t
    for i in range(len(p) + 1, len(ctx), 4):
        t = time.perf_counter()
        search.mcts(ctx[i-2], ctx[i-1], c.mcts, np.random.default_rng(i), cache)
        times.append(time.perf_counter() - t)
print(name, value, hint, "median us", round(1e6*np.median(times),1), "mean us", round(1e6*np.mean(times),1), "rounds/call", round(search.rounds/search.calls,3), "hint ms per trace", round(1e3*hint_t/len(traces),2))
