"""Draft-model forwards batched across requests: ``ModelDrafter.propose_batch`` drafts every request of a
step through one BatchKV in ``gamma`` forwards, and each row's draft is what the request drafted alone
(the per-request drafter this replaced, kept here as the oracle) draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.draft import Draft
from actors.engine import Engine, EngineConfig
from actors.kv import KVSequence
from actors.models import load_model
from actors.sampling import SamplingParams, warp
from actors.sd import ModelDrafter, draft_seed, draft_uniform, sample_at

GREEDY = SamplingParams(max_new_tokens=64, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=64, temperature=0.9, top_p=0.95, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_lm():
    return load_model("tiny-llama:1")


class _AloneDrafter:
    """The per-request sd drafter: its own KVSequence, gamma sequential batch-1 forwards per request."""

    def __init__(self, model, gamma: int) -> None:
        self.model, self.gamma, self.states = model, gamma, {}

    def start(self, rid: str, params: SamplingParams) -> None:
        self.states[rid] = (KVSequence(self.model), params, draft_seed(params))

    def propose(self, rid: str, context: list[int], max_nodes: int) -> Draft:
        kv, params, seed = self.states[rid]
        common = next((i for i, (a, b) in enumerate(zip(kv.cached_ids, context[:-1])) if a != b),
                      min(len(kv), len(context) - 1))
        kv.crop(common)
        logits, tokens, qs = kv.extend(context[common:])[-1], [], []
        n = min(self.gamma, max_nodes)
        for i in range(n):
            q = warp(logits, params)
            tok = int(q.argmax()) if params.greedy else sample_at(q, draft_uniform(seed, len(context) + i))
            tokens.append(tok)
            qs.append(q)
            if i + 1 < n:
                logits = kv.extend([tok])[-1]
        return Draft.chain(tokens, q=None if params.greedy else torch.stack(qs))


def _assert_same(batched: Draft, alone: Draft) -> None:
    assert batched.tokens.tolist() == alone.tokens.tolist()
    assert batched.parents.tolist() == alone.parents.tolist()
    if alone.q is None:
        assert batched.q is None
    else:
        torch.testing.assert_close(batched.q, alone.q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_proposals_equal_each_request_drafted_alone(draft_lm, params):
    """Ragged contexts, a shorter-gamma view in the same batch, different caps, contexts that keep a random
    accepted prefix (so rows re-sync by different amounts), a request joining and one leaving mid-way."""
    rng = np.random.default_rng(7)
    batched, alone = ModelDrafter(draft_lm.model, gamma=4), _AloneDrafter(draft_lm.model, 4)
    short, alone_short = batched.with_options(gamma=2), _AloneDrafter(draft_lm.model, 2)
    contexts: dict[str, list[int]] = {}
    drafted_sampled = 0

    def join(rid: str, view: ModelDrafter, oracle: _AloneDrafter, seed: int) -> None:
        contexts[rid] = rng.integers(0, 256, int(rng.integers(1, 40))).tolist()
        p = params.model_copy(update={"seed": seed})
        view.start(rid, contexts[rid], p)
        oracle.start(rid, p)

    for i in range(4):
        join(f"r{i}", batched, alone, seed=i)
    join("g2", short, alone_short, seed=11)
    oracles = {rid: alone for rid in contexts} | {"g2": alone_short}
    for step in range(6):
        if step == 2:
            join("late", batched, alone, seed=21)
            oracles["late"] = alone
        if step == 3:
            batched.finish("r1")
            del contexts["r1"]
        rids = list(contexts)
        caps = {rid: int(rng.integers(1, 6)) for rid in rids}
        drafts = batched.propose_batch([(rid, np.array(contexts[rid]), caps[rid]) for rid in rids])
        assert len({len(d) for d in drafts}) > 1  # ragged: rows stopped at different depths
        for rid, d in zip(rids, drafts):
            ref = oracles[rid].propose(rid, contexts[rid], caps[rid])
            _assert_same(d, ref)
            drafted_sampled += len(d) if d.q is not None else 0
            keep = int(rng.integers(0, len(d) + 1))  # the verified prefix, then the target's bonus token
            contexts[rid] += d.tokens[:keep].tolist() + [int(rng.integers(0, 256))]
    assert len(batched.kv.slots) == 5 and "r1" not in batched._requests  # the finished slot was freed
    assert (drafted_sampled > 0) == (not params.greedy)


def test_a_bad_item_fails_alone(draft_lm):
    drafter = ModelDrafter(draft_lm.model, gamma=3)
    drafter.start("a", [1, 2, 3], GREEDY)
    out = drafter.propose_batch([("a", np.array([1, 2, 3]), 3), ("nobody", np.array([4, 5]), 3),
                                 ("a", np.array([1, 2, 3]), 3), ("a", np.array([], np.int64), 3)])
    assert isinstance(out[0], Draft) and len(out[0]) == 3
    assert isinstance(out[1], KeyError) and isinstance(out[2], ValueError) and isinstance(out[3], ValueError)
    with pytest.raises(KeyError):
        drafter.propose("nobody", np.array([4, 5]), 3)


def test_freeing_a_slot_when_the_last_one_was_never_written(draft_lm):
    """A request started but not yet drafted holds a row past the buffers (they grow at a forward): freeing
    another request moves that row into the gap without copying, and both drafters' states stay right."""
    drafter = ModelDrafter(draft_lm.model, gamma=2)
    drafter.start("a", [5, 6, 7], GREEDY)
    drafter.propose("a", np.array([5, 6, 7]), 2)  # buffers for 1 slot + headroom: 2 rows
    drafter.start("b", [1], GREEDY)
    drafter.start("c", [2, 3], GREEDY)  # row 2: beyond the buffers until the next forward
    drafter.finish("a")
    assert [drafter._requests[r].slot.row for r in ("b", "c")] == [1, 0]
    fresh = ModelDrafter(draft_lm.model, gamma=2)
    for rid, ctx in (("b", [1, 4]), ("c", [2, 3, 4])):
        fresh.start(rid, ctx, GREEDY)
    got = drafter.propose_batch([("b", np.array([1, 4]), 2), ("c", np.array([2, 3, 4]), 2)])
    want = fresh.propose_batch([("b", np.array([1, 4]), 2), ("c", np.array([2, 3, 4]), 2)])
    assert [d.tokens.tolist() for d in got] == [d.tokens.tolist() for d in want]


