"""Acceptance rules: greedy against exact tables, sampling against the target's law (chi-square).

The statistical tests use a Markov target over a small vocabulary: ``P[s]`` is the target's next-token
law after token ``s`` (row ``START`` at the pending token), ``Q`` the drafter's. Each draw drafts a fresh
tree below START, lets the rule accept, and (when only the bonus came out) lets the next, draft-less step
emit the target's own draw; the first two emitted tokens must follow ``P[START, a] * P[a, b]``, a law that
depends on which child was taken. Negative controls run deliberately wrong rules through the same check."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import actors.acceptance as acceptance
from actors.acceptance import Acceptance, accept_chain_sampled, accept_greedy, accept_tree_sampled, residual
from actors.draft import Draft

V = 8
START = V  # the Markov state before any token
ALPHA = 1e-3
N_DRAWS = 20_000


def _markov(rng: np.random.Generator, zeros: int) -> np.ndarray:
    """[V + 1, V] row-stochastic, each row with its ``zeros`` smallest entries removed."""
    m = rng.dirichlet(np.full(V, 0.8), size=V + 1)
    np.put_along_axis(m, np.argsort(m, axis=1)[:, :zeros], 0.0, axis=1)
    return m / m.sum(1, keepdims=True)


_rng = np.random.default_rng(1234)
P = _markov(_rng, zeros=2)  # target: some tokens impossible, so residuals must avoid them
Q = _markov(_rng, zeros=2)  # proposal: other zeros, so drafted tokens are sometimes impossible to the target
P_T = torch.tensor(P, dtype=torch.float32)
Q_T = torch.tensor(Q, dtype=torch.float32)
with np.errstate(divide="ignore"):
    LOG_Q = np.log(Q)
JOINT = P[START][:, None] * P[:V]  # [V, V] exact law of the first two emitted tokens

# A batch of n drafts of one shape: tokens [n, m], parents [m], and the Markov state each node's token was
# drawn from (its row of Q) [n, m], or None for q-less drafts.
Drafts = tuple[np.ndarray, np.ndarray, np.ndarray | None]
Step = Callable[[int, np.random.Generator], Drafts]  # (n, drafter rng) -> n drafts below START
Rule = Callable[[Draft, torch.Tensor, torch.Generator], Acceptance]


def _without_replacement(states: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """[*states.shape, k] tokens drawn sequentially without replacement from Q[states] (Gumbel top-k)."""
    keys = LOG_Q[states] + rng.gumbel(size=(*states.shape, V))
    return np.argsort(-keys, axis=-1)[..., :k]


def chain_q(n: int, rng: np.random.Generator) -> Drafts:
    """3 tokens drawn autoregressively from Q."""
    states = [np.full(n, START)]
    for _ in range(3):
        states.append(_without_replacement(states[-1], 1, rng)[:, 0])
    rows = np.stack(states, 1)  # [n, 4]
    return rows[:, 1:], np.arange(3) - 1, rows[:, :-1]


def tree_q(n: int, rng: np.random.Generator) -> Drafts:
    """3 children drawn without replacement from Q[START], each with 2 drawn likewise from Q[child]."""
    first = _without_replacement(np.full(n, START), 3, rng)  # [n, 3]
    second = _without_replacement(first, 2, rng).reshape(n, 6)  # [n, 6] children of first[:, 0], 0, 1, 1, ...
    states = np.concatenate([np.full((n, 3), START), first.repeat(2, axis=1)], 1)
    return np.concatenate([first, second], 1), np.array([-1, -1, -1, 0, 0, 1, 1, 2, 2]), states


def tree_fixed(n: int, rng: np.random.Generator) -> Drafts:
    """A deterministic tree with duplicate siblings on both levels and no proposal (q = None)."""
    first = [(START + 1) % V, (START + 3) % V, (START + 1) % V]
    tokens = first + [t for c in first for t in ((c + 2) % V, (c + 2) % V, (c + 5) % V)]
    return np.tile(tokens, (n, 1)), np.array([-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2]), None


def _drafts_and_targets(step: Step, n: int, rng: np.random.Generator) -> list[tuple[Draft, torch.Tensor]]:
    """n (draft, [1 + m, V] target rows) pairs; Markov: row i + 1 depends on node i's token only."""
    tokens, parents, states = step(n, rng)
    ps = P_T[torch.from_numpy(np.concatenate([np.full((n, 1), START), tokens], 1))]  # [n, 1 + m, V]
    qs = None if states is None else Q_T[torch.from_numpy(states)]  # [n, m, V]
    return [(Draft(tokens[k], parents, None if qs is None else qs[k]), ps[k]) for k in range(n)]


