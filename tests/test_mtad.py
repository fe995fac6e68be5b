"""MTAD / MMTAD: the joint-ratio rules against tables, beam sampling against brute force, the draft model's
tree cache against fresh forwards, and the engine's ends (draft == target accepts all, tau = inf is plain
sampling in distribution, temperature 0 is plain greedy, seeded runs repeat)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from actors.acceptance import accept_greedy, accept_mmtad, accept_mtad
from actors.draft import Draft
from actors.drafter import Feedback, NoDrafter
from actors.engine import Engine
from actors.methods import METHODS, MethodUnavailable, make_drafter
from actors.mtad import BeamTree, MtadDrafter, beam_sample
from actors.sampling import SamplingParams, warp
from actors.sd import sync_rows
from specd_testing import exact_pair_distribution

NEG = -math.inf
V = 4


def _onehot_logp(rows: list[int], vocab: int = V) -> torch.Tensor:
    """[len(rows), vocab] log p with all mass on the given token per row (a deterministic bonus)."""
    lp = torch.full((len(rows), vocab), NEG)
    lp[torch.arange(len(rows)), torch.tensor(rows)] = 0.0
    return lp


def _logp(table: list[list[float]]) -> torch.Tensor:
    return torch.tensor(table).log()


# --- acceptance tables --------------------------------------------------------------------------------------

# Chain x = [0, 1, 2]; target rows p(. | prefix) and the draft's q of each drafted token.
P_ROWS = [[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1], [0.05, 0.05, 0.8, 0.1], [0.25, 0.25, 0.25, 0.25]]
CHAIN = [0, 1, 2]


def _log32(values) -> np.ndarray:
    """log in float32, as the target's rows are: equal probabilities give exactly equal logs."""
    return torch.tensor(values, dtype=torch.float32).log().double().numpy()


def _bonus(logp: torch.Tensor, row: int, seed: int) -> int:
    """The rule's single draw: one multinomial from ``p`` at ``row`` on a fresh generator."""
    return int(torch.multinomial(logp[row].exp(), 1, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("q, tau, accepted", [
    ([0.5, 0.1, 0.8], 0.5, 3),   # ratios 1, 1, 1: everything passes
    ([0.5, 0.4, 0.8], 0.5, 1),   # cumulative ratios 1, .25, .25: only d = 1 passes
    ([0.5, 0.4, 0.1], 0.5, 3),   # 1, .25, 2: d = 3 passes though d = 2 fails (shorter prefixes need not pass)
    ([0.9, 0.4, 0.8], 0.6, 0),   # .56, .14, .14: nothing passes
    ([0.5, 0.1, 0.8], 1.0, 0),   # a ratio of exactly 1 is not > 1
    ([0.5, 0.1, 0.8], math.inf, 0),
])
def test_accept_mtad_table(q, tau, accepted):
    lp = _logp(P_ROWS)
    for seed in range(3):
        acc = accept_mtad(CHAIN, _log32(q), lp, tau, torch.Generator().manual_seed(seed))
        assert acc.accepted_nodes == list(range(accepted))
        assert acc.tokens == CHAIN[:accepted] + [_bonus(lp, accepted, seed)]


def test_accept_mtad_bonus_is_drawn_from_p_at_acc():
    lp = _logp(P_ROWS)  # ratios 1, .25, ...: acc = 1, bonus from row 1 (no residual: token 1 may come again)
    gen = torch.Generator().manual_seed(0)
    bonus = [accept_mtad(CHAIN, _log32([0.5, 0.4, 0.8]), lp, 0.5, gen).tokens[1] for _ in range(4000)]
    counts = np.bincount(bonus, minlength=V)
    assert chisquare(counts, np.array(P_ROWS[1]) * 4000).pvalue > 1e-3


# Tree: depth 1 = nodes 0 (token 0), 1 (token 1); depth 2 = node 2 (token 2, under 0), node 3 (token 3, under 1),
# node 4 (token 1, under 1). Rows: 0 pending, 1 after node 0, 2 after node 1; the rest only give bonuses.
TREE = Draft(np.array([0, 1, 2, 3, 1]), np.array([-1, -1, 0, 1, 1]))
TREE_P = [[0.4, 0.4, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3], [0.1, 0.3, 0.1, 0.5]] + [[0.25] * 4] * 3


@pytest.mark.parametrize("q, tau, path", [
    # node ratios: 0: .4/q0, 1: .4/q1, 2: r0 * .3/q2, 3: r1 * .5/q3, 4: r1 * .3/q4; path joint p: .12, .2, .12
    ([.4, .4, .3, .5, .3], 0.5, [1, 3]),   # all pass at depth 2: the highest target joint wins
    ([.4, .4, .3, .9, .9], 0.6, [0, 2]),   # only node 2 passes at depth 2
    ([.4, .4, .99, .99, .99], 0.6, [0]),   # depth 1 only: nodes 0 and 1 tie on joint p, the first wins
    ([.9, .4, .9, .9, .9], 0.7, [1]),      # depth 1 only, node 1 alone
    ([.9, .9, .1, .9, .9], 0.5, [0, 2]),   # node 2 passes though its parent fails
    ([.9, .9, .9, .9, .9], 0.5, []),
])
def test_accept_mmtad_table(q, tau, path):
    lp = _logp(TREE_P)
    acc = accept_mmtad(TREE, lp, _log32(q), tau, torch.Generator().manual_seed(4))
    assert acc.accepted_nodes == path
    assert acc.tokens == TREE.tokens[path].tolist() + [_bonus(lp, path[-1] + 1 if path else 0, 4)]


def test_mmtad_on_a_chain_is_mtad_and_temperature_zero_is_greedy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 5))
        tokens = rng.integers(0, V, n)
        argmax = rng.integers(0, V, n + 1)
        if n and rng.random() < 0.5:
            argmax[: n] = tokens  # often right, so long accepts happen
        lp = _onehot_logp(argmax.tolist())  # temperature 0: p and q are one-hots, q's log is 0 on its token
        gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        chain = accept_mtad(tokens, np.zeros(n), lp, 0.5, gen_a)
        assert chain == accept_mmtad(Draft.chain(tokens), lp, np.zeros(n), 0.5, gen_b)
        assert chain == accept_greedy(Draft.chain(tokens), torch.from_numpy(argmax))


