"""Continuous batching on tiny real models: the batched forward against per-sequence forwards, greedy
output under concurrency against the same request alone, exact sampling inside a batch, and requests
joining, failing and leaving between steps."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from actors.aded.drafter import AdedConfig, AdedDrafter
from actors.aded.trigram import build_matrix
from actors.acceptance import accept_tree_sampled
from actors.budget import choose_batch_budget
from actors.cost import CostModel
from actors.draft import Draft
from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.stats import RequestFailed
from actors.kv import BatchKV, KVSequence, RowInput, causal_row, tree_row
from actors.mtad import MtadDrafter
from actors.sampling import SamplingParams, warp
from actors.sd import ModelDrafter
from actors.tiny import tiny_model
from shared_state import MemoryStore, StoreConfig
from specd_testing import TreeDrafter, exact_pair_distribution

V = 259
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _random_draft(rng: np.random.Generator, kind: str) -> Draft:
    n = {"empty": 0, "chain": int(rng.integers(1, 7)), "tree": int(rng.integers(2, 12))}[kind]
    if kind == "chain":
        return Draft.chain(rng.integers(0, V, n))
    return Draft(rng.integers(0, V, n), [int(rng.integers(-1, i)) for i in range(n)])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_forward_matches_each_sequence_alone(family, seed):
    """Rows of different context lengths with trees, chains and empty drafts, in ONE forward, give each
    row's per-sequence logits; then accept/reject rounds keep every row's cache equal to a fresh forward."""
    model = tiny_model(family, seed=seed)
    rng = np.random.default_rng(seed)
    contexts = [rng.integers(0, V, int(rng.integers(1, 40))).tolist() for _ in range(5)]
    batch, alone = BatchKV(model), []
    slots = [batch.add() for _ in contexts]
    for slot, ctx in zip(slots, contexts):
        batch.forward([RowInput(slot, *causal_row(0, ctx[:-1]))]) if len(ctx) > 1 else None
        kv = KVSequence(model)
        if len(ctx) > 1:
            kv.extend(ctx[:-1])
        alone.append(kv)
    for _ in range(6):
        drafts = [_random_draft(rng, kind) for kind in rng.choice(["empty", "chain", "tree"], len(contexts))]
        rows = [RowInput(s, *tree_row(len(s), c[-1], d.tokens, d.parents, d.depths()))
                for s, c, d in zip(slots, contexts, drafts)]
        bases = [len(s) for s in slots]
        batched = batch.forward(rows)
        for i, (kv, ctx, d) in enumerate(zip(alone, contexts, drafts)):
            ref = kv.extend_tree(ctx[-1], d.tokens, d.parents, d.depths())
            torch.testing.assert_close(batched[i], ref, atol=1e-5, rtol=1e-5)
            leaf = int(rng.integers(-1, len(d)))
            path = d.path_to(leaf) if leaf >= 0 else []
            batch.keep_path(slots[i], bases[i] + 1, path)
            kv.keep_path(bases[i] + 1, path)
            ctx += d.tokens[path].tolist() + [int(rng.integers(0, V))]
    for slot, ctx in zip(slots, contexts):
        assert slot.ids == ctx[:-1]
        last = batch.forward([RowInput(slot, *causal_row(len(slot), [ctx[-1]]))])[0][-1]
        with torch.inference_mode():
            torch.testing.assert_close(last, model(torch.tensor([ctx])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_freed_slots_are_reused_and_memory_follows_the_tokens():
    model = tiny_model("llama", seed=0)
    batch = BatchKV(model)
    slots = [batch.add() for _ in range(6)]
    for i, s in enumerate(slots):
        batch.forward([RowInput(s, *causal_row(0, list(range(1, 20 + 40 * i))))])
    held = batch.nbytes()
    for s in slots[1:]:
        batch.remove(s)  # the long rows go: capacity shrinks to what the short one needs
    assert [s.row for s in slots] == [0, -1, -1, -1, -1, -1] and batch.nbytes() < held / 2
    again = batch.add()
    assert again.row == 1
    logits = batch.forward([RowInput(again, *causal_row(0, [3, 4, 5]))])[0]
    with torch.inference_mode():
        torch.testing.assert_close(logits[-1], model(torch.tensor([[3, 4, 5]])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_a_short_row_joining_never_shrinks_the_cache_under_a_long_one():
    """A forward that covers only a new short row (its prefill) must not cut capacity below the longest
    live row: it once did, dropping a long request's newest entries (greedy output changed at c=2)."""
    model = tiny_model("llama", seed=0)
    batch = BatchKV(model)
    long_ids = [int(t) for t in np.random.default_rng(0).integers(1, V, 300)]
    first = batch.add()
    batch.forward([RowInput(first, *causal_row(0, long_ids[:-1]))], logits=False)
    joined = batch.add()
    batch.forward([RowInput(joined, *causal_row(0, [3, 4, 5]))], logits=False)
    assert batch.capacity >= len(first)
    logits = batch.forward([RowInput(first, *causal_row(len(first), long_ids[-1:]))])[0]
    with torch.inference_mode():
        torch.testing.assert_close(logits[-1], model(torch.tensor([long_ids])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_a_prompt_is_prefilled_in_the_same_chunks_alone_and_joining_with_others(target):
    """Chunks end at multiples of prefill_chunk from the prompt's own start, whatever else joins."""
    def chunks(prompts):
        engine = Engine(target, EngineConfig(prefill_chunk=8))
        seen, prefill = {}, engine.verifier.prefill
        engine.verifier.prefill = lambda seq, n: seen.setdefault(len(seq.tokens), []).append(n) or prefill(seq, n)
        engine.run_many(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True), NoDrafter())
        return seen

    prompts = [list(range(1, 14)), list(range(1, 21)), list(range(1, 6))]  # 12, 19 and 4 tokens to cache
    together = chunks(prompts)
    for p in prompts:
        assert together[len(p)] == chunks([p])[len(p)] == [min(8, len(p) - 1 - i) for i in range(0, len(p) - 1, 8)]


def test_batch_budget_turns_speculation_down_as_rows_grow():
    """On a CPU-like curve (cost grows with rows x tokens) the same drafts get fewer nodes in a bigger batch."""
    cost = CostModel.from_profile({"k": [1, 8, 64, 512], "context_lengths": [0, 1e6],
                                   "seconds": [[1.0, 1.2, 3.0, 20.0]] * 2})
    draft = Draft.chain(np.arange(8))
    draft = Draft(draft.tokens, draft.parents, p_accept=[0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    kept = [choose_batch_budget([draft] * rows, 100, cost)[0] for rows in (1, 4, 16, 64)]
    assert kept[0] > 0 and kept == sorted(kept, reverse=True) and kept[-1] < kept[0]
    assert choose_batch_budget([draft] * 4, 100, CostModel.flat()) == [8] * 4  # flat curve: take everything
    sd = Draft.chain([1, 2, 3])  # no estimates: verified whole
    assert choose_batch_budget([sd, draft], 100, cost)[0] == 3


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(2, 40))).tolist() for _ in range(n)]


