"""Attention that computes each row of a ragged batch exactly as it would be computed alone.

Rows of a :class:`~actors.kv.BatchKV` forward have different lengths; one SDPA call over the batch's
padded key length gives a short row the right function but not the same bits: the masked tail changes
how the kernel blocks the sum over keys (seen with SmolLM2 on this CPU: logits off by 4e-5), so a
near-tie could flip a greedy token depending on who else is in the batch. The query length matters too:
on an AVX2 EPYC the same query row came out in other bits when SDPA was given 1 query or 4 (the
padded width of a batch with a 3-node draft in it), even on the math backend. Here every row attends
with its own queries over its own keys only (rows of equal shape share a call), which is the call it
gets when decoding alone, so greedy output never depends on the batch.

A row's keys are cut at its length rounded up to a multiple of ``KV_BUCKET`` (the columns past its own
entries are masked, so they add exact zeros), alone as in any batch: neighbouring rows whose lengths
round alike share one SDPA call. Cut at the exact length, every row of a decode batch was a call of its
own per layer: a plain 8-row step cost 1.4-2.1x one row on ragged rows against 1.1-1.4x on equal ones
(results/2026-12-07f-profile vs -d).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ROW_EXACT = "specd_row_exact"
KV_BUCKET = 64  # keys per row are cut at a multiple of this (BatchKV pads its key length to one)


def kv_bucket(n: int) -> int:
    return -(-n // KV_BUCKET) * KV_BUCKET


def row_exact_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, row_kv_lengths: Sequence[int] | None = None,
                        row_q_lengths: Sequence[int] | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA with row r's queries cut to ``row_q_lengths[r]`` and its keys to ``row_kv_lengths[r]`` (rounded up
    to ``KV_BUCKET``; the mask hides the extra columns): query
    [B, H, q, D], key/value [B, H_kv, kv, D], mask [B, 1, q, kv]; returns [B, q, H, D] like transformers'
    sdpa_attention_forward, zeros at a row's padded queries."""
    if row_kv_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q_all, kv_all = query.shape[2], key.shape[2]
    shapes = list(zip(map(kv_bucket, row_kv_lengths), row_q_lengths or [q_all] * len(row_kv_lengths)))
    if max(n for n, _ in shapes) > kv_all:  # cut shorter, a row would round unlike it does alone
        raise ValueError(f"keys of length {kv_all} are not padded to a multiple of {KV_BUCKET}")
    outs, start = [], 0
    while start < len(shapes):
        (n, q), end = shapes[start], start + 1
        while end < len(shapes) and shapes[end] == (n, q):
            end += 1
        rows = slice(start, end)
        mask = None if attention_mask is None else attention_mask[rows, :, :q, :n]
        out = _packed_sdpa(module, query[rows, :, :q], key[rows, :, :n], value[rows, :, :n], mask, **kwargs)
        outs.append(out if q == q_all else torch.nn.functional.pad(out, (0, 0, 0, 0, 0, q_all - q)))
        start = end
    return torch.cat(outs), None


def _packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, scaling: float | None = None, **kwargs) -> torch.Tensor:
    """transformers' SDPA with grouped-query heads packed onto their key/value heads at every query length.

    transformers packs a one-token query so (``pack_gqa``) and repeats the keys and values for longer ones
    (``repeat_kv``): a copy of every row's cache per layer, which made a 2-row verify step at ~320 tokens of
    context 6% (2 tokens a row) to 9% (4) slower on this CPU (results/2026-12-07s-gqa). Query heads
    ``h = g * n_rep + r`` of key/value head g become ``n_rep * q`` query rows of g (r-major), the mask
    repeated to match; each query row still attends alone, so the result is the same function, and a row
    alone and in a batch make the same call.
    """
    n_rep, (b, h, q, d) = getattr(module, "num_key_value_groups", 1), query.shape
    if n_rep == 1 or q == 1 or mask is None:
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)[0]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, h // n_rep, n_rep * q, d), key, value, attn_mask=mask.repeat(1, 1, n_rep, 1), scale=scaling)
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous()  # [b, q, h, d], as sdpa_attention_forward's


AttentionInterface.register(ROW_EXACT, row_exact_attention)


def use_row_exact_attention(model: PreTrainedModel) -> bool:
    """Route the model's SDPA attention through :func:`row_exact_attention`; False for another kind."""
    if model.config._attn_implementation in ("sdpa", ROW_EXACT):
        model.config._attn_implementation = ROW_EXACT
        return True
    return False
