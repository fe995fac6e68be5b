"""ADED as a :class:`actors.drafter.Drafter`: tri-gram matrix + adaptive store + context matching,
one ranked candidate tree per step, cut to a cost-aware budget.

Losslessness. ``propose`` returns ``Draft(tokens, parents)`` with ``q=None``. The engine then treats
every node as a point-mass proposal: at each tree level it accepts a child token ``x`` with probability
``p(x) / 1`` relative to the residual target distribution left by the siblings already rejected, which
is exact (the committed token is distributed as the target's) for *any* tree chosen independently of
the target's sampling randomness. An ADED tree is such a tree: it is a deterministic (or seeded) search
over n-gram statistics, not a sample from them. Attaching the tri-gram probabilities as ``q`` would
claim the nodes were drawn from ``q`` (i.i.d. or without replacement), which they were not (MCTS and
best-first pick the most probable tokens, never a random draw), and the multi-draft rejection rule
would then distort the output distribution.

Concurrency. One drafter serves many requests from many threads: per-request state lives in a dict
keyed by request id, the shared store is thread-safe, and the calibrator guards its counts with a lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.aded.budget import (HISTORY, MCTS, NGRAM, RECYCLE, SUFFIX, BudgetConfig, Calibrator, CostTable,
                                choose_budget)
from actors.aded.history import History, HistoryConfig
from actors.aded.jit_search import CompiledSearch
from actors.aded.mcts import MctsConfig, mcts_paths
from actors.aded.ngram import AdaptConfig, NGramConfig, NGramModel, topk_increments, trigram_increments
from actors.aded.recycle import Recycler, RecycleConfig
from actors.aded.suffix import SuffixConfig, suffix_chains
from actors.aded.tree import FLAT_CURVE_BEST_FIRST, BestFirstConfig, CandidateTrie, best_first_paths
from actors.aded.trigram import TrigramMatrix
from actors.cost import CostModel
from actors.draft import Draft
from actors.drafter import BaseDrafter, Feedback
from actors.sampling import SamplingParams
from shared_state.base import NGramStore


class AdedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    search: Literal["best_first", "mcts", "none"] = Field(
        "best_first", description="How n-gram candidates are found: the most probable paths (best_first), "
        "ADED's Monte-Carlo tree search (mcts; settings under 'mcts'), or none (context matching and "
        "recycled top-k only). "
        "Best-first is the default: it led on code in every run on both 2-core CPUs measured (by 0.01 in the "
        "last) and on chat in "
        "two of four (ar multiples on MT-Bench / HumanEval, best-first vs MCTS: 1.58x / 2.09x vs 1.55x / "
        "1.87x, results/2026-12-02d-search; 1.51x / 1.80x vs at most 1.46x / 1.78x, results/2026-12-07h-search; "
        "1.38x / 1.80x vs 1.44x / 1.71x for the path value, results/2026-12-07r-search; 1.44x / 1.87x vs "
        "1.51x / 1.86x for the rollout value, results/2026-12-07z-search); on a flat curve the "
        "two are within 0.05 tokens per forward of each other (the same runs' simulator); "
        "`specd bench --suite search` compares them.")
    compiled: bool = Field(True, description="Run the search compiled (numba, actors.aded.jit_search); False "
                           "runs the Python reference it is tested against (same trees, slower).")
    best_first: BestFirstConfig = Field(
        default_factory=BestFirstConfig, description="Best-first search settings. Left unset, they follow the "
        "cost curve: tree.FLAT_CURVE_BEST_FIRST (64 nodes) where 64 nodes cost under 1.5x one token (GPU-like).")
    mcts: MctsConfig = Field(default_factory=MctsConfig, description="MCTS settings (search='mcts').")
    suffix: SuffixConfig = Field(default_factory=SuffixConfig, description="Per-request context matching.")
    history: HistoryConfig = Field(default_factory=HistoryConfig, description="Cross-request output matching.")
    recycle: RecycleConfig = Field(default_factory=RecycleConfig, description="Token Recycling: the target's "
                                   "latest top-k after each token as a candidate tree.")
    ngram: NGramConfig = Field(default_factory=NGramConfig, description="How matrix and store combine.")
    adapt: AdaptConfig = Field(default_factory=AdaptConfig, description="What is folded into the store.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Cost-aware budget and calibration.")
    target_topk: int = Field(8, ge=0, le=64, description="Target top-k rows asked of the engine (0 = none): "
                             "the store's Token Recycling weights use the first len(adapt.topk_weights), the "
                             "recycled adjacency (recycle) up to len(recycle.rank_probs).")
    seed: int = Field(0, description="Seed for randomised search when the request gives none.")


@dataclass
class _Request:
    rng: np.random.Generator
    greedy: bool
    folded: int  # context tokens whose tri-grams (ending there) are already in the store
    pending_state: tuple[int, int] = (-1, -1)  # (context[-2], context[-1]) of the last proposal
    last_draft: Draft | None = None  # feedback about any other draft (e.g. the engine's empty one) is not ours
    context: np.ndarray | None = None  # the last proposal's context: joins the history on finish
    predicted: float = 0.0  # decayed sums of this request's predicted and realised accepted nodes
    realised: float = 0.0

    def correction(self, strength: float) -> float:
        """How this request's acceptance compares with the shared calibration (1 = as predicted)."""
        return (self.realised + strength) / (self.predicted + strength)


