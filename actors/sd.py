"""Standard speculative decoding's drafter: a small model of the target's tokenizer drafts a chain.

Lossless: each drafted token is sampled from the draft model's warped distribution ``q`` (the same
temperature / top-k / top-p as the target) and ``q`` travels with the draft, so the engine's rejection
sampling reproduces the target's distribution exactly; under greedy it is the argmax chain.
"""

from __future__ import annotations

import copy
import random
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
    seed: int  # the request's seed, or a fresh random one: the draft stream is a function of (seed, position)


_STREAM = 0x5D  # tags the draft stream's seed sequence: never the target's acceptance stream (torch, seed)


def draft_generator(params: SamplingParams) -> torch.Generator:
    """MTAD's beam-sampling stream for a request: seeded from its seed + 1, so never the target's.

    (MTAD is approximate by design, so a rebuild restarting this stream costs no exactness it had.)
    """
    seed = (params.seed if params.seed is not None else int(torch.seed())) + 1
    return torch.Generator().manual_seed(seed % (1 << 63))


def draft_seed(params: SamplingParams) -> int:
    return params.seed if params.seed is not None else random.getrandbits(63)


def draft_uniform(seed: int, position: int) -> float:
    """The uniform that draws the draft token at sequence ``position``: a function of (seed, position) only.

    Rejection sampling is exact only if each drafted token is a fresh draw from its q, independent of the
    acceptance tests already made. A stream that restarts when a drafter rebuilds a request's state (LRU
    eviction, another replica, a restart) would reuse uniforms whose tokens were already tested. Keyed by
    position it never does: a position is drafted again only after a rejection before it, and then its old
    token was never tested (each step tests a prefix), so its uniform is still independent of the output.
    """
    return float(np.random.default_rng([_STREAM, seed, position]).random())


def sample_at(q: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from ``q`` [V] with uniform ``u``: a token with q > 0 (the device stays q's)."""
    cdf = torch.cumsum(q.double(), 0)  # float64: a 150k vocabulary's cumulative sum keeps its last bins
    idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device),
                                 right=True))
    return min(idx, q.shape[0] - 1)


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
        self._requests[request_id] = _State(KVSequence(self.model), params, draft_seed(params))

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        st = self._requests[request_id]
        logits = sync_to_context(st.kv, context)
        tokens, qs = [], []
        for i in range(min(self.gamma, max_nodes)):
            q = warp(logits, st.params)  # [vocab]
            tok = int(q.argmax()) if st.params.greedy else sample_at(q, draft_uniform(st.seed, len(context) + i))
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
