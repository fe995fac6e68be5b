"""DrafterHost (the body of a drafter-pool replica) without Ray: state rebuilds, feedback, LRU bound."""

from __future__ import annotations

import numpy as np

from actors.engine import Engine
from actors.methods import make_drafter
from actors.models import load_model
from actors.sampling import SamplingParams
from deploy.convert import draft_from_proto, draft_to_proto, params_to_sampling
from deploy.drafters import DrafterHost
from specd_api.v1 import specd_pb2 as pb


def _step(rid: str, context: list[int], prompt_len: int) -> pb.DraftStepRequest:
    return pb.DraftStepRequest(request_id=rid, method="sd", context=context, prompt_len=prompt_len, max_nodes=4,
                               sampling=params_to_sampling(SamplingParams()), max_new_tokens=32)


def _one(host: DrafterHost, req: pb.DraftStepRequest) -> pb.DraftStepResponse:
    """``req`` as a batch of one; its draft (an error fails the test)."""
    result = host.step_batch(pb.DraftBatchRequest(steps=[req])).results[0]
    assert not result.HasField("error"), result.error
    return result.response


def test_rebuilds_lost_state_and_drafts_the_same():
    target, draft = load_model("tiny-llama"), load_model("tiny-llama:1")
    context = target.tokenizer("hello world, hello")["input_ids"]
    out = Engine(target).run(context, SamplingParams(max_new_tokens=8, ignore_eos=True), make_drafter("ar", target))
    full = context + out.token_ids

    warm = DrafterHost({"sd": make_drafter("sd", target, draft)})
    _one(warm, _step("a", context, len(context)))  # the request's first step: a start, not a rebuild
    want = draft_from_proto(_one(warm, _step("a", full, len(context))).draft)
    cold = DrafterHost({"sd": make_drafter("sd", target, draft)})  # a replica that never saw the request
    reply = _one(cold, _step("a", full, len(context)))
    assert reply.rebuilt and cold.rebuilds == 1 and warm.rebuilds == 0
    got = draft_from_proto(reply.draft)
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.parents, want.parents)


def test_sessions_are_bounded_and_finished():
    target, draft = load_model("tiny-llama"), load_model("tiny-llama:1")
    host = DrafterHost({"sd": make_drafter("sd", target, draft)}, max_sessions=2)
    for rid in ("a", "b", "c"):
        _one(host, _step(rid, [5, 6, 7], 3))
    assert list(host.sessions) == ["b", "c"]  # the least recently stepped went first
    assert set(host.drafters["sd"]._requests) == {"b", "c"}  # and its drafter state with it
    host.finish("b")
    host.finish("unknown")  # a finish that lands where the request never was is harmless
    assert list(host.sessions) == ["c"]


def test_mtad_drafts_cross_the_wire_with_their_log_q_and_options():
    """The verifier applies MTAD's rule to remote drafts: it needs each node's log q and the pool's tau."""
    target, draft = load_model("tiny-llama"), load_model("tiny-llama:1")
    host = DrafterHost({"mtad": make_drafter("mtad", target, draft, tau=0.7)})
    info = host.info()["mtad"]
    assert (info["acceptance"], info["tau"], set(info["options"])) == ("mtad", 0.7, {"gamma", "beam_width", "tau"})
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    req = pb.DraftStepRequest(request_id="r", method="mtad", context=[5, 6, 7], prompt_len=3, max_nodes=16,
                              sampling=params_to_sampling(params), max_new_tokens=8, gamma=2)
    d = draft_from_proto(_one(host, req).draft)
    assert len(d) == 2 and d.logq.shape == (2,) and np.all(d.logq <= 0)
    assert np.array_equal(draft_from_proto(draft_to_proto(d)).logq, d.logq)
