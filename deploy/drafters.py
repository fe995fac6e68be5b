"""Drafters in the serving layer: built from config, hosted on the draft pool, reached through a thin
adapter that implements the ``actors.drafter.Drafter`` protocol over a Serve handle.

One remote call per decode step and pool: the adapter sends every request of the step that the pool serves
in one ``DraftBatchRequest`` and piggybacks each request's previous feedback on it (the engine always calls
observe -> propose in that order). Each item carries the request's whole context, so a replica without its
state (a restart, a scale-in, an LRU eviction, a routing miss) rebuilds it with ``start`` and goes on;
affinity (deploy.routing: each verifier's adapter picks one replica for all its requests) keeps that rare,
which matters because a rebuild costs a re-prefill of a draft model, or folds the prompt's tri-grams into
the adaptive store a second time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from actors.draft import Draft
from actors.drafter import AcceptanceRule, Drafter, Feedback, with_options
from actors.methods import MethodUnavailable, make_drafter
from actors.models import LoadedModel, TargetTokenizer
from actors.sampling import SamplingParams
from deploy.config import ServeConfig
from deploy.convert import (draft_from_proto, draft_to_proto, feedback_from_proto, feedback_to_proto,
                            params_from_step, params_to_sampling)
from specd_api.v1 import specd_pb2 as pb

log = logging.getLogger("specd.serve")


def make_store(cfg: ServeConfig, target: LoadedModel | TargetTokenizer):
    """The adaptive n-gram store: Redis when a URL is configured, else in-process memory."""
    from shared_state import MemoryStore, StoreConfig

    config = StoreConfig(namespace=target.identity, vocab_size=target.vocab_size)
    url = os.environ.get(cfg.redis_url_env) if cfg.redis_url_env else cfg.redis_url
    if url:
        from shared_state import RedisStore

        return RedisStore(config, url)
    return MemoryStore(config)


def build_drafters(cfg: ServeConfig, methods: Sequence[str], target: LoadedModel | TargetTokenizer,
                   draft: LoadedModel | None) -> dict[str, Drafter]:
    """Every method of ``methods`` that can run here; the others are logged and left out."""
    store = make_store(cfg, target) if set(methods) & set(cfg.trigram_methods) else None
    out: dict[str, Drafter] = {}
    for method in methods:
        options = dict(cfg.drafter_options.get(method, {}))
        if method in cfg.trigram_methods:
            options.setdefault("store", store)
        if method == "aded" and not cfg.store_prompts:  # options are AdedConfig's fields
            options["adapt"] = {**dict(options.get("adapt") or {}), "fold_prompt": False}
        try:
            out[method] = make_drafter(method, target, draft, **options)
        except (MethodUnavailable, FileNotFoundError) as e:  # e.g. not registered yet, or no tri-gram matrix
            log.warning("method %s not served: %s", method, e)
    return out


@dataclass
class _Session:
    last_draft: Draft | None = None  # the drafter recognises feedback by the identity of its own draft


class DrafterHost:
    """Runs drafters for many requests in one process (the body of a drafter-pool replica)."""

    def __init__(self, drafters: dict[str, Drafter], max_sessions: int = 64, vocab_size: int | None = None) -> None:
        self.drafters = drafters
        self.vocab_size = vocab_size  # the target's: what a RemoteDrafter checks every draft against
        self.max_sessions = max_sessions  # bounds the states of requests whose finish never arrived
        self.sessions: OrderedDict[str, tuple[str, _Session]] = OrderedDict()  # id -> (method, state), oldest first
        self.rebuilds = 0
        self._lock = threading.Lock()

    def info(self) -> dict[str, dict]:
        """method -> what the verifier's RemoteDrafter mirrors: top-k rows wanted, acceptance rule, options."""
        return {m: {"target_topk": d.target_topk, "acceptance": d.acceptance, "tau": d.tau,
                    "options": tuple(d.options), "vocab_size": self.vocab_size}
                for m, d in self.drafters.items()}

    def step_batch(self, batch: pb.DraftBatchRequest) -> pb.DraftBatchResponse:
        """Each item's draft, or its error alone. Every item's session is started (or rebuilt) or fed the
        feedback it carries, then the items whose drafters share a ``batch_key`` draft in one ``propose_batch``
        (a draft model: one forward per depth for all of them)."""
        results = [pb.DraftStepResult() for _ in batch.steps]
        groups: dict[int, list[tuple[int, Drafter, _Session, bool]]] = {}
        for i, req in enumerate(batch.steps):
            try:
                drafter, session, rebuilt = self._prepare(req)
            except Exception as e:  # noqa: BLE001 - bad options, an unknown method, a failing start: this item's
                results[i].error = _error_text(e)
                continue
            groups.setdefault(id(drafter.batch_key), []).append((i, drafter, session, rebuilt))
        for group in groups.values():
            items = [(batch.steps[i].request_id, np.asarray(batch.steps[i].context, np.int64),
                      batch.steps[i].max_nodes) for i, *_ in group]
            try:
                drafts = group[0][1].propose_batch(items)
            except Exception as e:  # noqa: BLE001 - the whole call failed: each of its items reports it
                drafts = [e] * len(items)
            for (i, _, session, rebuilt), draft in zip(group, drafts):
                if isinstance(draft, BaseException):
                    results[i].error = _error_text(draft)
                else:
                    session.last_draft = draft
                    results[i].response.CopyFrom(pb.DraftStepResponse(draft=draft_to_proto(draft), rebuilt=rebuilt))
        return pb.DraftBatchResponse(results=results)

    def _prepare(self, req: pb.DraftStepRequest) -> tuple[Drafter, _Session, bool]:
        """The item's drafter view and session: started when this replica has none, else fed its feedback."""
        if req.method not in self.drafters:
            raise ValueError(f"method {req.method!r} is not served by this pool")
        drafter = with_options(self.drafters[req.method], **{k: getattr(req, k) if req.HasField(k) else None
                                                             for k in ("gamma", "beam_width")})
        rid = req.request_id
        with self._lock:
            session = self.sessions.get(rid, (None, None))[1]
            if session is not None:
                self.sessions.move_to_end(rid)  # least recently stepped goes first when over max_sessions
        if session is None:
            return drafter, self._start(drafter, req), True
        if req.HasField("feedback") and session.last_draft is not None:
            drafter.observe(rid, feedback_from_proto(req.feedback, session.last_draft))
        return drafter, session, False

    def finish(self, request_id: str) -> None:
        with self._lock:
            method, _ = self.sessions.pop(request_id, (None, None))
        if method is not None:
            self.drafters[method].finish(request_id)

    def _start(self, drafter: Drafter, req: pb.DraftStepRequest) -> _Session:
        prompt = list(req.context[: max(1, req.prompt_len)])
        drafter.start(req.request_id, prompt, params_from_step(req))
        with self._lock:
            self.rebuilds += req.prompt_len < len(req.context)  # a first step is a start, not a rebuild
            self.sessions[req.request_id] = (req.method, session := _Session())
            evict = next(iter(self.sessions)) if len(self.sessions) > self.max_sessions else None
        if evict is not None:
            self.finish(evict)
        return session


