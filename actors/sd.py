"""Standard speculative decoding's drafter: a small model of the target's tokenizer drafts a chain.

Lossless: each drafted token is sampled from the draft model's warped distribution ``q`` (the same
temperature / top-k / top-p as the target) and ``q`` travels with the draft, so the engine's rejection
sampling reproduces the target's distribution exactly; under greedy it is the argmax chain.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from actors.draft import Draft
from actors.drafter import BaseDrafter, Feedback
from actors.kv import KVSequence
from actors.sampling import SamplingParams, warp


@dataclass
class _State:
    kv: KVSequence
    params: SamplingParams
    generator: torch.Generator


def draft_generator(params: SamplingParams) -> torch.Generator:
    """The draft model's random stream for a request: seeded from its seed + 1, so never the target's."""
    seed = (params.seed if params.seed is not None else int(torch.seed())) + 1
    return torch.Generator().manual_seed(seed % (1 << 63))


def sync_to_context(kv: KVSequence, context: Sequence[int]) -> torch.Tensor:
    """Make ``kv`` cache exactly ``context`` and return the logits at its last token.

    Keeps the longest common prefix (the accepted draft tokens are usually already cached) and feeds
    the rest; the last token is always fed so its logits come back.
    """
    context = [int(t) for t in context]
    common = 0
    for a, b in zip(kv.cached_ids, context[:-1]):
        if a != b:
            break
        common += 1
    kv.crop(common)
    return kv.extend(context[common:])[-1]


class ModelDrafter(BaseDrafter):
    options = ("gamma",)

    def __init__(self, model: PreTrainedModel, gamma: int = 4) -> None:
        if gamma < 1:
            raise ValueError("gamma must be >= 1")
        self.model = model
        self.gamma = gamma
        self._requests: dict[str, _State] = {}

    def with_options(self, gamma: int) -> ModelDrafter:
        """A view drafting ``gamma`` tokens that shares this drafter's model and request states."""
        if gamma < 1:
            raise ValueError("gamma must be >= 1")
        view = copy.copy(self)
        view.gamma = gamma
        return view

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self._requests[request_id] = _State(KVSequence(self.model), params, draft_generator(params))

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        st = self._requests[request_id]
        logits = sync_to_context(st.kv, context)
        tokens, qs = [], []
        for i in range(min(self.gamma, max_nodes)):
            q = warp(logits, st.params)  # [vocab]
            tok = int(q.argmax()) if st.params.greedy else int(torch.multinomial(q, 1, generator=st.generator))
            tokens.append(tok)
            qs.append(q)
            if i + 1 < min(self.gamma, max_nodes):
                logits = st.kv.extend([tok])[-1]
        q_rows = None if st.params.greedy or not qs else torch.stack(qs)
        return Draft.chain(tokens, q=q_rows)

    def observe(self, request_id: str, feedback: Feedback) -> None:
        pass  # the next propose() re-syncs the cache to the committed context

    def finish(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
