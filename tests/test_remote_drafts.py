"""Drafts that arrive from a drafter pool are checked before the target sees them; sessions cannot collide.

The served path without Ray: RemoteDrafter -> protobuf -> DrafterHost.step over an in-process handle.
"""

from __future__ import annotations

import numpy as np

from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.sampling import SamplingParams
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
