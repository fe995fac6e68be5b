"""Standard speculative decoding's drafter: a small model of the target's tokenizer drafts a chain.

Lossless: each drafted token is sampled from the draft model's warped distribution ``q`` (the same
temperature / top-k / top-p as the target) and ``q`` travels with the draft, so the engine's rejection
sampling reproduces the target's distribution exactly; under greedy it is the argmax chain.
"""

from __future__ import annotations

import copy
import random
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from actors.draft import Draft
from actors.drafter import BaseDrafter, Feedback
from actors.kv import BatchKV, RowInput, Slot, causal_row
from actors.sampling import SamplingParams, warp


@dataclass(eq=False)
class _State:
    slot: Slot  # the request's row of the drafter's BatchKV
    params: SamplingParams
    seed: int  # the request's seed, or a fresh random one: the draft stream is a function of (seed, position)
    gamma: int  # the depth of the view that started it: one batch drafts each request to its own


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


class SlotDrafter(BaseDrafter):
    """A draft model's drafter whose requests share ONE :class:`BatchKV` (a slot each): ``propose`` is a
    batch of one, ``finish`` frees the slot. Views made by ``with_options`` share the model, the cache and
    the request table, so one batch serves them all."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.kv = BatchKV(model)  # shared by the views, like the request table
        self._requests: dict = {}
        self._lock = threading.Lock()  # a drafter pool steps requests from several threads; the cache is shared

    @property
    def batch_key(self) -> object:
        return self._requests  # every view proposes for every request of the table

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        (out,) = self.propose_batch([(request_id, context, max_nodes)])
        if isinstance(out, BaseException):
            raise out
        return out

    def finish(self, request_id: str) -> None:
        with self._lock:
            self._free(request_id)

    def _free(self, request_id: str) -> None:
        st = self._requests.pop(request_id, None)
        if st is not None:
            self.kv.remove(st.slot)


class ModelDrafter(SlotDrafter):
    """Drafts every request of a step together: ONE :class:`BatchKV` holds a slot per request, a step syncs
    every row to its context in one forward (rows padded) and then runs ``[rows, 1]`` forwards in lockstep,
    one per draft depth, over the rows still drafting: ``gamma`` forwards per step for the whole batch.

    Each row's draft stream is what a request drafted alone would draw: argmax, or ``sample_at(q,
    draft_uniform(seed, position))`` with its own q; only the forward is shared.
    """

    options = ("gamma",)

    def __init__(self, model: PreTrainedModel, gamma: int = 4) -> None:
        if gamma < 1:
            raise ValueError("gamma must be >= 1")
        super().__init__(model)
        self.gamma = gamma

    def with_options(self, gamma: int) -> ModelDrafter:
        """A view drafting ``gamma`` tokens that shares this drafter's model and request states."""
        if gamma < 1:
            raise ValueError("gamma must be >= 1")
        view = copy.copy(self)
        view.gamma = gamma
        return view

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        with self._lock:
            self._free(request_id)  # a rebuilt request starts again from a fresh slot
            self._requests[request_id] = _State(self.kv.add(), params, draft_seed(params), self.gamma)

    def propose_batch(self, items: Sequence[tuple[str, np.ndarray, int]]) -> list[Draft | BaseException]:
        out: list[Draft | BaseException] = [Draft.empty() for _ in items]
        rows: list[tuple[int, _Row]] = []
        with self._lock:
            for i, (request_id, context, max_nodes) in enumerate(items):
                try:
                    st = checked_state(self._requests, request_id, context, [r.state for _, r in rows])
                except (KeyError, ValueError) as e:
                    out[i] = e
                    continue
                if min(st.gamma, max_nodes) >= 1:
                    rows.append((i, _Row(st, [int(t) for t in context], min(st.gamma, max_nodes))))
            if rows:
                try:
                    drafts = draft_chains(self.kv, [r for _, r in rows])
                except Exception as e:  # noqa: BLE001 - the shared forward failed: every row of it fails
                    drafts = [e] * len(rows)
                for (i, _), d in zip(rows, drafts):
                    out[i] = d
        return out

    def observe(self, request_id: str, feedback: Feedback) -> None:
        pass  # the next propose() re-syncs the cache to the committed context



@dataclass
class _Row:
    state: _State
    context: list[int]  # the committed context; its last token is pending (not cached yet)
    n: int  # tokens to draft


def checked_state(requests: dict, request_id: str, context: np.ndarray, taken: list) -> object:
    """The state of one item of a batch (a KeyError or ValueError that fails that item alone)."""
    st = requests.get(request_id)
    if st is None:
        raise KeyError(f"request {request_id!r} was not started")
    if any(t is st for t in taken):
        raise ValueError(f"request {request_id!r} is twice in one batch")
    if not len(context):
        raise ValueError("an empty context has no pending token to draft after")
    return st


def draft_chains(kv: BatchKV, rows: list[_Row]) -> list[Draft]:
    """Each row's chain of ``row.n`` tokens in ``max(n)`` forwards: one sync, then ``[rows, 1]`` steps."""
    synced = sync_rows(kv, [(r.state.slot, r.context) for r in rows], 1 + max(r.state.gamma for r in rows))
    logits = dict(enumerate(synced))  # row -> [vocab] at its pending token
    tokens: list[list[int]] = [[] for _ in rows]
    qs: list[list[torch.Tensor]] = [[] for _ in rows]
    for depth in range(max(r.n for r in rows)):
        for j, last in logits.items():
            st = rows[j].state
            q = warp(last, st.params)  # [vocab]
            u = None if st.params.greedy else draft_uniform(st.seed, len(rows[j].context) + depth)
            tokens[j].append(int(q.argmax()) if u is None else sample_at(q, u))
            qs[j].append(q)
        feed = [j for j in logits if depth + 1 < rows[j].n]  # rows that draft another token
        if not feed:
            break
        out = kv.forward([RowInput(rows[j].state.slot, *causal_row(len(rows[j].state.slot), [tokens[j][-1]]))
                          for j in feed])
        logits = {j: o[-1] for j, o in zip(feed, out)}
    return [Draft.chain(t, q=None if r.state.params.greedy else torch.stack(q)) for r, t, q in zip(rows, tokens, qs)]


def sync_rows(kv: BatchKV, rows: list[tuple[Slot, list[int]]], short: int) -> list[torch.Tensor]:
    """Make each slot cache exactly its context; returns the logits [vocab] at each last token.

    A row keeps its longest common prefix with the context (the accepted draft tokens are usually cached)
    and feeds the rest; the last token is always fed so its logits come back. Catch-ups of at most
    ``short`` tokens (a step's accepted tokens and bonus) go in ONE forward; a longer one (a new prompt, a
    rebuilt request) is fed alone first up to its last token, since rows are padded to the longest and
    every row would pay for it.
    """
    inputs = []
    for slot, context in rows:
        common = 0
        for a, b in zip(slot.ids, context[:-1]):
            if a != b:
                break
            common += 1
        kv.crop(slot, common)
        if len(context) - common > short:
            kv.forward([RowInput(slot, *causal_row(common, context[common:-1]))], logits=False)
            common = len(context) - 1
        inputs.append(RowInput(slot, *causal_row(common, context[common:])))
    return [o[-1] for o in kv.forward(inputs)]