def _drafter(method: str, target, aux, matrix=None):
    if method == "ar":
        return NoDrafter()
    if method == "sd":
        return ModelDrafter(aux.model, gamma=3)
    if method == "mtad":
        return MtadDrafter(aux.model, gamma=3, beam_width=2, tau=0.5)
    if method == "tree":
        return TreeDrafter(V, seed=3)
    return AdedDrafter(matrix, MemoryStore(StoreConfig(namespace="tiny")), AdedConfig(), CostModel.flat())


@pytest.fixture(scope="module")
def matrix(target):
    engine = Engine(target)
    outs = [engine.run(p, GREEDY, NoDrafter()).token_ids for p in _prompts(10, seed=100)]
    return build_matrix([np.array(o) for o in outs], V, progress=False)


@pytest.mark.parametrize("method", ["ar", "sd", "aded", "mtad", "tree"])
def test_greedy_under_concurrency_equals_each_request_alone(target, aux, matrix, method):
    """8 requests of different lengths, 5 decoding at once (so requests join and leave between steps),
    each token-identical to the same request decoded alone."""
    prompts = _prompts(8, seed=11)
    params = [GREEDY.model_copy(update={"max_new_tokens": 8 + 3 * i}) for i in range(len(prompts))]
    alone_engine = Engine(target)
    alone = [alone_engine.run(p, q, NoDrafter()).token_ids for p, q in zip(prompts, params)]
    engine = Engine(target, EngineConfig(prefill_chunk=16), cost=CostModel.flat())
    drafter = _drafter(method, target, aux, matrix)
    batched = engine.run_many(prompts, params, drafter, concurrency=5)
    assert [g.token_ids for g in batched] == alone, [g for g in batched if isinstance(g, BaseException)]
    if method != "ar":
        assert sum(g.stats.drafted_tokens for g in batched) > 0
    assert engine.num_requests == 0 and len(engine.verifier.kv.slots) == 0


