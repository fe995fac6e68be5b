"""oneDNN linears (actors.kernels): the same function as torch's, on every path the engine uses."""

import numpy as np
import pytest
import torch

from actors.kernels import apply_kernels, onednn_available
from actors.kv import KVSequence
from actors.models import load_model


def test_this_build_has_onednn():
    # CI runs on the same CPU torch build as users: if this fails, `auto` silently means the slow path.
    assert onednn_available()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_onednn_logits_match_torch_on_tree_and_causal_forwards(family):
    plain = load_model(f"{family}:3", kernels="torch")
    fast = load_model(f"{family}:3")  # auto -> onednn on CPU fp32
    assert getattr(plain.model, "_specd_kernels") == "torch" and fast.model._specd_kernels == "onednn"
    ids = list(range(5, 40))
    tokens, parents = np.array([7, 8, 9, 10, 11]), np.array([-1, 0, 0, 2, -1])
    depths = np.array([1, 2, 2, 3, 1])
    out = []
    for lm in (plain, fast):
        kv = KVSequence(lm.model)
        causal = kv.extend(ids)
        tree = kv.extend_tree(3, tokens, parents, depths)
        out.append((causal, tree))
    for a, b in zip(*out):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_apply_is_idempotent_and_leaves_subclasses_alone():
    lm = load_model("tiny-llama:1")
    linear = lm.model.lm_head
    forward = linear.forward
    assert apply_kernels(lm.model) == "onednn" and linear.forward is forward  # not packed twice

    class Custom(torch.nn.Linear):
        pass

    m = torch.nn.Sequential(Custom(4, 4), torch.nn.Linear(4, 4))
    apply_kernels(m, "onednn")
    assert "forward" not in m[0].__dict__ and "forward" in m[1].__dict__
    x = torch.randn(3, 4)
    with torch.inference_mode():
        assert torch.allclose(m[1](x), torch.nn.functional.linear(x, m[1].weight, m[1].bias), atol=1e-5)
    x.requires_grad_(True)  # training-style calls fall back to torch's own linear (packed weights have no grad)
    m[1](x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("k, n", [(576, 1536), (1536, 576), (576, 49152)])  # SmolLM2's linear shapes
def test_a_row_is_computed_alike_alone_and_in_any_batch(k, n):
    # Greedy output may not depend on the batch: a row's output must be bitwise the same for every number
    # of rows. (oneDNN's one-row path summed K=1536 in another order; actors.kernels pads it to two rows.)
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False)
    apply_kernels(linear, "onednn")
    x = torch.randn(130, k)
    with torch.inference_mode():
        full = linear(x)
        for m in [*range(1, 18), 31, 64, 129]:
            assert torch.equal(linear(x[:m]), full[:m]), m
        assert torch.equal(linear(x[7]), full[7])  # a bare vector too
        assert torch.equal(linear(x[None, None, 7]), full[None, None, 7])
