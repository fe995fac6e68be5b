"""The contract between the decode engine and every drafter.

A drafter is a library: it knows nothing of Ray, gRPC, Redis or the verifier. The engine drives a
request through ``start -> (propose -> observe)* -> finish``; a step's requests whose drafters share a
``batch_key`` are proposed together through ``propose_batch`` (a draft model then runs one forward per depth
for all of them, not one per request and depth; a remote pool gets one call).

Everything the engine and the serving layer read off a drafter is in :class:`Drafter`; nothing is read with
a fallback. :class:`BaseDrafter` holds the defaults (exact acceptance, no ``tau``, no per-request options,
no target top-k), so a drafter states only where it differs.

Acceptance is exact (lossless) unless a drafter names an approximate rule in ``acceptance``: ``"mtad"`` /
``"mmtad"`` (:class:`actors.mtad.MtadDrafter`, which also sets ``tau`` and fills ``Draft.logq``). Such
requests report ``lossless: false``.

Per-request options are the fields of :class:`DraftOptions`: a drafter lists the ones it takes in ``options``
and returns a view of itself with them from ``with_options(**kw)``; the view shares the drafter's model
and per-request state, so it costs nothing. :func:`with_options` is the checked entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


#: The rule the engine applies to a drafter's drafts: "exact" (lossless rejection sampling / greedy path) or
#: an approximate joint rule of :mod:`actors.acceptance` (``accept_mtad`` / ``accept_mmtad``).
AcceptanceRule = Literal["exact", "mtad", "mmtad"]


class DraftOptions(BaseModel):
    """Per-request drafting options: the one list of their names, bounds and meanings (unset = the drafter's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gamma: int | None = Field(None, ge=1, description="sd / mtad / mmtad: draft depth (default 4).")
    beam_width: int | None = Field(None, ge=1, description="mtad / mmtad: beams per draft depth (default 4).")
    tau: float | None = Field(None, gt=0, description="mtad / mmtad: accept the longest prefix with joint p/q > tau "
                                                      "(default 0.5; larger accepts less).")


@runtime_checkable
class Drafter(Protocol):
    #: How many of the target's top tokens per verified node ``observe`` wants (0 = none).
    target_topk: int
    #: ``propose_batch`` mostly waits on another process (a remote pool): the engine then runs such groups
    #: concurrently with each other and with the local drafting, so a step costs one round trip.
    blocking: bool
    #: The engine's rule for this drafter's drafts; anything but "exact" makes a request ``lossless: false``.
    acceptance: AcceptanceRule
    #: The threshold of the mtad / mmtad rules (None for "exact").
    tau: float | None
    #: The :class:`DraftOptions` fields ``with_options`` takes.
    options: tuple[str, ...]
    #: Requests whose drafters have the same key (compared with ``is``) share one ``propose_batch`` call.
    batch_key: object

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None: ...

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        """Draft a tree below ``context[-1]`` (the pending token); at most ``max_nodes`` nodes.

        A draft with ``p_accept`` may be verified only in part (a prefix, chosen by the batch budget);
        ``Feedback.draft`` is then that prefix.
        """
        ...

    def propose_batch(self, items: Sequence[tuple[str, np.ndarray, int]]) -> list[Draft | BaseException]:
        """``propose`` for each ``(request_id, context, max_nodes)``, in order, in as few model forwards as it
        can; item i's draft, or the exception that ends request i alone (the others' drafts still count).

        The engine calls it on the drafter of ``items[0]`` for every request whose drafter has the same
        ``batch_key``: a drafter proposes for requests started through any view of it (``with_options``)
        with the options each was started with.
        """
        ...

    def observe(self, request_id: str, feedback: Feedback) -> None: ...

    def finish(self, request_id: str) -> None: ...

    def with_options(self, **options) -> Drafter:
        """A view with these ``options`` (a subset of ``self.options``, values set) sharing this drafter's state."""
        ...


class BaseDrafter:
    """The protocol's defaults: exact acceptance, no tau, no per-request options, no target top-k, and a
    ``propose_batch`` that proposes one request after the other (its own group: ``batch_key`` is itself)."""

    target_topk: int = 0
    blocking: bool = False
    acceptance: AcceptanceRule = "exact"
    tau: float | None = None
    options: tuple[str, ...] = ()

    @property
    def batch_key(self) -> object:
        return self

    def propose_batch(self, items: Sequence[tuple[str, np.ndarray, int]]) -> list[Draft | BaseException]:
        return propose_each(self, items)

    def with_options(self, **options) -> Drafter:
        raise ValueError(f"{', '.join(sorted(options))}: this method takes no per-request options")


def propose_each(drafter: Drafter, items: Sequence[tuple[str, np.ndarray, int]]) -> list[Draft | BaseException]:
    """``propose_batch`` as one ``propose`` after the other; a request's exception is its item."""
    out: list[Draft | BaseException] = []
    for request_id, context, max_nodes in items:
        try:
            out.append(drafter.propose(request_id, context, max_nodes))
        except Exception as e:  # noqa: BLE001 - this request's failure is its own
            out.append(e)
    return out


def with_options(drafter: Drafter, **options) -> Drafter:
    """``drafter`` with per-request options (:class:`DraftOptions` fields) applied; ``None`` values are ignored.

    ValueError with a one-line message when a value is out of bounds or the drafter does not take an option:
    nothing a client sets is dropped.
    """
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return drafter
    unknown = sorted(set(given) - set(drafter.options))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not apply to this method")
    try:
        DraftOptions(**given)
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    return drafter.with_options(**given)


class NoDrafter(BaseDrafter):
    """Plain autoregressive decoding: the same engine with an empty draft."""

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        pass

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        return Draft.empty()

    def observe(self, request_id: str, feedback: Feedback) -> None:
        pass

    def finish(self, request_id: str) -> None:
        pass
