"""The decode loop over a batch: draft -> budget -> verify -> accept -> commit -> observe, for every live
request at once, streaming each request's accepted tokens.

Autoregressive decoding is the same loop with empty drafts. Every method runs through here, so a
lossless drafter can only change speed, never output. Requests join between steps (their prompts
prefilled in chunks) and leave when they finish, fail or are aborted; one request's failure ends that
request alone.
"""

from __future__ import annotations

import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from actors.acceptance import Acceptance, accept_greedy, accept_mmtad, accept_mtad, accept_tree_sampled
from actors.budget import DraftGate, EstimateCorrection, choose_batch_budget, expected_tokens
from actors.cost import CostModel, TimedCost
from actors.detok import Detokenizer, find_stop
from actors.draft import Draft
from actors.drafter import Drafter, Feedback
from actors.engine_config import EngineConfig
from actors.models import LoadedModel
from actors.process import freeze_gc_heap
from actors.profile import default_cost
from actors.sampling import SamplingParams, warp
from actors.stats import Generation, GenerationStats, RequestFailed, StepInfo, StepOutput, collect
from actors.verifier import TargetSequence, Verifier


@dataclass(eq=False)
class _Request:
    id: str
    params: SamplingParams
    drafter: Drafter
    seq: TargetSequence | None  # None until admitted to the batch
    generator: torch.Generator
    detok: Detokenizer
    stats: GenerationStats
    arrived: float
    prompt: list[int]
    max_draft: int | None = None  # the request's own cap on nodes per step (a client's max_draft_tokens)
    gate: DraftGate = field(default_factory=DraftGate)  # read only with EngineConfig.draft_gate
    output: list[int] = field(default_factory=list)
    sent: int = 0  # characters of detok.text already streamed


