"""The contract between the decode engine and every drafter.

A drafter is a library: it knows nothing of Ray, gRPC, Redis or the verifier. The engine drives a
request through ``start -> (propose -> observe)* -> finish``.

Acceptance is exact (lossless) unless a drafter names an approximate rule in an ``acceptance`` attribute:
``"mtad"`` / ``"mmtad"`` (:class:`actors.mtad.MtadDrafter`, which also carries ``tau`` and puts each node's
log q in ``Draft.info["logq"]``). Such requests report ``lossless: false``.

Per-request options (``gamma``, ``beam_width``, ``tau``): a drafter lists the ones it takes in ``options``
and returns a view of itself with them from ``with_options(**kw)``; the view shares the drafter's model
and per-request state, so it costs nothing. :func:`with_options` is the checked entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from actors.draft import Draft
from actors.sampling import SamplingParams


@dataclass(frozen=True)
class Feedback:
    """What one verify step taught: sent to the drafter after the engine commits."""

    draft: Draft  # the tree that was verified
    accepted_nodes: list[int]  # draft node indices on the accepted path, root to leaf
    new_tokens: list[int]  # committed this step: the accepted draft tokens + the target's bonus token
    # [1 + n, k] the target's top-k token ids at the pending token (row 0) and at every draft node,
    # rejected branches included (free statistics, as Token Recycling uses them). None unless the
    # drafter asked for it through ``target_topk``.
    target_topk: torch.Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    #: How many of the target's top tokens per verified node ``observe`` wants (0 = none).
    target_topk: int
    #: ``propose`` mostly waits on another process (a remote drafter): the engine then drafts every
    #: request of a step concurrently, so a step costs one round trip, not one per request.
    blocking: bool

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None: ...

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        """Draft a tree below ``context[-1]`` (the pending token); at most ``max_nodes`` nodes.

        A draft with ``p_accept`` may be verified only in part (a prefix, chosen by the batch budget);
        ``Feedback.draft`` is then that prefix.
        """
        ...

    def observe(self, request_id: str, feedback: Feedback) -> None: ...

    def finish(self, request_id: str) -> None: ...


def with_options(drafter: Drafter, **options) -> Drafter:
    """``drafter`` with per-request options applied (``None`` values are ignored).

    ValueError, naming the options, when the drafter does not take one: nothing a client sets is dropped.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return drafter
    unknown = sorted(set(options) - set(getattr(drafter, "options", ())))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not apply to this method")
    return drafter.with_options(**options)


class NoDrafter:
    """Plain autoregressive decoding: the same engine with an empty draft."""

    target_topk = 0
    blocking = False

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        pass

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        return Draft.empty()

    def observe(self, request_id: str, feedback: Feedback) -> None:
        pass

    def finish(self, request_id: str) -> None:
        pass
