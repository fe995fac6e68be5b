"""What the engine reports of each decoding step (StepInfo): the budget's expectation, and that only steps
that decode are reported (a step that only prefills is not); the curve the budget prices steps with,
corrected by the steps the engine times (TimedCost)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.budget import choose_batch_budget, expected_tokens
from actors.cost import CostModel, TimedCost
from actors.draft import Draft
from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.sampling import SamplingParams
from actors.stats import StepInfo
from specd.bench.batching import run_embedded


def _estimated(p: list[float]) -> Draft:
    return Draft(np.arange(1, len(p) + 1), list(range(-1, len(p) - 1)), p_accept=np.array(p))


def test_expected_tokens_is_rows_plus_the_kept_estimates_scaled_and_capped_as_the_budget_reads_them():
    drafts = [_estimated([0.9, 0.5, 0.2]), Draft.chain([5, 6]), Draft.empty()]
    assert expected_tokens(drafts, [2, 2, 0]) == pytest.approx(3 + 0.9 + 0.5)  # the chain has no estimates
    assert expected_tokens(drafts, [3, 2, 0], factor=0.5) == pytest.approx(3 + 0.45 + 0.25 + 0.1)
    assert expected_tokens(drafts, [3, 2, 0], factor=2.0) == pytest.approx(3 + 1.0 + 1.0 + 0.4)


def test_expected_speedup_is_expected_tokens_per_plain_step_of_the_rows():
    info = StepInfo(rows=4, proposed=8, verified=6, tokens=12, cost_ratio=1.25, expected=7.5)
    assert info.expected_speedup == pytest.approx(7.5 / (4 * 1.25))


def test_run_many_reports_every_decoding_step_and_no_prefill_only_step(target):
    engine = Engine(target, EngineConfig(max_batch=2, prefill_chunk=4), cost=CostModel.flat())
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    engine.add(list(range(1, 11)), params, NoDrafter(), "long")  # 10 prompt tokens: 3 chunks of 4
    assert engine.step() == [] and engine.last_step is None  # prefill only: no decoding step to report
    engine.abort("long")
    steps: list[StepInfo] = []
    outs = engine.run_many([list(range(1, 11)), [1, 2, 3]], params, NoDrafter(), on_step=steps.append)
    # one row per request per decoding step, and no step without a row (the long prompt's prefill-only steps)
    assert sum(s.rows for s in steps) == sum(o.stats.target_forwards for o in outs) == 10
    assert all(s.rows >= 1 for s in steps) and any(s.rows == 2 for s in steps)
    assert all(s.verified == 0 and s.expected == s.rows and s.expected_speedup == 1.0 for s in steps)


def test_run_embedded_summarises_the_steps(target):
    engine = Engine(target, EngineConfig(max_batch=2), cost=CostModel.flat())
    r = run_embedded(engine, NoDrafter(), [[1, 2, 3], [4, 5, 6]], SamplingParams(max_new_tokens=3, ignore_eos=True), 2)
    assert r["steps"] == 3 and r["mean_rows_per_step"] == 2.0
    assert r["speculative_steps_pct"] == 0.0 and r["budget_expected_speedup"] == 1.0
    assert r["full_batch_steps_pct"] == 100.0 and r["full_batch_tokens_per_second"] > 0


def test_full_batch_throughput_leaves_out_the_drain_of_a_closed_loop(target):
    """Three prompts two at a time: the third decodes alone once the first two are done (3 of 6 steps);
    the full-batch rate counts only the two-row steps, each step's committed tokens (``produced``)."""
    from specd.bench.batching import full_batch_fields

    engine = Engine(target, EngineConfig(max_batch=2), cost=CostModel.flat())
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    r = run_embedded(engine, NoDrafter(), [[1, 2, 3], [4, 5, 6], [7, 8, 9]], params, 2)
    assert r["steps"] == 6 and r["full_batch_steps_pct"] == 50.0
    steps = [StepInfo(rows=2, proposed=0, verified=0, tokens=2, produced=2),
             StepInfo(rows=1, proposed=0, verified=0, tokens=1, produced=1),
             StepInfo(rows=2, proposed=3, verified=3, tokens=8, produced=5)]
    got = full_batch_fields(list(zip([1.0, 2.0, 6.0], steps)), start=0.0, c=2)
    assert got == {"full_batch_tokens_per_second": 7 / 5, "full_batch_steps_pct": 66.7}  # (2 + 5) / (1 + 4) s
    outs = []
    engine.run_many([[1, 2, 3], [4, 5]], params, NoDrafter(), on_step=outs.append)
    assert [s.produced for s in outs] == [s.rows for s in outs] == [2, 2, 2]


