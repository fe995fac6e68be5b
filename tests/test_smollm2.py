"""The real SmolLM2-135M through the engine: coherent greedy text, identical under every lossless draft."""

import pytest

from actors.drafter import NoDrafter
from actors.engine import Engine
from actors.sampling import SamplingParams
from actors.sd import ModelDrafter
from actors.models import encode_prompt
from specd_testing import TreeDrafter

pytestmark = pytest.mark.smollm2

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string."]
PARAMS = SamplingParams(max_new_tokens=32)


@pytest.fixture(scope="module")
def runs(smollm2):
    engine = Engine(smollm2)
    out = []
    for prompt in PROMPTS:
        ids = encode_prompt(smollm2.tokenizer, prompt, chat=True)
        out.append((ids, engine.run(ids, PARAMS, NoDrafter())))
    return engine, out


def test_greedy_ar_is_coherent(runs):
    _, results = runs
    assert "Paris" in results[0][1].text
    assert "def " in results[1][1].text


def test_lossless_drafts_give_identical_tokens(runs, smollm2):
    engine, results = runs
    vocab = smollm2.model.config.vocab_size
    for i, (ids, ar) in enumerate(results):
        oracle = ar.token_ids + [0] * 64
        for drafter in (TreeDrafter(vocab, seed=i, oracle=oracle, mode="tree", size=12),
                        TreeDrafter(vocab, seed=i, mode="random", size=6),
                        ModelDrafter(smollm2.model, gamma=4)):
            out = engine.run(ids, PARAMS, drafter)
            assert out.token_ids == ar.token_ids
            assert out.text == ar.text
