"""Shared test helpers: drafters (random trees, a noisy oracle) and exact target distributions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from actors.draft import Draft
from actors.drafter import BaseDrafter, Feedback
from actors.sampling import SamplingParams, warp
from deploy.drafters import DrafterHost
from specd_api.v1 import specd_pb2 as pb


class TreeDrafter(BaseDrafter):
    """Drafts random trees; with ``oracle`` (the expected continuation of the whole sequence) it hides the
    right path, possibly behind wrong or duplicate siblings, so the engine must pick it out."""

    target_topk = 0

    def __init__(self, vocab: int, seed: int, oracle: list[int] | None = None, mode: str = "random",
                 size: int = 8) -> None:
        self.vocab, self.oracle, self.mode, self.size = vocab, oracle, mode, size
        self.rng = np.random.default_rng(seed)
        self.observed: list[Feedback] = []

    def start(self, request_id, prompt_ids, params):
        self.prompt_len = len(prompt_ids)

    def propose(self, request_id, context, max_nodes):
        n = min(self.size, max_nodes)
        if self.mode == "random" or self.oracle is None:
            parents = [int(self.rng.integers(-1, i)) for i in range(n)]
            return Draft(self.rng.integers(0, self.vocab, n), parents)
        pos = len(context) - self.prompt_len  # output tokens committed so far, the pending one included
        right = self.oracle[pos : pos + n]
        if self.mode == "chain":
            return Draft.chain(right)
        # "tree": each level has a wrong sibling first (sometimes a duplicate of the right token), then the
        # right node, whose children continue; leaves are cut at n nodes.
        tokens, parents, parent = [], [], -1
        for t in right:
            if len(tokens) + 2 > n:
                break
            wrong = t if self.rng.random() < 0.3 else int((t + 1 + self.rng.integers(self.vocab - 1)) % self.vocab)
            tokens += [wrong, t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return Draft(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64))

    def observe(self, request_id, feedback):
        self.observed.append(feedback)

    def finish(self, request_id):
        pass


@torch.inference_mode()
def exact_pair_distribution(model, prompt: list[int], params: SamplingParams) -> tuple[list[tuple[int, int]], list[float]]:
    """Every possible (first, second) output token pair under ``params`` and its exact probability."""
    p0 = warp(model(torch.tensor([prompt])).logits[0, -1], params)
    cells, probs = [], []
    for a in torch.nonzero(p0).flatten().tolist():
        p1 = warp(model(torch.tensor([prompt + [a]])).logits[0, -1], params)
        for b in torch.nonzero(p1).flatten().tolist():
            cells.append((a, b))
            probs.append(float(p0[a]) * float(p1[b]))
    total = sum(probs)  # float32 rounding: scipy's chisquare wants the expected counts to sum to n exactly
    return cells, [p / total for p in probs]


# --- an in-process stand-in for a drafter pool's Serve handle (the surface RemoteDrafter uses) ---


@dataclass
class _Call:
    fn: Callable

    def remote(self, *args):
        return _Done(self.fn(*args))


@dataclass
class _Done:
    value: object

    def result(self, timeout_s: float | None = None):
        return self.value

    def cancel(self) -> None:
        pass


class FreshReplicaEachStep:
    """The handle surface RemoteDrafter uses; every step goes to a new DrafterHost (a replica without state)."""

    def __init__(self, drafters: dict) -> None:
        self.drafters = drafters
        self.rebuilds = 0
        self.batch_sizes: list[int] = []  # items per step_batch call
        self.routes: set[str | None] = set()  # the multiplexed ids calls were routed by

    def options(self, multiplexed_model_id: str | None = None, **_):
        self.routes.add(multiplexed_model_id)
        return self

    @property
    def step_batch(self) -> _Call:
        return _Call(self._step_batch)

    @property
    def finish(self) -> _Call:
        return _Call(lambda request_id: None)

    def _step_batch(self, payload: bytes) -> bytes:
        batch = pb.DraftBatchRequest.FromString(payload)
        self.batch_sizes.append(len(batch.steps))
        return self._host_step(batch).SerializeToString()

    def _host_step(self, batch: pb.DraftBatchRequest) -> pb.DraftBatchResponse:
        host = DrafterHost(self.drafters)
        reply = host.step_batch(batch)
        self.rebuilds += host.rebuilds
        return reply


class OneReplica(FreshReplicaEachStep):
    """The same surface over one DrafterHost that keeps every session (no rebuilds)."""

    def __init__(self, drafters: dict, vocab_size: int | None = None) -> None:
        super().__init__(drafters)
        self.host = DrafterHost(drafters, vocab_size=vocab_size)

    @property
    def finish(self) -> _Call:
        return _Call(self.host.finish)

    def _host_step(self, batch: pb.DraftBatchRequest) -> pb.DraftBatchResponse:
        return self.host.step_batch(batch)
