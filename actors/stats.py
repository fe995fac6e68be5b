"""What the engine reports: each step's output per request, whole generations, per-request stats and
per-step batch shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # decode steps (verify forwards) this request took part in, prefill excluded
    drafted_tokens: int = 0  # draft nodes verified
    accepted_tokens: int = 0
    # [i] = steps in which the draft token at depth i + 1 was accepted (vLLM's per-position counts)
    accepted_per_position: list[int] = field(default_factory=list)
    invalid_drafts: int = 0  # drafts dropped for ids outside the vocabulary (the step went on without them)
    seconds: float = 0.0  # from arrival (queueing and prefill included) to the latest step
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # drafting time of the steps this request was in
    lossless: bool = True

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def count(self, drafted: int, accepted: int) -> None:
        """Fold one verify step: ``drafted`` nodes verified, ``accepted`` of them on the accepted path."""
        self.target_forwards += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        for depth in range(accepted):
            if depth == len(self.accepted_per_position):
                self.accepted_per_position.append(0)
            self.accepted_per_position[depth] += 1

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tokens_per_forward"] = round(self.tokens_per_forward, 4)
        d["tokens_per_second"] = round(self.tokens_per_second, 3)
        return d


@dataclass(frozen=True)
class StepInfo:
    """The shape of one batched verify step (metrics and benchmarks read it)."""

    rows: int  # requests decoded in the step
    proposed: int  # draft nodes the drafters offered
    verified: int  # draft nodes the batch budget kept
    tokens: int  # query tokens fed, padding included: rows x (1 + longest kept draft)
    context: int = 0  # the longest row's cached tokens
    cost_ratio: float = 1.0  # the cost curve's price of the step as a multiple of a plain step of its rows
    expected: float = 0.0  # tokens the budget expects: rows + the kept nodes' (corrected) estimates
    produced: int = 0  # tokens the step committed (accepted nodes + bonus, before EOS and stop cuts)

    @property
    def expected_speedup(self) -> float:
        """The budget's view of the step against a plain step of its rows: expected tokens per unit cost."""
        return self.expected / (self.rows * self.cost_ratio)


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


class RequestFailed(RuntimeError):
    """One request's drafter or acceptance failed; the request ended, the batch went on."""


def collect(outputs: Iterator[StepOutput]) -> Generation:
    """A request's step outputs joined into its whole generation."""
    ids, text, reason, stats = [], [], "length", GenerationStats()
    for out in outputs:
        ids += out.token_ids
        text.append(out.text)
        reason, stats = out.finish_reason or reason, out.stats
    return Generation(ids, "".join(text), reason, stats)