class _WrongTemperature(Engine):
    """A known-wrong engine: its rule accepts and samples at half the request's temperature."""

    @staticmethod
    def _accept(req, draft, logits):
        params = req.params.model_copy(update={"temperature": req.params.temperature / 2})
        return accept_tree_sampled(draft, warp(logits, params), req.generator)


def _batched_pairs(engine_cls, target, n: int):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=3, ignore_eos=True)
    prompt = [5, 17, 99]
    cells, expected = exact_pair_distribution(target.model, prompt, params)
    drafter = TreeDrafter(V, seed=0, mode="tree", oracle=[c[0] for c in cells] * 10, size=8)
    engine = engine_cls(target, cost=CostModel.flat())
    outs = engine.run_many([prompt] * n, [params.model_copy(update={"seed": s}) for s in range(n)], drafter,
                           concurrency=16)
    assert not [g for g in outs if isinstance(g, BaseException)]
    pairs = [tuple(g.token_ids[:2]) for g in outs]
    observed = np.array([pairs.count(c) for c in cells])
    assert observed.sum() == n
    trees = [f.draft for f in drafter.observed if len(f.draft) >= 3 and not f.draft.is_chain]
    return chisquare(observed, np.array(expected) * n).pvalue, len(trees)


def test_sampling_inside_a_batch_is_exact(target):
    """Every request of a batch of 16 samples the target's law while multi-node trees are verified; the
    same test catches a rule at the wrong temperature (the negative control)."""
    pvalue, trees = _batched_pairs(Engine, target, 1500)
    assert trees >= 1000  # most first steps verified a real tree (siblings, depth > 1)
    assert pvalue > 1e-3
    biased, _ = _batched_pairs(_WrongTemperature, target, 1500)
    assert biased < 1e-3


class _Failing(TreeDrafter):
    def propose(self, request_id, context, max_nodes):
        if request_id == "bad" and len(context) > self.prompt_len + 3:
            raise RuntimeError("drafter exploded")
        return super().propose(request_id, context, max_nodes)


class _OutOfVocab(TreeDrafter):
    def propose(self, request_id, context, max_nodes):
        return Draft.chain([V + 7]) if request_id == "poison" else super().propose(request_id, context, max_nodes)


def test_a_failing_request_ends_alone_and_a_bad_draft_is_dropped(target):
    engine = Engine(target, cost=CostModel.flat())
    alone = Engine(target).run([1, 2, 3], GREEDY, NoDrafter()).token_ids
    for rid, drafter in (("bad", _Failing(V, seed=1)), ("poison", _OutOfVocab(V, seed=1))):
        engine.add([1, 2, 3], GREEDY, drafter, rid)
        engine.add([1, 2, 3], GREEDY, drafter, "good")
        outputs: dict[str, list] = {"good": [], rid: []}
        while engine.has_work():
            for got, out in engine.step():
                outputs[got].append(out)
        good = [t for o in outputs["good"] for t in o.token_ids]
        assert good == alone
        if rid == "bad":
            assert isinstance(outputs["bad"][-1], RequestFailed) and "drafter exploded" in str(outputs["bad"][-1])
        else:
            assert [t for o in outputs[rid] for t in o.token_ids] == alone
            assert outputs[rid][-1].stats.invalid_drafts > 0
        assert len(engine.verifier.kv.slots) == 0


