"""ADED's compiled search against its Python reference, through the engine, and from every interface."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import actors.aded.jit_search as jit_search
from actors.aded.drafter import AdedConfig, AdedDrafter
from actors.aded.jit_search import CompiledSearch
from actors.aded.mcts import MctsConfig, mcts_paths
from actors.aded.ngram import NGramConfig, NGramModel, trigram_increments
from actors.aded.tree import BestFirstConfig, best_first_paths
from actors.aded.trigram import build_matrix
from actors.cost import CostModel
from actors.drafter import BaseDrafter, Feedback
from actors.methods import aded_config, check_options, describe
from actors.sampling import SamplingParams
from shared_state import MemoryStore, StoreConfig
from specd.cli import main


def _streams(seed: int, vocab: int, n: int = 12, length: int = 300) -> list[np.ndarray]:
    """Token streams with a preferred successor most of the time (so rows have a head and a tail)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = [int(rng.integers(vocab)), int(rng.integers(vocab))]
        for _ in range(length):
            s.append((s[-1] * 7 + s[-2]) % vocab if rng.random() < 0.6 else int(rng.integers(vocab)))
        out.append(np.array(s))
    return out


def _model(seed: int, vocab: int, adaptive: int) -> tuple[NGramModel, list[np.ndarray]]:
    """Matrix from seeded streams; ``adaptive`` random increments in the store (rows the search must combine)."""
    streams = _streams(seed, vocab)
    matrix = build_matrix(streams, vocab, top_k=int(4 + seed % 6), progress=False)
    store = MemoryStore(StoreConfig(namespace="t"))
    rng = np.random.default_rng(seed + 1000)
    store.add([(int(rng.integers(-1, vocab)), int(rng.integers(vocab)), int(rng.integers(vocab)),
                float(rng.uniform(0.01, 1.5))) for _ in range(adaptive)])
    config = NGramConfig(pair_alpha=float(rng.uniform(0, 3)), backoff=float(rng.uniform(0.1, 1.0)),
                         max_successors=int(rng.integers(3, 13)))
    return NGramModel(matrix, store, config), streams


@pytest.mark.parametrize("seed", range(12))
def test_compiled_search_equals_reference(seed):
    vocab = (40, 97, 300)[seed % 3]
    model, streams = _model(seed, vocab, adaptive=(0, 300, 3000)[seed % 3])
    search = CompiledSearch(model)
    rng = np.random.default_rng(seed)
    for case in range(6):
        s = streams[case % len(streams)]
        i = int(rng.integers(2, len(s)))
        a, b = (int(s[i - 2]), int(s[i - 1])) if case < 5 else (-1, int(s[0]))  # -1: a one-token context
        mc = MctsConfig(simulations=int(rng.integers(1, 80)), max_depth=int(rng.integers(1, 5)),
                        rollout_len=int(rng.integers(0, 5)), top_paths=int(rng.integers(1, 30)),
                        extend=int(rng.integers(0, 3)), c1=float(rng.uniform(0.5, 40)), c2=float(rng.uniform(1, 10)),
                        value=("rollout", "path")[case % 2])
        ref_rng, jit_rng = np.random.default_rng(case), np.random.default_rng(case)
        assert search.mcts(a, b, mc, jit_rng) == mcts_paths(model.memo(), a, b, mc, ref_rng)
        assert jit_rng.random() == ref_rng.random()  # both drew the same uniforms
        bf = BestFirstConfig(max_nodes=int(rng.integers(0, 40)), max_depth=int(rng.integers(1, 9)),
                             branch=int(rng.integers(1, 6)), min_prob=float(rng.choice([0.0, 0.01, 0.05])))
        assert search.best_first(a, b, bf) == best_first_paths(model.memo(), a, b, bf)
    if seed % 3:
        assert search.mirror.combined > 0  # the searches met states with adaptive weights


def test_static_rows_equal_ngram_model():
    model, _ = _model(5, 300, adaptive=0)
    search = CompiledSearch(model)
    rng = np.random.default_rng(0)
    for a, b in [(-1, 3), (299, 299), (300, 1), (5, 400)] + rng.integers(0, 300, (300, 2)).tolist():
        assert search.static_row(a, b) == model._combine(a, b, {}), (a, b)


