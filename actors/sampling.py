"""Sampling parameters and the logits -> probabilities transform shared by target and proposals.

Lossless speculative sampling requires the target distribution ``p`` and any proposal ``q`` to be taken
after the *same* processing; both go through :func:`warp`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=1, le=1 << 20, description="Stop after this many generated tokens.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy (argmax).")
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="Keep only the k most likely tokens; 0 disables. At "
                       "most int32's maximum: remote drafters are sent it in SamplingOptions.top_k.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus: keep the smallest set with this mass.")
    seed: int | None = Field(None, description="Seed for sampling and for randomised drafters.")
    stop: tuple[str, ...] = Field((), description="Stop strings; the output is cut before the first match.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., vocab] logits -> [..., vocab] float32 probabilities after temperature, top-k, top-p.

    Greedy params give a one-hot at the argmax, so greedy decoding is sampling from ``warp``.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    # Shifted so the largest is 0 before dividing: the same distribution, but a tiny temperature (1e-300 passes
    # validation; it would be 0 in float32) sends the others to -inf instead of making every logit +-inf or
    # 0/0 (softmax NaN).
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop_sorted[..., 0] = False  # also when top_p is below float32's range (1e-300 compares as 0 >= 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