def test_abort_mid_batch_frees_the_slot_and_joins_happen_every_step(target):
    engine = Engine(target, EngineConfig(max_batch=3, prefill_chunk=8), cost=CostModel.flat())
    drafter = TreeDrafter(V, seed=2)
    alone = Engine(target)
    prompts = _prompts(7, seed=5)
    expected = {f"r{i}": alone.run(p, GREEDY, NoDrafter()).token_ids for i, p in enumerate(prompts)}
    got: dict[str, list[int]] = {rid: [] for rid in expected}
    rows_seen = []
    for i, p in enumerate(prompts):  # one request joins at every step
        engine.add(p, GREEDY, drafter, f"r{i}")
        for rid, out in engine.step():
            got[rid] += out.token_ids
        rows_seen.append(len(engine.verifier.kv.slots))
        if i == 2:
            engine.abort("r1")
    assert max(rows_seen) <= 3  # max_batch holds the rest back
    while engine.has_work():
        for rid, out in engine.step():
            got[rid] += out.token_ids
    assert len(engine.verifier.kv.slots) == 0
    for rid in expected:
        if rid != "r1":
            assert got[rid] == expected[rid], rid
    assert got["r1"] == expected["r1"][: len(got["r1"])] and len(got["r1"]) < len(expected["r1"])


def test_generation_stops_at_the_model_context(target):
    """A prompt near the model's context stops with finish reason 'length' at the context, not past it."""
    limit = target.model.config.max_position_embeddings
    engine = Engine(target, cost=CostModel.flat())
    prompt = [7] * (limit - 5)
    out = engine.run(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True), TreeDrafter(V, seed=0))
    assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == limit


def test_engine_loop_serves_many_threads_and_cancels(target):
    """The served shape without Ray: callers on other threads submit, receive their steps through sinks,
    and a cancelled request's slot is freed while the others finish token-identical to running alone."""
    import threading

    from actors.loop import EngineLoop

    prompts = _prompts(6, seed=21)
    alone = Engine(target)
    expected = [alone.run(p, GREEDY, NoDrafter()).token_ids for p in prompts]
    engine = Engine(target, EngineConfig(max_batch=4), cost=CostModel.flat())
    loop = EngineLoop(lambda: engine, on_step=lambda info: 1 / 0)  # a broken metrics hook must not stop decoding
    got = {i: [] for i in range(len(prompts))}
    done = {i: threading.Event() for i in range(len(prompts))}

    def sink_for(i):
        def sink(out):
            if isinstance(out, BaseException):
                got[i].append(out)
                done[i].set()
                return
            got[i] += out.token_ids
            if i == 0 and len(got[0]) >= 3:
                loop.cancel("r0")
                done[0].set()
            if out.finish_reason:
                done[i].set()
        return sink

    threads = [threading.Thread(target=loop.submit, args=(p, GREEDY, TreeDrafter(V, seed=i), f"r{i}", sink_for(i)))
               for i, p in enumerate(prompts)]
    for th in threads:
        th.start()
    for i in range(len(prompts)):
        assert done[i].wait(300), f"request {i} never finished"
    deadline = time.monotonic() + 300  # the cancel is applied at the loop's next step boundary
    while engine.num_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_requests == 0 and len(engine.verifier.kv.slots) == 0  # the cancelled slot is free
    loop.close()
    for i in range(1, len(prompts)):
        assert got[i] == expected[i]
    assert got[0] == expected[0][: len(got[0])] and len(got[0]) < len(expected[0])


