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


def test_a_request_gets_the_same_logits_alone_and_in_a_ragged_batch(smollm2):
    """Greedy output may not depend on who else is in the batch: a request's logits decoded alone equal,
    bit for bit, its logits inside a batch of rows of other lengths and drafts (plain steps and trees),
    rows 0 and 1 of different lengths sharing an attention call (the same key bucket), with stale entries
    of a longer, rolled-back sequence in the masked columns past their own."""
    import numpy as np
    import torch

    from actors.draft import Draft
    from actors.kv import BatchKV, RowInput, causal_row, tree_row

    rng = np.random.default_rng(0)
    vocab = smollm2.model.config.vocab_size
    contexts = [rng.integers(0, vocab, n).tolist() for n in (37, 50, 90, 5, 61)]
    drafts = [Draft.empty(), Draft.empty(), Draft.chain([11, 12, 13]),
              Draft(np.array([5, 6, 7]), np.array([-1, -1, 0])), Draft.empty()]

    def prefilled(kv: BatchKV, ctx: list[int], stale: int = 0):
        slot = kv.add()
        kv.forward([RowInput(slot, *causal_row(0, ctx[:-1]))], logits=False)
        if stale:  # entries past the row's length that a rejected draft would leave
            kv.forward([RowInput(slot, *causal_row(len(slot), rng.integers(0, vocab, stale).tolist()))], logits=False)
            kv.crop(slot, len(ctx) - 1)
        return slot

    def row(slot, ctx, d):
        return RowInput(slot, *tree_row(len(slot), ctx[-1], d.tokens, d.parents, d.depths()))

    batch = BatchKV(smollm2.model)
    slots = [prefilled(batch, c, stale=40) for c in contexts]
    batched = batch.forward([row(s, c, d) for s, c, d in zip(slots, contexts, drafts)])
    for ctx, d, got in zip(contexts, drafts, batched):
        alone = BatchKV(smollm2.model)
        ref = alone.forward([row(prefilled(alone, ctx), ctx, d)])[0]
        assert torch.equal(got, ref), (got - ref).abs().max()