class _CountForwards:
    """Counts the draft model's forwards (a hook on its decoder, which every BatchKV forward runs once) and
    records each one's input shape [rows, tokens per row]."""

    def __init__(self, model) -> None:
        self.calls, self.shapes = 0, []
        self._hook = model.base_model.register_forward_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs, output) -> None:
        self.calls += 1
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def close(self) -> None:
        self._hook.remove()


def test_an_engine_step_runs_gamma_draft_forwards_for_the_whole_batch():
    """B requests of sd with gamma tokens each: gamma draft forwards per step (the per-request drafter ran
    B x gamma), and the batch's greedy output is still each request's output alone."""
    target, draft = load_model("tiny-llama"), load_model("tiny-llama:1")
    gamma, prompts = 3, [[5, 17, 99], [1, 2], list(range(30, 60)), [7] * 11]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    always = EngineConfig(draft_gate=False)  # every request drafts every step: the counts below say so
    alone = [Engine(target, always).run(p, params, ModelDrafter(draft.model, gamma)).token_ids for p in prompts]
    engine, drafter = Engine(target, always), ModelDrafter(draft.model, gamma)
    rids = [engine.add(p, params, drafter) for p in prompts]
    counter, per_step = _CountForwards(draft.model), []
    try:
        outputs = {rid: [] for rid in rids}
        while engine.has_work():
            before = counter.calls
            for rid, out in engine.step():
                outputs[rid] += out.token_ids
            if engine.last_step is not None and engine.last_step.rows == len(prompts):
                per_step.append((counter.calls - before, engine.last_step.proposed))
            engine.last_step = None
    finally:
        counter.close()
    assert [outputs[r] for r in rids] == alone
    # The first step also feeds each prompt longer than a step's catch-up to the draft model, alone.
    assert per_step[0] == (gamma + sum(len(p) > gamma + 1 for p in prompts), gamma * len(prompts))
    full = [calls for calls, proposed in per_step[1:] if proposed == gamma * len(prompts)]  # no row capped
    assert len(full) >= 2 and set(full) == {gamma}
    assert all(calls <= gamma for calls, _ in per_step[1:])


