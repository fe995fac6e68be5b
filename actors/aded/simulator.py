"""Offline simulator: replay recorded greedy target outputs against a drafter, no target forward.

Under greedy decoding the engine accepts the longest draft path whose tokens equal the target's
continuation, then commits the target's next token. A recorded greedy output *is* that continuation,
so replaying it tells exactly what the engine would accept, step by step, and the CostModel turns the
step sizes into an estimated speedup over plain autoregressive decoding.

The recorded top-k (the target's top tokens at every output position) stands in for
``Feedback.target_topk``: it is known for the pending token and the accepted nodes (their context is
the recorded prefix), not for rejected branches, whose rows are -1. The simulator therefore
under-states what the target's top-k feedback teaches in the real engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from actors.cost import CostModel, smollm2_cpu_cost
from actors.draft import Draft
from actors.drafter import BaseDrafter, Drafter, Feedback
from actors.models import encode_prompt
from actors.sampling import SamplingParams


@dataclass
class Trace:
    prompt_ids: list[int]
    output_ids: list[int]
    # [len(output_ids), k]: the target's top-k ids predicting output position t (row t's first id is
    # output_ids[t] under greedy); empty when not recorded.
    topk: list[list[int]] = field(default_factory=list)
    name: str = ""


def shipped_traces(identity: str) -> Path | None:
    """Recorded greedy traces of a target on ``TUNING_PROMPTS`` shipped with specd (SmolLM2's), if any."""
    path = Path(__file__).parent / "data" / f"{identity}.tuning-traces.jsonl"
    return path if path.exists() else None


def save_traces(traces: Sequence[Trace], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for t in traces:
            f.write(json.dumps(t.__dict__) + "\n")


def load_traces(path: str | Path) -> list[Trace]:
    return [Trace(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


@torch.no_grad()
def record_traces(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, top_k: int = 8,
                  chat: bool = True) -> list[Trace]:
    """Greedy-generate each prompt with HF ``generate`` and keep the target's top-k at every step."""
    traces = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt, chat and bool(tokenizer.chat_template))])  # [1, L]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        generated = out.sequences[0, ids.shape[1]:].tolist()
        topk = [torch.topk(step[0], top_k).indices.tolist() for step in out.logits][: len(generated)]
        traces.append(Trace(ids[0].tolist(), generated, topk, prompt[:60]))
    return traces


@dataclass
class ReplayResult:
    tokens: int = 0  # generated tokens replayed
    forwards: int = 0  # verify forwards the engine would run
    draft_nodes: int = 0  # draft nodes verified in all
    draft_seconds: float = 0.0  # wall time spent in propose + observe
    verify_seconds: float = 0.0  # CostModel estimate of all verify forwards
    ar_seconds: float = 0.0  # CostModel estimate of plain autoregressive decoding
    per_trace: list[dict] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(1, self.forwards)

    @property
    def speedup(self) -> float:
        """Estimated tokens/s over AR, drafting time included."""
        return self.ar_seconds / max(1e-12, self.verify_seconds + self.draft_seconds)

    @property
    def verify_speedup(self) -> float:
        """Estimated tokens/s over AR counting verify forwards only: the draft policy without the noise
        of wall-clock drafting time on a shared machine (report drafting time separately)."""
        return self.ar_seconds / max(1e-12, self.verify_seconds)

    @property
    def draft_ms_per_step(self) -> float:
        return 1e3 * self.draft_seconds / max(1, self.forwards)

    def summary(self) -> dict:
        speedups = [t["speedup"] for t in self.per_trace] or [0.0]
        verify = [t["verify_speedup"] for t in self.per_trace] or [0.0]
        return {"tokens_per_forward": round(self.tokens_per_forward, 3), "speedup": round(self.speedup, 3),
                "min_trace_speedup": round(min(speedups), 3), "verify_speedup": round(self.verify_speedup, 3),
                "min_trace_verify_speedup": round(min(verify), 3), "nodes_per_forward":
                round(self.draft_nodes / max(1, self.forwards), 2), "draft_ms_per_step":
                round(self.draft_ms_per_step, 3), "tokens": self.tokens, "forwards": self.forwards}


def accepted_path(draft: Draft, continuation: np.ndarray) -> list[int]:
    """Node indices of the longest root-to-node path equal to a prefix of ``continuation``."""
    path: list[int] = []
    parent = -1
    for want in continuation:
        nxt = [i for i in np.flatnonzero(draft.parents == parent) if draft.tokens[i] == want]
        if not nxt:
            break
        parent = int(nxt[0])
        path.append(parent)
    return path


def _topk_rows(trace: Trace, draft: Draft, pos: int, path: list[int], k: int) -> torch.Tensor | None:
    """[1 + n, k] target top-k rows known from the trace (pending token, accepted nodes), -1 elsewhere."""
    if not trace.topk or k <= 0:
        return None
    rows = torch.full((1 + len(draft), k), -1, dtype=torch.int64)
    for r, t in [(0, pos)] + [(node + 1, pos + j + 1) for j, node in enumerate(path)]:
        if t < len(trace.topk):
            ids = trace.topk[t][:k]
            rows[r, : len(ids)] = torch.tensor(ids)
    return rows


def replay_trace(drafter: Drafter, trace: Trace, cost: CostModel, request_id: str = "sim",
                 max_nodes: int = 64) -> dict:
    """Replay one trace; returns per-trace counts (tokens, forwards, nodes, seconds)."""
    out = np.asarray(trace.output_ids, np.int64)
    context = np.asarray(list(trace.prompt_ids) + trace.output_ids, np.int64)
    n_prompt = len(trace.prompt_ids)
    stats = {"tokens": 0, "forwards": 0, "nodes": 0, "draft_s": 0.0, "verify_s": 0.0, "ar_s": 0.0}
    t0 = time.perf_counter()
    drafter.start(request_id, trace.prompt_ids, SamplingParams())
    stats["draft_s"] += time.perf_counter() - t0
    # The engine feeds the pending token, the first output token is produced by prefill in both modes.
    pos = 1
    while pos < len(out):
        ctx = context[: n_prompt + pos]
        t0 = time.perf_counter()
        draft = drafter.propose(request_id, ctx, max_nodes)
        stats["draft_s"] += time.perf_counter() - t0
        path = accepted_path(draft, out[pos:])
        new = out[pos: pos + len(path) + 1].tolist()
        fb = Feedback(draft, path, new, _topk_rows(trace, draft, pos, path, drafter.target_topk))
        t0 = time.perf_counter()
        drafter.observe(request_id, fb)
        stats["draft_s"] += time.perf_counter() - t0
        stats["verify_s"] += cost.forward_seconds(1 + len(draft), len(ctx))
        stats["ar_s"] += sum(cost.forward_seconds(1, len(ctx) + j) for j in range(len(new)))
        stats["tokens"] += len(new)
        stats["forwards"] += 1
        stats["nodes"] += len(draft)
        pos += len(new)
    drafter.finish(request_id)
    return stats


def replay(drafter: Drafter, traces: Sequence[Trace], cost: CostModel | None = None,
           max_nodes: int = 64) -> ReplayResult:
    """Replay traces in order (the drafter keeps what it learns across them, as a server does)."""
    cost = cost or smollm2_cpu_cost()
    res = ReplayResult()
    for i, trace in enumerate(traces):
        s = replay_trace(drafter, trace, cost, f"sim-{i}", max_nodes)
        res.tokens += s["tokens"]
        res.forwards += s["forwards"]
        res.draft_nodes += s["nodes"]
        res.draft_seconds += s["draft_s"]
        res.verify_seconds += s["verify_s"]
        res.ar_seconds += s["ar_s"]
        res.per_trace.append({"name": trace.name, "tokens_per_forward": s["tokens"] / max(1, s["forwards"]),
                              "speedup": s["ar_s"] / max(1e-12, s["verify_s"] + s["draft_s"]),
                              "verify_speedup": s["ar_s"] / max(1e-12, s["verify_s"])})
    return res


class PromptLookupDrafter(BaseDrafter):
    """Baseline: HF ``prompt_lookup_num_tokens`` (transformers' PromptLookupCandidateGenerator) as a Drafter.

    The first earlier occurrence of the last ``max_ngram`` .. 1 tokens, and the ``num_tokens`` after it,
    drafted as a chain on every step whatever it costs.
    """

    target_topk = 0

    def __init__(self, num_tokens: int = 10, max_ngram: int = 2) -> None:
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        pass

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        n = len(context)
        for size in range(min(self.max_ngram, n - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(context[:-1], size)  # [n - size, size]
            hits = np.flatnonzero((windows == context[n - size:]).all(axis=1))
            for start in hits + size:
                chain = context[start: min(n, start + self.num_tokens, start + max_nodes)]
                if len(chain):
                    return Draft.chain(chain)
        return Draft.empty()

    def observe(self, request_id: str, feedback: Feedback) -> None:
        pass

    def finish(self, request_id: str) -> None:
        pass
