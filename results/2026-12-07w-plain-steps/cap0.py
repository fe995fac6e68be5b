"""By hand: at c=8 on chat, ar vs ADED vs ADED never asked for a draft (cap 0), alternating, one engine."""
import sys, time, json
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from actors.engine import Engine, EngineConfig
from actors.methods import make_drafter
from actors.models import load_model
from actors.process import freeze_gc_heap
from actors.sampling import SamplingParams
from specd.bench.prompts import mtbench_prompts

target = load_model("smollm2-135m")
engine = Engine(target, EngineConfig(max_batch=8))
prompts = [target.encode(r["prompt"], chat=True) for r in mtbench_prompts()[:8]]
params = SamplingParams(max_new_tokens=128)
for m in ("ar", "aded"):
    engine.run_many(prompts[:2], SamplingParams(max_new_tokens=8), make_drafter(m, target), 2)
cap = engine._cap
res = {}
for rep in range(3):
    for name in ("ar", "aded", "aded-cap0"):
        engine._cap = (lambda req: 0) if name == "aded-cap0" else cap
        d = make_drafter(name.split("-")[0], target)
        freeze_gc_heap()
        steps = []
        t = time.perf_counter()
        outs = engine.run_many(prompts, params, d, 8, on_step=lambda i: steps.append((time.perf_counter(), i)))
        wall = time.perf_counter() - t
        tok = sum(len(o.token_ids) for o in outs)
        draft_s = sum(o.stats.draft_seconds for o in outs) / 8
        res.setdefault(name, []).append((round(tok / wall, 2), round(wall, 2), len(steps), round(draft_s, 2)))
        print(name, res[name][-1], flush=True)
engine._cap = cap
print(json.dumps(res))
