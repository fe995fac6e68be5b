"""EngineLoop's thread builds the engine it steps: in a serving process it is the one thread that runs torch
(actors.loop says why)."""

from __future__ import annotations

import threading

import pytest

from actors.cost import CostModel
from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.loop import EngineLoop
from actors.sampling import SamplingParams


def test_engine_loop_builds_its_engine_on_the_thread_that_steps_it(target):
    seen: dict[str, set[int]] = {"build": set(), "step": set()}

    def build() -> Engine:
        seen["build"].add(threading.get_ident())
        return Engine(target, EngineConfig(max_batch=2), cost=CostModel.flat())

    loop = EngineLoop(build, on_step=lambda info: seen["step"].add(threading.get_ident()))
    done, outs = threading.Event(), []

    def sink(out):
        outs.append(out)
        if isinstance(out, BaseException) or out.finish_reason:
            done.set()

    loop.submit([1, 2, 3, 4], SamplingParams(max_new_tokens=5, ignore_eos=True), NoDrafter(), "r", sink)
    assert done.wait(300), "the request never finished"
    loop.close()
    assert outs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs) == 5
    assert len(seen["build"]) == 1 and seen["step"] == seen["build"]  # every step on the building thread
    assert threading.get_ident() not in seen["build"]


def test_engine_loop_raises_what_its_build_raised():
    def build() -> Engine:
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError, match="no such model"):
        EngineLoop(build)
    assert not [t for t in threading.enumerate() if t.name == "engine-loop" and t.is_alive()]