class Engine:
    """Owns the target's batch. Not thread-safe: one thread drives it (``actors.loop.EngineLoop`` when served)."""

    def __init__(self, target: LoadedModel, config: EngineConfig | None = None, cost: CostModel | None = None) -> None:
        self.target = target
        self.config = cfg = config or EngineConfig()
        if cfg.backend == "plain":
            self.verifier = Verifier(target.model, batch_invariant=cfg.batch_invariant)
        else:
            from actors.tp import deepspeed_verifier  # imports deepspeed

            self.verifier = deepspeed_verifier(target.model, cfg.tp_size, cfg.tp_heartbeat_s)
        self.cost = cost if cost is not None else default_cost(target)
        self.correction = EstimateCorrection(cfg.budget_correction, cfg.budget_correction_decay)
        self.timed_cost = TimedCost(self.cost)  # the curve corrected by the steps timed here
        self.vocab_size = int(target.model.config.vocab_size)
        self._requests: dict[str, _Request] = {}
        self._waiting: list[_Request] = []  # admitted in order as slots free up
        self._pool: ThreadPoolExecutor | None = None  # drafts blocking (remote) drafters concurrently
        self.last_step: StepInfo | None = None
        freeze_gc_heap()

    # -- requests ------------------------------------------------------------------------------------
    def add(self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter,
            request_id: str | None = None, max_draft_tokens: int | None = None) -> str:
        """Queue a request (it joins the batch at the next step with a free slot); returns its id."""
        rid = request_id or uuid.uuid4().hex
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already generating")
        prompt = self.verifier.check_prompt(prompt_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        stats = GenerationStats(prompt_tokens=len(prompt), lossless=drafter.acceptance == "exact")
        req = _Request(rid, params, drafter, None, torch.Generator().manual_seed(seed),
                       Detokenizer(self.target.tokenizer), stats, time.perf_counter(), prompt, max_draft_tokens)
        self._requests[rid] = req
        self._waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        """End a request now (a cancelled stream): its slot and drafter state are freed."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self._release(req)

    def has_work(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, StepOutput | BaseException]]:
        """One step of every live request; returns what each produced (an exception ends that request)."""
        events: list[tuple[str, StepOutput | BaseException]] = []
        self.last_step = None  # set by a step that decodes (not one that only prefills)
        self._admit(events)
        live = self._prefill()
        # Undrafted this step (their gate is shut): neither proposed to nor told, so each drafter's state stays
        # that of its last real draft (a remote drafter's pending feedback included).
        gated = self.config.draft_gate
        held = {r.id for r in live if gated and r.params.greedy and not r.gate.should_draft()}
        t0 = time.perf_counter()  # drafting's own time (the gate's cost): draft, budget, telling the drafters
        drafts = self._draft([r for r in live if r.id not in held], events) | {rid: Draft.empty() for rid in held}
        live = [r for r in live if r.id in drafts]
        if not live:
            return events
        drafts = self._budget(live, [drafts[r.id] for r in live])
        t1 = time.perf_counter()
        logits = self.verifier.verify([(r.seq, d) for r, d in zip(live, drafts)])  # [1 + n_r, vocab] each
        verify_s = time.perf_counter() - t1
        self.timed_cost.observe(self.last_step.tokens // len(live), self.last_step.context, len(live), verify_s)
        gained, tell_s = self._accept_all(live, drafts, logits, held, events)
        self.last_step = replace(self.last_step, produced=len(gained) + sum(gained.values()))
        if gated:
            self._update_gates(live, drafts, held, gained, t1 - t0 + tell_s, verify_s)
        return events

    def _update_gates(self, live: list[_Request], drafts: list[Draft], held: set[str], gained: dict[str, int],
                      overhead_s: float, verify_s: float) -> None:
        """Charge each drafted request an equal share of drafting's time and the verify time its nodes added."""
        drafted = [(r, d) for r, d in zip(live, drafts) if r.id not in held and r.id in gained]
        plain_s = verify_s / max(self.last_step.cost_ratio, 1.0)
        nodes = max(1, sum(len(d) for _, d in drafted))
        for req, draft in drafted:
            req.gate.update(len(live), gained[req.id], overhead_s / len(drafted),
                            (verify_s - plain_s) * len(draft) / nodes, plain_s)

    def _accept_all(self, live: list[_Request], drafts: list[Draft], logits: list[torch.Tensor], held: set[str],
                    events: list) -> tuple[dict[str, int], float]:
        """Accept, commit, tell the drafters and emit, request by request; returns each request's accepted
        draft tokens and the seconds spent telling the drafters."""
        predicted = realised = tell_s = 0.0
        gained: dict[str, int] = {}
        for req, draft, row in zip(live, drafts, logits):
            try:
                acc = self._accept_and_commit(req, draft, row)
                t = time.perf_counter()
                if req.id not in held:  # tell its drafter (with the target's top-k rows it asked for)
                    k = req.drafter.target_topk
                    topk = torch.topk(row, k, dim=-1).indices if k else None
                    req.drafter.observe(req.id, Feedback(draft, acc.accepted_nodes, acc.tokens, topk))
                tell_s += time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - this request's drafter or rule failed; the batch goes on
                events.append((req.id, self._fail(req, e)))
                continue
            gained[req.id] = len(acc.tokens) - 1  # accepted draft tokens (the bonus is not the draft's)
            if draft.p_accept is not None and len(draft):
                predicted += float(draft.p_accept.sum())
                realised += len(acc.tokens) - 1
            out = self._emit(req, acc.tokens)
            events.append((req.id, out))
            if out.finish_reason:
                self._requests.pop(req.id, None)
                self._release(req)
        self.correction.update(predicted, realised)
        return gained, tell_s

    def _admit(self, events: list) -> None:
        while self._waiting and len(self._requests) - len(self._waiting) < self.config.max_batch:
            req = self._waiting.pop(0)
            req.seq = self.verifier.start(req.prompt, prefill=False)  # a verifier failure is the whole engine's
            try:
                req.drafter.start(req.id, req.prompt, req.params)
            except Exception as e:  # noqa: BLE001 - a drafter failure is its request's alone
                events.append((req.id, self._fail(req, e)))

    def _prefill(self) -> list[_Request]:
        """Cache joining prompts, at most ``prefill_chunk`` tokens a step; returns the requests ready to decode.

        A prompt is cut at multiples of ``prefill_chunk`` from its own start, never where another request
        left the step's budget: its cache comes from the same forwards whoever shares the batch, so its
        greedy output cannot depend on them (a chunk's shape sets the rounding, see actors.attention).
        """
        chunk = budget = self.config.prefill_chunk
        ready = []
        for req in [r for r in self._requests.values() if r.seq is not None]:
            n = min(chunk - len(req.seq.slot) % chunk, req.seq.to_prefill)  # up to its next boundary
            if 0 < n <= budget:
                t = time.perf_counter()
                self.verifier.prefill(req.seq, n)
                budget -= n
                req.stats.prefill_seconds += time.perf_counter() - t
            if not req.seq.to_prefill:
                ready.append(req)
        return ready

    def _draft(self, live: list[_Request], events: list) -> dict[str, Draft]:
        """Each live request's draft: one ``propose_batch`` per group of requests whose drafters share a
        ``batch_key`` (a draft model runs one forward per depth for all; a remote pool gets one call), the
        groups of blocking (remote) drafters concurrently, so a step waits for one round trip."""
        t = time.perf_counter()
        results: dict[str, Draft | BaseException] = {}
        groups: dict[int, list[tuple[_Request, int]]] = {}
        for req in live:
            if cap := self._cap(req):
                groups.setdefault(id(req.drafter.batch_key), []).append((req, cap))
            else:
                results[req.id] = Draft.empty()
        remote = [g for g in groups.values() if g[0][0].drafter.blocking]
        if remote and self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.max_batch, thread_name_prefix="draft")
        futures = [self._pool.submit(self._propose_group, g) for g in remote]
        for group in groups.values():
            if not group[0][0].drafter.blocking:
                results |= self._propose_group(group)
        for f in futures:
            results |= f.result()
        drafts: dict[str, Draft] = {}
        for req in live:
            if isinstance(out := results[req.id], BaseException):  # a drafter error ends its request alone
                events.append((req.id, self._fail(req, out)))
            else:
                drafts[req.id] = out
        dt = time.perf_counter() - t
        for req in live:
            req.stats.draft_seconds += dt
        return drafts

    def _propose_group(self, group: list[tuple[_Request, int]]) -> dict[str, Draft | BaseException]:
        """One ``propose_batch`` call for requests whose drafters share a ``batch_key``."""
        items = [(r.id, np.asarray(r.seq.tokens, np.int64), cap) for r, cap in group]
        try:
            drafts = group[0][0].drafter.propose_batch(items)
            if len(drafts) != len(items):
                raise RuntimeError(f"drafter returned {len(drafts)} drafts for {len(items)} requests")
        except Exception as e:  # noqa: BLE001 - the whole call failed: each of its requests ends
            drafts = [e] * len(items)
        out: dict[str, Draft | BaseException] = {}
        for (req, cap), d in zip(group, drafts):
            try:
                out[req.id] = d if isinstance(d, BaseException) else self._checked(req, d, cap)
            except Exception as e:  # noqa: BLE001 - an oversized draft is its request's error
                out[req.id] = e
        return out

    def _cap(self, req: _Request) -> int:
        remaining = req.params.max_new_tokens - len(req.output) - 1  # the bonus token is free
        own = self.config.max_draft_tokens if req.max_draft is None else req.max_draft
        return max(0, min(self.config.max_draft_tokens, own, self.verifier.room(req.seq), remaining))

    def _checked(self, req: _Request, draft: Draft, cap: int) -> Draft:
        if len(draft) > cap:
            raise RuntimeError(f"drafter returned {len(draft)} nodes over its cap of {cap}")
        if len(draft) and not (0 <= draft.tokens.min() and draft.tokens.max() < self.vocab_size):
            req.stats.invalid_drafts += 1  # dropped, never fatal: this step is a plain one
            return Draft.empty()
        return draft

    def _budget(self, live: list[_Request], drafts: list[Draft]) -> list[Draft]:
        """Cut drafts to the batch budget (actors.budget); records the step's shape. The budget reads the
        timed curve unless a sampled request is in the step (its seed must not depend on the machine's speed)."""
        context = max(len(r.seq.tokens) for r in live)
        timed = self.config.budget_timing and all(r.params.greedy for r in live)
        cost = self.timed_cost if timed else self.cost
        keep = choose_batch_budget(drafts, context, cost, self.config.budget_min_gain, self.correction.factor)
        rows, level = len(live), max(keep)
        ratio = cost.forward_seconds(1 + level, context, rows) / cost.forward_seconds(1, context, rows)
        self.last_step = StepInfo(rows=rows, proposed=sum(map(len, drafts)), verified=sum(keep),
                                  tokens=rows * (1 + level), context=context, cost_ratio=ratio,
                                  expected=expected_tokens(drafts, keep, self.correction.factor))
        return [d.prefix(n) for d, n in zip(drafts, keep)]

    def _accept_and_commit(self, req: _Request, draft: Draft, logits: torch.Tensor) -> Acceptance:
        acc = self._accept(req, draft, logits)
        self.verifier.commit(req.seq, acc.accepted_nodes, acc.tokens)
        req.stats.count(len(draft), len(acc.accepted_nodes))
        return acc

    @staticmethod
    def _accept(req: _Request, draft: Draft, logits: torch.Tensor) -> Acceptance:
        if req.params.greedy:  # also MTAD's rule at temperature 0 (one-hot p and q, tau < 1)
            return accept_greedy(draft, logits.argmax(-1))
        p = warp(logits, req.params)
        rule, logq = req.drafter.acceptance, draft.logq  # [n] the drafter's log q per node
        if rule == "mtad":
            return accept_mtad(draft.tokens, logq, p.log(), req.drafter.tau, req.generator)
        if rule == "mmtad":
            return accept_mmtad(draft, p.log(), logq, req.drafter.tau, req.generator)
        return accept_tree_sampled(draft, p, req.generator)

    def _emit(self, req: _Request, tokens: list[int]) -> StepOutput:
        """Apply EOS, max-token, stop-string and context cuts to a step's tokens and produce the text delta."""
        params, eos, detok = req.params, self.target.eos_ids, req.detok
        emitted, reason = [], None
        for t in tokens:
            if t in eos and not params.ignore_eos:
                reason = "stop"
                break
            emitted.append(t)
            req.output.append(t)
            before = len(detok.text)
            detok.push(t)
            if params.stop and (cut := find_stop(detok.text, params.stop, before)) >= 0:
                detok.text = detok.text[:cut]
                reason = "stop_string"
                break
            if len(req.output) >= params.max_new_tokens:
                reason = "length"
                break
        if reason is None and len(req.seq.tokens) >= self.verifier.max_context:
            reason = "length"  # the model's context is full
        if reason in ("stop", "length"):
            detok.flush()  # a held-back partial character ends the stream as it is
        reason = "stop" if reason == "stop_string" else reason
        # While running, hold back text that could be the start of a stop string.
        hold = 0 if reason else max((len(s) - 1 for s in params.stop), default=0)
        end = max(req.sent, len(detok.text) - hold)
        delta, req.sent = detok.text[req.sent : end], end
        req.stats.new_tokens = len(req.output)
        req.stats.seconds = time.perf_counter() - req.arrived
        return StepOutput(emitted, delta, reason, req.stats)

    def _fail(self, req: _Request, error: Exception) -> RequestFailed:
        self._requests.pop(req.id, None)
        self._release(req)  # a waiting request leaves the queue there
        failed = RequestFailed(f"request {req.id}: {type(error).__name__}: {error}")
        failed.__cause__ = error
        return failed

    def _release(self, req: _Request) -> None:
        if req in self._waiting:
            self._waiting.remove(req)
            return
        try:
            req.drafter.finish(req.id)
        finally:
            if req.seq is not None:
                self.verifier.finish(req.seq)

    # -- driving it from one thread ------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter,
                 request_id: str | None = None) -> Iterator[StepOutput]:
        """Stream one request's output (the engine must be otherwise idle); the last item has a finish_reason."""
        if self._requests:
            raise RuntimeError("Engine.generate needs an idle engine; use add/step to batch requests")
        rid = self.add(prompt_ids, params, drafter, request_id)
        try:
            while rid in self._requests:
                for got, out in self.step():
                    if isinstance(out, BaseException):
                        raise out
                    yield out
        finally:
            self.abort(rid)

    def run(self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter) -> Generation:
        return collect(self.generate(prompt_ids, params, drafter))

    def run_many(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 drafter: Drafter, concurrency: int | None = None,
                 on_step: Callable[[StepInfo], None] | None = None) -> list[Generation | BaseException]:
        """Decode ``prompts`` batched, ``concurrency`` at a time (default: all); results in prompt order.
        ``on_step`` gets each decoding step's shape."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        limit = concurrency or len(prompts)
        outputs: dict[str, list[StepOutput]] = {}
        order, results, nxt = [], {}, 0
        while nxt < len(prompts) or self._requests:
            while nxt < len(prompts) and len(self._requests) < limit:
                rid = self.add(prompts[nxt], params[nxt], drafter, f"batch-{nxt}-{uuid.uuid4().hex[:8]}")
                order.append(rid)
                outputs[rid] = []
                nxt += 1
            events = self.step()
            if on_step is not None and self.last_step is not None:
                on_step(self.last_step)
            for rid, out in events:
                if isinstance(out, BaseException):
                    results[rid] = out
                else:
                    outputs[rid].append(out)
                    if out.finish_reason:
                        results[rid] = collect(iter(outputs.pop(rid)))
        return [results[rid] for rid in order]

    def close(self) -> None:
        """Release the verifier (a tensor-parallel leader stops its follower ranks)."""
        for rid in list(self._requests):
            self.abort(rid)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.verifier.close()

