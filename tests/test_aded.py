"""ADED drafter: matrix, adaptation, search, budget, suffix matching, concurrency, simulator."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch

from actors.aded.budget import SUFFIX, BudgetConfig, Calibrator, choose_budget
from actors.aded.drafter import AdedConfig, AdedDrafter
from actors.aded.mcts import MctsConfig, mcts_paths, run_mcts
from actors.aded.ngram import NGramConfig, NGramModel
from actors.aded.recycle import RecycleConfig, Recycler
from actors.aded.simulator import PromptLookupDrafter, Trace, accepted_path, replay
from actors.aded.suffix import SuffixConfig, suffix_chains
from actors.aded.trigram import TrigramMatrix, build_matrix
from actors.cost import CostModel, smollm2_cpu_cost
from actors.draft import Draft
from actors.drafter import Drafter, Feedback
from actors.sampling import SamplingParams
from shared_state import MemoryStore, StoreConfig

V = 64


def _streams(seed: int = 0, n: int = 20, length: int = 400) -> list[np.ndarray]:
    """Markov-ish token streams: a deterministic successor most of the time, noise otherwise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = [int(rng.integers(V)), int(rng.integers(V))]
        for _ in range(length):
            s.append((s[-1] * 7 + s[-2]) % V if rng.random() < 0.7 else int(rng.integers(V)))
        out.append(np.array(s))
    return out


@pytest.fixture(scope="module")
def matrix() -> TrigramMatrix:
    return build_matrix(_streams(), V, top_k=6, progress=False)


def _store() -> MemoryStore:
    return MemoryStore(StoreConfig(namespace="test"))


def _drafter(matrix, **config) -> AdedDrafter:
    return AdedDrafter(matrix, _store(), AdedConfig(**config), smollm2_cpu_cost())


def test_matrix_counts_and_round_trip(matrix, tmp_path):
    counts = Counter()
    for s in _streams():
        counts.update(zip(s[:-2].tolist(), s[1:-1].tolist(), s[2:].tolist()))
    (a, b, _), _ = counts.most_common(1)[0]
    row = {c: n for (x, y, c), n in counts.items() if (x, y) == (a, b)}
    ids, probs = matrix.pair_successors(a, b)
    total = sum(row.values())
    assert len(ids) == min(6, len(row))
    assert np.allclose(probs, [row[c] / total for c in ids.tolist()])
    assert list(probs) == sorted(probs, reverse=True)
    assert sorted(row.values(), reverse=True)[: len(ids)] == [row[c] for c in ids.tolist()]
    assert matrix.pair_successors(V + 3, 0)[0].size == 0  # out of vocabulary: unseen, never aliased
    assert matrix.bigram_successors(b)[0].size > 0

    path = tmp_path / "m.safetensors"
    matrix.save(path)
    loaded = TrigramMatrix.load(path)
    assert (loaded.vocab_size, loaded.top_k) == (matrix.vocab_size, matrix.top_k)
    for name in ("pair_keys", "pair_offsets", "pair_succ", "pair_probs", "pair_totals", "bi_offsets", "bi_succ"):
        assert np.array_equal(getattr(loaded, name), getattr(matrix, name)), name


def test_drafter_satisfies_protocol(matrix):
    assert isinstance(_drafter(matrix), Drafter)


def test_topk_feedback_changes_the_draft(matrix):
    # Free verification: the budget keeps every candidate, so the draft shows the ranking itself.
    drafter = AdedDrafter(matrix, _store(), AdedConfig(suffix=SuffixConfig(enabled=False)), CostModel.flat())
    drafter.start("r", [1, 2, 3], SamplingParams())
    ctx = np.array([1, 2, 3, 5, 9])
    before = drafter.propose("r", ctx, 16)
    target = 41 if 41 not in before.tokens[:1] else 42
    topk = torch.full((1 + len(before), 4), -1)
    topk[0, 0] = target  # the target's argmax after (5, 9)
    drafter.observe("r", Feedback(before, [], [target], topk))
    after = drafter.propose("r", ctx, 16)
    assert after.tokens[0] == target and after.parents[0] == -1


def test_verified_trigrams_fold_once(matrix):
    store = _store()
    drafter = AdedDrafter(matrix, store, AdedConfig(target_topk=0), smollm2_cpu_cost())
    drafter.start("r", [7, 8, 9], SamplingParams())
    for n in range(4, 8):  # the context grows one token at a time; (7, 8, 9) is seen on every step
        drafter.propose("r", np.array([7, 8, 9, 7, 8, 9, 7][:n]), 8)
    assert store.successors(7, 8) == {9: pytest.approx(0.08)}  # twice in the context: +0.04 each
    assert store.successors(8, 9) == {7: pytest.approx(0.08)}


