"""The draft gate: a request whose drafting costs more than it adds stops drafting, probes now and then,
and keeps drafting when it pays; output never changes, and sampled requests are never held."""

import numpy as np
import pytest

from actors.budget import DraftGate
from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.sampling import SamplingParams
from actors.sd import ModelDrafter
from specd_testing import TreeDrafter

GREEDY = SamplingParams(max_new_tokens=48, ignore_eos=True)


def drafted_pattern(gate: DraftGate, steps: int, gained: float, overhead_s: float) -> str:
    out = []
    for _ in range(steps):
        if gate.should_draft():
            gate.update(rows=8, gained=gained, overhead_s=overhead_s, added_verify_s=0.01, plain_s=0.1)
            out.append("D")
        else:
            out.append(".")
    return "".join(out)


def test_gate_backs_off_while_drafting_costs_more_than_it_adds():
    # 8 rows x (10 ms drafting + 10 ms added verify) / 100 ms plain = 1.6 tokens of cost per step, 0.2 gained.
    pattern = drafted_pattern(DraftGate(warmup=4), 80, gained=0.2, overhead_s=0.01)
    assert pattern.startswith("DDDDD")  # the warm-up is never judged
    gaps = [len(g) for g in pattern.split("D")[1:-1]]
    assert gaps[-1] == 32 and gaps[:5] == [0, 0, 0, 0, 1]  # probes after 1, 2, 4, ... up to max_skip steps
    assert pattern.count("D") < 15


def test_gate_stays_open_when_drafting_pays():
    assert drafted_pattern(DraftGate(), 50, gained=3.0, overhead_s=0.01) == "D" * 50


def test_gate_reopens_when_the_text_turns_predictable():
    gate = DraftGate(warmup=0)
    drafted_pattern(gate, 40, gained=0.0, overhead_s=0.01)
    assert gate.skip > 1
    assert drafted_pattern(gate, 200, gained=5.0, overhead_s=0.01).endswith("D" * 50)


class Counting(TreeDrafter):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.proposed = 0

    def propose(self, request_id, context, max_nodes):
        self.proposed += 1
        return super().propose(request_id, context, max_nodes)


def prompt(seed=0):
    return np.random.default_rng(seed).integers(0, 256, 12).tolist()


@pytest.mark.parametrize("gate", [True, False])
def test_hopeless_drafts_are_held_back_and_output_is_unchanged(target, gate):
    engine = Engine(target, EngineConfig(draft_gate=gate))
    ar = engine.run(prompt(), GREEDY, NoDrafter())
    drafter = Counting(259, seed=0, mode="random", size=6)  # random tokens: nearly never accepted
    out = engine.run(prompt(), GREEDY, drafter)
    assert out.token_ids == ar.token_ids
    steps = out.stats.target_forwards
    if gate:
        assert drafter.proposed < steps / 2
        assert len(drafter.observed) == drafter.proposed  # held steps are not told either
    else:
        assert drafter.proposed >= steps - 1  # all but a last step with no room left for a draft


def test_a_drafter_as_slow_as_the_target_is_held_back(target):
    """sd drafting with the target itself: all 5 tokens accepted, but 5 target forwards to draft them."""
    engine = Engine(target)
    ar = engine.run(prompt(1), GREEDY, NoDrafter())
    free = Engine(target, EngineConfig(draft_gate=False)).run(prompt(1), GREEDY, ModelDrafter(target.model, gamma=5))
    gated = engine.run(prompt(1), GREEDY, ModelDrafter(target.model, gamma=5))
    assert gated.token_ids == free.token_ids == ar.token_ids
    assert gated.stats.drafted_tokens < free.stats.drafted_tokens


def test_right_drafts_keep_drafting(target):
    engine = Engine(target)
    ar = engine.run(prompt(2), GREEDY, NoDrafter())
    drafter = Counting(259, seed=0, oracle=ar.token_ids + [0] * 64, mode="chain", size=6)
    out = engine.run(prompt(2), GREEDY, drafter)
    assert out.token_ids == ar.token_ids
    assert drafter.proposed >= out.stats.target_forwards - 1  # every step drafted (the last may have no room)
    assert out.stats.target_forwards < ar.stats.target_forwards / 3


def test_sampled_requests_always_draft(target):
    engine = Engine(target)
    drafter = Counting(259, seed=0, mode="random", size=6)
    out = engine.run(prompt(), SamplingParams(max_new_tokens=48, ignore_eos=True, temperature=1.0, seed=3), drafter)
    assert drafter.proposed >= out.stats.target_forwards - 1