def test_rules_reject_bad_inputs():
    with pytest.raises(ValueError, match="tau"):
        accept_mtad([0], [0.0], _onehot_logp([0, 0]), 0.0, None)
    with pytest.raises(ValueError, match="logq"):
        accept_mmtad(TREE, _logp(TREE_P), [0.0], 0.5, None)
    with pytest.raises(ValueError, match="rows"):
        accept_mtad([0, 1], [0.0, 0.0], _onehot_logp([0, 0]), 0.5, None)


# --- beam sampling ------------------------------------------------------------------------------------------

def _prefix_logq(prefix: tuple[int, ...], vocab: int = 5) -> torch.Tensor:
    """[vocab] a fixed log q for every prefix, with zeros (top-k-like filtering) that depend on it."""
    rng = np.random.default_rng(hash(prefix) % (1 << 32))
    q = rng.dirichlet(np.ones(vocab))
    q[rng.choice(vocab, 2, replace=False)] = 0.0
    return torch.tensor(q / q.sum()).log()


@pytest.mark.parametrize("gamma, width", [(2, 3), (3, 3), (3, 1), (3, 10)])
def test_beam_weights_match_brute_force_enumeration(gamma, width):
    # Every sequence of up to gamma tokens and its exact summed log q.
    exact = {}
    for d in range(1, gamma + 1):
        for seq in itertools.product(range(5), repeat=d):
            exact[seq] = sum(float(_prefix_logq(seq[:i])[seq[i]]) for i in range(d))

    def expand(tree: BeamTree, nodes: list[int]) -> torch.Tensor:
        return torch.stack([_prefix_logq(tuple(tree.tokens[a] for a in tree.path(v))) for v in nodes])

    for seed in range(20):
        tree = beam_sample(_prefix_logq(()), expand, gamma, width, torch.Generator().manual_seed(seed))
        seqs = [tuple(tree.tokens[a] for a in tree.path(v)) for v in range(len(tree.tokens))]
        for v, seq in enumerate(seqs):
            assert tree.weights[v] == pytest.approx(exact[seq], abs=1e-9)
            assert tree.logq[v] == pytest.approx(float(_prefix_logq(seq[:-1])[seq[-1]]), abs=1e-9)
            assert math.isfinite(tree.weights[v])  # never a q = 0 token
        assert len(set(seqs)) == len(seqs)  # without replacement: no duplicate beams
        finite = sum(math.isfinite(w) for s, w in exact.items() if len(s) == 1)
        assert [tree.depths.count(d) for d in range(1, gamma + 1)][0] == min(width, finite)
        assert all(tree.depths[b] == gamma for b in tree.beams) and len(tree.beams) <= width
        assert tree.weights[tree.best_chain()[-1]] == max(tree.weights[b] for b in tree.beams)


