"""DrafterHost (the body of a drafter-pool replica) without Ray: state rebuilds, feedback, LRU bound."""

from __future__ import annotations

import numpy as np

from actors.engine import Engine
from actors.methods import make_drafter
from actors.models import load_model
from actors.sampling import SamplingParams
from deploy.convert import draft_from_proto, params_to_sampling
from deploy.drafters import DrafterHost
from specd.v1 import specd_pb2 as pb


def _step(rid: str, context: list[int], prompt_len: int) -> pb.DraftStepRequest:
    return pb.DraftStepRequest(request_id=rid, method="sd", context=context, prompt_len=prompt_len, max_nodes=4,
                               sampling=params_to_sampling(SamplingParams()), max_new_tokens=32)


def test_rebuilds_lost_state_and_drafts_the_same():
    target, draft = load_model("tiny-llama"), load_model("tiny-llama:1")
    context = target.tokenizer("hello world, hello")["input_ids"]
    out = Engine(target).run(context, SamplingParams(max_new_tokens=8, ignore_eos=True), make_drafter("ar", target))
    full = context + out.token_ids

    warm = DrafterHost({"sd": make_drafter("sd", target, draft)})
    warm.step(_step("a", context, len(context)))  # the request's first step: a start, not a rebuild
    want = draft_from_proto(warm.step(_step("a", full, len(context))).draft)
    cold = DrafterHost({"sd": make_drafter("sd", target, draft)})  # a replica that never saw the request
    reply = cold.step(_step("a", full, len(context)))
    assert reply.rebuilt and cold.rebuilds == 1 and warm.rebuilds == 0
    got = draft_from_proto(reply.draft)
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.parents, want.parents)


def test_sessions_are_bounded_and_finished():
    target, draft = load_model("tiny-llama"), load_model("tiny-llama:1")
    host = DrafterHost({"sd": make_drafter("sd", target, draft)}, max_sessions=2)
    for rid in ("a", "b", "c"):
        host.step(_step(rid, [5, 6, 7], 3))
    assert list(host.sessions) == ["b", "c"]  # the least recently stepped went first
    assert set(host.drafters["sd"]._requests) == {"b", "c"}  # and its drafter state with it
    host.finish("b")
    host.finish("unknown")  # a finish that lands where the request never was is harmless
    assert list(host.sessions) == ["c"]
