"""The decode loop on tiny real models: lossless drafts never change greedy output; sampling is exact."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from actors.cost import CostModel
from actors.drafter import NoDrafter
from actors.engine import Engine, EngineConfig
from actors.models import LoadedModel, load_model
from actors.sampling import SamplingParams
from actors.sd import ModelDrafter
from specd_testing import TreeDrafter, exact_pair_distribution

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(target):
    return Engine(target)


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(1, 30))).tolist() for _ in range(n)]


def test_ar_is_plain_greedy(engine, target):
    prompt = prompts(1)[0]
    out = engine.run(prompt, GREEDY, NoDrafter())
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(GREEDY.max_new_tokens):
            ids.append(int(target.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt):]
    assert out.stats.target_forwards == GREEDY.max_new_tokens
    assert out.finish_reason == "length"


@pytest.mark.parametrize("mode", ["random", "chain", "tree"])
def test_greedy_identity_with_trees(engine, mode):
    for i, prompt in enumerate(prompts(12)):
        ar = engine.run(prompt, GREEDY, NoDrafter())
        drafter = TreeDrafter(259, seed=i, oracle=ar.token_ids + [0] * 64, mode=mode, size=int(3 + i % 5 * 7))
        spec = engine.run(prompt, GREEDY, drafter)
        assert spec.token_ids == ar.token_ids
        if mode == "chain":  # all-right drafts: far fewer forwards than tokens
            assert spec.stats.target_forwards < ar.stats.target_forwards / 2


def test_greedy_identity_sd(engine, target):
    same = ModelDrafter(target.model, gamma=5)
    other = ModelDrafter(load_model("tiny-llama:1").model, gamma=3)
    ungated = Engine(target, EngineConfig(draft_gate=False))  # drafting with the target never pays: the gate would stop it
    for prompt in prompts(8, seed=1):
        ar = engine.run(prompt, GREEDY, NoDrafter())
        assert engine.run(prompt, GREEDY, other).token_ids == ar.token_ids
        full = ungated.run(prompt, GREEDY, same)
        assert full.token_ids == ar.token_ids
        assert full.stats.tokens_per_forward == pytest.approx(6.0, abs=0.9)  # draft == target: all accepted


def _sample_pairs(engine, drafter, n, params):
    """n seeded samples, 16 decoding at a time (each request draws from its own generator)."""
    outs = engine.run_many([[5, 17, 99]] * n, [params.model_copy(update={"seed": s}) for s in range(n)], drafter, 16)
    return [tuple(out.token_ids[:2]) for out in outs], sum(out.stats.drafted_tokens for out in outs)


@pytest.mark.parametrize("kind", ["sd", "tree"])
def test_sampled_output_has_target_distribution(engine, target, kind):
    # 5 new tokens: the first step may draft 4 nodes (the bonus token is free), so the pair of first tokens
    # is decided by multi-node drafts (two levels of wrong-then-right siblings for "tree", a 3-chain for sd).
    params = SamplingParams(max_new_tokens=5, temperature=1.0, top_k=3, ignore_eos=True)
    prompt = [5, 17, 99]
    cells, expected = exact_pair_distribution(target.model, prompt, params)
    drafter = ModelDrafter(load_model("tiny-llama:1").model, gamma=3) if kind == "sd" else \
        TreeDrafter(259, seed=0, mode="tree", oracle=[c[0] for c in cells] * 10)
    n = 2000
    # A flat curve: the batch budget keeps every node, so the first steps really verify the multi-node drafts.
    pairs, drafted = _sample_pairs(Engine(target, cost=CostModel.flat()), drafter, n, params)
    observed = [pairs.count(c) for c in cells]
    assert sum(observed) == n
    assert drafted >= 3 * n  # multi-node drafts on the first step, not single tokens
    if kind == "tree":
        trees = [f.draft for f in drafter.observed if len(f.draft)]
        assert trees and all(len(d.children()[0]) == 2 for d in trees)  # siblings at the first level
        assert sum(int(d.depths().max()) >= 2 for d in trees) >= n / 2  # and a second level below
    expected = np.array(expected) / np.sum(expected) * n  # float32 rows: the exact law sums to 1 +- 1e-7
    assert chisquare(observed, expected).pvalue > 1e-3


def test_seeded_sampling_repeats(engine, target):
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=123, ignore_eos=True)
    sd = ModelDrafter(load_model("tiny-llama:1").model, gamma=3)
    a = engine.run([1, 2, 3], params, sd).token_ids
    assert engine.run([1, 2, 3], params, sd).token_ids == a
    assert engine.run([1, 2, 3], params.model_copy(update={"seed": 124}), sd).token_ids != a


def test_streamed_deltas_add_up_and_stop_string_cuts(engine, target):
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    full = engine.run([40, 41, 42], params, NoDrafter())
    assert len(full.text) > 10
    stop = full.text[8:11]
    first = full.text.find(stop)
    cut = engine.run([40, 41, 42], params.model_copy(update={"stop": (stop,)}), TreeDrafter(259, 0))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:first]
    chunks = list(engine.generate([40, 41, 42], params, TreeDrafter(259, 1)))
    assert "".join(c.text for c in chunks) == full.text
    assert sum(len(c.token_ids) for c in chunks) == 60 and chunks[-1].finish_reason == "length"


@dataclass
class _ExtraEos(LoadedModel):
    """The tiny model rarely emits its real EOS; declare one of its greedy tokens an EOS instead."""

    extra_eos: int = -1

    @property
    def eos_ids(self) -> set[int]:
        return super().eos_ids | {self.extra_eos}


def test_eos_stops_and_is_not_emitted(engine, target):
    ar = engine.run([7, 8], GREEDY, NoDrafter())
    eos = ar.token_ids[4]
    with_eos = _ExtraEos(target.model, target.tokenizer, target.name, target.identity, extra_eos=eos)
    out = Engine(with_eos).run([7, 8], SamplingParams(max_new_tokens=40), TreeDrafter(259, 0, oracle=ar.token_ids, mode="chain"))
    assert out.finish_reason == "stop"
    assert out.token_ids == ar.token_ids[: ar.token_ids.index(eos)]
