"""The measured cost of one verify forward as a function of tokens fed and context length.

On a GPU that cost is nearly flat in k for small k; on a CPU it is not (see the SmolLM2 curves in
``actors/data/smollm2-135m-cpu-verify-cost.json``), so any draft budget must read this curve. The curve
comes from ``specd profile`` (see actors/profile.py) and is saved as JSON:

    {"k": [1, 2, ...], "context_lengths": [64, 256, ...], "seconds": [[t(k, ctx) for k] for ctx], ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CostModel:
    k: np.ndarray  # [K] tokens fed in one forward (the pending token + draft nodes), increasing
    context_lengths: np.ndarray  # [C] increasing
    seconds: np.ndarray  # [C, K]

    @classmethod
    def from_profile(cls, profile: dict) -> CostModel:
        k = np.asarray(profile["k"], dtype=np.float64)
        ctx = np.asarray(profile["context_lengths"], dtype=np.float64)
        sec = np.asarray(profile["seconds"], dtype=np.float64)
        if sec.shape != (len(ctx), len(k)) or np.any(np.diff(k) <= 0) or np.any(np.diff(ctx) <= 0):
            raise ValueError("profile needs increasing k and context_lengths and seconds[len(ctx)][len(k)]")
        return cls(k, ctx, sec)

    @classmethod
    def from_json(cls, path: str | Path) -> CostModel:
        return cls.from_profile(json.loads(Path(path).read_text()))

    @classmethod
    def flat(cls, seconds: float = 1.0) -> CostModel:
        """A GPU-like curve (cost independent of k): useful as a neutral default in tests."""
        return cls(np.array([1.0, 1024.0]), np.array([0.0, 1e6]), np.full((2, 2), seconds))

    def forward_seconds(self, n_tokens: int, context_len: int) -> float:
        """Predicted seconds to verify ``n_tokens`` (pending token + draft nodes) after ``context_len``."""
        # Linear in k between measured points and beyond the last; clamped in context length.
        per_ctx = [np.interp(n_tokens, self.k, row, right=None) for row in self.seconds]
        if n_tokens > self.k[-1]:
            slope = (self.seconds[:, -1] - self.seconds[:, -2]) / (self.k[-1] - self.k[-2])
            per_ctx = list(self.seconds[:, -1] + slope * (n_tokens - self.k[-1]))
        return float(np.interp(context_len, self.context_lengths, per_ctx))

    def relative(self, n_tokens: int, context_len: int) -> float:
        """Cost of ``n_tokens`` as a multiple of a plain one-token decode step at the same context."""
        return self.forward_seconds(n_tokens, context_len) / self.forward_seconds(1, context_len)


#: SmolLM2-135M's measured CPU curves, one per linear kernel, with the machine and how they were measured.
SMOLLM2_CPU_COST_PATH = Path(__file__).parent / "data" / "smollm2-135m-cpu-verify-cost.json"


@lru_cache(maxsize=1)
def _smollm2_cpu_profiles() -> dict[str, dict]:
    return json.loads(SMOLLM2_CPU_COST_PATH.read_text())["kernels"]


def smollm2_cpu_cost(kernels: str = "torch") -> CostModel:
    """SmolLM2-135M's curve for these linear kernels (the torch one for kernels never measured): the ADED
    budget's fallback when ``specd profile`` has not been run for the target. A steeper curve than the
    target's only makes the budget cautious, never slower than plain decoding."""
    profiles = _smollm2_cpu_profiles()
    return CostModel.from_profile(profiles[kernels if kernels in profiles else "torch"])
