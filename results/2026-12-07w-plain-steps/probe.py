"""By-hand: are ADED's plain 8-row verify steps slower than ar's because of GC (or something else)?"""
import gc, sys, time, json, statistics
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
from step_costs import timed_run
from actors.engine import Engine, EngineConfig
from actors.methods import make_drafter
from actors.models import load_model
from actors.sampling import SamplingParams
from specd.bench.prompts import mtbench_prompts

gc_time = [0.0]; t0 = [0.0]
def cb(phase, info):
    if phase == "start": t0[0] = time.perf_counter()
    else: gc_time[0] += time.perf_counter() - t0[0]
gc.callbacks.append(cb)
target = load_model("smollm2-135m")
c = 8
engine = Engine(target, EngineConfig(max_batch=c))
prompts = [target.encode(r["prompt"], chat=True) for r in mtbench_prompts()[:8]]
params = SamplingParams(max_new_tokens=128)
for m in ("ar", "aded"):
    engine.run_many(prompts[:2], SamplingParams(max_new_tokens=8), make_drafter(m, target), 2)
res = {}
for rep in range(2):
    for name in ("ar", "aded", "aded-nogc", "ar-nogc"):
        if name.endswith("nogc"): gc.disable()
        gc_time[0] = 0.0
        r = timed_run(engine, prompts, params, name.split("-")[0], c)
        gc.enable()
        plain = [s[2] for s in r["steps"] if s[0] == 8 and s[1] == 1]
        res.setdefault(name, []).append((r["tokens_per_second"], round(1e3 * statistics.median(plain), 2), round(1e3*statistics.mean(plain),2), len(plain), round(gc_time[0], 3)))
        print(name, res[name][-1], flush=True)
print(json.dumps(res))
