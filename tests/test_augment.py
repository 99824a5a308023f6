"""Augment: labels and weights, typed side features, and the negative sampler (tasks/augment.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from nightrec.core import settings
from nightrec.core.records import Validated
from nightrec.store import layout, storage
from nightrec.tasks import augment

DAY = 86400.0


# --- labels and weights ---------------------------------------------------------------------


def test_labels_implicit_threshold_and_rating_weights():
    df = pd.DataFrame({"rating": [5.0, 2.0, np.nan, 3.0]})
    out = augment.label_interactions(df, positive_min_rating=3.0, weight_by_rating=True,
                                     max_rating=5.0)
    assert out["label"].tolist() == [1, 0, 1, 1] and out["label"].dtype == "int8"
    assert out["weight"].tolist() == pytest.approx([1.0, 0.4, 1.0, 0.6])
    assert out["weight"].dtype == "float32" and "weight" not in df.columns  # input untouched
    flat = augment.label_interactions(df, positive_min_rating=0.0, weight_by_rating=False,
                                      max_rating=5.0)
    assert flat["label"].tolist() == [1, 1, 1, 1] and flat["weight"].tolist() == [1.0] * 4


def test_recency_weights_halve_per_half_life_with_a_floor():
    now = 1_780_000_000.0
    df = pd.DataFrame({"rating": [4.0, 4.0, 4.0, 4.0, np.nan],
                       "timestamp": [now, now - 7 * DAY, now - 14 * DAY, now - 1e4 * DAY,
                                     now + DAY]})
    out = augment.label_interactions(df, positive_min_rating=0.0, weight_by_rating=True,
                                     max_rating=5.0, recency_half_life_days=7.0, now=now)
    assert out["weight"].tolist() == pytest.approx([0.8, 0.4, 0.2, augment.MIN_WEIGHT, 1.0])
    assert (out["weight"] > 0).all() and (out["weight"] <= 1).all()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="recency_half_life_days"):
            augment.label_interactions(df, positive_min_rating=0.0, weight_by_rating=False,
                                       max_rating=5.0, recency_half_life_days=bad, now=now)
    with pytest.raises(ValueError, match="now"):
        augment.label_interactions(df, positive_min_rating=0.0, weight_by_rating=False,
                                   max_rating=5.0, recency_half_life_days=7.0)


# --- side features --------------------------------------------------------------------------


def test_features_are_typed_codes_numbers_and_multi_hot():
    clean = pd.DataFrame({"item_id": ["b", "a", "c", "a"], "item_idx": [1, 0, 2, 0]})
    side = pd.DataFrame({"item_id": ["a", "b", "zz"], "year": ["1995", "n/a", "2001"],
                         "genres": ["Comedy|Sci-Fi", "(no genres listed)", "Drama"],
                         "studio": ["X", None, "Y"], "title": ["A", "B", "Z"]})
    table = augment.index_features(clean, side, id_col="item_id", idx_col="item_idx")
    assert table["item_idx"].tolist() == [0, 1, 2] and table["item_id"].tolist() == ["a", "b", "c"]
    out, enc = augment.encode_features(table, numeric=["year"], categorical=["studio"],
                                       multi_hot=["genres", "tags"])
    assert out["year"].dtype == "float32"
    assert out["year"].iloc[0] == 1995 and out["year"].iloc[1:].isna().all()
    assert enc["studio"] == {"kind": "categorical", "vocabulary": ["X"]}
    assert out["studio"].tolist() == [1, 0, 0] and out["studio"].dtype == "int32"  # 0: missing
    assert enc["genres"]["separator"] == "|"
    assert enc["genres"]["vocabulary"] == ["(no genres listed)", "Comedy", "Sci-Fi"]
    assert [list(t) for t in out["genres"]] == [["Comedy", "Sci-Fi"], ["(no genres listed)"], []]
    assert np.stack(out["genres_multi_hot"]).tolist() == [[0, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert enc["tags"]["vocabulary"] == [] and out["tags"].map(len).tolist() == [0, 0, 0]
    assert out["title"].iloc[:2].tolist() == ["A", "B"] and pd.isna(out["title"].iloc[2])
    back = pd.read_parquet(__import__("io").BytesIO(storage.parquet_bytes(out)))
    assert back["genres_multi_hot"].map(list).tolist() == [[0, 1, 1], [1, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="two kinds"):
        augment.encode_features(table, numeric=["year"], categorical=["year"])


def test_blank_separated_genres_as_in_movielens_100k():
    table = pd.DataFrame({"item_idx": [0, 1], "genres": ["Animation Children's Comedy", " Drama "]})
    out, enc = augment.encode_features(table, multi_hot=["genres"])
    assert enc["genres"]["separator"] == "blank"
    assert enc["genres"]["vocabulary"] == ["Animation", "Children's", "Comedy", "Drama"]
    assert np.stack(out["genres_multi_hot"]).sum(axis=1).tolist() == [3, 1]


def test_run_writes_labelled_events_typed_feature_tables_and_their_encoding(s3, sample):
    ds = "2026-10-01"
    items = pd.read_csv(sample["items"], dtype=str)
    users = pd.read_csv(sample["users"], dtype=str)
    clean = pd.DataFrame({
        "user_id": ["1", "1", "2"], "item_id": ["1", "2", "2"], "rating": [5.0, 1.0, 3.0],
        "timestamp": [1_780_000_000] * 3, "user_idx": np.array([0, 0, 1], np.int32),
        "item_idx": np.array([0, 1, 1], np.int32)})
    uris = Validated(ds=ds, interactions=layout.run_uri(ds, "clean", "interactions.parquet"),
                     items=layout.run_uri(ds, "ingest", "items.parquet"),
                     users=layout.run_uri(ds, "ingest", "users.parquet"),
                     report=layout.run_uri(ds, "validate", "report.json"))
    storage.write_parquet(clean, uris.interactions)
    storage.write_parquet(items, uris.items)
    storage.write_parquet(users, uris.users)
    params = json.loads(json.dumps(settings.load_params()))
    params["augment"].update(positive_min_rating=3.0, weight_by_rating=True)
    out = augment.run(uris, params)
    events = storage.read_parquet(out.interactions)
    assert events["label"].tolist() == [1, 0, 1]
    assert events["weight"].tolist() == pytest.approx([1.0, 0.2, 0.6])
    item_f = storage.read_parquet(out.item_features)
    user_f = storage.read_parquet(out.user_features)
    assert item_f["item_idx"].tolist() == [0, 1] and user_f["user_idx"].tolist() == [0, 1]
    assert item_f["year"].dtype == "float32" and user_f["age"].dtype == "float32"
    for col in ("gender", "occupation", "zip_code"):
        assert user_f[col].dtype == "int32" and (user_f[col] >= 1).all()
    encoding = storage.read_json(out.feature_encoding)
    assert encoding["user"]["gender"]["vocabulary"] == sorted(set(users["gender"][:2]))
    genres = encoding["item"]["genres"]["vocabulary"]
    assert all(len(v) == len(genres) for v in item_f["genres_multi_hot"])
    assert [sorted(g) for g in item_f["genres"]] == [sorted(set(s.split())) for s in
                                                     items["genres"][:2]]


# --- negative sampling ----------------------------------------------------------------------


def _seen(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    u = [r for r, items in enumerate(rows) for _ in items]
    i = [x for items in rows for x in items]
    return augment.seen_matrix(np.array(u, int), np.array(i, int), n_users=len(rows),
                               n_items=n_items)


def _chi2_pvalue(draws: np.ndarray, expected_p: np.ndarray) -> float:
    observed = np.bincount(draws.ravel(), minlength=len(expected_p))
    keep = expected_p > 0
    assert observed[~keep].sum() == 0
    return stats.chisquare(observed[keep], expected_p[keep] / expected_p[keep].sum()
                           * observed.sum()).pvalue


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_draws_follow_count_to_the_alpha_among_unseen_items(alpha):
    n_items = 50
    counts = np.arange(n_items, dtype=float) ** 2  # item 0 has count 0
    seen = _seen([[1, 5, 49, 48], [2, 3]], n_items)
    users = np.zeros(40_000, dtype=np.int64)  # user 0 only: one target distribution
    neg = augment.sample_negatives(users, seen, n_neg=5, item_counts=counts, alpha=alpha,
                                   seed=7)
    assert neg.shape == (40_000, 5) and neg.dtype == np.int32
    expected = counts ** alpha
    expected[[1, 5, 49, 48]] = 0
    assert _chi2_pvalue(neg, expected) > 1e-3
    if alpha == 0.0:
        assert (neg == 0).any()  # uniform: 0 ** 0 = 1, the never-counted item too
    else:
        assert not (neg == 0).any()


def test_never_a_seen_item_and_deterministic_per_seed():
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 400
    u = rng.integers(0, n_users, 20_000)
    i = np.minimum(rng.zipf(1.5, 20_000), n_items) - 1  # popular items are the seen ones
    seen = augment.seen_matrix(u, i, n_users=n_users, n_items=n_items)
    counts = augment.item_popularity(i, n_items=n_items)
    kw = {"n_neg": 8, "item_counts": counts, "alpha": 0.75}
    a = augment.sample_negatives(u, seen, seed=3, **kw)
    b = augment.sample_negatives(u, seen, seed=3, **kw)
    c = augment.sample_negatives(u, seen, seed=4, **kw)
    g = augment.sample_negatives(u, seen, seed=np.random.default_rng(3), **kw)
    assert np.array_equal(a, b) and np.array_equal(a, g) and not np.array_equal(a, c)
    dense = seen.toarray()
    assert not dense[u[:, None], a].any() and not dense[u[:, None], c].any()
    assert counts[a].min() > 0  # alpha > 0: never an item nobody interacted with


def test_a_user_who_has_seen_almost_everything_gets_the_rest_in_proportion():
    n_items = 1000
    counts = np.full(n_items, 100.0)
    counts[[10, 20]] = [1.0, 3.0]  # the only unseen items hold 0.004% of the mass
    seen = _seen([[i for i in range(n_items) if i not in (10, 20)], [0]], n_items)
    neg = augment.sample_negatives(np.array([0, 1, 0]), seen, n_neg=4000, item_counts=counts,
                                   alpha=1.0, seed=1)
    user0 = neg[[0, 2]].ravel()
    assert set(user0) == {10, 20} and 0 not in neg[1]
    assert 0.2 < (user0 == 10).mean() < 0.3  # 1 : 3
    only = _seen([[i for i in range(n_items) if i != 999]], n_items)
    assert (augment.sample_negatives(np.zeros(3, int), only, n_neg=2, item_counts=counts,
                                     alpha=0.0, seed=0) == 999).all()


def test_a_user_with_nothing_left_to_sample_is_refused_clearly():
    counts = np.array([5.0, 0.0, 3.0])
    seen = _seen([[0, 2], [0]], 3)  # user 0 left with item 1 only, whose weight is 0
    with pytest.raises(ValueError, match=r"1 user\(s\) have no unseen item.*user 0"):
        augment.sample_negatives(np.array([1, 0]), seen, n_neg=1, item_counts=counts,
                                 alpha=0.5, seed=0)
    # uniform sampling can still draw item 1 for user 0
    neg = augment.sample_negatives(np.array([1, 0]), seen, n_neg=3, item_counts=counts,
                                   alpha=0.0, seed=0)
    assert (neg[1] == 1).all() and 0 not in neg[0]


def test_edge_inputs():
    seen = _seen([[0], []], 4)
    counts = np.ones(4)
    kw = {"item_counts": counts, "alpha": 0.75, "seed": 0}
    assert augment.sample_negatives(np.array([], int), seen, n_neg=3, **kw).shape == (0, 3)
    assert augment.sample_negatives(np.array([0, 1]), seen, n_neg=0, **kw).shape == (2, 0)
    explicit_zero = sp.csr_matrix((np.array([0, 1]), np.array([0, 1]), np.array([0, 2, 2])),
                                  shape=(2, 4))  # a stored 0 is not "seen"
    draws = augment.sample_negatives(np.zeros(500, int), explicit_zero, n_neg=2, **kw)
    assert 0 in draws and 1 not in draws
    for bad, match in [
        ({"users": np.array([2])}, "row indices"),
        ({"users": np.array([[0]])}, "1-D"),
        ({"users": np.array([0.5])}, "integer"),
        ({"n_neg": -1}, "n_neg"),
        ({"item_counts": np.ones(3)}, "item_counts"),
        ({"item_counts": np.array([1, np.nan, 1, 1])}, "finite"),
        ({"alpha": -0.5}, "alpha"),
        ({"item_counts": np.zeros(4)}, "nonzero sampling weight"),
    ]:
        args = dict(users=np.array([0]), seen=seen, n_neg=1, **kw) | bad
        with pytest.raises(ValueError, match=match):
            augment.sample_negatives(args.pop("users"), args.pop("seen"), **args)


@pytest.mark.parametrize("weights", [np.arange(50.0) ** 1.5, np.ones(7), np.r_[1e-300, 1, 0, 1e300],
                                     np.r_[np.zeros(5), np.random.default_rng(0).pareto(1, 999)]])
def test_alias_table_holds_exactly_the_weights(weights):
    prob, alias = augment._alias_table(weights)
    n = len(weights)
    implied = prob / n
    np.add.at(implied, alias, (1 - prob) / n)
    assert implied == pytest.approx(weights / weights.sum(), abs=1e-12)
    assert (implied[weights == 0] == 0).all()
