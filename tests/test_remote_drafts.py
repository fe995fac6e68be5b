"""Drafts that arrive from a drafter pool are checked before the target sees them; sessions cannot collide.

The served path without Ray: RemoteDrafter -> protobuf -> DrafterHost.step_batch over an in-process handle.
"""

from __future__ import annotations

import numpy as np

from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.models import load_model
from actors.sampling import SamplingParams
from actors.sd import ModelDrafter
from deploy.drafters import RemoteDrafter
from specd_testing import OneReplica, TreeDrafter

GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
PROMPT = [5, 17, 99, 3]


def _remote(handle) -> RemoteDrafter:
    return RemoteDrafter.from_info(handle, "tree", handle.host.info()["tree"])


def test_a_draft_naming_ids_outside_the_vocabulary_is_a_plain_step(target):
    engine = Engine(target, EngineConfig(draft_gate=False))  # every step drafts, so every step is refused
    want = engine.run(PROMPT, GREEDY, NoDrafter()).token_ids
    poisoned = TreeDrafter(100_000, seed=0, size=6)  # random ids up to 100k: a poisoned store row, a bad replica
    drafter = _remote(OneReplica({"tree": poisoned}, vocab_size=target.vocab_size))
    out = engine.run(PROMPT, GREEDY, drafter)
    assert out.token_ids == want  # never an IndexError, and still the target's own output
    assert drafter.refused.get("out_of_vocabulary", 0) >= 10 and out.stats.drafted_tokens == 0


def test_valid_remote_drafts_still_pass(target):
    engine = Engine(target)
    want = engine.run(PROMPT, GREEDY, NoDrafter()).token_ids
    drafter = _remote(OneReplica({"tree": TreeDrafter(259, seed=1, oracle=want + [0] * 32, mode="chain")},
                                 vocab_size=target.vocab_size))
    out = engine.run(PROMPT, GREEDY, drafter)
    assert out.token_ids == want and out.stats.accepted_tokens > 0 and not drafter.refused


def test_two_verifiers_with_the_same_request_id_get_two_sessions():
    handle = OneReplica({"tree": TreeDrafter(259, seed=2)}, vocab_size=259)
    a, b = _remote(handle), _remote(handle)  # built once per verifier replica
    for d in (a, b):
        d.start("same-id", [1, 2, 3], GREEDY)
        d.propose("same-id", np.array([1, 2, 3]), 4)
    assert len(handle.host.sessions) == 2
    a.finish("same-id")  # ends a's session only
    assert list(handle.host.sessions) == [f"{b.session_prefix}/same-id"]


def test_a_steps_requests_reach_a_pool_in_one_call_and_its_draft_model_batches_them(target):
    """sd over the wire: each decoding step sends ONE DraftBatchRequest with every drafting request, routed by
    the adapter's key, and the pool drafts them through the draft model's batch (a sync forward, then one
    per depth, for all of them); every output is the target's greedy output alone. The draft model is a
    copy of the target, so drafts are accepted."""
    aux = load_model("tiny-llama")
    prompts = [[5, 17, 99, 3], [7, 8], [200, 1, 2, 3, 4, 5], [9]]
    engine = Engine(target, EngineConfig(max_batch=4, draft_gate=False))
    want = [engine.run(p, GREEDY, NoDrafter()).token_ids for p in prompts]
    handle = OneReplica({"sd": ModelDrafter(aux.model, gamma=3)}, vocab_size=target.vocab_size)
    drafter = RemoteDrafter.from_info(handle, "sd", handle.host.info()["sd"])
    forwards = []
    hook = aux.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        steps = []
        outs = engine.run_many(prompts, GREEDY, drafter, on_step=steps.append)
    finally:
        hook.remove()
    assert [o.token_ids for o in outs] == want
    assert len(handle.batch_sizes) <= len(steps) and handle.batch_sizes[0] == 4  # one call per step, all rows
    assert sum(handle.batch_sizes) > 2 * len(handle.batch_sizes)  # calls carried several requests
    assert len(forwards) <= (1 + 3) * len(handle.batch_sizes)  # not (1 + gamma) per request
    assert handle.routes == {drafter.session_prefix} and sum(o.stats.accepted_tokens for o in outs) > 0


class _FailsOnPrompt(TreeDrafter):
    """Drafts the oracle chain, but raises for the request whose prompt starts with ``bad``."""

    def __init__(self, want: list[int], bad: int) -> None:
        super().__init__(259, seed=3, oracle=want + [0] * 32, mode="chain", size=3)
        self.bad = bad

    def propose(self, request_id, context, max_nodes):
        if context[0] == self.bad:
            raise RuntimeError("this request's state is broken")
        return super().propose(request_id, context, max_nodes)


def test_an_item_the_pool_cannot_draft_is_a_plain_step_for_it_alone(target):
    good, bad = [5, 17, 99, 3], [7, 17, 99, 3]  # equal lengths: the oracle drafter keeps one prompt length
    engine = Engine(target, EngineConfig(draft_gate=False))
    want = [engine.run(p, GREEDY, NoDrafter()).token_ids for p in (good, bad)]
    handle = OneReplica({"tree": _FailsOnPrompt(want[0], bad=7)}, vocab_size=target.vocab_size)
    drafter = _remote(handle)
    outs = engine.run_many([good, bad], GREEDY, drafter)
    assert [o.token_ids for o in outs] == want  # both finish with the target's own output
    assert outs[0].stats.accepted_tokens > 0 and outs[1].stats.drafted_tokens == 0
    assert drafter.refused["drafter_error"] >= 10 and drafter.link.failures == 0  # the pool itself is fine
    assert max(handle.batch_sizes) == 2
