"""ADED through the real decode engine on a tiny model: greedy identity and the sampled distribution."""

from __future__ import annotations

import numpy as np
import pytest

import actors.engine as engine_mod
from actors.aded.drafter import AdedConfig, AdedDrafter
from actors.aded.trigram import build_matrix
from actors.cost import CostModel, smollm2_cpu_cost
from actors.drafter import NoDrafter
from actors.sampling import SamplingParams
from shared_state import MemoryStore, StoreConfig
from specd_testing import exact_pair_distribution

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(target):
    # Drafting always: these tests judge the drafts; on a tiny model the draft gate would hold most back
    # (its forward costs about what ADED's drafting does), which tests/test_draft_gate.py checks.
    return engine_mod.Engine(target, engine_mod.EngineConfig(draft_gate=False))


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(2, 30))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def matrix(engine):
    """A matrix of the tiny target's own greedy outputs on other prompts: drafts are often right."""
    outs = [engine.run(p, GREEDY, NoDrafter()).token_ids for p in _prompts(12, seed=100)]
    return build_matrix([np.array(o) for o in outs], 259, progress=False)


@pytest.mark.parametrize("search,cost", [("best_first", "cpu"), ("best_first", "flat"), ("mcts", "flat")])
def test_greedy_identity(engine, matrix, search, cost):
    costs = smollm2_cpu_cost() if cost == "cpu" else CostModel.flat()
    config = AdedConfig(search=search, mcts={"simulations": 30})
    drafter = AdedDrafter(matrix, MemoryStore(StoreConfig(namespace="tiny")), config, costs)
    drafted = forwards = tokens = 0
    for prompt in _prompts(10, seed=7):
        ar = engine.run(prompt, GREEDY, NoDrafter())
        spec = engine.run(prompt, GREEDY, drafter)
        assert spec.token_ids == ar.token_ids
        drafted += spec.stats.drafted_tokens
        forwards += spec.stats.target_forwards
        tokens += len(spec.token_ids)
    assert drafted > 0
    assert tokens / forwards > 1.2  # the target's own n-grams and repeats are found


def test_recycled_topk_alone_drafts_and_keeps_greedy_identity(engine, matrix):
    # Only Token Recycling's rows: no n-gram search, no context or history matching, no store weights.
    config = AdedConfig(search="none", suffix={"enabled": False}, history={"enabled": False},
                        adapt={"topk_weights": (), "verified_delta": 0.0})
    drafter = AdedDrafter(matrix, MemoryStore(StoreConfig(namespace="tiny")), config, CostModel.flat())
    accepted = drafted = 0
    for prompt in _prompts(8, seed=11):
        ar = engine.run(prompt, GREEDY, NoDrafter())
        spec = engine.run(prompt, GREEDY, drafter)
        assert spec.token_ids == ar.token_ids
        drafted += spec.stats.drafted_tokens
        accepted += spec.stats.accepted_tokens
    assert drafted > 0 and accepted > 0  # the rows the engine returned were drafted, and some were right


def test_sampled_output_has_target_distribution(engine, target, matrix):
    from scipy.stats import chisquare

    params = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=3, ignore_eos=True)
    prompt = [5, 17, 99]
    cells, expected = exact_pair_distribution(target.model, prompt, params)
    # Teach the store the likeliest continuation so drafts are non-empty and often (not always) right.
    store = MemoryStore(StoreConfig(namespace="tiny"))
    a0 = max(cells, key=lambda c: expected[cells.index(c)])
    store.add([(prompt[-2], prompt[-1], a0[0], 3.0), (prompt[-1], a0[0], a0[1], 3.0)])
    drafter = AdedDrafter(matrix, store, AdedConfig(adapt={"verified_delta": 0.0, "topk_weights": ()}),
                          CostModel.flat())
    n = 2000  # 16 decoding at a time on a flat curve (the batch budget keeps every node), each its own seed
    outs = engine_mod.Engine(target, cost=CostModel.flat()).run_many(
        [prompt] * n, [params.model_copy(update={"seed": s}) for s in range(n)], drafter, 16)
    pairs = [tuple(out.token_ids[:2]) for out in outs]
    assert sum(out.stats.drafted_tokens for out in outs) > n / 2
    observed = [pairs.count(c) for c in cells]
    assert sum(observed) == n
    expected = np.array(expected) / np.sum(expected) * n  # float32 rows: the exact law sums to 1 +- 1e-7
    assert chisquare(observed, expected).pvalue > 1e-3