def test_search_follows_store_changes():
    """Between calls the store changes (rows gained, changed, emptied, evicted): still the reference's trees."""
    model, streams = _model(7, 97, adaptive=500)
    model.store.config = model.store.config.model_copy(update={"max_rows": 400})  # evicts as it goes
    search = CompiledSearch(model)
    s = streams[0]
    for step in range(2, 60):
        a, b = int(s[step - 1]), int(s[step])
        config = MctsConfig(simulations=40, value="path" if step % 2 else "rollout")
        assert search.mcts(a, b, config, np.random.default_rng(step)) == \
            mcts_paths(model.memo(), a, b, config, np.random.default_rng(step))
        assert search.best_first(a, b, BestFirstConfig()) == best_first_paths(model.memo(), a, b, BestFirstConfig())
        model.store.add(trigram_increments(s[: step + 3].tolist(), step, 0.7))  # new rows
        c = int(s[step + 1])
        model.store.add([(b, c, int(s[step + 2]), -5.0), (a, b, c, -5.0)])  # rows emptied / weights removed
    assert search.mirror.combined > 0 and model.store.evicted > 0


def test_mirror_starts_over_when_full_or_overflowed():
    """A mirror out of room, or whose watch overflowed, reloads the whole view and stays exact."""
    model, streams = _model(4, 97, adaptive=200)
    search = CompiledSearch(model)
    search.mirror._allocate(16, 16)  # far too small: the next sync must start over
    search.mirror.watch.limit = 50
    rng = np.random.default_rng(0)
    for step in range(30):
        model.store.add([(int(rng.integers(97)), int(rng.integers(97)), int(rng.integers(97)), 0.5)
                         for _ in range(5 if step % 3 else 200)])  # every third step overflows the watch
        a, b = int(rng.integers(97)), int(rng.integers(97))
        assert search.best_first(a, b, BestFirstConfig()) == best_first_paths(model.memo(), a, b, BestFirstConfig())
    assert len(search.mirror.arrays[2]) >= len(model.store)


def test_store_watch_reports_every_change():
    store = MemoryStore(StoreConfig(namespace="t", max_rows=10))
    store.add([(0, 0, 1, 1.0)])
    watch = store.watch(limit=100)
    assert watch.drain() == (False, {(0, 0): {1: 1.0}})  # the first drain: the whole view
    store.add([(0, 0, 1, -2.0), (1, 1, 2, 0.5)])  # a row emptied, a row added
    assert watch.drain() == (False, {(0, 0): {}, (1, 1): {2: 0.5}})
    store.add([(i, i, 1, 1.0 + i) for i in range(2, 14)])  # 13 rows: past max_rows + 10%, the lightest go
    reset, rows = watch.drain()
    assert not reset and (1, 1) in rows and rows[(1, 1)] == {} and len(store) == 10
    store.add([(i, 0, 1, 1.0) for i in range(200)])  # more than the watch's limit
    assert watch.drain() == (True, store.rows())


def test_search_over_a_redis_store_pulls_what_it_reads():
    """The compiled search reads a mirror, not ``successors``: it must still tell a Redis store what it read,
    or rows other replicas wrote would never be pulled into its drafts."""
    from redis_server import RedisServer
    from shared_state import RedisStore

    model, streams = _model(2, 97, adaptive=0)
    a, b = int(streams[0][5]), int(streams[0][6])
    fast = {"flush_interval_s": 0.02, "refresh_interval_s": 0.05, "half_life_s": None}
    with RedisServer() as server:
        mine = RedisStore(StoreConfig(namespace="t", vocab_size=97), server.url, **fast)
        model = NGramModel(model.matrix, mine, model.config)
        search = CompiledSearch(model)
        before = search.best_first(a, b, BestFirstConfig())
        other = RedisStore(StoreConfig(namespace="t", vocab_size=97), server.url, **fast)
        other.add([(a, b, 96, 3.0)])  # another replica learns a successor the matrix does not rank first
        assert other.refresh(timeout=120)  # flushed to Redis
        other.close()
        assert mine.refresh(timeout=120)  # one cycle: the reads the search marked are pulled
        after = search.best_first(a, b, BestFirstConfig())
        assert after[0][1] == 96 and after != before
        assert after == best_first_paths(model.memo(), a, b, BestFirstConfig())
        mine.close()


@pytest.mark.parametrize("search", ["best_first", "mcts"])
def test_drafter_compiled_equals_reference_over_a_request(search):
    """Whole drafter (context matching, feedback into the store, budget): compiled and reference agree."""
    model, streams = _model(3, 97, adaptive=0)
    drafts = []
    for compiled in (True, False):
        config = AdedConfig(search=search, compiled=compiled, mcts={"simulations": 50, "value": "path"})
        d = AdedDrafter(model.matrix, MemoryStore(StoreConfig(namespace="t")), config, CostModel.flat())
        ctx = streams[1][:300]
        d.start("r", ctx[:20].tolist(), SamplingParams(seed=1))
        out, pos = [], 20
        while pos < 200:
            draft = d.propose("r", ctx[:pos], 32)
            out.append((draft.tokens.tolist(), draft.parents.tolist()))
            topk = torch.tensor([[int(ctx[pos]), -1, -1, -1]] * (1 + len(draft)))
            d.observe("r", Feedback(draft, [], [int(ctx[pos])], topk))
            pos += 1
        drafts.append(out)
    assert drafts[0] == drafts[1]
    assert sum(len(t) > 1 for t, _ in drafts[0]) > 20  # multi-node trees, not empty drafts


