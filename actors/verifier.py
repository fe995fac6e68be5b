"""The target side of speculative decoding: owns each request's KV cache, verifies draft trees.

Per step and request: ``verify`` feeds the pending token plus the whole draft tree in one forward and
returns the target's logits at every row; ``commit`` keeps the accepted path in the cache and rolls the
rest back. ``verify`` takes a batch of (sequence, draft) pairs so several requests can later share one
forward (continuous batching); today it runs them one after another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel

from actors.draft import Draft
from actors.kv import KVSequence


class ContextOverflow(ValueError):
    """The sequence would grow past the model's maximum context."""


@dataclass
class TargetSequence:
    kv: KVSequence
    tokens: list[int]  # committed ids (prompt + output); tokens[-1] is pending: its KV is not cached yet
    verified: int = field(default=0)  # len(kv) before the last verify: where the tree's entries start
    key: int = field(default=0)  # the verifier's handle (tensor-parallel followers mirror sequences by it)


class Verifier:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
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

    def start(self, prompt_ids: Sequence[int]) -> TargetSequence:
        """Prefill all prompt tokens but the last, which becomes the pending token."""
        prompt = self.check_prompt(prompt_ids)
        kv = KVSequence(self.model)
        if len(prompt) > 1:
            kv.extend(prompt[:-1])
        return TargetSequence(kv, prompt)

    def room(self, seq: TargetSequence) -> int:
        """How many draft nodes still fit in the context after the pending token."""
        return max(0, self.max_context - len(seq.tokens) - 1)

    def verify(self, batch: Sequence[tuple[TargetSequence, Draft]]) -> list[torch.Tensor]:
        """For each pair, the target's logits [1 + n, vocab] at the pending token and every draft node."""
        out = []
        for seq, draft in batch:
            self.check_draft(seq, draft)
            seq.verified = len(seq.kv)
            logits = seq.kv.extend_tree(seq.tokens[-1], draft.tokens, draft.parents, draft.depths())
            out.append(logits.cpu())  # acceptance runs on the CPU (its generator lives there)
        return out

    def commit(self, seq: TargetSequence, accepted_nodes: list[int], new_tokens: list[int]) -> None:
        """Keep the pending token and the accepted nodes in the cache; ``new_tokens`` become committed.

        ``new_tokens`` is the accepted draft tokens followed by the bonus token, which is the new pending.
        """
        seq.kv.keep_path(seq.verified + 1, accepted_nodes)
        seq.tokens.extend(new_tokens)

    def finish(self, seq: TargetSequence) -> None:
        """The request is over; its KV cache goes with ``seq`` (a TP leader also tells its followers)."""

    def close(self) -> None:
        """Release what the verifier holds beyond its sequences (a TP leader stops its followers)."""
