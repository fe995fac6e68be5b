"""The target side of speculative decoding: owns every live request's KV cache, verifies draft trees.

All sequences live in one :class:`~actors.kv.BatchKV`. ``verify`` feeds, for every (sequence, draft)
pair of a step, the pending token plus the whole draft tree, all in ONE batched forward, and returns
each pair's logits; ``commit`` keeps a sequence's accepted path and rolls the rest back. A new
sequence's prompt is cached by ``prefill`` in chunks, one forward per chunk, so a long prompt joins a
running batch without stalling it for the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel

from actors.draft import Draft
from actors.kv import BatchKV, RowInput, Slot, causal_row, tree_row


class ContextOverflow(ValueError):
    """The sequence would grow past the model's maximum context."""


@dataclass(eq=False)
class TargetSequence:
    slot: Slot
    tokens: list[int]  # committed ids (prompt + output); tokens[-1] is pending: its KV is not cached yet
    verified: int = field(default=0)  # cached entries before the last verify: where the tree's entries start
    key: int = field(default=0)  # the verifier's handle (tensor-parallel followers mirror sequences by it)

    @property
    def to_prefill(self) -> int:
        """Prompt tokens (all but the pending one) whose KV is not cached yet."""
        return len(self.tokens) - 1 - len(self.slot)


class Verifier:
    def __init__(self, model: PreTrainedModel, batch_invariant: bool = True) -> None:
        self.model = model
        self.kv = BatchKV(model, row_exact=batch_invariant)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))

    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_context:
            raise ContextOverflow(f"prompt has {len(prompt)} tokens; the model's context is {self.max_context}")
        return prompt

    def check_draft(self, seq: TargetSequence, draft: Draft) -> None:
        if len(draft) > self.room(seq):
            raise ContextOverflow(f"draft of {len(draft)} nodes does not fit the remaining context")

    def start(self, prompt_ids: Sequence[int], prefill: bool = True) -> TargetSequence:
        """A sequence in a new slot; its prompt but the last token (the pending one) is cached now, or
        chunk by chunk through :meth:`prefill` when ``prefill`` is False."""
        seq = TargetSequence(self.kv.add(), self.check_prompt(prompt_ids))
        if prefill:
            self._cache_prompt(seq, None)
        return seq

    def prefill(self, seq: TargetSequence, max_tokens: int | None = None) -> int:
        """Cache up to ``max_tokens`` more prompt tokens in one forward; returns how many are left."""
        return self._cache_prompt(seq, max_tokens)

    def _cache_prompt(self, seq: TargetSequence, max_tokens: int | None) -> int:
        # Not ``prefill``: a TP leader mirrors that op, while ``start`` is mirrored as a whole.
        start = len(seq.slot)
        chunk = seq.tokens[start : len(seq.tokens) - 1][:max_tokens]
        if chunk:
            self.kv.forward([RowInput(seq.slot, *causal_row(start, chunk))], logits=False)
        return seq.to_prefill

    def room(self, seq: TargetSequence) -> int:
        """How many draft nodes still fit in the context after the pending token."""
        return max(0, self.max_context - len(seq.tokens) - 1)

    def verify(self, batch: Sequence[tuple[TargetSequence, Draft]]) -> list[torch.Tensor]:
        """For each pair, the target's logits [1 + n, vocab] at the pending token and every draft node."""
        rows = []
        for seq, draft in batch:
            self.check_draft(seq, draft)
            if seq.to_prefill:
                raise RuntimeError("verify before the prompt is prefilled")
            seq.verified = len(seq.slot)
            rows.append(RowInput(seq.slot, *tree_row(seq.verified, seq.tokens[-1], draft.tokens, draft.parents,
                                                     draft.depths())))
        return self.kv.forward(rows)

    def commit(self, seq: TargetSequence, accepted_nodes: list[int], new_tokens: list[int]) -> None:
        """Keep the pending token and the accepted nodes in the cache; ``new_tokens`` become committed.

        ``new_tokens`` is the accepted draft tokens followed by the bonus token, which is the new pending.
        """
        self.kv.keep_path(seq.slot, seq.verified + 1, accepted_nodes)
        seq.tokens.extend(new_tokens)

    def finish(self, seq: TargetSequence) -> None:
        """The request is over: its slot (and KV cache) is freed for the next one."""
        if seq.slot.row >= 0:
            self.kv.remove(seq.slot)

    def close(self) -> None:
        """Release what the verifier holds beyond its sequences (a TP leader stops its followers)."""
