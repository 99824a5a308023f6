"""Evaluation at scale (issue "Train, evaluate, score and publish at 100M", Evaluation at scale).

- the vectorised hit matrix and every per-user metric equal a plain-Python reference on random
  rankings (empty -1 slots, users with more relevant items than K, relevant items never
  recommended), from sets or from (row, item) pairs with duplicates, in any row blocking;
- ``evaluate.targets`` gives the same users and relevant items as the per-user sets it built;
- the percentile bootstrap is seeded, independent of its memory blocking, and covers the
  population mean about as often as its level says;
- above ``evaluate.max_users`` test users, evaluate ranks one seeded sample of exactly that
  many for every side, reports intervals that bracket the point estimates and (hand-built
  case) the whole population's known figure; below it, everyone, and no interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from nightrec.core import schema, settings
from nightrec.ml import metrics
from nightrec.tasks import evaluate

K = 12
N_ITEMS = 40


def _random_case(seed: int, n_users: int = 250):
    """Rankings of distinct items with trailing -1 slots (fewer unseen items than K), and
    relevant sets of 1..30 items (often more than K), some above every recommended item
    (cold items: relevant, never recommended) and one huge index."""
    rng = np.random.default_rng(seed)
    recs = np.full((n_users, K), -1, dtype=np.int64)
    relevant = []
    for u in range(n_users):
        filled = K if u % 4 else int(rng.integers(0, K + 1))
        recs[u, :filled] = rng.choice(N_ITEMS, size=filled, replace=False)
        rel = set(rng.choice(N_ITEMS + 15, size=int(rng.integers(1, 31)), replace=False).tolist())
        if u % 17 == 0:
            rel.add(2**40)
        relevant.append(rel)
    recs[3] = -1  # a user with nothing to recommend
    return recs, relevant


def _reference(recs: np.ndarray, relevant: list[set[int]], k: int) -> dict[str, list[float]]:
    """Every metric per user, one slot at a time, from the definitions in the metrics doc."""
    out = {name: [] for name in ("recall", "precision", "hit_rate", "ndcg", "mrr", "map")}
    for row, rel in zip(recs, relevant):
        hits = [int(i) >= 0 and int(i) in rel for i in row[:k]]
        n_hits = sum(hits)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        first = next((r for r, h in enumerate(hits) if h), None)
        ap, found = 0.0, 0
        for r, h in enumerate(hits):
            if h:
                found += 1
                ap += found / (r + 1)
        out["recall"].append(n_hits / len(rel))
        out["precision"].append(n_hits / k)
        out["hit_rate"].append(float(n_hits > 0))
        out["ndcg"].append(sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h) / ideal)
        out["mrr"].append(0.0 if first is None else 1 / (first + 1))
        out["map"].append(ap / min(len(rel), k))
    return out


def _pairs(relevant: list[set[int]], seed: int) -> metrics.Relevant:
    """The same relevant items as (row, item) pairs, shuffled, each pair given twice."""
    rows = np.array([r for r, rel in enumerate(relevant) for _ in rel] * 2)
    items = np.array([i for rel in relevant for i in rel] * 2)
    order = np.random.default_rng(seed).permutation(len(rows))
    return metrics.Relevant.from_pairs(rows[order], items[order], n_rows=len(relevant))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_metrics_equal_the_reference(seed, monkeypatch):
    recs, relevant = _random_case(seed)
    assert any(len(r) > K for r in relevant) and (recs == -1).any()
    want_hits = np.array([[int(i) >= 0 and int(i) in rel for i in row]
                          for row, rel in zip(recs, relevant)])
    as_pairs = _pairs(relevant, seed)
    assert as_pairs.to_sets() == relevant
    assert (metrics.hit_matrix(recs, relevant) == want_hits).all()
    assert (metrics.hit_matrix(recs, as_pairs) == want_hits).all()
    monkeypatch.setattr(metrics, "_HIT_BLOCK_SLOTS", 3 * K)  # blocks of 3 rows
    assert (metrics.hit_matrix(recs, as_pairs) == want_hits).all()

    ks = [1, 5, K]
    per_user = metrics.user_metrics(recs, as_pairs, ks)
    means = metrics.all_metrics(recs, relevant, ks)
    assert set(per_user) == set(means) == {f"{m}_at_{k}" for m in metrics.METRICS for k in ks}
    n_rel = np.array([len(r) for r in relevant])
    for k in ks:
        ref = _reference(recs, relevant, k)
        for name, fn in metrics.METRICS.items():
            key = f"{name}_at_{k}"
            np.testing.assert_allclose(per_user[key], ref[name], rtol=1e-12, atol=1e-15)
            assert means[key] == pytest.approx(np.mean(ref[name]), rel=1e-12)
            assert fn(want_hits, n_rel, k) == pytest.approx(np.mean(ref[name]), rel=1e-12)
            assert ((per_user[key] >= 0) & (per_user[key] <= 1)).all()
    assert means[f"hit_rate_at_{K}"] > 0  # the random case has hits to find


def test_relevant_take_and_bad_input():
    _, relevant = _random_case(5, n_users=30)
    rel = metrics.Relevant.from_sets(relevant)
    rows = np.array([7, 2, 2, 29, 0])
    assert rel.take(rows).to_sets() == [relevant[r] for r in rows]
    assert len(rel.take(np.array([], dtype=np.int64))) == 0
    with pytest.raises(ValueError, match="rows of recommendations"):
        metrics.hit_matrix(np.zeros((3, 2), dtype=np.int64), relevant[:2])
    with pytest.raises(ValueError, match="at least one relevant"):
        metrics.all_metrics(np.zeros((2, 2), dtype=np.int64), [{1}, set()], [2])
    with pytest.raises(ValueError, match=">= 0"):
        metrics.Relevant.from_pairs(np.array([0]), np.array([-1]), n_rows=1)


def test_targets_match_the_per_user_sets_they_replace():
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 25
    known = pd.DataFrame({schema.USER_IDX: rng.integers(0, 40, 300),  # users 40..59: cold
                          schema.ITEM_IDX: rng.integers(0, n_items, 300),
                          schema.LABEL: np.int8(1)})
    target = pd.DataFrame({schema.USER_IDX: rng.integers(0, n_users, 400),
                           schema.ITEM_IDX: rng.integers(0, n_items, 400),  # with duplicates
                           schema.LABEL: rng.integers(0, 2, 400).astype(np.int8)})
    seen, users, rel = evaluate.targets(known, target, n_users=n_users, n_items=n_items)
    pos = target[target[schema.LABEL] == 1]
    sets = pos.groupby(schema.USER_IDX)[schema.ITEM_IDX].apply(set)
    warm = set(known[schema.USER_IDX])
    assert users.tolist() == [u for u in sets.index if u in warm]
    assert rel.to_sets() == [sets[u] for u in users]
    assert seen.shape == (n_users, n_items) and len(users) > 0
    assert not set(users) & (set(range(40, n_users)))


def test_known_as_several_frames_is_known_concatenated():
    """evaluate passes what ranking excludes as a list of frames (train + valid, the test
    events before a champion's cutoff) instead of a concatenated copy: the seen matrix, the
    users and relevant items, popularity and the known-user count are the concatenation's. A
    frame without a label column is all positives."""
    rng = np.random.default_rng(4)
    n_users, n_items = 50, 30
    frames = [pd.DataFrame({schema.USER_IDX: rng.integers(0, 35, n).astype(np.int32),
                            schema.ITEM_IDX: rng.integers(0, n_items, n).astype(np.int32)})
              for n in (200, 90, 40)]  # pairs repeat within and across the frames
    target = pd.DataFrame({schema.USER_IDX: rng.integers(0, n_users, 300),
                           schema.ITEM_IDX: rng.integers(0, n_items, 300)})
    whole = pd.concat(frames, ignore_index=True)
    seen, users, rel = evaluate.targets(frames, target, n_users=n_users, n_items=n_items)
    want_seen, want_users, want_rel = evaluate.targets(whole, target, n_users=n_users,
                                                       n_items=n_items)
    assert seen.dtype == want_seen.dtype and set(seen.data.tolist()) == {1}
    assert np.array_equal(seen.toarray(), want_seen.toarray() > 0)
    assert users.tolist() == want_users.tolist() and rel.to_sets() == want_rel.to_sets()
    assert evaluate.known_users(seen) == whole[schema.USER_IDX].nunique()
    pop = evaluate.popularity_model(frames, n_users=n_users, n_items=n_items)["item_bias"]
    assert pop.tolist() == np.bincount(whole[schema.ITEM_IDX], minlength=n_items).tolist()
    labelled = whole.assign(**{schema.LABEL: rng.integers(0, 2, len(whole)).astype(np.int8)})
    pop = evaluate.popularity_model(labelled, n_users=n_users, n_items=n_items)["item_bias"]
    pos = labelled[labelled[schema.LABEL] == 1]
    assert pop.tolist() == np.bincount(pos[schema.ITEM_IDX], minlength=n_items).tolist()
    # a pair repeated 256 times (an int8 count wraps to 0) is still seen, across frames too
    many = pd.DataFrame({schema.USER_IDX: np.full(200, 49), schema.ITEM_IDX: np.full(200, 3)})
    seen, _, _ = evaluate.targets([many, many.iloc[:56]], target, n_users=n_users,
                                  n_items=n_items)
    assert seen[49, 3] == 1 and evaluate.known_users(seen) == 1


def test_bootstrap_is_seeded_and_independent_of_its_blocking(monkeypatch):
    rng = np.random.default_rng(0)
    values = {"a": rng.random(500), "b": (rng.random(500) < 0.2).astype(float)}
    ci = metrics.bootstrap_ci(values, samples=150, level=0.9, seed=11)
    assert ci == metrics.bootstrap_ci(values, samples=150, level=0.9, seed=11)
    assert ci != metrics.bootstrap_ci(values, samples=150, level=0.9, seed=12)
    for name, (lo, hi) in ci.items():
        assert lo < values[name].mean() < hi
    monkeypatch.setattr(metrics, "_BOOTSTRAP_BLOCK_CELLS", 1700)  # 3 resamples a block
    assert metrics.bootstrap_ci(values, samples=150, level=0.9, seed=11) == ci
    # a wider level gives a wider interval from the same resamples
    wide = metrics.bootstrap_ci(values, samples=150, level=0.99, seed=11)
    assert all(wide[n][0] <= ci[n][0] and ci[n][1] <= wide[n][1] for n in ci)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci(values, samples=0, level=0.9, seed=1)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci(values, samples=10, level=1.0, seed=1)


def test_bootstrap_interval_covers_the_population_mean_about_as_often_as_its_level():
    population = np.random.default_rng(1).random(20_000) ** 3  # skewed, like per-user ndcg
    truth = population.mean()
    covered = 0
    for seed in range(100):
        sample = np.random.default_rng([seed, 99]).choice(population, 300, replace=False)
        lo, hi = metrics.bootstrap_ci({"m": sample}, samples=300, level=0.9, seed=seed)["m"]
        covered += lo <= truth <= hi
    # 90% nominal (87 here: the percentile interval runs a little narrow on skewed data); one of
    # half the width would cover ~60, a shifted or degenerate one far fewer
    assert 80 <= covered <= 97


# --- evaluate: sampling and intervals ---------------------------------------------------------

N_USERS, N_EVAL_ITEMS = 400, 40


def _half_hit_case():
    """400 warm users, one test item each; the model puts it first for even users (each user
    vector is the indicator of that item, items are the identity) and never shows it to odd
    users (zero vectors: the lowest unseen indices, 0..10, while their test items are 30..39).
    Popularity (train items 0..4) never hits. So over everyone, the model's ndcg, recall and
    hit rate at 10 are exactly 0.5, popularity's 0."""
    users = np.arange(N_USERS)
    test_item = np.where(users % 2 == 0, 20 + (users // 2) % 10, 30 + users % 10)
    frame = {schema.LABEL: np.int8(1), schema.WEIGHT: np.float32(1)}
    parts = {
        "train": pd.DataFrame({schema.USER_IDX: users, schema.ITEM_IDX: users % 5,
                               schema.TIMESTAMP: 100, **frame}),
        "valid": pd.DataFrame({schema.USER_IDX: users, schema.ITEM_IDX: 5 + users % 3,
                               schema.TIMESTAMP: 200, **frame}),
        "test": pd.DataFrame({schema.USER_IDX: users, schema.ITEM_IDX: test_item,
                              schema.TIMESTAMP: 300, **frame}),
    }
    user = np.zeros((N_USERS, N_EVAL_ITEMS), np.float32)
    even = users[users % 2 == 0]
    user[even, test_item[even]] = 1.0
    emb = {"user": user, "item": np.eye(N_EVAL_ITEMS, dtype=np.float32),
           "item_bias": np.zeros(N_EVAL_ITEMS, np.float32)}
    return parts, emb


def _spy(monkeypatch) -> list[np.ndarray]:
    """Record the users every side is ranked for."""
    calls, real = [], evaluate.recommend

    def recommend(emb, seen, users, k, ranks=None):
        calls.append(np.array(users))
        return real(emb, seen, users, k, ranks)

    monkeypatch.setattr(evaluate, "recommend", recommend)
    return calls


def _sampling(max_users: int, seed: int = 7) -> evaluate.Sampling:
    return evaluate.Sampling(max_users=max_users, bootstrap_samples=200, ci_level=0.95,
                             seed=seed)


RANKING_KEYS = {f"{m}_at_{k}" for m in metrics.METRICS for k in (10, 20)}


def test_unsampled_evaluation_ranks_everyone_and_reports_no_interval(monkeypatch):
    parts, emb = _half_hit_case()
    calls = _spy(monkeypatch)
    for sampling in (None, _sampling(N_USERS)):  # max_users == eligible users: no sample
        got = evaluate.evaluate_embeddings(emb, parts, ks=[10, 20], n_users=N_USERS,
                                           sampling=sampling)
        assert got["n_test_users"] == got["evaluated_users"] == N_USERS
        assert got["sampled"] is False and got["bootstrap"] is None
        assert "ci" not in got["model"] and "ci" not in got["popularity"]
        for key in ("ndcg_at_10", "recall_at_10", "hit_rate_at_10"):
            assert got["model"][key] == 0.5 and got["popularity"][key] == 0.0
    assert all(len(c) == N_USERS for c in calls)


def test_sampled_evaluation_ranks_one_seeded_sample_for_every_side(monkeypatch):
    parts, emb = _half_hit_case()
    calls = _spy(monkeypatch)
    got = evaluate.evaluate_embeddings(emb, parts, ks=[10, 20], n_users=N_USERS,
                                       sampling=_sampling(100))
    assert got["sampled"] is True and got["n_test_users"] == N_USERS
    assert got["evaluated_users"] == 100
    assert got["bootstrap"] == {"samples": 200, "level": 0.95}
    model_users, pop_users = calls
    assert len(model_users) == 100 and np.array_equal(model_users, pop_users)
    assert np.array_equal(model_users, np.unique(model_users))  # distinct, in index order
    # the relevant items followed their users: the figure is the sample's share of even users
    share_even = float(np.mean(model_users % 2 == 0))
    assert got["model"]["hit_rate_at_10"] == pytest.approx(share_even)
    assert got["model"]["ndcg_at_10"] == pytest.approx(share_even)
    assert 0.0 < share_even < 1.0

    for side in ("model", "popularity"):
        assert set(got[side]["ci"]) == RANKING_KEYS  # coverage and popularity: no interval
        for key, (lo, hi) in got[side]["ci"].items():
            assert lo - 1e-12 <= got[side][key] <= hi + 1e-12, (side, key)
    lo, hi = got["model"]["ci"]["ndcg_at_10"]
    assert lo < hi  # a 0/1 metric with both outcomes in the sample has a real width
    # the whole population's figure, known to be 0.5, lies inside the sample's interval
    for key in ("ndcg_at_10", "recall_at_10", "hit_rate_at_10"):
        lo, hi = got["model"]["ci"][key]
        assert lo <= 0.5 <= hi, key
    assert got["popularity"]["ci"]["ndcg_at_10"] == [0.0, 0.0]
    # the gate reads the point estimates, as before
    verdict = evaluate.gate(got, gate_metric="ndcg_at_10", min_lift=0.05, max_regression=0.02)
    assert verdict["model"] == got["model"]["ndcg_at_10"] and verdict["blessed"]

    # deterministic for a fixed seed; another seed ranks other users
    again = evaluate.evaluate_embeddings(emb, parts, ks=[10, 20], n_users=N_USERS,
                                         sampling=_sampling(100))
    assert again == got and np.array_equal(calls[2], model_users)
    evaluate.evaluate_embeddings(emb, parts, ks=[10, 20], n_users=N_USERS,
                                 sampling=_sampling(100, seed=8))
    assert len(calls[4]) == 100 and not np.array_equal(calls[4], model_users)


def test_champion_comparison_samples_the_same_users_for_model_and_champion(monkeypatch):
    parts, emb = _half_hit_case()
    champion = evaluate.popularity_model(parts["train"], n_users=N_USERS,
                                         n_items=N_EVAL_ITEMS)
    calls = _spy(monkeypatch)
    got = evaluate.compare_with_champion(emb, lambda: champion, parts, train_cutoff=250,
                                         ks=[10], n_users=N_USERS, sampling=_sampling(60))
    assert got["compared"] and got["users"] == N_USERS
    assert got["evaluated_users"] == 60 and got["sampled"] is True
    assert len(calls) == 2 and len(calls[0]) == 60 and np.array_equal(calls[0], calls[1])
    for side in ("model", "champion"):
        for key, (lo, hi) in got[side]["ci"].items():
            assert lo - 1e-12 <= got[side][key] <= hi + 1e-12, (side, key)
    whole = evaluate.compare_with_champion(emb, champion, parts, train_cutoff=250, ks=[10],
                                           n_users=N_USERS)
    assert whole["evaluated_users"] == whole["users"] == N_USERS and not whole["sampled"]
    assert "ci" not in whole["model"]


def test_evaluate_reads_its_sampling_from_params():
    assert {"evaluate.max_users", "evaluate.bootstrap_samples", "evaluate.ci_level",
            "seed"} <= set(evaluate.PARAMS)
    params = settings.load_params()
    s = evaluate.Sampling.from_params(settings.step_params(evaluate.PARAMS, params))
    assert s.max_users == params["evaluate"]["max_users"] and s.seed == params["seed"]
    assert s.ci_level == params["evaluate"]["ci_level"]
    assert s.bootstrap_samples == params["evaluate"]["bootstrap_samples"]
    assert s.sample_rows(s.max_users) is None
    rows = s.sample_rows(s.max_users + 10)
    assert len(rows) == s.max_users and np.array_equal(rows, np.unique(rows))
    with pytest.raises(ValueError, match="max_users"):
        evaluate.Sampling(max_users=0, bootstrap_samples=10, ci_level=0.9, seed=1)
    with pytest.raises(ValueError, match="ci_level"):
        evaluate.Sampling(max_users=5, bootstrap_samples=10, ci_level=1.5, seed=1)
    assert set(evaluate.PART_COLUMNS) == {schema.USER_IDX, schema.ITEM_IDX, schema.LABEL,
                                          schema.TIMESTAMP}