@dataclass
class _Remote:
    prompt_len: int
    params: SamplingParams
    gamma: int | None  # the options of the view that started the request, sent with each of its steps
    beam_width: int | None
    feedback: Feedback | None = None


@dataclass
class DraftLink:
    """The health of one remote drafter as the verifier sees it, shared by every per-request view.

    A failed or timed-out step (a killed replica, a pool with no replica yet, an overloaded one) is a plain
    step for that request, never its end; for ``retry_s`` afterwards no request waits on the pool (plain
    steps at once), then the next step tries again. A replica that comes back without a request's state
    rebuilds it from the context the step carries.
    """

    timeout_s: float = 3.0  # one step's round trip; past it the step is plain
    retry_s: float = 2.0  # after a failure, steps skip the pool this long
    failures: int = 0  # steps whose call failed or timed out
    skipped: int = 0  # steps not sent while the pool was considered down
    down_until: float = 0.0  # time.monotonic() before which steps are not sent
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def is_down(self) -> bool:
        if time.monotonic() >= self.down_until:
            return False
        with self._lock:
            self.skipped += 1
        return True

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            self.down_until = time.monotonic() + self.retry_s

    def stats(self) -> dict[str, int | bool]:
        return {"failures": self.failures, "skipped": self.skipped, "down": time.monotonic() < self.down_until}