def test_mcts_invariants(matrix):
    model = NGramModel(matrix, _store(), NGramConfig())
    (a, b) = (int(_streams()[0][0]), int(_streams()[0][1]))
    config = MctsConfig(simulations=60)
    t = run_mcts(model.memo(), a, b, config, np.random.default_rng(0))
    assert t.visits[0] == 60
    for node in range(t.size):  # a node's visits = its own leaf evaluations + its children's visits
        lo, hi = t.child_lo[node], t.child_hi[node]
        if lo >= 0:
            assert t.visits[node] >= t.visits[lo:hi].sum() >= t.visits[node] - 1
    assert t.depth[: t.size].max() <= config.max_depth
    paths = mcts_paths(model.memo(), a, b, config, np.random.default_rng(0))
    assert all(parent < i for i, (parent, _, _) in enumerate(paths))
    assert all(conf <= paths[parent][2] for parent, _, conf in paths if parent >= 0)
    assert paths == mcts_paths(model.memo(), a, b, config, np.random.default_rng(0))


@pytest.mark.parametrize("search", ["best_first", "mcts"])
def test_draft_respects_budget_and_seed(matrix, search):
    drafts = []
    for _ in range(2):
        drafter = _drafter(matrix, search=search, budget=BudgetConfig(ngram_prior_scale=1.0),
                           mcts=MctsConfig(simulations=40))
        drafter.start("r", [1, 2], SamplingParams(seed=3))
        drafts.append(drafter.propose("r", np.array(_streams()[1][:50]), 5))
    d = drafts[0]
    assert 0 < len(d) <= 5
    assert np.all(d.parents < np.arange(len(d)))
    assert np.array_equal(d.tokens, drafts[1].tokens) and np.array_equal(d.parents, drafts[1].parents)


def test_budget_rule():
    rel = np.array([smollm2_cpu_cost().relative(1 + n, 170) for n in range(33)])
    assert choose_budget(np.zeros(32), rel) == 0
    assert choose_budget(np.array([0.3] + [0.0] * 31), rel) == 0  # 1.3 tokens for 1.46x the cost
    assert choose_budget(np.full(32, 0.95), rel) > 4
    flat = np.ones(33)
    assert choose_budget(np.full(32, 0.01), flat) == 32  # free verification: draft everything


def test_drafter_stops_drafting_when_nothing_is_accepted(matrix):
    drafter = _drafter(matrix, target_topk=0, budget=BudgetConfig(suffix_prior=(0.95,)))
    drafter.start("r", [1, 2], SamplingParams())
    ctx = np.array([3, 4, 5, 6, 7, 8, 9, 10] * 3)  # a long suffix match: confident at first
    first = drafter.propose("r", ctx, 32)
    assert len(first) > 0
    for _ in range(200):
        d = drafter.propose("r", ctx, 32)
        if not len(d):
            break
        drafter.observe("r", Feedback(d, [], [0]))
    assert len(drafter.propose("r", ctx, 32)) == 0


def test_calibrator_learns_per_bucket():
    cal = Calibrator(BudgetConfig(prior_strength=1.0, ema_decay=1.0))
    b = cal.chain_bucket(SUFFIX, 4, 1)
    cal.update(np.array([b] * 99), np.ones(99, bool))
    assert cal.estimates()[b] > 0.95
    assert cal.estimates()[cal.chain_bucket(SUFFIX, 4, 2)] == pytest.approx(cal.prior[cal.chain_bucket(SUFFIX, 4, 2)])


def test_suffix_matching_finds_repeated_span():
    span = [11, 12, 13, 14, 15, 16]
    ctx = np.array([1, 2] + span + [3, 4, 5, 11, 12, 13])
    chains = suffix_chains(ctx, SuffixConfig(max_chains=2))
    match, cont = chains[0]
    assert match == 3 and cont.tolist() == [14, 15, 16, 3, 4, 5, 11, 12, 13]


def test_suffix_chain_reaches_the_draft(matrix):
    drafter = _drafter(matrix, search="none", budget=BudgetConfig(suffix_prior=(0.95,)))
    drafter.start("r", [], SamplingParams())
    d = drafter.propose("r", np.array([50, 51, 52, 53, 54, 55, 9, 50, 51, 52]), 8)
    assert d.tokens[:3].tolist() == [53, 54, 55] and d.is_chain


