"""Served sd stays exact when every step lands on a drafter replica that lost the request's state.

The drafter side is the served one (RemoteDrafter -> protobuf -> DrafterHost.step_batch -> ModelDrafter); only
the Serve handle is replaced by an in-process one that sends each step to a fresh DrafterHost over the same
drafters, which is what an LRU eviction, a restart, a scale-in or a routing miss gives: ``start`` again
from the prompt, then ``propose`` on the whole context.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from actors.engine import Engine
from actors.models import load_model
from actors.sampling import SamplingParams
from actors.sd import ModelDrafter, draft_uniform, sample_at
from deploy.drafters import RemoteDrafter
from specd_testing import FreshReplicaEachStep, OneReplica, exact_pair_distribution


PROMPT = [5, 17, 99]


@pytest.fixture(scope="module")
def draft_model():
    """The target with a perturbed head: close enough that about half the drafted tokens are accepted."""
    model = load_model("tiny-llama", kernels="torch").model
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.05)
    return model


def _run(engine, handle, params, seed):
    return engine.run(PROMPT, params.model_copy(update={"seed": seed}), RemoteDrafter(handle, "sd", target_topk=0))


def test_a_rebuilt_session_drafts_what_a_kept_one_drafts(target, draft_model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    engine, drafter = Engine(target), ModelDrafter(draft_model, gamma=3)
    fresh, rejected = FreshReplicaEachStep({"sd": drafter}), 0
    for seed in range(30):
        kept = _run(engine, OneReplica({"sd": drafter}), params, seed)
        assert _run(engine, fresh, params, seed).token_ids == kept.token_ids, seed
        rejected += kept.stats.accepted_tokens < kept.stats.drafted_tokens  # a position drafted twice
    assert fresh.rebuilds >= 30 * 2 and rejected >= 15


def test_sd_with_a_rebuild_every_step_has_the_target_distribution(target, draft_model):
    params = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    cells, expected = exact_pair_distribution(target.model, PROMPT, params)
    handle = FreshReplicaEachStep({"sd": ModelDrafter(draft_model, gamma=2)})
    engine, n, pairs, drafted, accepted = Engine(target), 1500, [], 0, 0
    for s in range(n):
        out = _run(engine, handle, params, s)
        pairs.append(tuple(out.token_ids[:2]))
        drafted, accepted = drafted + out.stats.drafted_tokens, accepted + out.stats.accepted_tokens
    observed = [pairs.count(c) for c in cells]
    assert sum(observed) == n
    assert handle.rebuilds > n / 10  # a second step (after a rejection) on a replica that had lost the request
    assert drafted > n and 0.2 < accepted / drafted < 0.9  # chains of 2, about half accepted
    expected = np.array(expected) / np.sum(expected) * n  # float32 rows: the exact law sums to 1 +- 1e-7
    assert chisquare(observed, expected).pvalue > 1e-3


def test_the_draft_stream_is_a_function_of_seed_and_position():
    assert draft_uniform(7, 12) == draft_uniform(7, 12)
    assert len({draft_uniform(7, pos) for pos in range(100)} | {draft_uniform(8, 12)}) == 101
    q = torch.tensor([0.0, 0.25, 0.0, 0.75])
    assert [sample_at(q, u) for u in (0.0, 0.2, 0.2499, 0.25, 0.9, 0.999999)] == [1, 1, 1, 3, 3, 3]