def test_best_first_default_follows_the_cost_curve():
    from actors.aded.simulator import smollm2_cpu_cost
    from actors.aded.tree import FLAT_CURVE_BEST_FIRST

    model, _ = _model(1, 40, adaptive=0)
    store = MemoryStore(StoreConfig(namespace="t"))
    assert AdedDrafter(model.matrix, store, None, CostModel.flat()).config.best_first == FLAT_CURVE_BEST_FIRST
    assert AdedDrafter(model.matrix, store, None, smollm2_cpu_cost("onednn")).config.best_first == BestFirstConfig()
    mine = AdedConfig(best_first={"max_nodes": 10})
    assert AdedDrafter(model.matrix, store, mine, CostModel.flat()).config.best_first.max_nodes == 10


def test_serve_config_takes_aded_fields_and_rejects_unknown_keys(tmp_path, capsys):
    from deploy.config import ServeConfig, load_config

    cfg = ServeConfig(drafter_options={"aded": {"search": "mcts", "mcts": {"simulations": 64}}})
    assert aded_config(cfg.drafter_options["aded"]).mcts.simulations == 64
    assert "MCTS (PUCT, 64 simulations" in describe("aded", cfg.drafter_options["aded"])
    assert "best-first" in describe("aded", None)
    for bad, words in [({"aded": {"serch": "mcts"}}, "serch"), ({"aded": {"aded": {"search": "mcts"}}}, "aded"),
                       ({"aded": {"mcts": {"simulation": 3}}}, "mcts.simulation"), ({"sd": {"gama": 3}}, "gama"),
                       ({"nope": {}}, "unknown method")]:
        with pytest.raises(ValueError, match=words):
            ServeConfig(drafter_options=bad)
    check_options("mtad", {"gamma": 3, "tau": 0.5})

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"drafter_options": {"aded": {"search": "mcts", "mcts": {"simulations": 64}}}}))
    assert main(["serve", "--config", str(path), "--print-serve-config"]) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["drafter_options"]
    assert rendered == {"aded": {"search": "mcts", "mcts": {"simulations": 64}}}
    # flags on top of the file
    assert main(["serve", "--config", str(path), "--aded-value", "path", "--aded-depth", "4",
                 "--print-serve-config"]) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["drafter_options"]
    assert rendered["aded"] == {"search": "mcts", "mcts": {"simulations": 64, "value": "path", "max_depth": 4}}
    assert load_config(path).drafter_options["aded"]["search"] == "mcts"

    path.write_text(yaml.safe_dump({"drafter_options": {"aded": {"search": "mcts", "simulations": 64}}}))
    assert main(["serve", "--config", str(path), "--print-serve-config"]) == 2
    err = capsys.readouterr().err
    assert "simulations" in err and "Traceback" not in err


TINY = ["--model", "tiny-llama", "--no-chat", "--max-new-tokens", "24", "--json"]