@dataclass
class RemoteDrafter:
    """``actors.drafter.Drafter`` over a drafter-pool handle; called from the engine's (non-async) thread."""

    blocking: ClassVar[bool] = True  # each propose_batch is a round trip: the engine overlaps the pools' calls
    handle: Any  # DeploymentHandle of a DrafterPool deployment
    method: str
    target_topk: int
    affinity: bool = True
    acceptance: AcceptanceRule = "exact"  # the remote drafter's rule, applied here by the engine (mtad / mmtad)
    tau: float | None = None  # mtad / mmtad threshold, read by the engine's acceptance
    options: tuple[str, ...] = ()  # per-request options the remote drafter takes
    gamma: int | None = None  # this view's per-request options, sent with every step
    beam_width: int | None = None
    vocab_size: int | None = None  # the target's; a draft naming an id outside it is dropped
    # Drafter sessions are keyed "<this adapter's random prefix>/<request id>": the client picks request ids,
    # and two verifier replicas given the same one must never share a drafter session.
    session_prefix: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Shared by every per-request view (dataclasses.replace keeps the same dict): drafts refused, by reason.
    refused: dict[str, int] = field(default_factory=dict)
    link: DraftLink = field(default_factory=DraftLink)  # shared by the views, like ``refused``
    _requests: dict[str, _Remote] = field(default_factory=dict)

    @classmethod
    def from_info(cls, handle: Any, method: str, info: dict, affinity: bool = True,
                  link: DraftLink | None = None) -> RemoteDrafter:
        return cls(handle, method, info["target_topk"], affinity, info["acceptance"], info["tau"],
                   tuple(info["options"]), vocab_size=info.get("vocab_size"), link=link or DraftLink())

    def with_options(self, gamma: int | None = None, beam_width: int | None = None,
                     tau: float | None = None) -> RemoteDrafter:
        """A view for one request (shares the request table); the pool validates gamma/beam_width itself."""
        if tau is not None and not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        return dataclasses.replace(self, gamma=gamma or self.gamma, beam_width=beam_width or self.beam_width,
                                   tau=self.tau if tau is None else tau)

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        # The first step carries the prompt; every step carries the options of the view that started it.
        self._requests[request_id] = _Remote(len(prompt_ids), params, self.gamma, self.beam_width)

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        draft = self.propose_batch([(request_id, context, max_nodes)])[0]
        if isinstance(draft, BaseException):
            raise draft
        return draft

    @property
    def batch_key(self) -> object:
        return self._requests  # shared by every view: a step's requests on this pool go in one call

    def propose_batch(self, items: Sequence[tuple[str, np.ndarray, int]]) -> list[Draft | BaseException]:
        """One round trip for the step: a ``DraftBatchRequest`` of every item to this adapter's replica.

        A failed or timed-out call makes every item a plain step (``DraftLink``); an item the replica could
        not draft (its error) or a draft the target cannot verify is a plain step for that item alone."""
        if self.link.is_down():
            return [Draft.empty() for _ in items]  # their feedback rides on the next step that is sent
        batch = pb.DraftBatchRequest()
        for request_id, context, max_nodes in items:
            st = self._requests[request_id]
            msg = batch.steps.add(
                request_id=self._key(request_id), method=self.method, context=np.asarray(context).tolist(),
                prompt_len=st.prompt_len, max_nodes=max_nodes, sampling=params_to_sampling(st.params),
                max_new_tokens=st.params.max_new_tokens, gamma=st.gamma, beam_width=st.beam_width)
            if st.feedback is not None:
                msg.feedback.CopyFrom(feedback_to_proto(st.feedback))
                st.feedback = None
        response = self._handle().step_batch.remote(batch.SerializeToString())
        try:
            reply = pb.DraftBatchResponse.FromString(response.result(timeout_s=self.link.timeout_s))
            if len(reply.results) != len(items):
                raise ValueError(f"{len(reply.results)} results for {len(items)} steps")
        except Exception as e:  # noqa: BLE001 - a dead, missing or stuck replica, or a garbled reply: plain steps
            response.cancel()  # a step still queued for a replica that is not there yet is dropped
            self.link.failed()
            log.warning("drafter %s step failed (%s: %s); plain steps for %.1fs", self.method, type(e).__name__,
                        str(e)[:200], self.link.retry_s)
            return [Draft.empty() for _ in items]
        return [self._checked(result, max_nodes) for result, (_, _, max_nodes) in zip(reply.results, items)]

    def observe(self, request_id: str, feedback: Feedback) -> None:
        self._requests[request_id].feedback = feedback

    def finish(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self._handle().finish.remote(self._key(request_id))  # fire and forget: same route as the steps

    def _key(self, request_id: str) -> str:
        return f"{self.session_prefix}/{request_id}"

    def _handle(self):
        """Every call of this adapter (one per verifier replica) goes to one replica: a step's requests travel
        together, so their sessions must live together; verifiers spread over the pool (deploy.routing)."""
        return self.handle.options(multiplexed_model_id=self.session_prefix) if self.affinity else self.handle

    def _checked(self, result: pb.DraftStepResult, max_nodes: int) -> Draft:
        """The draft a replica sent, or the empty draft (a plain step) when it sent an error or a draft the
        target cannot verify.

        A draft crosses a process boundary and may come from state shared with others (the Redis store):
        an id outside the vocabulary would index past the target's logits (an IndexError here, a device
        assert on CUDA) and fail the request. Refusals are counted in ``refused`` (by reason) and logged.
        """
        if result.HasField("error"):
            draft, reason = None, f"drafter_error: {result.error}"
        else:
            try:
                draft = draft_from_proto(result.response.draft)
                reason = draft_problem(draft, max_nodes, self.vocab_size)
            except Exception as e:  # noqa: BLE001 - undecodable bytes or an inconsistent tree: refused the same way
                draft, reason = None, f"undecodable ({type(e).__name__}: {e})"
        if reason is None:
            return draft
        key = reason.split(":")[0].split(" ")[0]
        self.refused[key] = self.refused.get(key, 0) + 1
        log.warning("draft from %s refused, plain step instead: %s", self.method, reason)
        return Draft.empty()


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def draft_problem(draft: Draft, max_nodes: int, vocab_size: int | None) -> str | None:
    """Why the target cannot verify ``draft`` (None: it can)."""
    if len(draft) > max_nodes:
        return f"oversized: {len(draft)} nodes over the cap of {max_nodes}"
    if vocab_size is not None and len(draft) and not (draft.tokens.min() >= 0 and draft.tokens.max() < vocab_size):
        return f"out_of_vocabulary: token ids must lie in [0, {vocab_size})"
    if draft.q is not None:
        if vocab_size is not None and draft.q.shape[1] != vocab_size:
            return f"bad_q: q rows have {draft.q.shape[1]} columns for a vocabulary of {vocab_size}"
        if not bool(torch.isfinite(draft.q).all()) or bool((draft.q < 0).any()):
            return "bad_q: q has negative or non-finite entries"
    return None
