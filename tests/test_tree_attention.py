"""Tree attention against a reference: every root-to-node path gives the logits of a plain causal forward."""

import numpy as np
import pytest
import torch

from actors.draft import Draft, tree_attention_mask
from actors.kv import KVSequence
from actors.tiny import tiny_model


def random_tree(rng: np.random.Generator, n: int, vocab: int) -> Draft:
    parents = np.array([rng.integers(-1, i) for i in range(n)])
    return Draft(rng.integers(0, vocab, n), parents)


def test_mask_of_chain_is_causal():
    mask = tree_attention_mask(Draft.chain([5, 6, 7]).parents)
    assert torch.equal(mask, torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_mask_of_siblings_hides_each_other():
    mask = tree_attention_mask(np.array([-1, -1, 0]))
    # node 1 (row 2) sees the pending token and itself only; node 2 (row 3) sees node 0 (col 1).
    assert mask[2].tolist() == [True, False, True, False]
    assert mask[3].tolist() == [True, True, False, True]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_path_matches_causal_forward(family, seed):
    model = tiny_model(family, seed=seed)
    rng = np.random.default_rng(seed)
    context = rng.integers(0, 259, 17).tolist()
    draft = random_tree(rng, 12, 259)
    kv = KVSequence(model)
    kv.extend(context[:-1])
    tree_logits = kv.extend_tree(context[-1], draft.tokens, draft.parents, draft.depths())
    with torch.inference_mode():
        ref_root = model(torch.tensor([context])).logits[0, -1]
        torch.testing.assert_close(tree_logits[0], ref_root, atol=1e-4, rtol=1e-4)
        for i in range(len(draft)):
            path = context + draft.tokens[draft.path_to(i)].tolist()
            ref = model(torch.tensor([path])).logits[0, -1]
            torch.testing.assert_close(tree_logits[i + 1], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_keep_path_then_extend_matches_fresh_forward(family):
    """After many accept/reject rounds the compacted cache gives the logits of a fresh full forward."""
    model = tiny_model(family, seed=3)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 259, 9).tolist()
    kv = KVSequence(model)
    kv.extend(tokens[:-1])
    for _ in range(15):
        draft = random_tree(rng, int(rng.integers(0, 10)), 259)
        base = len(kv)
        kv.extend_tree(tokens[-1], draft.tokens, draft.parents, draft.depths())
        leaf = int(rng.integers(-1, len(draft)))
        path = draft.path_to(leaf) if leaf >= 0 else []
        kv.keep_path(base + 1, path)
        tokens += draft.tokens[path].tolist() + [int(rng.integers(0, 259))]
        assert kv.cached_ids == tokens[:-1]
    logits = kv.extend([tokens[-1]])[-1]
    with torch.inference_mode():
        ref = model(torch.tensor([tokens])).logits[0, -1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q", [2, 7, 64])
def test_grouped_query_heads_packed_onto_their_key_heads_match_repeated_keys(q, monkeypatch):
    """A widened row's attention packs each key/value head's query heads as rows (as transformers does for
    one query) instead of repeating its keys; the same function as transformers' repeat_kv path."""
    import types

    import transformers.integrations.sdpa_attention as sdpa

    from actors.attention import _packed_sdpa

    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    gen = torch.Generator().manual_seed(q)
    query = torch.randn(2, q, 9, 16, generator=gen).transpose(1, 2)  # [B, H, q, D] as the layer passes it
    key, value = torch.randn(2, 3, 80, 16, generator=gen), torch.randn(2, 3, 80, 16, generator=gen)
    mask = torch.zeros(2, 1, q, 80)
    mask[0, 0, :, 50:] = mask[1, 0, 0, 3:] = torch.finfo(torch.float32).min  # a short row, a tree-like query
    expected, _ = sdpa.sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: pytest.fail("keys repeated"))
    got = _packed_sdpa(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (2, q, 9, 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