def test_cli_flags_reach_the_search(capsys, monkeypatch):
    calls = []
    original = jit_search.CompiledSearch.mcts

    def spy(self, a, b, config, rng):
        calls.append(config)
        return original(self, a, b, config, rng)

    monkeypatch.setattr(jit_search.CompiledSearch, "mcts", spy)
    assert main(["generate", *TINY, "def f(x): return x + x", "--method", "ar"]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert main(["generate", *TINY, "def f(x): return x + x", "--method", "aded", "--aded-search", "mcts",
                 "--aded-simulations", "12", "--aded-depth", "2", "--aded-value", "path"]) == 0
    aded = json.loads(capsys.readouterr().out)
    assert aded["token_ids"] == ar["token_ids"]
    assert calls and all((c.simulations, c.max_depth, c.value) == (12, 2, "path") for c in calls)


@pytest.mark.parametrize("args, message", [
    (["--method", "ar", "--aded-search", "mcts"], "applies to --method aded only"),
    (["--method", "aded", "--aded-simulations", "5"], "needs --aded-search mcts"),
    (["--method", "aded", "--aded-search", "mcts", "--aded-simulations", "0"], "simulations"),
    (["--server", "127.0.0.1:1", "--aded-search", "mcts"], "server setting"),
])
def test_cli_flag_errors_are_messages(capsys, args, message):
    assert main(["generate", *TINY, "hi", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


class _Recording(BaseDrafter):
    """The drafter as the engine sees it, noting each draft's size (to check trees were really drafted).
    BaseDrafter's ``propose_batch`` calls ``propose`` below, so every draft the engine asks for is noted."""

    def __init__(self, drafter) -> None:
        self.drafter, self.sizes = drafter, []
        self.target_topk = drafter.target_topk

    def __getattr__(self, name):  # whatever else the engine reads of a drafter
        return getattr(self.drafter, name)

    def start(self, *a):
        self.drafter.start(*a)

    def propose(self, request_id, context, max_nodes):
        draft = self.drafter.propose(request_id, context, max_nodes)
        self.sizes.append((int((draft.parents < 0).sum()), int((draft.parents >= 0).sum())))  # (level 1, deeper)
        return draft

    def observe(self, *a):
        self.drafter.observe(*a)

    def finish(self, *a):
        self.drafter.finish(*a)


@pytest.mark.parametrize("value", ["rollout", "path"])
def test_mcts_sampled_output_has_target_distribution(value):
    """Sampling through the engine with MCTS trees of several nodes and levels: the exact target distribution."""
    from scipy.stats import chisquare

    import actors.engine as engine_mod
    import actors.models as models
    from actors.drafter import NoDrafter
    from specd_testing import exact_pair_distribution

    target = models.load_model("tiny-llama")
    engine = engine_mod.Engine(target)
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True)
    rng = np.random.default_rng(100)
    outs = [engine.run(rng.integers(0, 256, int(rng.integers(2, 30))).tolist(), greedy, NoDrafter()).token_ids
            for _ in range(8)]
    matrix = build_matrix([np.array(o) for o in outs], 259, progress=False)
    # 6 tokens: the first step may draft 5 nodes (the engine keeps room for the bonus token), more than the
    # 3 first-level candidates; the first two output tokens, whose exact joint distribution is known, come
    # out of those trees.
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=3, ignore_eos=True)
    prompt = [5, 17, 99]
    cells, expected = exact_pair_distribution(target.model, prompt, params)
    expected = np.array(expected) / sum(expected)  # float32 products: scipy wants sums equal to 1e-8
    store = MemoryStore(StoreConfig(namespace="tiny"))
    first = {}
    for (a, _), p in zip(cells, expected):
        first[a] = first.get(a, 0.0) + p
    for (a, b), p in zip(cells, expected):  # the store mirrors the target: trees follow its likely paths
        store.add([(prompt[-2], prompt[-1], a, 3.0 * first[a] / len(cells)), (prompt[-1], a, b, 3.0 * p / first[a])])
    config = AdedConfig(search="mcts", mcts={"simulations": 40, "value": value},
                        adapt={"verified_delta": 0.0, "topk_weights": ()}, suffix={"enabled": False})
    drafter = _Recording(AdedDrafter(matrix, store, config, CostModel.flat()))
    n = 1500  # 16 decoding at a time on a flat curve (the batch budget keeps every node), each its own seed
    outs = engine_mod.Engine(target, cost=CostModel.flat()).run_many(
        [prompt] * n, [params.model_copy(update={"seed": s}) for s in range(n)], drafter, 16)
    pairs = [tuple(out.token_ids[:2]) for out in outs]
    siblings = sum(1 for first, _ in drafter.sizes if first >= 2)  # multi-draft rejection at level 1
    deep = sum(1 for _, below in drafter.sizes if below > 0)  # and depth 2
    assert siblings > n // 10 and deep > n // 10, (siblings, deep, len(drafter.sizes))
    observed = [pairs.count(c) for c in cells]
    assert sum(observed) == n
    assert chisquare(observed, expected * n).pvalue > 1e-3


@pytest.mark.smollm2
@pytest.mark.parametrize("search", ["best_first", "mcts"])
def test_smollm2_greedy_identical_to_ar(smollm2, search):
    from actors.drafter import NoDrafter
    from actors.engine import Engine
    from actors.methods import make_drafter

    engine = Engine(smollm2)
    drafter = make_drafter("aded", smollm2, search=search, mcts={"simulations": 150})
    params = SamplingParams(max_new_tokens=32)
    drafted = 0
    for prompt in ("Write a Python function that returns the sum of a list.", "Why is the sea salty?"):
        ids = smollm2.encode(prompt, chat=True)
        ar = engine.run(ids, params, NoDrafter())
        spec = engine.run(ids, params, drafter)
        assert spec.token_ids == ar.token_ids
        drafted += spec.stats.drafted_tokens
    assert drafted > 0
