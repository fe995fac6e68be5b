"""One sequence's KV cache on a Hugging Face causal LM, driven through transformers' public interfaces.

Tree attention needs no forked model file: transformers 5 passes a 4D attention mask through
unchanged, so feeding the draft nodes with an additive ``[1, 1, q, kv]`` mask and explicit
``position_ids`` (context length + depth) makes every node attend to the cached context, the pending
token and its own ancestors only. Rolling back is moving a length; keeping an accepted tree path is
one ``index_select`` per layer.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from actors.draft import tree_attention_mask


class KVSequence:
    """Token ids whose keys/values are cached, plus the forward calls that extend them."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cached_ids: list[int] = []  # ids whose KV is in the cache, in cache order

    def __len__(self) -> int:
        return len(self.cached_ids)

    @torch.inference_mode()
    def extend(self, ids: list[int]) -> torch.Tensor:
        """Causal forward of ``ids`` after the cache; returns their logits [len(ids), vocab]."""
        start, device = len(self.cached_ids), self.model.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
        out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.cached_ids.extend(ids)
        return out.logits[0].cpu()  # acceptance and drafters work on the CPU (a no-op there)

    @torch.inference_mode()
    def extend_tree(self, root: int, tokens: np.ndarray, parents: np.ndarray, depths: np.ndarray) -> torch.Tensor:
        """Forward the pending ``root`` and a draft tree below it in ONE call.

        Returns logits [1 + n, vocab]: row 0 at the root, row i + 1 at node i. The cache grows by 1 + n
        entries in node order; :meth:`keep_path` then keeps the accepted ones.
        """
        start, n = len(self.cached_ids), len(tokens)
        allowed = torch.ones(1 + n, start + 1 + n, dtype=torch.bool)
        allowed[:, start:] = tree_attention_mask(parents)
        return self.forward_masked([root, *tokens.tolist()], np.concatenate([[0], depths]) + start, allowed)

    @torch.inference_mode()
    def forward_masked(self, ids: list[int], positions, allowed: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` at ``positions``; row r attends to the cache entries where ``allowed[r]`` is True.

        ``allowed``: bool [len(ids), len(cache) + len(ids)]. The one path every non-causal forward takes
        (draft trees here, MTAD's beams): additive mask, inputs on the model's device, logits back on the CPU.
        """
        dtype, device = self.model.dtype, self.model.device
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            position_ids=torch.as_tensor(np.asarray(positions), dtype=torch.long).unsqueeze(0).to(device),
            attention_mask=mask[None, None].to(device),  # [1, 1, q, kv]
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cached_ids.extend(ids)
        return out.logits[0].cpu()  # acceptance and drafters work on the CPU (a no-op there)

    def keep_path(self, base: int, nodes: list[int]) -> None:
        """Keep the first ``base`` cached entries and then tree entries ``base + node`` (nodes in order).

        Accepted nodes sit at depth 1, 2, ... so their keys were computed at exactly the positions
        they now occupy: compaction is exact, nothing is recomputed.
        """
        if nodes == list(range(len(nodes))):
            self.crop(base + len(nodes))  # a chain prefix: rollback by length alone
            return
        keep = torch.tensor(list(range(base)) + [base + i for i in nodes], dtype=torch.long)
        for layer in self.cache.layers:
            keep = keep.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)
        self.cached_ids = [self.cached_ids[i] for i in keep.tolist()]

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` cached entries."""
        drop = len(self.cached_ids) - length
        if drop > 0:
            self.cache.crop(-drop)
            del self.cached_ids[length:]