def test_timed_cost_reprices_the_shapes_it_times_and_the_others_from_their_prior():
    """A curve 9% high on plain two-row steps (as measured on this CPU's chat run) buys a node worth 4%;
    once the plain steps are timed the node no longer pays, and timing the widened step brings it back."""
    curve = CostModel.from_profile({"batch": [1, 2], "k": [1, 2, 4], "context_lengths": [0, 1e6],
                                    "seconds": [[[0.070, 0.0716, 0.0862]] * 2] * 2})
    timed = TimedCost(curve)
    drafts = [_estimated([0.08, 0.04])] * 2
    assert choose_batch_budget(drafts, 100, timed) == [1, 1]  # untimed: the curve's prices
    for _ in range(50):
        timed.observe(1, 100, 2, 0.064)
    assert timed.factor(1, rows=2) == pytest.approx(0.064 / 0.070, rel=0.03)
    assert timed.factor(2, rows=2) == timed.factor(1, rows=1) == 1.0  # never timed
    assert choose_batch_budget(drafts, 100, timed) == [0, 0]
    for _ in range(50):
        timed.observe(2, 100, 2, 0.0650)
    assert choose_batch_budget(drafts, 100, timed) == [1, 1]
    # a width never run takes the widened steps' pooled correction (here about 0.91), a plain one none
    assert timed.factor(4, rows=2) == pytest.approx(timed.factor(2, rows=2), rel=0.03)
    assert timed.factor(4, rows=2) < 0.93
    assert timed.factor(1, rows=1) == 1.0


def test_timed_cost_moves_little_on_one_outlier():
    timed = TimedCost(CostModel.flat(0.05))
    timed.observe(1, 10, 1, 5.0)  # a preempted step, 100x its price
    assert 1.0 < timed.factor(1) <= np.exp(0.5 / 5)
    timed.observe(1, 10, 1, 0.0)  # a clock that did not move is ignored
    assert timed.factor(1) <= np.exp(0.5 / 5)


def test_the_engine_times_its_steps_and_a_step_with_a_sampled_request_reads_the_measured_curve(target, monkeypatch):
    import actors.engine as engine_mod

    engine = Engine(target, EngineConfig(max_batch=2), cost=CostModel.flat(1000.0))  # priced far above real
    used, choose = [], engine_mod.choose_batch_budget

    def recording(drafts, context, cost, *args):
        used.append(cost)
        return choose(drafts, context, cost, *args)

    monkeypatch.setattr(engine_mod, "choose_batch_budget", recording)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.run_many([[1, 2, 3], [4, 5, 6, 7]], greedy, NoDrafter())
    assert used and all(c is engine.timed_cost for c in used)
    assert engine.timed_cost.factor(1, rows=2) < 0.8  # every timed step pulled the price down
    used.clear()
    sampled = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=1)
    engine.run_many([[1, 2, 3], [4, 5, 6, 7]], [greedy, sampled], NoDrafter())
    assert used and all(c is engine.cost for c in used)
    off = Engine(target, EngineConfig(max_batch=2, budget_timing=False), cost=CostModel.flat())
    used.clear()
    off.run_many([[1, 2, 3]], greedy, NoDrafter())
    assert used and all(c is off.cost for c in used)
