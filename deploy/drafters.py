"""Drafters in the serving layer: built from config, hosted on the draft pool, reached through a thin
adapter that implements the ``actors.drafter.Drafter`` protocol over a Serve handle.

One remote call per decode step: the adapter piggybacks the previous step's feedback on the next
``propose`` (the engine always calls observe -> propose in that order), so a step costs one round trip.
Each call carries the whole context, so a replica without the request's state (a restart, a scale-in,
an LRU eviction, a routing miss) rebuilds it with ``start`` and goes on; affinity (deploy.routing: the
request id picks the replica) keeps that rare, which matters because a rebuild costs a re-prefill of a
draft model, or folds the prompt's tri-grams into the adaptive store a second time.
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
from actors.drafter import AcceptanceRule, BaseDrafter, Drafter, Feedback, propose_each, with_options
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

    def step(self, req: pb.DraftStepRequest) -> pb.DraftStepResponse:
        drafter = with_options(self.drafters[req.method], **{k: getattr(req, k) if req.HasField(k) else None
                                                             for k in ("gamma", "beam_width")})
        rid = req.request_id
        with self._lock:
            session = self.sessions.get(rid, (None, None))[1]
            if session is not None:
                self.sessions.move_to_end(rid)  # least recently stepped goes first when over max_sessions
        rebuilt = session is None
        if rebuilt:
            session = self._start(drafter, req)
        elif req.HasField("feedback") and session.last_draft is not None:
            drafter.observe(rid, feedback_from_proto(req.feedback, session.last_draft))
        session.last_draft = drafter.propose(rid, np.asarray(req.context, np.int64), req.max_nodes)
        return pb.DraftStepResponse(draft=draft_to_proto(session.last_draft), rebuilt=rebuilt)

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

    blocking: ClassVar[bool] = True  # each propose is a round trip: the engine overlaps a step's calls
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
        self._requests[request_id] = _Remote(len(prompt_ids), params)  # the first propose carries it all

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        st = self._requests[request_id]
        if self.link.is_down():
            return Draft.empty()  # the feedback of this plain step rides on the next step that is sent
        msg = pb.DraftStepRequest(
            request_id=self._key(request_id), method=self.method, context=np.asarray(context).tolist(),
            prompt_len=st.prompt_len, max_nodes=max_nodes, sampling=params_to_sampling(st.params),
            max_new_tokens=st.params.max_new_tokens, gamma=self.gamma, beam_width=self.beam_width)
        if st.feedback is not None:
            msg.feedback.CopyFrom(feedback_to_proto(st.feedback))
            st.feedback = None
        response = self._handle(request_id).step.remote(msg.SerializeToString())
        try:
            reply = response.result(timeout_s=self.link.timeout_s)
        except Exception as e:  # noqa: BLE001 - a dead, missing or stuck replica: this step is plain, not fatal
            response.cancel()  # a step still queued for a replica that is not there yet is dropped
            self.link.failed()
            log.warning("drafter %s step failed (%s: %s); plain steps for %.1fs", self.method, type(e).__name__,
                        str(e)[:200], self.link.retry_s)
            return Draft.empty()
        return self._checked(reply, max_nodes)

    @property
    def batch_key(self) -> object:
        return self  # blocking: the engine calls propose concurrently instead

    def propose_batch(self, items: Sequence[tuple[str, np.ndarray, int]]) -> list[Draft | BaseException]:
        return propose_each(self, items)

    def observe(self, request_id: str, feedback: Feedback) -> None:
        self._requests[request_id].feedback = feedback

    def finish(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self._handle(request_id).finish.remote(self._key(request_id))  # fire and forget: same route as the steps

    def _key(self, request_id: str) -> str:
        return f"{self.session_prefix}/{request_id}"

    def _handle(self, request_id: str):
        return self.handle.options(multiplexed_model_id=self._key(request_id)) if self.affinity else self.handle

    def _checked(self, reply: bytes, max_nodes: int) -> Draft:
        """The draft a replica sent, or the empty draft (a plain step) when it is not one the target can verify.

        A draft crosses a process boundary and may come from state shared with others (the Redis store):
        an id outside the vocabulary would index past the target's logits (an IndexError here, a device
        assert on CUDA) and fail the request. Refusals are counted in ``refused`` and logged.
        """
        try:
            draft = draft_from_proto(pb.DraftStepResponse.FromString(reply).draft)
            reason = draft_problem(draft, max_nodes, self.vocab_size)
        except Exception as e:  # noqa: BLE001 - undecodable bytes or an inconsistent tree: refused the same way
            draft, reason = None, f"undecodable ({type(e).__name__}: {e})"
        if reason is None:
            return draft
        key = reason.split(":")[0].split(" ")[0]
        self.refused[key] = self.refused.get(key, 0) + 1
        log.warning("draft from %s refused, plain step instead: %s", self.method, reason)
        return Draft.empty()


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


@dataclass
class CappedDrafter(BaseDrafter):
    """A per-request draft budget over a shared drafter: at most ``cap`` nodes per step."""

    inner: Drafter
    cap: int

    @property
    def target_topk(self) -> int:
        return self.inner.target_topk

    @property
    def blocking(self) -> bool:
        return self.inner.blocking

    @property
    def acceptance(self) -> AcceptanceRule:  # the engine must apply the inner drafter's rule (mtad is approximate)
        return self.inner.acceptance

    @property
    def tau(self) -> float | None:
        return self.inner.tau

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.inner.start(request_id, prompt_ids, params)

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        n = min(max_nodes, self.cap)
        return self.inner.propose(request_id, context, n) if n > 0 else Draft.empty()

    def observe(self, request_id: str, feedback: Feedback) -> None:
        self.inner.observe(request_id, feedback)

    def finish(self, request_id: str) -> None:
        self.inner.finish(request_id)