class AdedDrafter(BaseDrafter):
    """Per step: candidates from the request's own context, earlier requests and the n-gram model (best
    first or MCTS) merge into one trie; calibrated acceptance estimates rank it; the cost curve cuts it."""

    def __init__(self, matrix: TrigramMatrix, store: NGramStore, config: AdedConfig | None = None,
                 cost_model: CostModel | None = None) -> None:
        config = config or AdedConfig()
        flat = (cost_model or CostModel.flat()).relative(1 + config.budget.max_nodes, 256) < 1.5
        if flat and "best_first" not in config.model_fields_set:
            config = config.model_copy(update={"best_first": FLAT_CURVE_BEST_FIRST})
        self.config = config
        self.matrix = matrix
        self.store = store
        self.model = NGramModel(matrix, store, self.config.ngram)
        wants_topk = bool(self.config.adapt.topk_weights) or self.config.recycle.enabled
        self.target_topk = self.config.target_topk if wants_topk else 0
        self.recycler = Recycler(self.config.recycle, matrix.vocab_size, self.target_topk)
        # Sampled decoding accepts less than greedy: separate statistics, each shared by all requests.
        self.calibrators = {True: Calibrator(self.config.budget), False: Calibrator(self.config.budget)}
        budget = self.config.budget
        self.costs = CostTable(cost_model or CostModel.flat(), budget.max_nodes, budget.ctx_step)
        self.history = History(self.config.history, matrix.vocab_size)
        # Compiled (or loaded from numba's cache) here, so no request's first step pays for it.
        self.search = CompiledSearch(self.model) if self.config.compiled and self.config.search != "none" else None
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        seed = self.config.seed if params.seed is None else params.seed
        state = _Request(np.random.default_rng(seed), params.greedy, folded=0)
        if self.config.adapt.fold_prompt:
            self._fold_context(state, np.asarray(prompt_ids, np.int64))
        with self._lock:
            self._requests[request_id] = state

    def propose(self, request_id: str, context: np.ndarray, max_nodes: int) -> Draft:
        state = self._requests[request_id]
        ctx = np.asarray(context, np.int64)
        self._fold_context(state, ctx)
        state.context = ctx
        state.pending_state = (int(ctx[-2]) if len(ctx) > 1 else -1, int(ctx[-1]))
        calibrator = self.calibrators[state.greedy]
        trie = self._candidates(ctx, state, calibrator)
        tokens, parents, probs, buckets = trie.ranked(calibrator.estimates(), calibrator.agree_offset)
        budget = self.config.budget
        cap = min(max_nodes, budget.max_nodes)
        # Decayed every step, drafted or not: a request that stopped drafting drifts back and tries again.
        state.predicted *= budget.request_decay
        state.realised *= budget.request_decay
        scaled = np.minimum(1.0, probs[:cap] * state.correction(budget.request_prior_strength))
        n = choose_budget(scaled, self.costs.relative(len(ctx)), budget.min_gain)
        # info: each node's calibration bucket (for observe) and estimated P(accepted).
        draft = Draft(tokens[:n], parents[:n], info={"buckets": buckets[:n], "probs": probs[:n]}, p_accept=scaled[:n])
        state.last_draft = draft
        return draft

    def observe(self, request_id: str, feedback: Feedback) -> None:
        state = self._requests.get(request_id)
        if state is None or not _is_prefix(feedback.draft, state.last_draft):
            return
        draft = feedback.draft  # our last draft, or the prefix of it the batch budget verified
        buckets = state.last_draft.info["buckets"][: len(draft)]
        if len(draft):
            accepted = np.zeros(len(draft), bool)
            accepted[list(feedback.accepted_nodes)] = True
            self.calibrators[state.greedy].update(buckets, accepted)
            state.predicted += float(state.last_draft.info["probs"][: len(draft)].sum())
            state.realised += float(accepted.sum())
        if feedback.target_topk is not None:
            self.recycler.observe(state.pending_state[1], draft.tokens, feedback.target_topk)
        if feedback.target_topk is not None and self.config.adapt.topk_weights:
            inc = topk_increments(state.pending_state, draft.tokens, draft.parents, feedback.target_topk,
                                  self.config.adapt.topk_weights)
            self.store.add([x for x in inc if x[0] >= 0])

    def finish(self, request_id: str) -> None:
        with self._lock:
            state = self._requests.pop(request_id, None)
        if state is not None and state.context is not None:
            self.history.extend([state.context])

    def _fold_context(self, state: _Request, ctx: np.ndarray) -> None:
        """Each verified tri-gram of the request once (the prompt's on start, the output's as it grows)."""
        delta = self.config.adapt.verified_delta
        if delta > 0 and len(ctx) > state.folded:
            self.store.add(trigram_increments(ctx.tolist(), state.folded, delta))
        state.folded = max(state.folded, len(ctx))

    def _candidates(self, ctx: np.ndarray, state: _Request, calibrator: Calibrator) -> CandidateTrie:
        """All sources' candidate paths below the pending token, merged into one trie."""
        trie = CandidateTrie()
        sources = ((SUFFIX, suffix_chains(ctx, self.config.suffix)), (HISTORY, self.history.chains(ctx)))
        for source, chains in sources:
            for match_len, chain in chains:
                parent = -1
                for depth, tok in enumerate(chain.tolist(), start=1):
                    parent = trie.add(parent, tok, source, calibrator.chain_bucket(source, match_len, depth))
        for paths, source in (self._search(state), (self.recycler.paths(state.pending_state[1]), RECYCLE)):
            local: list[int] = []
            for parent, tok, conf in paths:
                local.append(trie.add(local[parent] if parent >= 0 else -1, tok, source,
                                      calibrator.conf_bucket(source, conf)))
        return trie

    def _search(self, state: _Request) -> tuple[list[tuple[int, int, float]], int]:
        """The n-gram search's candidate nodes ``(parent, token, confidence)`` and their source."""
        a, b = state.pending_state
        search, config = self.config.search, self.config
        if search == "none":
            return [], NGRAM
        if self.search is not None:
            if search == "best_first":
                return self.search.best_first(a, b, config.best_first), NGRAM
            return self.search.mcts(a, b, config.mcts, state.rng), MCTS
        lookup = self.model.memo()
        if search == "best_first":
            return best_first_paths(lookup, a, b, config.best_first), NGRAM
        return mcts_paths(lookup, a, b, config.mcts, state.rng), MCTS


def _is_prefix(verified: Draft, ours: Draft | None) -> bool:
    """Feedback is about our last draft or a prefix of it (not, say, the engine's empty draft)."""
    if ours is None or len(verified) > len(ours):
        return False
    return verified is ours or (len(verified) > 0 and np.array_equal(verified.tokens, ours.tokens[: len(verified)])
                                and np.array_equal(verified.parents, ours.parents[: len(verified)]))
