"""The decode loop: draft -> verify -> accept -> commit -> observe, streaming accepted tokens.

Autoregressive decoding is the same loop with an empty draft. Every method runs through here, so a
lossless drafter can only change speed, never output.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.acceptance import Acceptance, accept_greedy, accept_mmtad, accept_mtad, accept_tree_sampled
from actors.detok import Detokenizer, find_stop
from actors.draft import Draft
from actors.drafter import Drafter, Feedback
from actors.models import LoadedModel
from actors.sampling import SamplingParams, warp
from actors.verifier import TargetSequence, Verifier


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_draft_tokens: int = Field(64, ge=0, le=1024, description="Hard cap on draft nodes verified per step.")
    backend: Literal["plain", "deepspeed"] = Field(
        "plain", description="Verifier backend: the model as loaded, or sharded by DeepSpeed AutoTP (actors.tp).")
    tp_size: int = Field(1, ge=1, description="Tensor-parallel ranks of the deepspeed backend (rank 0 runs the engine).")
    tp_heartbeat_s: float = Field(
        10.0, gt=0, description="An idle TP leader pings its followers this often (below the group's timeout).")

    @model_validator(mode="after")
    def _tp_needs_deepspeed(self) -> EngineConfig:
        if self.tp_size > 1 and self.backend != "deepspeed":
            raise ValueError("tp_size > 1 needs backend 'deepspeed'")
        return self


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # decode steps (verify forwards), prefill excluded
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # [i] = steps in which the draft token at depth i + 1 was accepted (vLLM's per-position counts)
    accepted_per_position: list[int] = field(default_factory=list)
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    lossless: bool = True

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tokens_per_forward"] = round(self.tokens_per_forward, 4)
        d["tokens_per_second"] = round(self.tokens_per_second, 3)
        return d


@dataclass
class StepOutput:
    token_ids: list[int]  # newly committed output tokens (after EOS / length / stop cuts)
    text: str  # text delta
    finish_reason: str | None  # None while running; "stop" (EOS or stop string) or "length"
    stats: GenerationStats


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats


@dataclass
class _Request:
    id: str
    params: SamplingParams
    drafter: Drafter
    seq: TargetSequence
    generator: torch.Generator
    detok: Detokenizer
    stats: GenerationStats
    output: list[int] = field(default_factory=list)
    sent: int = 0  # characters of detok.text already streamed


class Engine:
    def __init__(self, target: LoadedModel, config: EngineConfig | None = None) -> None:
        self.target = target
        self.config = cfg = config or EngineConfig()
        if cfg.backend == "plain":
            self.verifier = Verifier(target.model)
        else:
            from actors.tp import deepspeed_verifier  # imports deepspeed

            self.verifier = deepspeed_verifier(target.model, cfg.tp_size, cfg.tp_heartbeat_s)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter, request_id: str | None = None
    ) -> Iterator[StepOutput]:
        """Stream a request's output; the last item has a finish_reason."""
        t0 = time.perf_counter()
        req = self._start(list(prompt_ids), params, drafter, request_id or uuid.uuid4().hex)
        req.stats.prefill_seconds = time.perf_counter() - t0
        try:
            while True:
                tokens = self._step(req)
                out = self._emit(req, tokens)
                req.stats.seconds = time.perf_counter() - t0
                yield out
                if out.finish_reason:
                    return
        finally:
            drafter.finish(req.id)
            self.verifier.finish(req.seq)

    def close(self) -> None:
        """Release the verifier (a tensor-parallel leader stops its follower ranks)."""
        self.verifier.close()

    def run(self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter) -> Generation:
        ids, text, reason, stats = [], [], "length", GenerationStats()
        for out in self.generate(prompt_ids, params, drafter):
            ids += out.token_ids
            text.append(out.text)
            reason, stats = out.finish_reason or reason, out.stats
        return Generation(ids, "".join(text), reason, stats)

    def _start(self, prompt: list[int], params: SamplingParams, drafter: Drafter, rid: str) -> _Request:
        seq = self.verifier.start(prompt)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        try:
            drafter.start(rid, prompt, params)
        except BaseException:
            self.verifier.finish(seq)
            raise
        stats = GenerationStats(prompt_tokens=len(prompt), lossless=drafter.acceptance == "exact")
        gen = torch.Generator().manual_seed(seed)
        return _Request(rid, params, drafter, seq, gen, Detokenizer(self.target.tokenizer), stats)

    def _step(self, req: _Request) -> list[int]:
        """One speculative step; returns the tokens it committed (accepted draft tokens + bonus)."""
        draft = self._draft(req)
        logits = self.verifier.verify([(req.seq, draft)])[0]  # [1 + n, vocab]
        acc = self._accept(req, draft, logits)
        self.verifier.commit(req.seq, acc.accepted_nodes, acc.tokens)
        k = req.drafter.target_topk
        topk = torch.topk(logits, k, dim=-1).indices if k else None
        req.drafter.observe(req.id, Feedback(draft, acc.accepted_nodes, acc.tokens, topk))
        self._count(req.stats, draft, acc)
        return acc.tokens

    def _draft(self, req: _Request) -> Draft:
        t = time.perf_counter()
        remaining = req.params.max_new_tokens - len(req.output) - 1  # the bonus token is free
        cap = max(0, min(self.config.max_draft_tokens, self.verifier.room(req.seq), remaining))
        context = torch.tensor(req.seq.tokens).numpy()
        draft = req.drafter.propose(req.id, context, cap) if cap else Draft.empty()
        if len(draft) > cap:
            raise RuntimeError(f"drafter returned {len(draft)} nodes over its cap of {cap}")
        req.stats.draft_seconds += time.perf_counter() - t
        return draft

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

    @staticmethod
    def _count(stats: GenerationStats, draft: Draft, acc: Acceptance) -> None:
        stats.target_forwards += 1
        stats.drafted_tokens += len(draft)
        stats.accepted_tokens += len(acc.accepted_nodes)
        for depth in range(len(acc.accepted_nodes)):
            if depth == len(stats.accepted_per_position):
                stats.accepted_per_position.append(0)
            stats.accepted_per_position[depth] += 1

    def _emit(self, req: _Request, tokens: list[int]) -> StepOutput:
        """Apply EOS, max-token and stop-string cuts to a step's tokens and produce the text delta."""
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
        if reason in ("stop", "length"):
            detok.flush()  # a held-back partial character ends the stream as it is
        reason = "stop" if reason == "stop_string" else reason
        # While running, hold back text that could be the start of a stop string.
        hold = 0 if reason else max((len(s) - 1 for s in params.stop), default=0)
        end = max(req.sent, len(detok.text) - hold)
        delta, req.sent = detok.text[req.sent : end], end
        req.stats.new_tokens = len(req.output)
        return StepOutput(emitted, delta, reason, req.stats)
