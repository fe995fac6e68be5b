"""KV caches on a Hugging Face causal LM, driven through transformers' public cache interface.

:class:`BatchKV` is a ``transformers.Cache`` whose layers hold every sequence slot of a batch: keys and
values ``[slots, kv_heads, capacity, head_dim]`` with a length per slot. One forward feeds ``[R, Q]``
tokens for a contiguous range of slots: row r writes its q_r new entries at columns ``len_r ..
len_r + q_r`` (padding queries beyond q_r write junk past the row's length, never counted) and attends
through a ``[R, 1, Q, kv]`` additive mask that combines the row's own length, padding and tree mask.
transformers 5 passes a 4D mask through unchanged, so no model file is forked.

Memory follows the tokens held: capacity is the longest live row (plus headroom), grown and shrunk as
rows come and go, never slots x maximum context. Slots stay contiguous: freeing one moves the last row
into it, so a step's forward always covers one slice of the buffers (a view, no copy).

Rolling back is moving a length; keeping an accepted tree path rewrites one row's tail (one gather per
layer). :class:`KVSequence` is the one-slot case (the tests' per-sequence reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from actors.attention import kv_bucket, use_row_exact_attention
from actors.draft import tree_attention_mask

_ALIGN = 64  # capacity granularity (tokens)


@dataclass(eq=False)
class Slot:
    """A sequence's place in a :class:`BatchKV`; ``row`` moves when other slots are freed."""

    row: int
    ids: list[int] = field(default_factory=list)  # ids whose KV is cached, in cache order

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RowInput:
    """One row of a batched forward: ``ids`` appended at ``positions``; ``allowed`` [q, len + q] bool says
    which cache columns each new token attends to (its own row's old entries, then the new ones)."""

    slot: Slot
    ids: list[int]
    positions: np.ndarray
    allowed: torch.Tensor


class _SlotLayer(CacheLayerMixin):
    """One model layer's share of a :class:`BatchKV`; the owner decides where each update is written."""

    is_sliding = False

    def __init__(self, owner: BatchKV) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner._write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner._kv_len, 0

    def get_seq_length(self) -> int:
        return self._owner._kv_len

    def get_max_length(self) -> int:
        return -1