def _chain_rule(draft: Draft, p: torch.Tensor, gen: torch.Generator) -> Acceptance:
    return accept_chain_sampled(draft.tokens, draft.q, p, gen)


def _always_accept(draft: Draft, p: torch.Tensor, gen: torch.Generator) -> Acceptance:
    """Wrong on purpose: keep the first root-to-leaf path whatever the target says."""
    nodes = draft.path_to(len(draft) - 1) if len(draft) else []
    row = nodes[-1] + 1 if nodes else 0
    bonus = int(torch.multinomial(p[row], 1, generator=gen))
    return Acceptance(nodes, draft.tokens[nodes].tolist() + [bonus])


def _first_two(step: Step, rule: Rule, n: int, seed: int) -> np.ndarray:
    """[n, 2] the first two tokens the engine emits from START, each draw with a fresh draft."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    out = np.full((n, 2), -1)
    for k, (draft, p) in enumerate(_drafts_and_targets(step, n, rng)):
        tokens = rule(draft, p, gen).tokens[:2]
        out[k, : len(tokens)] = tokens
    # A step that emitted one token is followed by one that drafts nothing: the target's own draw.
    alone = out[:, 1] < 0
    cdf = P[out[alone, 0]].cumsum(1)
    out[alone, 1] = (cdf > rng.random((len(cdf), 1)) * cdf[:, -1:]).argmax(1)
    return out


def _chisquare_pvalue(cells: np.ndarray, probs: np.ndarray) -> float:
    """p-value that ``cells`` (ids into ``probs`` [K]) are draws from ``probs``.

    A draw in a zero-probability cell gives 0; cells expecting fewer than 5 draws are pooled.
    """
    counts = np.bincount(cells, minlength=len(probs))
    if counts[probs == 0].any():
        return 0.0
    expected = probs * len(cells)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return chisquare(obs[keep], exp[keep] * len(cells) / exp[keep].sum()).pvalue


def _pvalues(draws: np.ndarray) -> tuple[float, float]:
    """(first token vs P[START], first two tokens vs JOINT)."""
    return (
        _chisquare_pvalue(draws[:, 0], P[START]),
        _chisquare_pvalue(draws[:, 0] * V + draws[:, 1], JOINT.ravel()),
    )


# ---------------------------------------------------------------------------------------------- greedy


def _chain(tokens: list[int]) -> tuple[list[int], list[int]]:
    return tokens, list(range(-1, len(tokens) - 1))


GREEDY_TABLE = {
    # name: (tokens, parents, target argmax per row, accepted nodes, emitted tokens)
    "empty draft": ([], [], [7], [], [7]),
    "all wrong": (*_chain([5, 6, 7]), [1, 2, 3, 4], [], [1]),
    "all right": (*_chain([1, 2, 3]), [1, 2, 3, 4], [0, 1, 2], [1, 2, 3, 4]),
    "partial chain": (*_chain([1, 2, 9, 4]), [1, 2, 3, 4, 5], [0, 1], [1, 2, 3]),
    "second branch matches": ([5, 1, 6, 2], [-1, -1, 0, 1], [1, 0, 2, 0, 7], [1, 3], [1, 2, 7]),
    "branch matches at depth 1 only": ([5, 1, 6, 2], [-1, -1, 0, 1], [1, 0, 3, 0, 4], [1], [1, 3]),
    "duplicate leaf siblings: first": ([3, 3], [-1, -1], [3, 4, 4], [0], [3, 4]),
    "duplicate siblings: the deeper match": ([3, 3, 8], [-1, -1, 1], [3, 8, 8, 2], [1, 2], [3, 8, 2]),
    "deep chain all right": (*_chain(list(range(20))), list(range(21)), list(range(20)), list(range(21))),
    "deep chain wrong at 15": (
        *_chain(list(range(15)) + [99] + list(range(16, 20))),
        list(range(21)),
        list(range(15)),
        list(range(16)),
    ),
}


@pytest.mark.parametrize("case", GREEDY_TABLE.values(), ids=GREEDY_TABLE.keys())
def test_greedy_table(case) -> None:
    tokens, parents, argmax, nodes, emitted = case
    draft = Draft(np.array(tokens, np.int64), np.array(parents, np.int64))
    assert accept_greedy(draft, torch.tensor(argmax)) == Acceptance(nodes, emitted)


@pytest.mark.parametrize("with_q", [False, True])
def test_sampling_at_temperature_zero_is_greedy(with_q: bool) -> None:
    """One-hot targets (warp at temperature 0) make the sampled rule the greedy one (unique siblings)."""
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(rng.integers(0, 12))
        parents = np.array([rng.integers(-1, i) for i in range(n)], np.int64)
        tokens = np.zeros(n, np.int64)
        q = torch.zeros(n, V)
        for kids in Draft(tokens, parents).children():
            tokens[kids] = rng.choice(V, size=len(kids), replace=False)
            q[kids] = torch.tensor(rng.dirichlet(np.ones(V)), dtype=torch.float32)  # one row per group
        draft = Draft(tokens, parents, q if with_q else None)
        argmax = torch.tensor(rng.choice(tokens, n + 1) if n else [3])  # mostly tokens of the tree
        p = torch.nn.functional.one_hot(argmax, V).float()
        assert accept_tree_sampled(draft, p, gen) == accept_greedy(draft, argmax)


# -------------------------------------------------------------------------------------------- sampled

SCENARIOS = {
    "chain with q": (chain_q, _chain_rule),
    "tree with q": (tree_q, accept_tree_sampled),
    "fixed tree, duplicates, q=None": (tree_fixed, accept_tree_sampled),
}


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_sampled_output_follows_target(scenario) -> None:
    step, rule = scenario
    first, joint = _pvalues(_first_two(step, rule, N_DRAWS, seed=7))
    assert first > ALPHA and joint > ALPHA, (first, joint)


def _with_replacement(draft: Draft, siblings: list[int], like: torch.Tensor):
    """Wrong on purpose: every sibling judged against the full row, as if drawn with replacement."""
    for c in siblings:
        yield c, int(draft.tokens[c]), draft.q[siblings[0]]


def _rows_off_by_one(draft: Draft, p: torch.Tensor, gen: torch.Generator) -> Acceptance:
    """Wrong on purpose: node i judged against row i instead of i + 1 (right first token, wrong second)."""
    return accept_tree_sampled(draft, torch.cat([p[:1], p[:-1]]), gen)


NEGATIVE_CONTROLS = {
    # name: (step, rule, (module attribute, replacement) to patch in)
    "always accept": (chain_q, _always_accept, None),
    "resample r, not the residual": (tree_fixed, accept_tree_sampled, ("residual", lambda r, q: r)),
    "siblings with replacement": (tree_q, accept_tree_sampled, ("_proposals", _with_replacement)),
    "target rows off by one": (tree_q, _rows_off_by_one, None),
}


@pytest.mark.parametrize("control", NEGATIVE_CONTROLS.values(), ids=NEGATIVE_CONTROLS.keys())
def test_wrong_rules_are_detected(control, monkeypatch) -> None:
    """The same check, on an eighth of the draws, rejects each deliberately wrong rule."""
    step, rule, patch = control
    if patch:
        monkeypatch.setattr(acceptance, *patch)
    first, joint = _pvalues(_first_two(step, rule, N_DRAWS // 8, seed=7))
    assert min(first, joint) < ALPHA, (first, joint)


def test_empty_draft_samples_the_target() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert accept_tree_sampled(Draft.empty(), p, gen) == Acceptance([], [2])
    assert accept_chain_sampled([], torch.zeros(0, 4), p, gen) == Acceptance([], [2])


def test_seeded_determinism() -> None:
    [(draft, p)] = _drafts_and_targets(tree_q, 1, np.random.default_rng(0))

    def run(seed: int) -> list[Acceptance]:
        gen = torch.Generator().manual_seed(seed)
        return [accept_tree_sampled(draft, p, gen) for _ in range(200)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert len({tuple(a.tokens) for a in run(1)}) > 1


# ------------------------------------------------------------------------------------------------ edge


def test_zero_proposal_probability_raises() -> None:
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    with pytest.raises(ValueError, match="proposal probability 0"):
        accept_chain_sampled([2], q, torch.full((2, 4), 0.25), torch.Generator())


def test_duplicate_siblings_with_q_raise() -> None:
    """Siblings drawn without replacement cannot repeat a token: a repeat is a drafter bug."""
    q = torch.full((2, 4), 0.25)
    draft = Draft(np.array([1, 1]), np.array([-1, -1]), q)
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0]] + [[0.25] * 4] * 2)  # reject the first, test the second
    with pytest.raises(ValueError, match="proposal probability 0"):
        accept_tree_sampled(draft, p, torch.Generator())


def test_wrong_row_count_raises() -> None:
    with pytest.raises(ValueError, match="target rows"):
        accept_tree_sampled(Draft.chain([1, 2]), torch.full((2, 4), 0.25), torch.Generator())
    with pytest.raises(ValueError, match="target rows"):
        accept_greedy(Draft.chain([1, 2]), torch.tensor([1, 2]))


def test_residual() -> None:
    r = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.6, 0.1, 0.1])
    torch.testing.assert_close(residual(r, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    # r <= q everywhere (rounding): 0/0, falls back to r, staying inside the target's support.
    below = torch.tensor([0.5, 0.5 - 2**-20, 0.0, 0.0])
    torch.testing.assert_close(residual(below, torch.tensor([0.5, 0.5, 0.0, 0.0])), below)
    # point-mass proposal: r with x zeroed; and r all on x keeps x.
    torch.testing.assert_close(residual(r, torch.tensor([1.0, 0, 0, 0])), torch.tensor([0.0, 0.6, 0.4, 0.0]))
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(residual(e1, e1), e1)


def test_zero_residual_inside_the_walk_stays_in_support() -> None:
    """r <= q with r(x) < q(x): a rejection leaves no residual mass; the bonus then comes from r itself.

    The target row is scaled by 1/2 so that this rounding-sized event happens half the time.
    """
    draft = Draft.chain([0], torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    p = torch.tensor([[0.25, 0.25, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    results = [accept_tree_sampled(draft, p, gen) for _ in range(200)]
    rejected = [a.tokens[0] for a in results if not a.accepted_nodes]
    assert 0 < len(rejected) < len(results)
    assert set(rejected) == {0, 1}


def test_siblings_drawn_from_different_rows_are_each_tested_against_their_own():
    """Two first-level siblings drawn independently from different proposals q1, q2: the emitted token is p."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q1, q2 = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.05, 0.05, 0.1, 0.8])
    rng, gen, n = np.random.default_rng(0), torch.Generator().manual_seed(0), 20_000
    counts = np.zeros(4)
    for x1, x2 in zip(rng.choice(4, n, p=q1.numpy()), rng.choice(4, n, p=q2.numpy())):
        draft = Draft(np.array([x1, x2]), np.array([-1, -1]), q=torch.stack([q1, q2]))
        acc = accept_tree_sampled(draft, torch.stack([p, p, p]), gen)
        counts[acc.tokens[0]] += 1
    assert chisquare(counts, p.numpy() * n).pvalue > 1e-3


def test_siblings_sharing_a_row_are_still_without_replacement():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.5, 0.3, 0.1, 0.1])
    rng, gen, n = np.random.default_rng(1), torch.Generator().manual_seed(1), 20_000
    counts = np.zeros(4)
    for _ in range(n):
        x = rng.choice(4, 2, replace=False, p=q.numpy())  # sequential draws without replacement from q
        acc = accept_tree_sampled(Draft(x, np.array([-1, -1]), q=torch.stack([q, q])), torch.stack([p, p, p]), gen)
        counts[acc.tokens[0]] += 1
    assert chisquare(counts, p.numpy() * n).pvalue > 1e-3