@pytest.mark.parametrize("keep_all", [False, True], ids=["mtad", "mmtad"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_mtad_drafts_equal_each_request_drafted_alone(draft_lm, params, keep_all):
    """One MtadDrafter for every request (beams of all rows expanded in one forward per depth) against a
    drafter of its own per request; observed accepted paths, unobserved drafts and a narrower view included."""
    from actors.drafter import Feedback
    from actors.mtad import MtadDrafter

    rng = np.random.default_rng(3)

    def make(**kw):
        return MtadDrafter(draft_lm.model, gamma=3, beam_width=3, keep_all_beams=keep_all, **kw)

    batched, contexts, oracles = make(), {}, {}
    for i in range(4):
        rid, view = f"r{i}", batched.with_options(beam_width=2) if i == 3 else batched
        oracles[rid] = make().with_options(beam_width=2) if i == 3 else make()
        contexts[rid] = rng.integers(0, 256, int(rng.integers(1, 30))).tolist()
        p = params.model_copy(update={"seed": i})
        view.start(rid, contexts[rid], p)
        oracles[rid].start(rid, contexts[rid], p)
    for step in range(5):
        rids = list(contexts)
        caps = {rid: int(rng.integers(1, 10)) for rid in rids}
        drafts = batched.propose_batch([(rid, np.array(contexts[rid]), caps[rid]) for rid in rids])
        for rid, d in zip(rids, drafts):
            ref = oracles[rid].propose(rid, np.array(contexts[rid]), caps[rid])
            assert d.tokens.tolist() == ref.tokens.tolist() and d.parents.tolist() == ref.parents.tolist()
            np.testing.assert_allclose(d.logq, ref.logq, atol=1e-5)
            leaf = int(rng.integers(-1, len(d)))
            accepted = d.path_to(leaf) if leaf >= 0 else []
            new = d.tokens[accepted].tolist() + [int(rng.integers(0, 256))]
            if rid != "r2":  # r2's drafts are never observed: the next propose drops their tree entries
                batched.observe(rid, Feedback(d, accepted, new))
                oracles[rid].observe(rid, Feedback(ref, accepted, new))
            contexts[rid] += new


@pytest.mark.parametrize("method", ["sd", "mtad"])
def test_one_draft_forward_per_depth_for_the_whole_batch(draft_lm, method):
    """propose_batch over B requests runs gamma draft forwards; proposing them one by one ran B x gamma."""
    from actors.mtad import MtadDrafter

    gamma, contexts = 4, [[5, 17, 99], [1, 2], list(range(30, 60)), [7] * 11, [3]]

    def make():
        if method == "sd":
            return ModelDrafter(draft_lm.model, gamma=gamma)
        return MtadDrafter(draft_lm.model, gamma=gamma, beam_width=2)

    counter = _CountForwards(draft_lm.model)
    try:
        drafters = {}
        for name in ("batched", "each"):
            drafters[name] = make()
            for i, c in enumerate(contexts):
                drafters[name].start(f"r{i}", c, SAMPLED.model_copy(update={"seed": i}))
        items = [(f"r{i}", np.array(c), gamma) for i, c in enumerate(contexts)]
        before = counter.calls
        first = drafters["batched"].propose_batch(items)  # the prompts' first sync
        # the prompts longer than a step's catch-up go alone first: no row is padded to 30 tokens
        long = sum(len(c) > gamma + 1 for c in contexts)
        assert counter.calls - before == gamma + long
        assert all(q <= gamma + 1 for rows, q in counter.shapes[before:] if rows > 1)
        [drafters["each"].propose(*item) for item in items]
        # a step later: one token of each draft accepted, then the bonus
        items = [(rid, np.concatenate([c, d.tokens[:1], [9]]), gamma) for (rid, c, _), d in zip(items, first)]
        before = counter.calls
        batched = drafters["batched"].propose_batch(items)
        assert counter.calls - before == gamma
        before = counter.calls
        each = [drafters["each"].propose(*item) for item in items]
        assert counter.calls - before == gamma * len(contexts)
    finally:
        counter.close()
    assert [d.tokens.tolist() for d in batched] == [d.tokens.tolist() for d in each]
