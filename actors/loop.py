"""One thread that owns an :class:`~actors.engine.Engine` and steps its batch for many callers.

Callers (a serving replica's event loop, several client threads) ``submit`` requests with a sink; the
loop thread admits them between steps, runs ``Engine.step`` while there is work, and hands every
request its outputs through its sink: a ``StepOutput`` per step (its stats copied, so a caller may keep
them), the last one with a finish_reason, or an exception that ended the request. ``cancel`` ends a
request after the current step and frees its slot. Nothing here knows of Ray or gRPC.

The loop's thread also *builds* the engine (loads the models): in a process it is the one thread that runs
torch. libgomp gives each thread that opens a parallel region a pool of its own, and once the pools'
threads outnumber the CPUs it stops spinning at barriers and sleeps on a futex instead, so each of a
forward's hundreds of small parallel regions pays a wake-up: a forward run on a second thread after
another loaded the model ran 1.36x slower on 2 cores (``benchmarks/torch_threads.py``,
``results/2026-12-07-torch-threads/``). Whoever builds a loop must leave every torch op to that thread.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
from typing import Callable, Sequence

from actors.drafter import Drafter
from actors.engine import Engine
from actors.stats import StepOutput
from actors.sampling import SamplingParams
from actors.stats import StepInfo

log = logging.getLogger(__name__)

Sink = Callable[[StepOutput | BaseException], None]


class EngineLoop:
    def __init__(self, build: Callable[[], Engine], on_step: Callable[[StepInfo], None] | None = None) -> None:
        """Start the loop's thread, which calls ``build`` (load the models, make the engine) and then serves;
        returns once the engine is built, raising what ``build`` raised."""
        self.on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._closed = threading.Event()
        built: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="engine-loop", daemon=True)
        self._thread.start()
        self.engine: Engine  # set on the loop's thread, before it reports
        if isinstance(error := built.get(), BaseException):
            raise error

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter, request_id: str,
               sink: Sink, max_draft_tokens: int | None = None) -> None:
        """Queue a request (``Engine.add``'s arguments); ``sink`` is called from the loop thread with each of
        its outputs."""
        if self._closed.is_set():
            raise RuntimeError("the engine loop is closed")
        self._inbox.put(("add", (list(prompt_ids), params, drafter, request_id, max_draft_tokens), sink))

    def cancel(self, request_id: str) -> None:
        """End the request after the current step (its slot and drafter state are freed); idempotent."""
        self._inbox.put(("cancel", request_id, None))

    def live_requests(self) -> int:
        return len(self._sinks)

    def close(self) -> None:
        self._closed.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout=30)

    def _run(self, build: Callable[[], Engine], built: queue.SimpleQueue) -> None:
        try:
            self.engine = build()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            built.put(e)
            return
        built.put(None)
        while not self._closed.is_set():
            self._drain(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the batch's forward failed: every request ends with it
                log.exception("engine step failed")
                for rid in list(self._sinks):
                    self.engine.abort(rid)
                    self._deliver(rid, e)
                continue
            if self.on_step is not None and self.engine.last_step is not None:
                try:
                    self.on_step(self.engine.last_step)
                except Exception:  # noqa: BLE001 - a metrics hook must never stop the batch
                    log.exception("on_step hook failed")
            for rid, out in events:
                self._deliver(rid, out)
        for rid in list(self._sinks):
            self.engine.abort(rid)
            self._deliver(rid, RuntimeError("the engine loop was closed"))

    def _drain(self, block: bool) -> None:
        """Apply queued submissions and cancellations (waiting for one when the engine is idle)."""
        while True:
            try:
                kind, arg, sink = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                prompt, params, drafter, rid, max_draft = arg
                try:
                    self.engine.add(prompt, params, drafter, rid, max_draft)
                except Exception as e:  # noqa: BLE001 - a request the engine refuses ends alone
                    sink(e)
                    continue
                self._sinks[rid] = sink
            elif kind == "cancel":
                if self._sinks.pop(arg, None) is not None:
                    self.engine.abort(arg)

    def _deliver(self, rid: str, out: StepOutput | BaseException) -> None:
        sink = self._sinks.get(rid)
        if sink is None:
            return
        if isinstance(out, BaseException) or out.finish_reason:
            del self._sinks[rid]
        if isinstance(out, StepOutput):
            stats = copy.copy(out.stats)
            stats.accepted_per_position = list(stats.accepted_per_position)
            out = dataclasses.replace(out, stats=stats)
        try:
            sink(out)
        except Exception:  # noqa: BLE001 - a caller's sink must not stop everyone's decoding
            log.exception("sink of request %s failed", rid)