def test_beam_sampling_first_step_follows_q():
    """With one beam, beam sampling is ancestral sampling: the first token follows q."""
    q0 = _prefix_logq(())
    gen = torch.Generator().manual_seed(0)
    first = [beam_sample(q0, None, 1, 1, gen).tokens[0] for _ in range(3000)]
    counts = np.bincount(first, minlength=5)
    keep = q0.exp().numpy() > 0
    assert counts[~keep].sum() == 0
    assert chisquare(counts[keep], q0.exp().numpy()[keep] * 3000).pvalue > 1e-3


# --- the drafter on tiny models -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(target):
    return Engine(target)


def _fresh_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("keep_all", [False, True])
def test_drafted_log_q_matches_fresh_forwards(aux, keep_all):
    """Each node's log q (tree-masked draft forwards) equals warp of a fresh forward over its whole path."""
    params = SamplingParams(temperature=1.0, top_k=3, seed=5)
    drafter = MtadDrafter(aux.model, gamma=3, beam_width=3, keep_all_beams=keep_all)
    drafter.start("r", [1, 2], params)
    context = [1, 2, 3, 4, 5]
    draft = drafter.propose("r", np.array(context), 64)
    assert 3 <= len(draft) <= 9 if keep_all else len(draft) == 3
    for i in range(len(draft)):
        path = draft.tokens[draft.path_to(i)].tolist()
        logq = warp(_fresh_logits(aux.model, context + path[:-1]), params).log()[path[-1]]
        assert draft.logq[i] == pytest.approx(float(logq), abs=1e-4)
        assert draft.info["beam_weight"][i] == pytest.approx(
            sum(draft.logq[j] for j in draft.path_to(i)), abs=1e-9)


@pytest.mark.parametrize("keep_all", [False, True])
def test_draft_cache_rollback_matches_fresh_forward(aux, keep_all):
    params = SamplingParams(temperature=1.0, top_k=4, seed=1)
    drafter = MtadDrafter(aux.model, gamma=4, beam_width=3, keep_all_beams=keep_all)
    drafter.start("r", [7], params)
    context = [7, 8, 9]
    for step in range(4):
        draft = drafter.propose("r", np.array(context), 64)
        leaf = len(draft) - 1 if step % 2 else max(0, len(draft) - 2)  # a full path, or one cut short
        accepted = draft.path_to(leaf)[: 1 + step % 3]
        new = draft.tokens[accepted].tolist() + [11 + step]
        drafter.observe("r", Feedback(draft, accepted, new))
        slot = drafter._requests["r"].slot
        assert slot.ids == context + new[: len(slot.ids) - len(context)]
        context += new
        synced = sync_rows(drafter.kv, [(slot, context)], 1)[0]
        torch.testing.assert_close(synced, _fresh_logits(aux.model, context), atol=1e-4, rtol=1e-4)


def test_mmtad_tree_verified_in_one_forward_matches_separate_forwards(target, aux):
    from actors.verifier import Verifier

    params = SamplingParams(temperature=1.0, top_k=3, seed=2)
    drafter = MtadDrafter(aux.model, gamma=3, beam_width=3, keep_all_beams=True)
    drafter.start("r", [3, 1, 4], params)
    draft = drafter.propose("r", np.array([3, 1, 4, 1, 5]), 64)
    assert not draft.is_chain
    verifier = Verifier(target.model)
    seq = verifier.start([3, 1, 4, 1, 5])
    rows = torch.log_softmax(verifier.verify([(seq, draft)])[0], -1)  # [1 + n, V]
    for r in range(len(draft) + 1):
        path = draft.tokens[draft.path_to(r - 1)].tolist() if r else []
        fresh = torch.log_softmax(_fresh_logits(target.model, [3, 1, 4, 1, 5] + path), -1)
        torch.testing.assert_close(rows[r], fresh, atol=1e-4, rtol=1e-4)


