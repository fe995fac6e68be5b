"""A remote drafter that fails mid-request (a killed replica, a pool with no replica yet, a stuck one) costs
plain steps, never the request: the served path without Ray, RemoteDrafter -> protobuf -> DrafterHost."""

from __future__ import annotations

import pytest

from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.sampling import SamplingParams
from deploy.drafters import DraftLink, DrafterHost, RemoteDrafter
from specd_testing import OneReplica, TreeDrafter

GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
PROMPT = [5, 17, 99, 3]


class _Failed:
    """A handle response whose replica died (``error``) or never answered within the bound (TimeoutError)."""

    def __init__(self, error: Exception, log: list) -> None:
        self.error, self.log = error, log

    def result(self, timeout_s: float | None = None):
        self.log.append(timeout_s)
        raise self.error

    def cancel(self) -> None:
        self.log.append("cancel")


class KillableReplica(OneReplica):
    """One replica whose process can be killed (steps fail) and replaced by a fresh one (no sessions)."""

    def __init__(self, drafters: dict, vocab_size: int, error: Exception) -> None:
        super().__init__(drafters, vocab_size)
        self.error, self.down_steps, self.steps, self.calls = error, set(), 0, []

    @property
    def step_batch(self):
        self.steps += 1
        if self.steps in self.down_steps:
            return _FailingCall(_Failed(self.error, self.calls))
        if self.steps - 1 in self.down_steps:  # the first step after an outage lands on a new replica
            self.host = DrafterHost(self.drafters, vocab_size=self.host.vocab_size)
        return super().step_batch


class _FailingCall:
    def __init__(self, response: _Failed) -> None:
        self.response = response

    def remote(self, *args):
        return self.response


@pytest.fixture(scope="module")
def want(target):
    return Engine(target).run(PROMPT, GREEDY, NoDrafter()).token_ids


def _oracle(want):
    return TreeDrafter(259, seed=1, oracle=want + [0] * 64, mode="chain", size=3)


@pytest.mark.parametrize("error", [RuntimeError("The actor died unexpectedly"), TimeoutError("no replica")])
def test_a_failing_drafter_step_is_a_plain_step_and_the_request_goes_on(target, want, error):
    handle = KillableReplica({"tree": _oracle(want)}, target.vocab_size, error)
    handle.down_steps = {3}
    link = DraftLink(timeout_s=7.5, retry_s=0.0)  # retry at once: the next step reaches the new replica
    drafter = RemoteDrafter.from_info(handle, "tree", handle.host.info()["tree"], link=link)
    out = Engine(target).run(PROMPT, GREEDY, drafter)
    assert out.token_ids == want  # the request finished, with the target's own greedy output
    assert link.failures == 1 and handle.calls == [7.5, "cancel"]  # bounded wait, the queued step dropped
    assert out.stats.accepted_tokens > 0  # drafted before and after the outage
    assert handle.host.rebuilds == 1  # the replacement rebuilt the request's state from the context


def test_while_a_pool_is_down_steps_do_not_wait_on_it(target, want):
    handle = KillableReplica({"tree": _oracle(want)}, target.vocab_size, RuntimeError("dead"))
    handle.down_steps = {1}
    link = DraftLink(timeout_s=1.0, retry_s=3600.0)  # down for the rest of the request
    drafter = RemoteDrafter.from_info(handle, "tree", handle.host.info()["tree"], link=link)
    # Every step asks for a draft (the draft gate would hold back steps that drafted nothing).
    out = Engine(target, EngineConfig(draft_gate=False)).run(PROMPT, GREEDY, drafter)
    assert out.token_ids == want and out.stats.drafted_tokens == 0
    assert link.failures == 1 and link.skipped == out.stats.target_forwards - 2  # the last step drafts nothing
    assert handle.steps == 1  # no further call was sent while the pool counted as down
    assert link.stats()["down"]


def test_every_accepted_sampling_params_can_be_sent_to_a_remote_drafter():
    """A top_k over int32 (HTTP takes any JSON integer) passed validation, then failed the request when the
    drafter step was built (an HTTP 500, found by the fuzz run): it is refused where it arrives."""
    from pydantic import ValidationError

    from deploy.convert import params_to_sampling

    params_to_sampling(SamplingParams(top_k=2**31 - 1, temperature=1.0, seed=2**63 - 1))
    with pytest.raises(ValidationError, match="top_k"):
        SamplingParams(top_k=10**30)


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan():
    """temperature 1e-300 (valid: > 0) overflowed the logits to +-inf, softmax gave NaN and the request died
    (gRPC INTERNAL with a traceback, found by the fuzz run)."""
    import torch

    from actors.sampling import warp

    logits = torch.tensor([[3.0, -2.0, 7.5, 0.0]])
    probs = warp(logits, SamplingParams(temperature=1e-300, top_p=1e-300))
    assert torch.equal(probs, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(warp(logits, SamplingParams(temperature=0.7)), torch.softmax(logits / 0.7, -1))