def test_engine_forwards_raise_no_transformers_deprecation(target, aux):
    """The engine and the drafter models drive transformers through its current cache interface
    (``cache=``; ``past_key_values`` is deprecated and warned about on every call)."""
    import warnings

    engine = Engine(target, cost=CostModel.flat())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for drafter in (ModelDrafter(aux.model, gamma=2), MtadDrafter(aux.model, gamma=2, beam_width=2, tau=0.5,
                                                                     keep_all_beams=True)):
            engine.run([1, 2, 3], SamplingParams(max_new_tokens=6, ignore_eos=True), drafter)


def test_a_cuda_target_is_never_budgeted_with_the_cpu_curve():
    """Profiles are keyed by device and dtype; a drafter pool names the verifier's device (from the config),
    and with no profile for it a CUDA target gets the flat curve, never the CPU fallback."""
    from actors.models import load_tokenizer
    from actors.profile import fallback_cost, profile_path
    from deploy.config import DeploymentOptions, ServeConfig

    gpu = ServeConfig(verifier=DeploymentOptions(num_gpus=1))
    assert gpu.verifier_device_type() == "cuda" and ServeConfig().verifier_device_type() == "cpu"
    on_gpu = load_tokenizer("tiny-llama", device_type=gpu.verifier_device_type(), dtype=gpu.dtype)
    on_cpu = load_tokenizer("tiny-llama")
    assert (on_gpu.device_type, on_gpu.dtype_name, on_gpu.kernels) == ("cuda", "bfloat16", "torch")
    assert profile_path(on_gpu) != profile_path(on_cpu)
    flat = fallback_cost(on_gpu)
    assert flat.relative(64, 512) == 1.0 and fallback_cost(on_cpu).relative(64, 512) > 1.5


def test_the_profile_times_ragged_rows_as_the_engine_batches_them(target, monkeypatch):
    """A served batch's rows differ in length, and batch invariance attends row by row, so a curve timed on
    equal rows would price a plain many-row step below what the engine pays. Every timed forward of
    ``specd profile`` has rows of distinct lengths, the longest the context it is filed under."""
    from actors.profile import measure_verify_cost

    seen: list[tuple[int, list[int], int]] = []
    forward = BatchKV.forward

    def spy(self, batch, logits=True):
        if logits:  # a timed forward (prompts are cached with logits=False)
            seen.append((len(batch), sorted(len(r.slot) for r in batch), max(len(r.ids) for r in batch)))
        return forward(self, batch, logits)

    monkeypatch.setattr(BatchKV, "forward", spy)
    profile = measure_verify_cost(target, k_values=(1, 3), context_lengths=(16, 32),
                                  batch_sizes=(1, 4), repeats=1)
    assert profile["rows"] == "ragged"
    assert {(rows, k) for rows, _, k in seen} == {(1, 1), (1, 3), (4, 1), (4, 3)}
    for rows, lengths, _ in seen:
        assert len(set(lengths)) == rows and max(lengths) in (16, 32)


def test_a_curve_from_another_cpu_is_used_with_a_warning(target, tmp_path, monkeypatch, caplog):
    """The profile records the CPU model; a curve measured on another CPU still budgets (any budget is
    lossless) but the engine says so, naming both CPUs; this machine's own curve loads silently."""
    import json
    import logging

    import actors.profile as profile_mod

    curve = {"k": [1, 2], "context_lengths": [0, 1e6], "seconds": [[1.0, 1.5]] * 2}
    path = tmp_path / "curve.json"
    monkeypatch.setattr(profile_mod, "profile_path", lambda _: path)
    with caplog.at_level(logging.WARNING, logger="actors.profile"):
        path.write_text(json.dumps({**curve, "machine": {"cpu_model": profile_mod.cpu_model()}}))
        assert profile_mod.default_cost(target).relative(2, 100) == 1.5
        assert not caplog.records
        path.write_text(json.dumps({**curve, "machine": {"cpu_model": "Some Other CPU"}}))
        assert profile_mod.default_cost(target).relative(2, 100) == 1.5
    assert "Some Other CPU" in caplog.text and profile_mod.cpu_model() in caplog.text