def test_concurrent_adaptation_loses_no_counts(matrix):
    store = MemoryStore(StoreConfig(namespace="t", cap=1e9, top_k=64))
    drafter = AdedDrafter(matrix, store, AdedConfig(adapt={"verified_delta": 1.0, "topk_weights": (1.0,)}),
                          smollm2_cpu_cost())
    threads, steps = 8, 40

    def work(t: int) -> None:
        for i in range(steps):
            rid = f"req-{t}-{i}"
            drafter.start(rid, [5, 6, 7], SamplingParams())  # shared tri-gram (5, 6, 7)
            d = drafter.propose(rid, np.array([5, 6, 7, 1000 + t, 2000 + t]), 8)
            topk = torch.full((1 + len(d), 1), -1)
            topk[0, 0] = 9  # the target's argmax after the pending state (1000 + t, 2000 + t)
            drafter.observe(rid, Feedback(d, [], [9], topk))
            drafter.finish(rid)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert store.successors(5, 6) == {7: threads * steps}
    assert store.successors(6, 7) == {1000 + t: steps for t in range(threads)}
    for t in range(threads):
        assert store.successors(7, 1000 + t) == {2000 + t: steps}
        assert store.successors(1000 + t, 2000 + t) == {9: steps}
    assert not drafter._requests


def test_simulator_replays_a_repetitive_trace(matrix):
    out = [5, 6, 7, 8] * 10
    trace = Trace(prompt_ids=[5, 6, 7, 8, 5, 6, 7, 8], output_ids=out)
    res = replay(_drafter(matrix), [trace], smollm2_cpu_cost())
    assert res.tokens == len(out) - 1
    assert res.tokens_per_forward > 2.0 and res.speedup > 1.0
    d = Draft(np.array([6, 9, 7]), np.array([-1, -1, 0]))
    assert accepted_path(d, np.array([6, 7, 8])) == [0, 2]


def test_default_matrix_from_files_and_cached_generation(tmp_path, monkeypatch):
    from actors.aded import corpus
    from actors.tiny import tiny_tokenizer

    monkeypatch.setenv("SPECD_CACHE_DIR", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "chat.jsonl").write_text('{"text": "hello world"}\n{"prompt": "hi", "response": "hello there"}\n')
    calls = []

    def generate(prompt: str) -> str:
        calls.append(prompt)
        return "def add(a, b): return a + b"

    kwargs = dict(sources=[tmp_path / "src", tmp_path / "chat.jsonl"], prompts=corpus.CORPUS_PROMPTS[:3],
                  include_stdlib=False,
                  include_package_docs=False, progress=False)
    for _ in range(2):
        m = corpus.build_default_matrix(tok, "tiny", generate_fn=generate, **kwargs)
    assert len(calls) == 3  # the second build reads the cached answers
    assert corpus.default_matrix_path("tiny").exists()
    ids = tok("return a", add_special_tokens=False)["input_ids"]
    succ, _ = m.pair_successors(ids[-2], ids[-1])
    assert tok.convert_tokens_to_ids(tok.tokenize(" "))[0] in succ.tolist()
    assert TrigramMatrix.load(corpus.default_matrix_path("tiny")).num_pairs == m.num_pairs


def test_make_aded_drafter_checks_the_tokenizer(matrix, tmp_path):
    from types import SimpleNamespace

    from actors.aded import make_aded_drafter

    path = tmp_path / "m.safetensors"
    TrigramMatrix(**{**matrix.__dict__, "identity": "tok-a"}).save(path)
    drafter = make_aded_drafter(SimpleNamespace(identity="tok-a", name="t"), matrix_path=path,
                                cost_model=CostModel.flat(), config={"search": "mcts"})
    assert drafter.config.search == "mcts" and drafter.matrix.num_pairs == matrix.num_pairs
    with pytest.raises(ValueError, match="tokenizer"):
        make_aded_drafter(SimpleNamespace(identity="tok-b", name="t"), matrix_path=path, cost_model=CostModel.flat())
    with pytest.raises(FileNotFoundError, match="ngrams build"):
        make_aded_drafter(SimpleNamespace(identity="tok-a", name="t"), matrix_path=tmp_path / "none.safetensors")


