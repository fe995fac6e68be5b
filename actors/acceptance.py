"""Acceptance rules: which draft nodes the target keeps, and the bonus token that follows them.

Pure functions of a :class:`~actors.draft.Draft`, the target's per-row output and a ``torch.Generator``.
Rows follow the verifier's layout: row 0 is the pending token (its distribution is over the first draft
level), row ``i + 1`` is node ``i`` (over node ``i``'s children, i.e. the token after node ``i``).

Greedy acceptance reproduces plain greedy decoding. Sampled acceptance emits tokens distributed exactly as
the target's ``p`` (rows that sum to 1, as :func:`actors.sampling.warp` gives) provided ``draft.q`` is the
law the drafter really sampled each token from: any such ``q`` keeps the output exact, and a ``q`` close to
``p`` (the same warp on the drafter's logits) keeps acceptance high.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from actors.draft import Draft


@dataclass(frozen=True)
class Acceptance:
    accepted_nodes: list[int]  # draft node indices on the accepted path, root to leaf
    tokens: list[int]  # the accepted draft tokens followed by the bonus token (len = len(accepted_nodes) + 1)


def accept_greedy(draft: Draft, target_argmax: torch.Tensor) -> Acceptance:
    """The longest draft path plain greedy decoding would have produced, then the target's next token.

    ``target_argmax``: [1 + n] the target's argmax id at every row. Every matching path is a prefix of the
    greedy continuation, so equally deep matches (possible only under duplicate siblings) carry the same
    tokens; the first in index order wins.
    """
    argmax = target_argmax.tolist()
    _check_rows(draft, len(argmax))
    depth = [0] * len(draft)  # [n] depth of node i when its whole path matches, else 0
    best = -1
    for i, (tok, par) in enumerate(zip(draft.tokens.tolist(), draft.parents.tolist())):
        if tok == argmax[par + 1] and (par < 0 or depth[par]):
            depth[i] = 1 + (depth[par] if par >= 0 else 0)
            if best < 0 or depth[i] > depth[best]:
                best = i
    return _result(draft, draft.path_to(best), argmax[best + 1])


def accept_chain_sampled(
    draft_tokens: Sequence[int] | np.ndarray,
    q: torch.Tensor | None,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> Acceptance:
    """Standard speculative sampling (Leviathan et al., Chen et al.) of a chain.

    ``draft_tokens``: [n]; ``q``: [n, V] the law each drafted token was sampled from (None: point masses,
    for a chain that was not sampled); ``p``: [n + 1, V] the target's. A chain is a tree with one child per
    level, for which the tree rule is exactly theirs: accept x_i w.p. min(1, p_i(x_i) / q_i(x_i)), else
    emit a draw from norm(max(p_i - q_i, 0)); when all are accepted the bonus comes from p_n.
    """
    return accept_tree_sampled(Draft.chain(draft_tokens, q), p, generator)


def accept_tree_sampled(draft: Draft, p: torch.Tensor, generator: torch.Generator | None) -> Acceptance:
    """Multi-draft recursive rejection sampling over a tree (SpecInfer), siblings without replacement.

    ``p``: [1 + n, V] the target's probabilities per row; ``generator`` lives on ``p``'s device. At the
    current row r = p[row], the children are tried in index order, each against the law it was drawn from
    (:func:`_proposals`): accept x w.p. min(1, r(x) / q(x)), else r <- residual(r, q). Whatever the next
    sibling's proposal, each such step leaves the law of the emitted token equal to r, so the walk is exact.
    An accepted child is descended into; when every child is rejected (or there are none) the bonus is drawn
    from what is left of r.
    """
    _check_rows(draft, p.shape[0])
    children = draft.children()
    u = torch.rand(len(draft), generator=generator, device=p.device).tolist()  # [n] one uniform per node
    nodes: list[int] = []
    row = 0
    while True:
        r = p[row]  # [V]
        for c, x, q in _proposals(draft, children[row], r):
            if u[c] * float(q[x]) < float(r[x]):  # u < r(x) / q(x), always when r(x) >= q(x)
                nodes.append(c)
                row = c + 1
                break
            r = residual(r, q)
        else:
            bonus = torch.multinomial(r, 1, generator=generator)
            return _result(draft, nodes, int(bonus))


def residual(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[V] norm(max(r - q, 0)): the target's law of the next token given that a draw from q was rejected.

    Zero mass means r <= q everywhere. Both being distributions, they then agree up to rounding and the
    rejection that led here had probability O(eps), so the exact residual is 0/0. Returning r keeps the
    emitted law within O(eps) of the target and, unlike a uniform fallback, never leaves r's support (a
    token the target filtered out, e.g. by top-k, stays impossible). Under a point-mass q = one-hot(x) this
    is "r with x zeroed"; its zero-mass case means r is all on x, which then is the right token to emit.
    """
    res = (r - q).clamp_min_(0.0)
    mass = float(res.sum())
    return res.div_(mass) if mass > 0 else r