def test_estimate_correction_turns_an_overrating_drafter_down():
    """Drafts that claim 0.9 per node but are never accepted stop buying padded columns within a few steps."""
    from actors.budget import EstimateCorrection

    cost = CostModel.from_profile({"k": [1, 2, 8], "context_lengths": [0, 1e6], "seconds": [[1.0, 1.2, 2.0]] * 2})
    draft = Draft(np.arange(4), [-1, 0, 1, 2], p_accept=[0.9, 0.8, 0.7, 0.6])
    correction = EstimateCorrection(strength=4.0, decay=0.98)
    assert choose_batch_budget([draft] * 8, 100, cost, factor=correction.factor)[0] > 0
    for _ in range(10):
        correction.update(predicted=8 * 3.0, realised=0.0)
    assert correction.factor < 0.1
    assert choose_batch_budget([draft] * 8, 100, cost, factor=correction.factor) == [0] * 8


@pytest.mark.parametrize("invariant", [True, False])
def test_batch_invariance_switch_sets_the_attention_calls_and_both_stay_close(target, monkeypatch, invariant):
    """Three rows of three context lengths in one forward: row-exact attention makes one SDPA call per layer
    for the two rows whose keys round to the same bucket (64) and one for the third, ``batch_invariant=False``
    one per layer; either way each row's logits stay
    close to those of the request alone (the bitwise checks of the invariant path are in test_smollm2.py
    and test_kernels.py)."""
    import actors.attention as attention

    calls = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    engine = Engine(target, EngineConfig(batch_invariant=invariant), cost=CostModel.flat())
    kv = engine.verifier.kv
    rng = np.random.default_rng(5)
    contexts = [rng.integers(0, V, n).tolist() for n in (5, 17, 70)]
    slots = [kv.add() for _ in contexts]
    for slot, ctx in zip(slots, contexts):
        kv.forward([RowInput(slot, *causal_row(0, ctx[:-1]))])
    calls.clear()
    batched = kv.forward([RowInput(s, *causal_row(len(s), [c[-1]])) for s, c in zip(slots, contexts)])
    layers = target.model.config.num_hidden_layers
    assert calls == ([2, 1] * layers if invariant else [3] * layers)  # rows per call
    with torch.inference_mode():
        for row, ctx in zip(batched, contexts):
            alone = target.model(torch.tensor([ctx])).logits[0, -1]
            torch.testing.assert_close(row[-1], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="plain backend"):
        EngineConfig(batch_invariant=False, backend="deepspeed")


class _RecordingCaps(TreeDrafter):
    """Random trees; records each ``propose_batch`` call's (request id, cap) items."""

    def __init__(self) -> None:
        super().__init__(259, seed=4, size=8)
        self.calls: list[dict[str, int]] = []

    def propose_batch(self, items):
        self.calls.append({rid: n for rid, _, n in items})
        return super().propose_batch(items)


def test_a_requests_own_draft_cap_holds_inside_a_shared_batch(target):
    """A client's max_draft_tokens caps its request only, and the capped request still drafts in the same
    ``propose_batch`` call as the others (one call per drafter per step)."""
    drafter = _RecordingCaps()
    engine = Engine(target, EngineConfig(draft_gate=False))
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    engine.add([5, 17, 99], params, drafter, "capped", max_draft_tokens=2)
    engine.add([7, 8, 9], params, drafter, "free")
    engine.add([1, 2, 3], params, drafter, "none", max_draft_tokens=0)
    while engine.has_work():
        engine.step()
    shared = [c for c in drafter.calls if {"capped", "free"} <= set(c)]
    assert shared and all(c["capped"] <= 2 for c in shared) and max(c["free"] for c in shared) > 2
    assert not any("none" in c for c in drafter.calls)  # a cap of 0: never asked for a draft
