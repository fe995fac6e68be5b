"""The verifier deployment: the target model and the decode loop, on the verify pool.

A request is one streaming call, so its KV cache lives on this replica from prefill to the last token.
The replica runs ONE engine loop (``actors.loop.EngineLoop``, a thread: the engine is synchronous and
calls remote drafters with blocking handle calls, which Serve forbids on the event loop) that owns the
batch: every live request of the replica advances in the same verify forward; that thread also loads the
models, so it is the only one here that runs torch (see actors.loop for why). Outputs cross back to
the event loop through a queue per request. A cancelled stream is cancelled in the loop, which frees
its slot and drafter state after the current step.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from actors.drafter import Drafter, NoDrafter, with_options
from actors.engine import Engine
from actors.loop import EngineLoop
from actors.methods import METHODS
from actors.models import load_model
from actors.process import freeze_gc_heap
from actors.stats import StepOutput
from deploy.config import ServeConfig
from deploy.drafters import DraftLink, RemoteDrafter, build_drafters
from deploy.metrics import verifier_metrics
from deploy.request import GenerationRequest, RequestError, check_max_tokens
from deploy.tp import TPGroup

_END = object()


@dataclass
class ServedChunk:
    output: StepOutput  # the engine's step, stats copied at the time it was produced
    method: str  # the method that actually decoded (after defaults and opt-outs)


def join_outputs(outs: list[StepOutput]) -> StepOutput:
    """Consecutive steps of one request as one: tokens and text joined, the last step's reason and stats."""
    return StepOutput([t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
                      outs[-1].finish_reason, outs[-1].stats)


class VerifierServer:
    async def __init__(self, config: dict, trigram=None, aux=None) -> None:
        self.cfg = cfg = ServeConfig.model_validate(config)
        self.tp = TPGroup(cfg) if cfg.tp_size > 1 else None
        self.drafters: dict[str, Drafter] = {"ar": NoDrafter()}
        self.metrics = verifier_metrics()
        # The models load on the engine loop's thread, the one thread of this replica that runs torch
        # (actors.loop: a second one slows every forward).
        self.loop = await asyncio.to_thread(EngineLoop, self._build, self.metrics.batch_step)
        self.engine = self.loop.engine
        self.links: dict[str, DraftLink] = {}  # pool -> its health as seen here, shared by the pool's methods
        for pool, handle in (("trigram", trigram), ("aux", aux)):
            if handle is not None:
                link = self.links[pool] = DraftLink(cfg.drafter_timeout_s, cfg.drafter_retry_s)
                for method, info in (await handle.info.remote()).items():
                    self.drafters[method] = RemoteDrafter.from_info(handle, method, info, cfg.drafter_affinity, link)
        self.default_method = cfg.default_method if cfg.default_method in self.drafters else "ar"
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        freeze_gc_heap()  # model, drafters and their tables live as long as the replica

    def _build(self) -> Engine:
        """The target, its engine and the colocated drafters (run on the engine loop's thread)."""
        cfg = self.cfg
        torch.set_num_threads(cfg.threads())
        # A TP group loads on the CPU: DeepSpeed moves each rank's shard to its device itself.
        self.target = load_model(cfg.model, device=cfg.device if cfg.tp_size == 1 else "cpu", dtype=cfg.dtype)
        # A tensor-parallel replica is rank 0 of its group.
        engine = self.tp.start(self.target, cfg.engine_config()) if self.tp else Engine(self.target, cfg.engine_config())
        if cfg.trigram_placement == "colocated":
            self.drafters |= build_drafters(cfg, cfg.trigram_methods, self.target, None)
        if cfg.aux_placement == "colocated" and cfg.draft_model:
            self.drafters |= build_drafters(cfg, cfg.aux_methods, self.target, load_model(cfg.draft_model, device=cfg.device))
        return engine

    def describe(self) -> dict:
        return {"model": self.cfg.model, "methods": sorted(self.drafters), "default_method": self.default_method,
                "max_context": self.engine.verifier.max_context, "max_tokens_limit": self.cfg.max_tokens_limit,
                "chat": self.target.is_chat}

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        """Serve's health probe: a broken tensor-parallel group fails it, so Serve replaces the replica."""
        if self.tp is not None:
            self.tp.check(self.engine)

    def live_requests(self) -> int:
        """Requests in this replica's engine (decoding, prefilling or waiting for a slot)."""
        return self.loop.live_requests()

    def stats(self) -> dict:
        """Read-only state for operators and fault tests: what is live, what the KV cache holds, the pools' links."""
        kv = self.engine.verifier.kv
        return {"live_requests": self.loop.live_requests(), "engine_requests": self.engine.num_requests,
                "kv_slots": len(kv.slots), "kv_tokens": kv.tokens_held(), "pid": os.getpid(),
                "links": {pool: link.stats() for pool, link in self.links.items()},
                "refused_drafts": {m: dict(d.refused) for m, d in self.drafters.items() if isinstance(d, RemoteDrafter)}}

    async def generate(self, req: GenerationRequest, whole: bool = False) -> AsyncIterator[ServedChunk]:
        """The request's output: a chunk per engine step, or one chunk at the end when ``whole`` (a unary
        call, for which one object crosses to the ingress instead of one per step)."""
        arrived = time.perf_counter()
        # Tokenizing a long prompt takes milliseconds of CPU: off the replica's event loop, on one thread (a
        # fast tokenizer's encode settings are not safe to change from two threads at once).
        ids, drafter, method = await asyncio.get_running_loop().run_in_executor(self._tokenize, self._prepare, req)
        lossless = METHODS[method].lossless
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sink = lambda x: loop.call_soon_threadsafe(queue.put_nowait, x)  # noqa: E731 - called from the loop thread
        self.loop.submit(ids, req.params, drafter, req.request_id, sink, req.max_draft_tokens)
        self.metrics.running.set(self.loop.live_requests())
        last, prev, done, held = None, arrived, False, []
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    if isinstance(item, ValueError) and last is None:  # refused at admission (e.g. a duplicate id)
                        raise RequestError(str(item)) from None
                    raise item
                item.stats.lossless = lossless
                prev = self._observe(method, last, item, arrived, prev)
                last, done = item, item.finish_reason is not None
                if not whole:
                    yield ServedChunk(item, method)
                    continue
                held.append(item)
                if done:
                    yield ServedChunk(join_outputs(held), method)
        finally:
            if not done:
                self.loop.cancel(req.request_id)  # a cancelled stream frees its slot after the current step
            self.metrics.running.set(self.loop.live_requests())

    def _prepare(self, req: GenerationRequest) -> tuple[list[int], Drafter, str]:
        """Validate against this model and pick the drafter; RequestError on a bad request."""
        if req.model is not None and req.model != self.cfg.model:
            raise RequestError(f"unknown model {req.model!r}; this server serves {self.cfg.model!r}")
        method = req.method or self.default_method
        if method not in METHODS:
            raise RequestError(f"unknown method {method!r}; choose from {', '.join(sorted(self.drafters))}")
        if method not in self.drafters:
            raise RequestError(f"method {method!r} is not served here; choose from {', '.join(sorted(self.drafters))}")
        check_max_tokens(req.params.max_new_tokens, self.cfg.max_tokens_limit)
        ids = self._encode(req)
        limit = self.engine.verifier.max_context
        if len(ids) >= limit:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
        if not req.speculate:
            method = "ar"
        try:
            drafter = with_options(self.drafters[method], **req.draft_options())
        except ValueError as e:
            raise RequestError(f"method {method!r}: {e}") from None
        return ids, drafter, method

    def _encode(self, req: GenerationRequest) -> list[int]:
        if req.prompt_ids is not None:
            vocab = self.target.model.config.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt_ids):
                raise RequestError(f"prompt_ids must be token ids in [0, {vocab})")
            return list(req.prompt_ids)
        if req.messages is not None:
            if not self.target.is_chat:
                raise RequestError(f"{self.cfg.model} has no chat template; send a prompt instead of messages")
            return self.target.encode([m.model_dump() for m in req.messages], chat=True)
        return self.target.encode(req.prompt, chat=False)

    def _observe(self, method: str, last: StepOutput | None, out: StepOutput, arrived: float, prev: float) -> float:
        """Record one step's metrics; returns the time of this step's tokens."""
        now, m, tags = time.perf_counter(), self.metrics, {"method": method}
        n = len(out.token_ids)
        if last is None:
            m.prompt_tokens.inc(out.stats.prompt_tokens, tags)
        if n:
            if out.stats.new_tokens == n:
                m.ttft.observe(now - arrived, tags)
            else:
                for _ in range(n):
                    m.itl.observe((now - prev) / n, tags)
            m.generation_tokens.inc(n, tags)
        m.step(method, last.stats if last else None, out.stats)
        if out.finish_reason:
            m.requests.inc(1, tags | {"finished_reason": out.finish_reason})
        return now if n else prev