class BatchKV(Cache):
    def __init__(self, model: PreTrainedModel, row_exact: bool = True) -> None:
        super().__init__(layers=[_SlotLayer(self) for _ in range(model.config.num_hidden_layers)])
        self.model = model
        # Row-exact attention: greedy output independent of the batch (off: one SDPA call over the batch).
        self._row_exact = use_row_exact_attention(model) and row_exact
        self.slots: list[Slot] = []
        self.capacity = 0  # tokens per slot in the buffers
        self._rows = slice(0, 0)
        self._cols: torch.Tensor | None = None  # [R, Q] column each new entry is written to
        self._kv_len = 0

    # -- slots ---------------------------------------------------------------------------------------
    def add(self) -> Slot:
        slot = Slot(len(self.slots))
        self.slots.append(slot)
        return slot

    @torch.inference_mode()
    def remove(self, slot: Slot) -> None:
        """Free ``slot``: the last row moves into its place, so live rows stay contiguous."""
        last = self.slots.pop()
        if last is not slot:
            for layer in self.layers:
                if layer.keys is not None and last.row < layer.keys.shape[0]:  # else never written: nothing held
                    layer.keys[slot.row].copy_(layer.keys[last.row])
                    layer.values[slot.row].copy_(layer.values[last.row])
            last.row = slot.row
            self.slots[slot.row] = last
        slot.row = -1
        self._fit(max((len(s) for s in self.slots), default=0))

    def tokens_held(self) -> int:
        return sum(len(s) for s in self.slots)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)

    # -- forward -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: list[RowInput], logits: bool = True) -> list[torch.Tensor]:
        """One forward over every row in ``batch``; returns each row's logits [q_r, vocab] on the CPU, or
        nothing when ``logits`` is False (a prompt chunk: the LM head would be a sixth of its FLOPs, unread).

        Rows of the covered slot range that ``batch`` leaves out take part as pure padding.
        """
        rows = sorted(r.slot.row for r in batch)
        lo, hi = rows[0], rows[-1] + 1
        by_row = {r.slot.row - lo: r for r in batch}
        n_rows, q = hi - lo, max(len(r.ids) for r in batch)
        lengths = [len(self.slots[i]) for i in range(lo, hi)]
        self._kv_len = kv_bucket(max(lengths) + q)  # every row's keys can be cut at its own bucket
        # Capacity follows the longest live row, not only this forward's rows (a joining row's prefill
        # covers itself alone: fitted to it, the buffers would shrink under the others' entries).
        self._fit(max(self._kv_len, max(len(s) for s in self.slots)))
        dtype, device = self.model.dtype, self.model.device
        ids = torch.zeros(n_rows, q, dtype=torch.long)
        pos = torch.tensor(lengths, dtype=torch.long)[:, None].repeat(1, q)
        mask = torch.full((n_rows, 1, q, self._kv_len), torch.finfo(dtype).min, dtype=dtype)
        mask[:, 0, :, 0] = 0  # padding queries look at one (finite) entry, so their rows stay finite
        for i, r in by_row.items():
            n, end = len(r.ids), lengths[i] + len(r.ids)
            ids[i, :n] = torch.tensor(r.ids, dtype=torch.long)
            pos[i, :n] = torch.as_tensor(np.asarray(r.positions), dtype=torch.long)
            mask[i, 0, :n] = 0
            mask[i, 0, :n, :end].masked_fill_(~r.allowed, torch.finfo(dtype).min)
            mask[i, 0, :n, end:] = torch.finfo(dtype).min
        self._rows = slice(lo, hi)
        self._cols = torch.tensor(lengths, dtype=torch.long)[:, None] + torch.arange(q)[None, :]
        # Each row's own queries and keys (its entries plus its real queries): what it attends with alone.
        own_q = [len(by_row[i].ids) if i in by_row else 1 for i in range(n_rows)]  # a padding row: any width
        own_kv = [max(1, lengths[i] + own_q[i] if i in by_row else lengths[i]) for i in range(n_rows)]
        extra = {"row_kv_lengths": own_kv, "row_q_lengths": own_q} if self._row_exact else {}
        hidden = self.model.base_model(
            input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
            cache=self, use_cache=True, **extra,
        ).last_hidden_state  # [R, Q, hidden]
        if not logits:
            for r in batch:
                r.slot.ids.extend(r.ids)
            return []
        keep = [i * q + j for i, r in sorted(by_row.items()) for j in range(len(r.ids))]
        flat = hidden.reshape(n_rows * q, -1)[torch.tensor(keep, device=hidden.device)]
        # [1, N, hidden]: a sharded head (DeepSpeed's LmHeadLinearAllreduce) wants [batch, seq, hidden]
        logits = self.model.get_output_embeddings()(flat[None])[0].float().cpu()  # acceptance runs on the CPU
        out, at = {}, 0
        for i, r in sorted(by_row.items()):
            out[id(r)] = logits[at : at + len(r.ids)]
            at += len(r.ids)
            r.slot.ids.extend(r.ids)
        return [out[id(r)] for r in batch]

    def _write(self, layer: _SlotLayer, keys: torch.Tensor, values: torch.Tensor):
        """Cache.update for one layer: keys/values [R, H, Q, D] land at ``self._cols`` of rows ``self._rows``."""
        if layer.keys is None or layer.keys.shape[0] < len(self.slots) or layer.keys.shape[2] < self.capacity:
            self._alloc(layer, keys)
        kb, vb = layer.keys[self._rows], layer.values[self._rows]  # views
        rows = torch.arange(kb.shape[0], device=kb.device)[:, None]
        cols = self._cols.to(kb.device)
        kb.transpose(1, 2)[rows, cols] = keys.transpose(1, 2)
        vb.transpose(1, 2)[rows, cols] = values.transpose(1, 2)
        return kb[:, :, : self._kv_len], vb[:, :, : self._kv_len]

    # -- capacity ------------------------------------------------------------------------------------
    def _fit(self, needed: int) -> None:
        """Grow capacity to hold ``needed`` columns; shrink when the longest row needs under half of it."""
        if needed > self.capacity:
            self.capacity = -(-int(needed * 1.25) // _ALIGN) * _ALIGN
        elif self.capacity > 4 * _ALIGN and needed * 2 < self.capacity:
            self.capacity = -(-int(needed * 1.25) // _ALIGN) * _ALIGN
            self._resize_all()
        if len(self.slots) * 2 + 4 < self._slot_capacity():
            self._resize_all()

    def _slot_capacity(self) -> int:
        layer = self.layers[0]
        return 0 if layer.keys is None else layer.keys.shape[0]

    def _alloc(self, layer: _SlotLayer, like: torch.Tensor) -> None:
        """(Re)allocate one layer's buffers for the current slots and capacity, keeping what they hold."""
        slots = max(len(self.slots), 1)
        slots = slots + slots // 4 + 1  # headroom: joining requests rarely reallocate
        shape = (slots, like.shape[1], self.capacity, like.shape[3])
        keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        values = torch.zeros_like(keys)
        if layer.keys is not None:
            s, t = min(slots, layer.keys.shape[0]), min(self.capacity, layer.keys.shape[2])
            keys[:s, :, :t] = layer.keys[:s, :, :t]
            values[:s, :, :t] = layer.values[:s, :, :t]
        layer.keys, layer.values = keys, values

    def _resize_all(self) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                self._alloc(layer, layer.keys)

    # -- commit / rollback ---------------------------------------------------------------------------
    @torch.inference_mode()
    def keep_path(self, slot: Slot, base: int, nodes: list[int]) -> None:
        """Keep ``slot``'s first ``base`` entries and then tree entries ``base + node`` (nodes in order).

        Accepted nodes sit at depth 1, 2, ... so their keys were computed at exactly the positions
        they now occupy: compaction is exact, nothing is recomputed.
        """
        if nodes == list(range(len(nodes))):
            self.crop(slot, base + len(nodes))  # a chain prefix: rollback by length alone
            return
        src = torch.tensor([base + i for i in nodes], dtype=torch.long)
        for layer in self.layers:
            if layer.keys is None:
                continue
            for buf in (layer.keys, layer.values):
                row = buf[slot.row]  # [H, T, D]
                row[:, base : base + len(nodes)] = row.index_select(1, src.to(row.device))
        kept = slot.ids[:base] + [slot.ids[base + i] for i in nodes]
        slot.ids[:] = kept

    def crop(self, slot: Slot, length: int) -> None:
        """Roll ``slot`` back to its first ``length`` entries."""
        del slot.ids[length:]


class KVSequence:
    """One sequence's cache (a one-slot :class:`BatchKV`): the per-sequence reference tests check batches against."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.batch = BatchKV(model)
        self.slot = self.batch.add()

    @property
    def cached_ids(self) -> list[int]:
        return self.slot.ids

    def __len__(self) -> int:
        return len(self.slot)

    def extend(self, ids: list[int]) -> torch.Tensor:
        """Causal forward of ``ids`` after the cache; returns their logits [len(ids), vocab]."""
        return self.forward_masked(*causal_row(len(self), ids))

    def extend_tree(self, root: int, tokens: np.ndarray, parents: np.ndarray, depths: np.ndarray) -> torch.Tensor:
        """Forward the pending ``root`` and a draft tree below it in ONE call.

        Returns logits [1 + n, vocab]: row 0 at the root, row i + 1 at node i. The cache grows by 1 + n
        entries in node order; :meth:`keep_path` then keeps the accepted ones.
        """
        return self.forward_masked(*tree_row(len(self), root, tokens, parents, depths))

    def forward_masked(self, ids: list[int], positions, allowed: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` at ``positions``; row r attends to the cache entries where ``allowed[r]`` is True.

        ``allowed``: bool [len(ids), len(cache) + len(ids)]. The one path every non-causal forward of a
        single sequence takes (draft trees, MTAD's beams).
        """
        return self.batch.forward([RowInput(self.slot, list(ids), np.asarray(positions), allowed)])[0]

    def keep_path(self, base: int, nodes: list[int]) -> None:
        self.batch.keep_path(self.slot, base, nodes)

    def crop(self, length: int) -> None:
        self.batch.crop(self.slot, length)


def tree_row(start: int, root: int, tokens: np.ndarray, parents: np.ndarray, depths: np.ndarray):
    """(ids, positions, allowed) of the pending ``root`` plus a draft tree after ``start`` cached entries."""
    n = len(tokens)
    allowed = torch.ones(1 + n, start + 1 + n, dtype=torch.bool)
    allowed[:, start:] = tree_attention_mask(parents)
    return [int(root), *np.asarray(tokens).tolist()], np.concatenate([[0], depths]).astype(np.int64) + start, allowed


def causal_row(start: int, ids: list[int]):
    """(ids, positions, allowed) of a causal chunk after ``start`` cached entries (prefill)."""
    n = len(ids)
    allowed = torch.ones(n, start + n, dtype=torch.bool)
    allowed[:, start:] = torch.tril(allowed[:, start:])
    return list(ids), np.arange(start, start + n), allowed