def _proposals(
    draft: Draft, siblings: list[int], like: torch.Tensor
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(node, token, [V] the law the token was drawn from) for each sibling, in index order, lazily.

    Without ``draft.q`` each node is a point mass at its token, exact for any tree chosen independently of
    the acceptance's randomness. With it, each node's own row is the law it was drawn from, and siblings
    whose row equals the previous sibling's were drawn from that row without replacement: the law of a
    later one is the row without the earlier siblings' tokens, renormalised. A sibling with a different
    row was drawn from that row independently of the earlier ones (as a fresh proposal, SpecInfer's
    multi-step rule), so it is tested against its row as is.
    """
    tokens = draft.tokens[siblings].tolist()
    if draft.q is None:
        for c, x in zip(siblings, tokens):
            point = torch.zeros_like(like)
            point[x] = 1.0
            yield c, x, point
        return
    row = q = None
    for c, x in zip(siblings, tokens):
        if row is None or not torch.equal(draft.q[c], row):
            row = draft.q[c]
            q = row.to(like)
        q = q / float(q.sum())
        if not float(q[x]) > 0:  # also NaN, when earlier siblings took all the mass
            raise ValueError(f"draft node {c}: its token {x} has proposal probability 0 (drafter bug)")
        yield c, x, q
        q = q.clone()
        q[x] = 0.0


def _check_rows(draft: Draft, rows: int) -> None:
    if rows != len(draft) + 1:
        raise ValueError(f"expected {len(draft) + 1} target rows (pending token + nodes), got {rows}")


def _result(draft: Draft, nodes: list[int], bonus: int) -> Acceptance:
    tokens = draft.tokens[np.asarray(nodes, np.int64)].tolist()
    return Acceptance(list(nodes), tokens + [int(bonus)])


# --- MTAD (approximate by design: NOT the target's distribution) ---------------------------------------------
# MTAD judges a drafted prefix by its joint likelihood ratio instead of token by token. Both rules are
# deterministic given the draft; only the bonus token is random. ``logp`` rows are log warp(target logits) (the
# same temperature / top-k / top-p as the drafter's q), ``logq`` the drafter's log q of each drafted token.


def accept_mtad(
    tokens: Sequence[int] | np.ndarray,
    logq: Sequence[float] | np.ndarray,
    logp: torch.Tensor,
    tau: float,
    generator: torch.Generator | None,
) -> Acceptance:
    """MTAD's chain rule: the longest prefix whose joint ratio passes, then one token sampled from the target.

    ``tokens``: [n]; ``logq``: [n]; ``logp``: [n + 1, V]. Accepts ``acc = max{d : sum_{i<=d} log p(x_i) -
    log q(x_i) > log tau}`` (0 when none passes); shorter prefixes need not pass. The bonus is a plain draw from
    ``p`` at row ``acc`` (no residual: this is why the output is biased toward high joint likelihood). With
    one-hot ``p`` and ``q`` (temperature 0) and ``tau < 1`` it is exactly :func:`accept_greedy` on the chain.
    """
    return accept_mmtad(Draft.chain(tokens), logp, logq, tau, generator)


def accept_mmtad(
    draft: Draft,
    logp: torch.Tensor,
    logq: Sequence[float] | np.ndarray,
    tau: float,
    generator: torch.Generator | None,
) -> Acceptance:
    """MMTAD's tree rule: at the deepest depth where any node's path passes, the path the target likes best.

    ``logp``: [1 + n, V] (row 0 the pending token, row i + 1 node i); ``logq``: [n] per node. A node passes when
    its root-to-node sum of ``log p - log q`` exceeds ``log tau``; among the passing nodes of the deepest depth
    the one with the highest target log-probability of its path wins (first in index order on ties). The bonus
    is drawn from ``p`` at the winner's row (row 0 when nothing passes). On a chain this is :func:`accept_mtad`.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    _check_rows(draft, logp.shape[0])
    logq = np.asarray(logq, np.float64).reshape(-1)
    if len(logq) != len(draft):
        raise ValueError(f"logq has {len(logq)} entries for {len(draft)} nodes")
    rows, cols = torch.from_numpy(draft.parents + 1), torch.from_numpy(draft.tokens)
    lp = logp[rows, cols].double().numpy()  # [n] log p of each node's token given its path
    ratio, joint = np.zeros(len(draft)), np.zeros(len(draft))  # [n] path sums of log p - log q and of log p
    for i, par in enumerate(draft.parents.tolist()):
        ratio[i] = (ratio[par] if par >= 0 else 0.0) + lp[i] - logq[i]
        joint[i] = (joint[par] if par >= 0 else 0.0) + lp[i]
    with np.errstate(invalid="ignore"):
        passing = ratio > np.log(tau)  # NaN (-inf - -inf) never passes
    best = -1
    if passing.any():
        depths = draft.depths()
        deepest = np.flatnonzero(passing & (depths == depths[passing].max()))
        best = int(deepest[np.argmax(joint[deepest])])
    bonus = torch.multinomial(logp[best + 1].exp(), 1, generator=generator)
    return _result(draft, draft.path_to(best), int(bonus))
