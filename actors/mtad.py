"""MTAD: multi-token joint drafting with an auxiliary model (Qin et al., arXiv 2407.09722). APPROXIMATE.

A small model of the target's tokenizer drafts ``gamma`` tokens by **beam sampling** with width ``w``:
step 1 samples ``w`` distinct tokens from ``q``; each later step samples ``w`` distinct (beam, token) pairs
from the flattened joint ``exp(log w_beam + log q(token | beam))``, where ``log w_beam`` is the beam's summed
log q (log-weights, not the authors' first softmax-over-probabilities version). Sampling is *without*
replacement (Gumbel top-k), so beams never duplicate; ``q`` is ``warp`` of the draft's logits, the same
temperature / top-k / top-p as the target's ``p``. All ``w`` beams of a depth are evaluated in ONE draft
forward, as a tree (each beam attends to the context and its own ancestors), and so are every other
request's of the step: one BatchKV holds a slot per request, so a step costs ``gamma`` draft forwards.

* ``mtad`` keeps the highest-weight beam as a chain; the engine accepts it with
  :func:`actors.acceptance.accept_mtad` (the longest prefix whose joint ratio ``p/q`` exceeds ``tau``).
* ``mmtad`` keeps all ``w`` final beams as a tree (shared prefixes are shared nodes), verified in one target
  forward and accepted with :func:`actors.acceptance.accept_mmtad`.

Not lossless by design: the output leans toward sequences of high joint likelihood (lower perplexity) and is
NOT distributed as the target's; every response says so (``lossless: false``). At temperature 0 ``q`` is a
one-hot, beam sampling degenerates to the draft's greedy chain and the engine uses the greedy rule, which is
what MTAD's rule reduces to for ``tau < 1``: the output is then identical to plain greedy decoding.

Each drafted node's ``log q`` travels in ``Draft.logq`` ([n] float64), the rule's input.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from actors.draft import Draft
from actors.drafter import Feedback
from actors.kv import RowInput, Slot
from actors.sampling import SamplingParams, warp
from actors.sd import SlotDrafter, checked_state, draft_generator, sync_rows


@dataclass
class BeamTree:
    """Every (beam, token) pair sampled during one draft, in sampling order (parents precede children)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1: child of the pending token
    logq: list[float] = field(default_factory=list)  # log q(token | its path)
    weights: list[float] = field(default_factory=list)  # log weight of the beam ending here: its path's summed log q
    depths: list[int] = field(default_factory=list)
    beams: list[int] = field(default_factory=list)  # the surviving beams (nodes at the last depth)

    def path(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def best_chain(self) -> list[int]:
        """Nodes of the highest-weight surviving beam, root to leaf (MTAD's draft)."""
        return self.path(max(self.beams, key=lambda b: self.weights[b])) if self.beams else []

    def all_beams(self, budget: int) -> list[int]:
        """The union of the surviving beams' paths, in node order (MMTAD's draft tree), at most ``budget`` nodes.

        Beams join best weight first and only whole, so a tight budget (>= the depth) still keeps the best beam.
        """
        keep: set[int] = set()
        for b in sorted(self.beams, key=lambda b: -self.weights[b]):
            path = keep.union(self.path(b))
            if len(path) <= budget:
                keep = path
        return sorted(keep)


#: (tree so far, nodes to expand) -> [len(nodes), V] log q of each node's next token
Expand = Callable[[BeamTree, list[int]], torch.Tensor]


def beam_sample(first_logq: torch.Tensor, expand: Expand, gamma: int, width: int,
                generator: torch.Generator | None) -> BeamTree:
    """Beam sampling over ``gamma`` depths; ``first_logq``: [V] log q at the pending token.

    Fewer than ``width`` beams survive when fewer candidates have q > 0 (top-k, temperature 0).
    """
    steps = beam_steps(first_logq, gamma, width, generator)
    try:
        tree, nodes = next(steps)
        while True:
            tree, nodes = steps.send(expand(tree, nodes))
    except StopIteration as done:
        return done.value


def beam_steps(first_logq: torch.Tensor, gamma: int, width: int,
               generator: torch.Generator | None) -> Generator[tuple[BeamTree, list[int]], torch.Tensor, BeamTree]:
    """:func:`beam_sample` one depth at a time: yields (tree, nodes to expand), takes their [len(nodes), V]
    log q, returns the tree; so a drafter can expand the beams of many requests in one forward."""
    tree = BeamTree()
    logq = first_logq[None]  # [beams, V]
    for depth in range(1, gamma + 1):
        if depth > 1:
            logq = yield tree, tree.beams
        prior = torch.tensor([tree.weights[b] for b in tree.beams] if depth > 1 else [0.0], dtype=torch.float64)
        joint = (prior[:, None] + logq.double()).flatten()  # [beams * V] log of the unnormalised joint
        picks = _gumbel_top_k(joint, width, generator)
        vocab = logq.shape[-1]
        beams = []
        for flat in picks:
            row, token = divmod(flat, vocab)
            tree.tokens.append(token)
            tree.parents.append(tree.beams[row] if depth > 1 else -1)
            tree.logq.append(float(logq[row, token]))
            tree.weights.append(float(joint[flat]))
            tree.depths.append(depth)
            beams.append(len(tree.tokens) - 1)
        tree.beams = beams
    return tree


def _gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """k distinct indices drawn sequentially without replacement from softmax(logits); fewer if fewer are finite."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    keys = logits - torch.log(-torch.log(u))
    k = min(k, int(torch.isfinite(logits).sum()))
    return torch.topk(keys, k).indices.tolist()


def log_warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] log of :func:`warp` (-inf where filtered out)."""
    return warp(logits, params).log()


def tree_nodes_row(slot: Slot, base: int, tree: BeamTree, nodes: list[int], slots: dict[int, int]) -> RowInput:
    """The row input of tree ``nodes`` (all of one depth) after ``slot``'s cache.

    ``base``: cache length of the context (the pending token included); ``slots``: node -> cache index of the
    nodes already fed, updated with the new ones. Each node attends to the context, its ancestors and itself,
    at position base + depth - 1.
    """
    start, n = len(slot), len(nodes)
    allowed = torch.zeros(n, start + n, dtype=torch.bool)  # [n, kv]
    allowed[:, :base] = True
    for r, node in enumerate(nodes):
        allowed[r, [slots[a] for a in tree.path(node)[:-1]]] = True
        allowed[r, start + r] = True
    slots.update({v: start + r for r, v in enumerate(nodes)})
    return RowInput(slot, [tree.tokens[v] for v in nodes], np.array([base + tree.depths[v] - 1 for v in nodes]),
                    allowed)


@dataclass
class _Pending:
    base: int  # draft cache length of the context
    nodes: list[int]  # draft node index -> BeamTree node
    slots: dict[int, int]  # BeamTree node -> cache index, for the nodes fed to the draft model


@dataclass(eq=False)
class _State:
    slot: Slot  # the request's row of the drafter's BatchKV
    params: SamplingParams
    generator: torch.Generator
    gamma: int  # the depth and width of the view that started it: one batch drafts each request to its own
    beam_width: int
    pending: _Pending | None = None  # the last draft, until observe() compacts the cache to its accepted path


@dataclass
class _Row:
    state: _State
    context: list[int]
    gamma: int
    max_nodes: int
    base: int = 0  # draft cache length of the context, once synced
    slots: dict[int, int] = field(default_factory=dict)  # BeamTree node -> cache index


class MtadDrafter(SlotDrafter):
    """MTAD (``keep_all_beams=False``: best beam, a chain) or MMTAD (all beams, a tree). Approximate.

    ``gamma``: draft depth; ``beam_width``: beams per depth; ``tau``: the joint-ratio threshold of the acceptance
    rule (larger accepts less; ``inf`` accepts nothing and the engine then samples plainly from the target).
    Every request of a step is drafted through ONE :class:`BatchKV` (a slot per request): one forward syncs
    every row, then one forward per depth expands every row's beams (``[rows, width]`` tree nodes).
    """

    options = ("gamma", "beam_width", "tau")

    def __init__(self, model: PreTrainedModel, gamma: int = 4, beam_width: int = 4, tau: float = 0.5,
                 keep_all_beams: bool = False) -> None:
        super().__init__(model)
        self._set(gamma, beam_width, tau)
        self.keep_all_beams = keep_all_beams
        self.acceptance = "mmtad" if keep_all_beams else "mtad"  # the engine's rule for these drafts

    def _set(self, gamma: int, beam_width: int, tau: float) -> None:
        if gamma < 1 or beam_width < 1:
            raise ValueError("gamma and beam_width must be >= 1")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.gamma, self.beam_width, self.tau = gamma, beam_width, tau

    def with_options(self, gamma: int | None = None, beam_width: int | None = None,
                     tau: float | None = None) -> MtadDrafter:
        """A view with these settings that shares this drafter's model and request states."""
        view = copy.copy(self)
        view._set(gamma or self.gamma, beam_width or self.beam_width, self.tau if tau is None else tau)
        return view

    def start(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        with self._lock:
            self._free(request_id)
            self._requests[request_id] = _State(self.kv.add(), params, draft_generator(params), self.gamma,
                                                self.beam_width)

    def propose_batch(self, items: Sequence[tuple[str, np.ndarray, int]]) -> list[Draft | BaseException]:
        out: list[Draft | BaseException] = [Draft.empty() for _ in items]
        rows: list[tuple[int, _Row]] = []
        with self._lock:
            for i, (request_id, context, max_nodes) in enumerate(items):
                try:
                    st = checked_state(self._requests, request_id, context, [r.state for _, r in rows])
                except (KeyError, ValueError) as e:
                    out[i] = e
                    continue
                if st.pending is not None:  # a draft that was never observed: drop its tree entries
                    self.kv.crop(st.slot, st.pending.base)
                    st.pending = None
                if min(st.gamma, max_nodes) >= 1:
                    rows.append((i, _Row(st, [int(t) for t in context], min(st.gamma, max_nodes), max_nodes)))
            if rows:
                try:
                    drafts = self._draft([r for _, r in rows])
                except Exception as e:  # noqa: BLE001 - the shared forward failed: every row of it fails
                    drafts = [e] * len(rows)
                for (i, _), d in zip(rows, drafts):
                    out[i] = d
        return out

    def _draft(self, rows: list[_Row]) -> list[Draft]:
        """Every row's beam sampling, expanded in lockstep: one draft forward per depth for all rows."""
        first = sync_rows(self.kv, [(r.state.slot, r.context) for r in rows], 1 + max(r.gamma for r in rows))
        steps, trees, asked = {}, [None] * len(rows), {}
        for j, (row, logits) in enumerate(zip(rows, first)):
            row.base = len(row.state.slot)
            steps[j] = beam_steps(log_warp(logits, row.state.params), row.gamma, row.state.beam_width,
                                  row.state.generator)
            self._advance(j, steps, trees, asked, None)
        while asked:
            order = list(asked)
            inputs = [tree_nodes_row(rows[j].state.slot, rows[j].base, *asked[j], rows[j].slots) for j in order]
            logits = self.kv.forward(inputs)
            for j, lg in zip(order, logits):
                self._advance(j, steps, trees, asked, log_warp(lg, rows[j].state.params))
        return [self._to_draft(r, t) for r, t in zip(rows, trees)]

    @staticmethod
    def _advance(j: int, steps: dict, trees: list, asked: dict, logq: torch.Tensor | None) -> None:
        """Send row ``j``'s beam sampling the log q of its last expansion (None: to start it); keep its next
        expansion in ``asked``, or its finished tree in ``trees``."""
        try:
            asked[j] = steps[j].send(logq)
        except StopIteration as done:
            asked.pop(j, None)
            trees[j] = done.value

    def _to_draft(self, row: _Row, tree: BeamTree) -> Draft:
        nodes = tree.all_beams(row.max_nodes) if self.keep_all_beams else tree.best_chain()
        index = {v: i for i, v in enumerate(nodes)}
        parents = [index.get(tree.parents[v], -1) for v in nodes]
        row.state.pending = _Pending(row.base, nodes, row.slots)
        info = {"beam_weight": np.array([tree.weights[v] for v in nodes])}  # [n] summed log q of each node's path
        return Draft(np.array([tree.tokens[v] for v in nodes], np.int64), np.array(parents, np.int64), info=info,
                     logq=np.array([tree.logq[v] for v in nodes]))  # [n] read by the acceptance rule

    def observe(self, request_id: str, feedback: Feedback) -> None:
        """Keep only the accepted path's entries in the draft cache (exact: they sit at their depth's positions)."""
        with self._lock:
            st = self._requests[request_id]
            pending, st.pending = st.pending, None
            if pending is None:
                return
            fed = [pending.slots[v] - pending.base for v in (pending.nodes[i] for i in feedback.accepted_nodes)
                   if v in pending.slots]
            self.kv.keep_path(st.slot, pending.base, fed)