# --- the engine ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["mtad", "mmtad"])
def test_draft_equal_to_target_accepts_everything(engine, target, method):
    drafter = make_drafter(method, target, target, gamma=4, beam_width=3)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0, ignore_eos=True)
    out = engine.run([5, 6, 7], params, drafter)
    assert out.stats.target_forwards == 6  # 5 tokens per step: gamma accepted + the bonus
    assert out.stats.accepted_per_position == [6, 6, 6, 6]
    assert out.stats.lossless is False


def test_infinite_tau_accepts_nothing_and_samples_the_target(engine, target, aux):
    """tau = inf: the first two tokens follow the target's own law (chi-square over the top_k^2 pairs)."""
    params = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=3, ignore_eos=True)
    prompt = [5, 17, 99]
    cells, expected = exact_pair_distribution(target.model, prompt, params)
    drafter = make_drafter("mtad", target, aux, gamma=1, beam_width=2, tau=math.inf)
    n = 1500  # 16 decoding at a time, each its own seed
    outs = engine.run_many([prompt] * n, [params.model_copy(update={"seed": s}) for s in range(n)], drafter, 16)
    pairs = [tuple(out.token_ids) for out in outs]
    assert sum(out.stats.accepted_tokens for out in outs) == 0
    observed = [pairs.count(c) for c in cells]
    assert sum(observed) == n
    expected = np.array(expected) / np.sum(expected) * n  # float32 rows: the exact law sums to 1 +- 1e-7
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("method", ["mtad", "mmtad"])
def test_infinite_tau_is_plain_sampling_seed_for_seed(engine, target, aux, method):
    """tau = inf draws one token per step from p, with the target's generator: exactly what ar draws."""
    drafter = make_drafter(method, target, aux, gamma=3, beam_width=3, tau=math.inf)
    for s in range(25):
        params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=s, ignore_eos=True)
        out = engine.run([1, 2, s], params, drafter)
        assert out.token_ids == engine.run([1, 2, s], params, NoDrafter()).token_ids
        assert out.stats.accepted_tokens == 0 and out.stats.drafted_tokens > 0


@pytest.mark.parametrize("method", ["mtad", "mmtad"])
def test_temperature_zero_is_plain_greedy(engine, target, aux, method):
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    for prompt in ([1, 2, 3], [200, 13]):
        ar = engine.run(prompt, params, NoDrafter())
        assert engine.run(prompt, params, make_drafter(method, target, aux)).token_ids == ar.token_ids


@pytest.mark.parametrize("method", ["mtad", "mmtad"])
def test_seeded_runs_repeat(engine, target, aux, method):
    params = SamplingParams(max_new_tokens=25, temperature=0.9, top_p=0.9, seed=123, ignore_eos=True)
    drafter = make_drafter(method, target, aux, gamma=3, beam_width=3)
    a = engine.run([1, 2, 3], params, drafter)
    assert engine.run([1, 2, 3], params, drafter).token_ids == a.token_ids
    assert engine.run([1, 2, 3], params.model_copy(update={"seed": 124}), drafter).token_ids != a.token_ids
    assert a.stats.lossless is False


def test_methods_registry(target):
    assert METHODS["mtad"][0] is False and METHODS["mmtad"][0] is False
    with pytest.raises(MethodUnavailable, match="needs a draft model"):
        make_drafter("mmtad", target)
    with pytest.raises(ValueError, match="tau"):
        MtadDrafter(target.model, tau=0)


def test_cli_generate_json_says_approximate(capsys):
    from specd.cli import main

    code = main(["generate", "--model", "tiny-llama", "--draft-model", "tiny-llama:1", "--no-chat", "--json",
                 "--max-new-tokens", "8", "--method", "mmtad", "--temperature", "1", "--seed", "0", "--tau", "0.3",
                 "--beam-width", "2", "hi"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["stats"]["lossless"] is False and out["stats"]["method"] == "mmtad"
    assert out["stats"]["new_tokens"] == 8
