"""Prometheus metrics through Ray Serve (exported by every Ray node's metrics agent, tagged with the
application, deployment and replica), named like vLLM's: ``vllm:<name>`` here is ``specd_<name>``, and
Prometheus shows it as ``ray_specd_<name>`` (Ray prefixes application metrics with ``ray_``).

Why not ``specd:``: Ray 2.60 records metrics through OpenTelemetry, whose instrument names may not
contain ``:``; such metrics are accepted with a deprecation warning and then silently never exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from ray.serve import metrics

from actors.stats import GenerationStats
from actors.stats import StepInfo

PREFIX = "specd_"
# Seconds; TTFT spans prefill (tens of ms to seconds on CPU), ITL one decode step per token.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]  # requests per step, draft nodes per step
TOKEN_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # query tokens per verify forward


def _make(kind, name: str, description: str, tags: tuple[str, ...] = (), **kw):
    return kind(PREFIX + name, description=description, tag_keys=tags, **kw)


@dataclass
class VerifierMetrics:
    running: metrics.Gauge
    requests: metrics.Counter
    prompt_tokens: metrics.Counter
    generation_tokens: metrics.Counter
    ttft: metrics.Histogram
    itl: metrics.Histogram
    drafts: metrics.Counter
    draft_tokens: metrics.Counter
    accepted_tokens: metrics.Counter
    accepted_per_pos: metrics.Counter
    batch_size: metrics.Histogram
    step_tokens: metrics.Histogram
    budget_nodes: metrics.Histogram
    proposed_nodes: metrics.Counter

    def batch_step(self, info: StepInfo) -> None:
        """One batched verify step: its rows, tokens fed and the budget's choice (called from the engine loop)."""
        self.batch_size.observe(info.rows)
        self.step_tokens.observe(info.tokens)
        self.budget_nodes.observe(info.verified)
        if info.proposed:
            self.proposed_nodes.inc(info.proposed)  # Ray's counters refuse 0

    def step(self, method: str, before: GenerationStats | None, after: GenerationStats) -> None:
        """Count one decode step's drafting from the change in the request's cumulative stats."""
        tags = {"method": method}
        drafted = after.drafted_tokens - (before.drafted_tokens if before else 0)
        accepted = after.accepted_tokens - (before.accepted_tokens if before else 0)
        if drafted > 0:
            self.drafts.inc(1, tags)
            self.draft_tokens.inc(drafted, tags)
        if accepted > 0:
            self.accepted_tokens.inc(accepted, tags)
            for pos in range(accepted):  # the accepted path is root-first: depths 0..accepted-1
                self.accepted_per_pos.inc(1, tags | {"position": str(pos)})


def verifier_metrics() -> VerifierMetrics:
    m = ("method",)
    return VerifierMetrics(
        running=_make(metrics.Gauge, "num_requests_running", "Requests decoding on this replica."),
        requests=_make(metrics.Counter, "request_success", "Finished requests.", ("method", "finished_reason")),
        prompt_tokens=_make(metrics.Counter, "prompt_tokens", "Prefilled prompt tokens.", m),
        generation_tokens=_make(metrics.Counter, "generation_tokens", "Generated tokens.", m),
        ttft=_make(metrics.Histogram, "time_to_first_token_seconds", "Request arrival to first token.", m,
                   boundaries=TTFT_BUCKETS),
        itl=_make(metrics.Histogram, "inter_token_latency_seconds", "Time per output token after the first.", m,
                  boundaries=ITL_BUCKETS),
        drafts=_make(metrics.Counter, "spec_decode_num_drafts", "Decode steps that verified a draft.", m),
        draft_tokens=_make(metrics.Counter, "spec_decode_num_draft_tokens", "Draft nodes verified.", m),
        accepted_tokens=_make(metrics.Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted.", m),
        accepted_per_pos=_make(metrics.Counter, "spec_decode_num_accepted_tokens_per_pos",
                               "Accepted draft tokens by depth in the draft.", ("method", "position")),
        batch_size=_make(metrics.Histogram, "batch_size", "Requests decoded in one verify forward.",
                         boundaries=BATCH_BUCKETS),
        step_tokens=_make(metrics.Histogram, "step_query_tokens", "Query tokens of one verify forward (padding "
                          "included).", boundaries=TOKEN_BUCKETS),
        budget_nodes=_make(metrics.Histogram, "budget_draft_nodes", "Draft nodes the batch budget kept in one step.",
                           boundaries=BATCH_BUCKETS),
        proposed_nodes=_make(metrics.Counter, "proposed_draft_nodes", "Draft nodes the drafters offered."),
    )


def ingress_metrics() -> SimpleNamespace:
    return SimpleNamespace(
        invalid=_make(metrics.Counter, "request_invalid", "Requests rejected as INVALID_ARGUMENT / 400.",
                      ("protocol",)),
    )


def pool_metrics(role: str) -> SimpleNamespace:
    rebuilds = _make(metrics.Counter, "drafter_state_rebuilds",
                     "Draft steps that found no request state on this replica and rebuilt it.", ("pool",))
    rebuilds.set_default_tags({"pool": role})
    return SimpleNamespace(rebuilds=rebuilds)