def test_distilled_predictions_enter_the_matrix():
    from actors.aded.distill import distill_trigrams
    from actors.tiny import tiny_model

    model = tiny_model(seed=0)
    streams = [np.random.default_rng(1).integers(0, 256, 64)]
    keys, weights = distill_trigrams(model, streams, 259, top_k=1, seq_len=16, batch_size=2, progress=False)
    assert len(keys) == 4 * 15 and np.all((weights > 0) & (weights <= 1))
    x = torch.tensor(streams[0][:16])[None]
    with torch.no_grad():
        argmax = int(model(x).logits[0, 5].argmax())
    m = build_matrix([], 259, weighted_trigrams=(keys, weights), progress=False)
    assert argmax in m.pair_successors(int(x[0, 4]), int(x[0, 5]))[0].tolist()


def test_prompt_lookup_baseline_takes_the_first_match():
    d = PromptLookupDrafter(num_tokens=3)
    draft = d.propose("r", np.array([1, 2, 3, 4, 5, 9, 2, 3, 7, 2, 3]), 64)
    assert draft.tokens.tolist() == [4, 5, 9] and draft.is_chain
    assert len(d.propose("r", np.array([1, 2, 3]), 64)) == 0


def test_shipped_smollm2_traces_load():
    from actors.aded.simulator import load_traces, shipped_traces

    path = shipped_traces("237d1306abb03682")
    traces = load_traces(path)
    assert len(traces) == 20 and all(len(t.topk) == len(t.output_ids) for t in traces)
    assert shipped_traces("no-such-tokenizer") is None


def test_recycler_offers_the_newest_row_after_each_token():
    rec = Recycler(RecycleConfig(rank_probs=(0.5, 0.2, 0.1)), vocab_size=V, k=8)  # rows as long as rank_probs
    assert rec.k == 3 and rec.paths(5) == []  # nothing observed yet
    draft = np.array([11, 12, 13])  # node 1 rejected: the simulator knows no row for it
    rows = torch.tensor([[11, 20, 21, 22], [30, 31, 32, 33], [-1, -1, -1, -1], [40, 41, 42, 43]])
    rec.observe(5, draft, rows)
    nodes = rec.paths(5)
    first = [(tok, conf) for parent, tok, conf in nodes if parent == -1]
    assert first == [(11, 0.5), (20, 0.2), (21, pytest.approx(0.1))]  # row 0 follows the pending token
    below = [tok for parent, tok, _ in nodes if parent == 0]
    assert below == [30, 31, 32]  # node 11's row: keyed by its token, not by the path to it
    assert rec.successors(-1, 12) == ([], [])
    assert rec.successors(7, 13) == ([40, 41, 42], [0.5, 0.2, 0.1])  # keyed by one token: any predecessor
    rec.observe(9, np.array([13]), torch.tensor([[1, 2, 3, 4], [50, 51, 52, 53]]))
    assert rec.successors(0, 13)[0] == [50, 51, 52]  # the newest forward replaces the row
    rec.observe(13, np.zeros(0, np.int64), torch.tensor([[60]]))  # a narrower row replaces it whole
    assert rec.successors(0, 13) == ([60], [0.5])
    rec.observe(V + 5, np.zeros(0, np.int64), torch.tensor([[1, 2, 3, 4]]))  # out of vocabulary: ignored
    assert not Recycler(RecycleConfig(enabled=False), V, 8).active


def test_recycled_row_leads_the_draft_in_a_new_state(matrix):
    # The store keys the target's top-k by bigram; after (8, 9) it knows nothing of what followed (5, 9).
    config = AdedConfig(search="none", suffix=SuffixConfig(enabled=False), history={"enabled": False},
                        adapt={"topk_weights": ()})
    drafter = AdedDrafter(matrix, _store(), config, CostModel.flat())
    drafter.start("r", [1, 2, 3], SamplingParams())
    first = drafter.propose("r", np.array([1, 2, 3, 5, 9]), 16)
    assert len(first) == 0  # no source has anything yet
    topk = torch.tensor([[41, 42, 43, 44, 45, 46, 47, 48]])
    drafter.observe("r", Feedback(first, [], [41], topk))
    after = drafter.propose("r", np.array([1, 2, 3, 5, 9, 41, 8, 9]), 16)
    assert after.tokens[after.parents == -1].tolist()[:3] == [41, 42, 43]
    off = AdedDrafter(matrix, _store(), config.model_copy(update={"recycle": RecycleConfig(enabled=False)}),
                      CostModel.flat())
    assert off.target_topk == 0
