"""CPU linear kernels that keep a verify forward's cost nearly flat in the number of new tokens.

Speculative decoding pays only where verifying k tokens costs about what verifying one costs. On the
2-core CPU this was developed on, torch's default fp32 GEMM path for 2..64 rows is far from that: its
skinny-GEMM kernels, not streaming the weights (the same for one row or eight), set the cost. oneDNN
with the weight reordered once into its blocked layout (what Inductor's freezing pass uses, called here
without compiling) keeps the cost nearly flat over those rows: compare the two SmolLM2 curves in
``actors/data/smollm2-135m-cpu-verify-cost.json``, and measure your own with ``specd profile``.
Swapping every ``nn.Linear`` of the model for it is the same math (fp32, a different summation order:
logits agree within the tolerance ``tests/test_kernels.py`` checks) and helps plain decoding too, so
every method and baseline in the engine gets it.

The dense weights stay in place (tensor-parallel sharding and tied embeddings read them), so on CPU a
model's linear weights take twice the memory; ``kernels="torch"`` opts out.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Kernels = Literal["auto", "onednn", "torch"]


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def kernels_of(model: nn.Module) -> str:
    """The kernels ``apply_kernels`` gave this model (``torch`` when it never ran)."""
    return getattr(model, "_specd_kernels", "torch")


def resolve(kernels: Kernels, model: nn.Module) -> str:
    """``auto``: oneDNN for an fp32 model on the CPU when this torch build has it, else torch's own."""
    if kernels != "auto":
        if kernels == "onednn" and not onednn_available():
            raise ValueError("kernels='onednn' needs a torch build with oneDNN (mkldnn)")
        return kernels
    param = next(model.parameters(), None)
    on_cpu_fp32 = param is not None and param.device.type == "cpu" and param.dtype == torch.float32
    return "onednn" if on_cpu_fp32 and onednn_available() else "torch"


def apply_kernels(model: nn.Module, kernels: Kernels = "auto") -> str:
    """Route the model's ``nn.Linear`` forwards through the chosen kernels; returns the one applied.

    Idempotent. Only for inference: the packed weights carry no gradient.
    """
    chosen = resolve(kernels, model)
    if chosen == "onednn" and kernels_of(model) != "onednn":
        for module in model.modules():
            if type(module) is nn.Linear:  # exact type: DeepSpeed's and others' subclasses keep their forward
                _pack(module)
    # Packing cannot be undone: asking for torch after oneDNN leaves oneDNN in place.
    model._specd_kernels = "onednn" if chosen == "onednn" else kernels_of(model)
    return model._specd_kernels


def _pack(linear: nn.Linear) -> None:
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
    bias = None if linear.bias is None else linear.bias.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad:
            return nn.functional.linear(x, linear.weight, linear.bias)
        if x.numel() == x.shape[-1]:
            # One row takes oneDNN's one-row path, which sums in another order than its many-row one (seen
            # for K=1536), so a request alone would round unlike the same request in a batch and a near-tie
            # could flip a greedy token. Two rows cost what one does (the weights are read either way). cat is
            # one kernel; repeat was a dozen small ops per linear, which showed over a forward's ~200 linears.
            row = x.reshape(1, -1)
            two = torch.ops.mkldnn._linear_pointwise(torch.cat((row, row)), packed, bias, "none", [], "")
            return two[:1].reshape(*x.shape[:-1], -1)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    linear.forward = forward  # instance attribute: the class and other models are untouched
