"""The engine's settings: batch shape, prefill chunking, the batch budget and its gate, the verifier backend."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_draft_tokens: int = Field(64, ge=0, le=1024, description="Hard cap on draft nodes verified per request and step.")
    max_batch: int = Field(16, ge=1, le=1024, description="Requests decoded together; more wait for a free slot.")
    prefill_chunk: int = Field(
        256, ge=1, description="Prompt tokens cached per forward and step. A joining request's prefill runs "
        "between the batch's decode steps, so this bounds how long it can stall them (one chunk's forward).")
    budget_min_gain: float = Field(
        0.0, ge=0.0, description="Speculate only when the batch budget predicts this relative gain over plain decoding.")
    budget_correction: float = Field(
        4.0, gt=0.0, description="Pseudo-tokens behind the batch budget's correction of the drafters' estimates "
        "(actors.budget.EstimateCorrection): smaller reacts faster to drafts that accept less than estimated.")
    budget_correction_decay: float = Field(0.98, gt=0.0, le=1.0, description="Per-step decay of that correction's sums.")
    budget_timing: bool = Field(
        True, description="Correct the cost curve per step shape (rows, tokens per row) from the verify forwards the "
        "engine times (actors.cost.TimedCost), so the budget prices the steps this machine runs now. Steps with a "
        "sampled request read the curve as measured: a seeded sample must not depend on the machine's speed.")
    draft_gate: bool = Field(
        True, description="Skip drafting for greedy requests while drafting's own time (drafter, feedback, the "
        "verify it adds) outweighs the tokens it adds to the batch (actors.budget.DraftGate). Sampled requests "
        "always draft: a gate fed by wall-clock time would make a seeded sample depend on the machine's speed.")
    batch_invariant: bool = Field(
        True, description="A request's logits are the same bits alone and in any batch, so greedy output never "
        "depends on who else is decoding: every row attends over its own keys, cut at a multiple of 64 (one SDPA "
        "call per layer and run of neighbouring rows that round alike; with a call per row it measured 1.11x a "
        "one-call decode forward at 8 rows on a 2-core Xeon, results/2026-12-02-row-attention). False: one "
        "SDPA call over the padded batch, which is faster but rounds a short row differently, so a near-tie "
        "can flip a greedy token with the batch's make-up. "
        "Sampling stays exact for the logits computed either way. The plain backend only.")
    backend: Literal["plain", "deepspeed"] = Field(
        "plain", description="Verifier backend: the model as loaded, or sharded by DeepSpeed AutoTP (actors.tp).")
    tp_size: int = Field(1, ge=1, description="Tensor-parallel ranks of the deepspeed backend (rank 0 runs the engine).")
    tp_heartbeat_s: float = Field(
        10.0, gt=0, description="An idle TP leader pings its followers this often (below the group's timeout).")

    @model_validator(mode="after")
    def _tp_needs_deepspeed(self) -> EngineConfig:
        if self.tp_size > 1 and self.backend != "deepspeed":
            raise ValueError("tp_size > 1 needs backend 'deepspeed'")
        if not self.batch_invariant and self.backend != "plain":
            raise ValueError("batch_invariant=False is for the plain backend (the deepspeed ranks attend row-exact)")
        return self
