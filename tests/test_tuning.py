"""Tuning in the loop, RP3beta and the blend (issue 16): every choice is made on the valid split,
and nothing that tunes can read the test split.

Small seeded data from the project's own generator; no S3.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from nightrec.core import schema, settings
from nightrec.ml import models, ranking
from nightrec.tasks import evaluate, score, split, train, tune
from tests.conftest import labelled_events, reference_ease

N_USERS, N_ITEMS = 300, 120


@pytest.fixture(scope="module")
def parts():
    df = labelled_events(n_users=N_USERS, n_items=N_ITEMS, n_interactions=9000, seed=11)
    return split.split_interactions(df, valid_fraction=0.1, test_fraction=0.1,
                                    min_user_events_for_holdout=5)


class TrainAndValidOnly(dict):
    """The split parts with the test split behind a tripwire: any read of it fails the test.
    ``train_both`` and the tune DAG's search get this; they must complete without touching it."""

    def __init__(self, parts: dict):
        super().__init__({k: parts[k] for k in ("train", "valid")})
        self.reads: list[str] = []

    def __getitem__(self, key):
        if key not in ("train", "valid"):
            raise AssertionError(f"the tuning read parts[{key!r}]")
        self.reads.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "test":
            raise AssertionError("the tuning asked for the test split")
        return super().get(key, default)


def _p(**overrides) -> settings.StepParams:
    base = {"train.sasrec.epochs": 3, "train.sasrec.dim": 16, "train.sasrec.max_len": 20,
            "train.mf_softmax.epochs": 2, "train.mf_softmax.embedding_dim": 8,
            "train.ials.factors": 8, "train.ials.iterations": 3}
    return settings.step_params(train.PARAMS, settings.with_overrides(
        settings.load_params(), {**base, **overrides}))


def test_the_tuning_never_reads_the_test_split_by_construction(parts, tmp_path):
    """Every family with searched hyperparameters and the blend, selected and refit, from parts
    that hold no test split and fail on any attempt to read one; the tune DAG's study too.
    (With ``train.ship_fit: train_valid``: with ``all`` the shipped refit, after the choice,
    reads the test split, and the next test shows that nothing chosen depends on it.)"""
    guarded = TrainAndValidOnly(parts)
    p = _p(**{"train.candidates": ["ease", "rp3beta", "ials", "sasrec"],
              "train.ship_fit": "train_valid",
              "train.ease.l2": [10.0, 1000.0], "train.ease.dropout": [0.0, 0.5],
              "train.ease.recency_half_life": [None, 5.0],
              "train.ials.regularization": [0.1, 100.0]})
    res = train.train_both(guarded, n_users=N_USERS, n_items=N_ITEMS, p=p, workdir=tmp_path)
    sel = res["selection"]
    assert set(sel["candidates"]) == {"ease", "rp3beta", "ials", "sasrec", "blend"}
    assert "test" not in guarded.reads and {"train", "valid"} <= set(guarded.reads)
    ease = sel["candidates"]["ease"]
    assert len(ease["search"]) == 24  # params.yaml's windows (null, 5, 20) x the 8 above
    assert {point.split(",")[0] for point in ease["search"]} == {
        "window=None", "window=5.0", "window=20.0"}
    assert set(ease["params"]) == {"window", "l2", "dropout", "recency_half_life"}
    # the choice is the best valid figure of the search, and what the refit used
    figures = {k: v["valid_ndcg_at_10"] for k, v in ease["search"].items()}
    assert train.point_key(ease["params"]) == max(figures, key=figures.get)
    assert ease["valid_ndcg_at_10"] == max(figures.values())
    # the tune DAG's study, the same way
    params = settings.with_overrides(settings.load_params(), {"tune.model": "ease",
                                                               "tune.n_trials": 2})
    best, _ = tune.search(TrainAndValidOnly(parts), params, n_users=N_USERS, n_items=N_ITEMS,
                          workdir=tmp_path)
    assert best["n_trials"] == 2


def _without_timings(value):
    """A selection record without its wall-clock figures (``train_s``, every ``fit_s``, the
    refits' projections and what was left for them)."""
    timings = ("train_s", "fit_s", "refits_projected_s", "refits_left_s")
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in timings}
    return value


def test_what_ships_sees_the_test_split_and_nothing_chosen_or_gated_depends_on_it(parts,
                                                                                 tmp_path):
    """The defaults (``train.ship_fit: all``, ``train.gate_fit: train_valid``): three fits of
    the chosen point. The refit on train + valid + test ships; the refit on train + valid is
    gated. The same run with another test split (its items scrambled) makes every valid
    figure, every choice, the selection fit and the gated fit identical: nothing that tunes or
    is gated read it. Only the shipped refit differs."""
    p = _p(**{"train.candidates": ["ease", "rp3beta"], "train.ease.l2": [5.0, 500.0],
              "train.ease.dropout": [0.0, 0.5], "train.ease.recency_half_life": [None, 3.0],
              "train.rp3beta.recency_half_life": [None], "train.ship_fit": "all",
              "train.gate_fit": "train_valid"})
    res = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, p=p, workdir=tmp_path)
    scrambled = parts["test"].assign(**{schema.ITEM_IDX: np.random.default_rng(3).permutation(
        parts["test"][schema.ITEM_IDX].to_numpy())})
    other = train.train_both({**parts, "test": scrambled}, n_users=N_USERS, n_items=N_ITEMS,
                             p=p, workdir=tmp_path)
    assert _without_timings(res["selection"]) == _without_timings(other["selection"])
    assert res["chosen"] == other["chosen"]
    for fit in ("holdout", "gated_refit"):
        mine, theirs = res[fit][0], other[fit][0]
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine), fit
    assert res["gated"] == "gated" and res["full"][1]["fitted_on"] == ["train", "valid", "test"]
    gated = res["gated_refit"][1]
    train_valid = pd.concat([parts["train"], parts["valid"]])
    assert gated["fitted_on"] == ["train", "valid"]
    assert res["gated_cutoff"] == gated["train_cutoff"] == int(
        train_valid[schema.TIMESTAMP].max()) == res["selection"]["gated_cutoff"]
    everything = pd.concat([parts["train"], parts["valid"], parts["test"]])
    assert res["train_cutoff"] == int(everything[schema.TIMESTAMP].max())
    key = "item_item"
    assert not np.array_equal(res["full"][0][key], other["full"][0][key])
    chosen = res["selection"]["candidates"][res["chosen"]]
    if res["chosen"] == "ease":  # the same point, refit from scratch on each fit's own parts
        point = chosen["params"]
        assert res["full"][1]["params"] == gated["params"] == point
        for frame, emb in ((everything, res["full"][0]), (train_valid, res["gated_refit"][0])):
            want = reference_ease(frame, point, n_users=N_USERS, n_items=N_ITEMS,
                                  window_weight=p["train.ease.window_weight"])
            assert np.allclose(emb[key], want[key], atol=1e-5)
    # gate_fit: train: the selection fit is gated, no third fit
    hold = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, workdir=tmp_path,
                            p=_p(**{**{k: p[k] for k in ("train.candidates", "train.ease.l2",
                                                         "train.ease.dropout",
                                                         "train.ship_fit")},
                                    "train.gate_fit": "train"}))
    assert hold["gated"] == "holdout" and "gated_refit" not in hold
    assert hold["gated_cutoff"] == int(parts["train"][schema.TIMESTAMP].max())
    assert hold["full"][1]["fitted_on"] == ["train", "valid", "test"]
    # train_valid: issue 12's rule, the train + valid refit ships and is itself gated
    tv = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, workdir=tmp_path,
                          p=_p(**{**{k: p[k] for k in ("train.candidates", "train.ease.l2",
                                                       "train.ease.dropout")},
                                  "train.ship_fit": "train_valid"}))
    assert tv["gated"] == "full" and tv["full"][1]["fitted_on"] == ["train", "valid"]
    assert "gated_refit" not in tv
    assert tv["gated_cutoff"] == tv["train_cutoff"] < int(parts["test"][schema.TIMESTAMP].min())
    with pytest.raises(ValueError, match="train.ship_fit"):
        train.ship_parts(_p(**{"train.ship_fit": "everything"}))
    with pytest.raises(ValueError, match="train.gate_fit"):
        train.gate_parts(_p(**{"train.gate_fit": "all"}))


def test_each_fit_of_an_mf_softmax_logs_to_its_own_tensorboard_folder(parts, tmp_path):
    """The selection fit, the gated refit (train + valid) and the shipped refit each write their
    own TensorBoard run, so the logs of one are never mixed into another's."""
    res = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, workdir=tmp_path,
                           p=_p(**{"train.candidates": ["mf_softmax"], "train.ship_fit": "all",
                                   "train.gate_fit": "train_valid"}))
    assert res["gated"] == "gated"
    runs = {d.name: sorted(f.relative_to(d).as_posix() for f in d.rglob("events.out.tfevents*"))
            for d in res["tensorboard"].iterdir()}
    assert set(runs) == {"holdout", "gated", "full"}, runs
    assert all(runs.values()), runs
    # one training run's event files per folder (train, and validation for the selection fit)
    assert [f.split("/")[0] for f in runs["gated"]] == ["train"]
    assert [f.split("/")[0] for f in runs["full"]] == ["train"]


@pytest.mark.parametrize("ship_fit", ["train_valid", "all"])
def test_a_searched_family_refits_its_chosen_point_on_the_shipped_parts(parts, tmp_path,
                                                                       ship_fit):
    p = _p(**{"train.candidates": ["ease"], "train.ease.l2": [5.0, 50.0, 5000.0],
              "train.ease.dropout": [0.0], "train.ease.recency_half_life": [None],
              "train.ship_fit": ship_fit})
    res = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, p=p, workdir=tmp_path)
    cand = res["selection"]["candidates"]["ease"]
    searched = [dict(kv.split("=") for kv in k.split(",")) for k in cand["search"]]
    assert [(s["window"], float(s["l2"])) for s in searched] == [
        (w, l2) for w in ("None", "5.0", "20.0") for l2 in (5.0, 50.0, 5000.0)]  # outermost
    point = cand["params"]
    assert res["full"][1]["params"] == point
    shipped = pd.concat([parts[n] for n in train.SHIP_FITS[ship_fit]])
    want = reference_ease(shipped, point, n_users=N_USERS, n_items=N_ITEMS,
                          window_weight=p["train.ease.window_weight"])
    assert np.allclose(res["full"][0]["item_item"], want["item_item"], atol=1e-5)
    # a single value is used as it is: nothing to score, nothing searched
    one = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, workdir=tmp_path, p=_p(**{
        "train.candidates": ["ease"], "train.ease.l2": 50.0, "train.ease.dropout": 0.0,
        "train.ease.recency_half_life": None, "train.ease.window": None}))
    assert one["selection"]["candidates"]["ease"]["params"] == {
        "window": None, "l2": 50.0, "dropout": 0.0, "recency_half_life": None}


def test_a_closed_form_search_past_its_share_stops_and_says_so(parts):
    calls = []

    def fit_one(point, _deadline):
        calls.append(point)
        return models.fit_ease(sparse.csr_matrix(np.eye(4)), l2=point["l2"], dropout=0.0), {}

    sample = pd.DataFrame({schema.USER_IDX: [0], schema.ITEM_IDX: [1]})
    known = pd.DataFrame({schema.USER_IDX: [0], schema.ITEM_IDX: [0]})
    import time

    emb, hist = train.search("ease", [{"l2": 1.0}, {"l2": 2.0}, {"l2": 3.0}], fit_one, sample,
                             known=known, n_users=4, metric="ndcg_at_10",
                             deadline=time.monotonic() - 1)
    assert calls == [{"l2": 1.0}]  # the first point always runs
    assert hist["search"]["2.0"] == hist["search"]["3.0"] == {"skipped": "time budget"}


def test_a_search_moves_every_key_from_its_best_before_the_rest_of_the_grid(monkeypatch):
    """A cyclic coordinate search: from the grid's first point, the best so far moved along
    one key at a time (l2, then the window), then the nearest points left. The windowed Gram
    is tried at the best plain l2 as the fifth fit, not after every plain point (a search cut
    after five fits has tried it; in the listed order it would have had to reach the sixth);
    the choice is still the best valid figure, a tie goes to the point listed first, and the
    record keeps the grid's order."""
    grid = [{"window": w, "l2": l2} for w in (None, 5.0) for l2 in (1.0, 2.0, 3.0, 4.0)]
    valid = {(None, 1.0): 0.1, (None, 2.0): 0.2, (None, 3.0): 0.3, (None, 4.0): 0.25,
             (5.0, 1.0): 0.05, (5.0, 2.0): 0.15, (5.0, 3.0): 0.4, (5.0, 4.0): 0.35}
    calls = []

    def fit_one(point, _deadline):
        calls.append((point["window"], point["l2"]))
        return {"tag": calls[-1]}, {}

    monkeypatch.setattr(evaluate, "ranking_metric", lambda emb, *a, **k: valid[emb["tag"]])
    sample = pd.DataFrame({schema.USER_IDX: [0], schema.ITEM_IDX: [1]})
    emb, hist = train.search("ease", grid, fit_one, sample, known=sample, n_users=1,
                             metric="ndcg_at_10", deadline=float("inf"))
    assert calls == [(None, 1.0), (None, 2.0), (None, 3.0), (None, 4.0), (5.0, 3.0),
                     (5.0, 1.0), (5.0, 2.0), (5.0, 4.0)]
    assert hist["params"] == {"window": 5.0, "l2": 3.0} and emb["tag"] == (5.0, 3.0)
    assert list(hist["search"]) == [train.point_key(pt) for pt in grid]
    # a tie with the best (5.0, 3.0): (5.0, 4.0) is fitted and listed after it, (5.0, 1.0)
    # fitted after it but listed before it: the one listed first is chosen either way
    for tie, chosen in (((5.0, 4.0), (5.0, 3.0)), ((5.0, 1.0), (5.0, 1.0))):
        calls.clear()
        monkeypatch.setitem(valid, tie, 0.4)
        _, hist = train.search("ease", grid, fit_one, sample, known=sample, n_users=1,
                               metric="ndcg_at_10", deadline=float("inf"))
        assert (hist["params"]["window"], hist["params"]["l2"]) == chosen
        monkeypatch.undo()
        monkeypatch.setattr(evaluate, "ranking_metric", lambda emb, *a, **k: valid[emb["tag"]])
    # the order alone
    assert train.next_point(grid, set(), None) == (0, 0)
    assert train.next_point(grid, {0, 1, 2, 3}, {"window": None, "l2": 3.0}) == (6, 1)
    assert train.next_point(grid, {0, 1, 2, 3, 6}, {"window": None, "l2": 9.0}) == (4, 0)
    # a best off the lists (an adopted tune point): its one-key neighbours, then the nearest
    assert train.next_point(grid, {0, 1, 2, 3, 6}, {"window": 5.0, "l2": 3.5}) == (4, 0)
    assert train.next_point(grid, {0, 1, 2, 3}, {"window": 5.0, "l2": 3.0}, 1) == (4, 0)
    assert train.next_point(grid, {1, 2, 3, 4, 5, 6}, {"window": 5.0, "l2": 3.0}, 0) == (7, 0)
    assert train.next_point(grid, {1, 2, 3, 4, 5, 6, 7}, {"window": 5.0, "l2": 3.0}, 0) == (
        0, 0)  # two keys changed: the only point left


def test_a_search_moves_each_key_in_turn_not_the_first_key_again_on_every_new_best(
        monkeypatch):
    """A cyclic coordinate search: every key is moved once from the best before any is moved
    twice, so a search cut after 1 + 2 + 2 + 1 fits has tried the costly outer key (EASE's
    window) too. Here every move along a key improves: a search that restarted from the first
    key on each new best would still be moving c and b at the sixth fit."""
    grid = [{"a": a, "b": b, "c": c} for a in (0, 1) for b in (0, 1, 2) for c in (0, 1, 2)]
    assert train.cycle_keys(grid) == ["c", "b", "a"]  # the fastest-varying (cheapest) first
    calls = []

    def fit_one(point, _deadline):
        calls.append((point["a"], point["b"], point["c"]))
        return {"tag": calls[-1]}, {}

    monkeypatch.setattr(evaluate, "ranking_metric",
                        lambda emb, *a, **k: 0.5 * emb["tag"][0] + emb["tag"][1] + emb["tag"][2])
    sample = pd.DataFrame({schema.USER_IDX: [0], schema.ITEM_IDX: [1]})
    _, hist = train.search("ease", grid, fit_one, sample, known=sample, n_users=1,
                           metric="ndcg_at_10", deadline=float("inf"))
    assert calls[:6] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 2), (0, 2, 2), (1, 2, 2)]
    assert sorted(calls) == sorted((pt["a"], pt["b"], pt["c"]) for pt in grid)  # then the rest
    assert hist["params"] == {"a": 1, "b": 2, "c": 2}
    # the one-key moves of the best all done: the nearest point left (two keys changed), not
    # the grid's first (three)
    near = {i for i, pt in enumerate(grid)
            if sum(pt[k] != v for k, v in {"a": 1, "b": 2, "c": 2}.items()) <= 1}
    assert train.next_point(grid, near, {"a": 1, "b": 2, "c": 2}, 2) == (2, 2)


def test_a_closed_form_search_projects_each_point_by_what_it_must_rebuild(monkeypatch):
    """A point the family says is cheap (a solve on the Gram matrix held, a recency value of
    the last solve) is fitted when the slowest fit so far (a Gram build) would overrun the
    deadline; one projected past it is not started and is recorded as such. Without the
    projection the slowest fit decides, as before."""
    import time

    grid = [{"l2": v} for v in (1.0, 2.0, 3.0)]

    def fit_one(point, _deadline):
        if point["l2"] == 1.0:
            time.sleep(1.0)  # the first fit builds the Gram matrix
        return {"tag": point["l2"]}, {}

    monkeypatch.setattr(evaluate, "ranking_metric", lambda emb, *a, **k: emb["tag"])
    sample = pd.DataFrame({schema.USER_IDX: [0], schema.ITEM_IDX: [1]})
    projected = {1.0: None, 2.0: 0.0, 3.0: 100.0}
    for projected_s, fitted in ((lambda pt: projected[pt["l2"]], [1.0, 2.0]), (None, [1.0])):
        _, hist = train.search("ease", grid, fit_one, sample, known=sample, n_users=1,
                               metric="ndcg_at_10", deadline=time.monotonic() + 1.9,
                               projected_s=projected_s)
        for point in grid:
            record = hist["search"][train.point_key(point)]
            assert (record == {"skipped": "time budget"}) == (point["l2"] not in fitted)
        assert hist["params"] == {"l2": fitted[-1]}


def test_ease_search_projects_a_window_by_its_gram_build_and_an_l2_by_its_solve(
        parts, monkeypatch):
    """search_item_item's projection, on real fits: each Gram matrix build is slowed to 3 s.
    With 5 s to the deadline, every point on the plain Gram held (an l2 value: a solve; a
    recency value: the last solve reused) is fitted after the first build, and each windowed
    point, which would build its own Gram (3 s more, past the deadline whatever the load), is
    skipped; the slowest fit so far (the first, with its build) would have stopped the search
    after the first point and its recency value."""
    import time

    real = train.ease_gram

    def slow(*args, **kwargs):
        time.sleep(3.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "ease_gram", slow)
    p = _p(**{"train.ease.window": [None, 5], "train.ease.l2": [300.0, 100.0],
              "train.ease.dropout": [0.0], "train.ease.recency_half_life": [None, 3.0]})
    _, hist = train.search_item_item("ease", parts["train"], parts["valid"], n_users=N_USERS,
                                     n_items=N_ITEMS, p=p, deadline=time.monotonic() + 5.0)
    fitted = {k for k, r in hist["search"].items() if "skipped" not in r}
    assert fitted == {train.point_key({"window": None, "l2": l2, "dropout": 0.0,
                                       "recency_half_life": h})
                      for l2 in (300.0, 100.0) for h in (None, 3.0)}
    assert all(r == {"skipped": "time budget"} for k, r in hist["search"].items()
               if k not in fitted)


def _dense_rp3beta(x: np.ndarray, alpha: float, beta: float, user_deg=None) -> np.ndarray:
    user_deg = x.sum(1, keepdims=True) if user_deg is None else user_deg
    pui = x / np.maximum(user_deg, 1)  # user -> item transition
    piu = x.T / np.maximum(x.sum(0)[:, None], 1)  # item -> user transition
    w = (piu ** alpha) @ (pui ** alpha)
    w = w * np.maximum(x.sum(0), 1)[None, :] ** -beta
    np.fill_diagonal(w, 0.0)
    return w


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (0.5, 0.5)])
def test_rp3beta_matches_the_random_walk_written_out(alpha, beta):
    rng = np.random.default_rng(2)
    x = (rng.random((50, 20)) < 0.3).astype(np.float64)
    got = models.fit_rp3beta(sparse.csr_matrix(x), alpha=alpha, beta=beta)
    assert np.allclose(got["item_item"], _dense_rp3beta(x, alpha, beta), atol=1e-6)
    head = models.fit_rp3beta(sparse.csr_matrix(x), alpha=alpha, beta=beta, max_items=8)
    index = models.item_index(head)
    assert len(index) == 8
    # the walk over the head's items, a user's step probability over all of theirs
    want = _dense_rp3beta(x[:, index], alpha, beta, user_deg=x.sum(1, keepdims=True))
    assert np.allclose(head["item_item"], want, atol=1e-6)


def _scores(emb: dict, seen: sparse.csr_matrix) -> np.ndarray:
    """Every user's score of every item, written out (no kernel)."""
    if models.is_hybrid(emb):
        return (seen.toarray() @ emb["item_item"] + emb["user"] @ emb["item"].T
                + emb["item_bias"])
    if models.is_item_item(emb):
        return seen.toarray() @ emb["item_item"] + emb["item_bias"]
    return emb["user"] @ emb["item"].T + emb["item_bias"]


def test_a_blend_scores_exactly_the_weighted_sum_of_its_parts():
    rng = np.random.default_rng(4)
    n_users, n_items = 40, 30
    seen = sparse.csr_matrix((rng.random((n_users, n_items)) < 0.2).astype(np.float32))
    factor = {"user": rng.normal(size=(n_users, 5)).astype(np.float32),
              "item": rng.normal(size=(n_items, 5)).astype(np.float32),
              "item_bias": rng.normal(size=n_items).astype(np.float32)}
    other = {"user": rng.normal(size=(n_users, 3)).astype(np.float32),
             "item": rng.normal(size=(n_items, 3)).astype(np.float32),
             "item_bias": rng.normal(size=n_items).astype(np.float32)}
    ii = models.fit_ease(seen, l2=2.0, dropout=0.0)
    jj = models.fit_rp3beta(seen, alpha=1.0, beta=0.2)
    users = np.arange(n_users)
    for a, b in ((factor, other), (ii, jj), (ii, factor), (factor, ii)):
        emb = models.blend(a, b, wa=0.3, wb=1.7)
        want = 0.3 * _scores(a, seen) + 1.7 * _scores(b, seen)
        assert np.allclose(_scores(emb, seen), want, atol=1e-4)
        # ranked by the kernel as scoring ranks it: the top 5 of the written-out scores
        top = evaluate.recommend(emb, seen, users, 5)
        masked = np.where(seen.toarray() > 0, -np.inf, want)
        got = np.take_along_axis(masked, top, axis=1)
        assert np.allclose(got, -np.sort(-masked, axis=1)[:, :5], atol=1e-4)
    # a head item-item model and a factor model do not blend exactly: no blend
    head = models.fit_ease(seen, l2=2.0, dropout=0.0, max_items=10)
    assert models.blend(head, factor, wa=1.0, wb=1.0) is None


def test_scoring_a_hybrid_folds_new_users_into_its_factor_part():
    rng = np.random.default_rng(6)
    n_items = 12
    seen = sparse.csr_matrix((rng.random((5, n_items)) < 0.4).astype(np.float32))
    ii = models.fit_ease(seen, l2=2.0, dropout=0.0)
    fac = {"user": rng.normal(size=(3, 4)).astype(np.float32),
           "item": rng.normal(size=(n_items, 4)).astype(np.float32),
           "item_bias": np.zeros(n_items, np.float32)}
    emb = models.blend(ii, fac, wa=1.0, wb=0.5)
    model_rows = np.array([0, 1, 2, -1, -1])  # the last two are new to the model
    user_vecs, item_vecs, bias, cold, folded = score.user_inputs(emb, seen, model_rows,
                                                                 fold_in_l2=1.0)
    assert folded.tolist() == [False, False, False] + (np.diff(seen.indptr)[3:] > 0).tolist()
    dense = user_vecs.toarray()
    assert np.allclose(dense[:3, n_items:], 0.5 * fac["user"])
    want_new = 0.5 * models.fold_in(fac["item"], np.zeros(n_items, np.float32), seen[3:], l2=1.0)
    assert np.allclose(dense[3:, n_items:], want_new, atol=1e-6)
    assert np.array_equal(dense[:, :n_items], seen.toarray() > 0)
    got = next(ranking.iter_top_k(user_vecs, item_vecs, bias, seen, np.arange(5), k=3))[1]
    full = dense @ item_vecs.T + bias
    full[seen.toarray() > 0] = -np.inf
    assert np.array_equal(got, np.argsort(-full, axis=1, kind="stable")[:, :3])


def test_the_blend_is_a_candidate_with_its_weight_chosen_on_valid(parts, tmp_path):
    p = _p(**{"train.candidates": ["ease", "ials"], "train.ease.l2": [50.0],
              "train.ease.dropout": [0.0], "train.ials.regularization": [1.0],
              "train.ease.recency_half_life": [None],
              "train.blend.weights": [0.2, 0.5, 0.8], "train.select_min_gain": 0.0,
              "train.select_confidence": 0.0})  # the point estimates decide
    res = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, p=p, workdir=tmp_path)
    blend = res["selection"]["candidates"]["blend"]
    figures = {float(w): v["valid_ndcg_at_10"] for w, v in blend["search"].items()}
    assert set(figures) == {0.2, 0.5, 0.8}
    assert blend["params"]["weight"] == max(figures, key=figures.get)
    assert blend["valid_ndcg_at_10"] == max(figures.values())
    assert sorted(blend["components"]) == ["ease", "ials"]
    # its figure is the blend of the two selection fits, re-measured by the same function
    sample = train.valid_sample(parts["valid"], max_users=int(p["train.valid_users"]),
                                seed=int(p["seed"]))
    # on this seeded data the blend beats both parts on valid (no minimum gain asked): shipped,
    # both components refit on the shipped parts and blended with that weight
    assert res["chosen"] == "blend" and blend["valid_ndcg_at_10"] > max(
        res["selection"]["candidates"][n]["valid_ndcg_at_10"] for n in ("ease", "ials"))
    assert models.is_hybrid(res["full"][0])
    assert set(res["full"][1]["component_histories"]) == {"ease", "ials"}
    assert res["full"][1]["params"]["weight"] == blend["params"]["weight"]
    value = evaluate.ranking_metric(res["holdout"][0], parts["train"], sample,
                                    metric="ndcg_at_10", n_users=N_USERS)
    assert value == pytest.approx(blend["valid_ndcg_at_10"], abs=1e-9)
    off = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, workdir=tmp_path,
                           p=_p(**{"train.candidates": ["ease", "ials"],
                                   "train.ials.regularization": [1.0],
                                   "train.blend.enabled": False}))
    assert "blend" not in off["selection"]["candidates"]


def test_pair_ranks_count_from_each_users_latest_pair():
    # user 0: item 2 at t=5 (and again at t=9: its latest), item 0 at t=7, item 1 untimed
    ranks = models.pair_ranks(np.array([0, 0, 0, 0, 1, 1]), np.array([2, 0, 2, 1, 3, 0]),
                              np.array([5, 7, 9, -1, 4, 4]), n_users=2, n_items=4)
    assert ranks.toarray().tolist() == [[2, 3, 1, 0], [2, 0, 0, 1]]  # a tie: higher item first
    seen = sparse.csr_matrix(ranks > 0, dtype=np.float32)
    rows = models.recency_rows(seen, ranks, 1.0)
    assert rows.toarray().tolist() == [[0.5, 0.25, 1.0, 0.0], [0.5, 0, 0, 1.0]]
    assert models.recency_rows(seen, ranks, None).toarray().tolist() == (seen > 0).toarray(
    ).astype(float).tolist()
    # a seen pair without a rank counts as the user's oldest
    more = seen.tolil()
    more[1, 1] = 1
    rows = models.recency_rows(sparse.csr_matrix(more), ranks, 1.0)
    assert rows.toarray()[1].tolist() == [0.5, 0.25, 0.0, 1.0]


def test_a_recency_model_scores_the_latest_items_rows_most_in_train_evaluate_and_score():
    """The weighted rows are what every consumer ranks with: ``scoring_inputs`` (evaluate,
    train's search) and score's ``user_inputs`` give the same vectors for the same ranks."""
    rng = np.random.default_rng(8)
    seen = sparse.csr_matrix((rng.random((6, 10)) < 0.5).astype(np.float32))
    u, i = seen.nonzero()
    ranks = models.pair_ranks(u, i, rng.integers(0, 50, len(u)), n_users=6, n_items=10)
    emb = models.fit_ease(seen, l2=1.0, dropout=0.0)
    emb["recency_half_life"] = np.array([2.0], np.float32)
    rows, item_vecs, _ = models.scoring_inputs(emb, seen, ranks)
    want = 0.5 ** ((ranks.toarray() - 1) / 2.0) * (ranks.toarray() > 0)
    assert np.allclose(rows.toarray(), want)
    got, *_ = score.user_inputs(emb, seen, np.arange(6), fold_in_l2=1.0, ranks=ranks)
    assert np.allclose(got.toarray(), want)
    top = evaluate.recommend(emb, seen, np.arange(6), 3, ranks)
    scores = np.where(seen.toarray() > 0, -np.inf, want @ emb["item_item"])
    assert np.allclose(np.take_along_axis(scores, top, 1), -np.sort(-scores, 1)[:, :3])


def test_the_recency_search_picks_recency_when_valid_is_each_users_next_events(tmp_path):
    """Users walk a catalogue in order (each user's next items follow their latest ones): with
    the valid split of later events, the search picks a short half-life; with a random valid
    split of the same log, none. The choice follows the data, not a default."""
    rng = np.random.default_rng(3)
    rows = []
    for user in range(200):
        start = int(rng.integers(0, 60))
        for step, item in enumerate(range(start, start + 25)):
            rows.append((user, item % 80, 1_700_000_000 + step * 60))
    df = pd.DataFrame(rows, columns=[schema.USER_IDX, schema.ITEM_IDX, schema.TIMESTAMP])
    df[schema.LABEL], df[schema.WEIGHT] = np.int8(1), np.float32(1)
    chosen = {}
    for method in ("leave_last_fraction", "random_per_user"):
        parts = split.split_interactions(df, **split.split_kwargs(settings.step_params(
            split.PARAMS, settings.with_overrides(settings.load_params(),
                                                  {"split.method": method}))))
        res = train.train_both(parts, n_users=200, n_items=80, workdir=tmp_path, p=_p(**{
            "train.candidates": ["ease"], "train.ease.l2": [10.0], "train.ease.dropout": [0.0],
            "train.ease.recency_half_life": [None, 2.0]}))
        chosen[method] = res["selection"]["candidates"]["ease"]["params"]["recency_half_life"]
        assert models.recency_half_life(res["full"][0]) == chosen[method]
    assert chosen == {"leave_last_fraction": 2.0, "random_per_user": None}


def test_a_champion_keeps_its_recency_and_both_halves_of_a_hybrid_when_aligned():
    """The gate ranks a champion as it ships: ``models.align`` keeps an item-item model's
    recency half-life and a hybrid's factor half (they were dropped before)."""
    rng = np.random.default_rng(9)
    seen = sparse.csr_matrix((rng.random((6, 8)) < 0.5).astype(np.float32))
    ease = models.fit_ease(seen, l2=1.0, dropout=0.0)
    ease["recency_half_life"] = np.array([3.0], np.float32)
    fac = {"user": rng.normal(size=(6, 2)).astype(np.float32),
           "item": rng.normal(size=(8, 2)).astype(np.float32),
           "item_bias": np.zeros(8, np.float32)}
    users, items = np.array([f"u{k}" for k in range(6)]), np.array([f"i{k}" for k in range(8)])
    for emb in (ease, models.blend(ease, fac, wa=1.0, wb=0.5)):
        got = models.align(emb, model_users=users, model_items=items, user_ids=users,
                           item_ids=items)
        assert set(got) == set(emb) - {"item_index"}
        u, i = seen.nonzero()
        ranks = models.pair_ranks(u, i, rng.integers(0, 9, len(u)), n_users=6, n_items=8)
        assert np.array_equal(evaluate.recommend(got, seen, np.arange(6), 3, ranks),
                              evaluate.recommend(emb, seen, np.arange(6), 3, ranks))


def test_a_challenger_wins_on_the_lower_end_of_its_paired_gain_over_the_valid_users():
    """``train.select_confidence``: the gain that must exceed ``select_min_gain`` is the lower
    end of the one-sided interval of the paired per-user gain, so the same mean gain wins on a
    consistent improvement and loses on noise, and more users make a smaller gain count."""
    rng = np.random.default_rng(5)
    base = rng.uniform(0.0, 0.4, 900)
    valid = {"ease": float(base.mean())}
    consistent = base + 0.01  # +0.01 for every user
    noisy = base + 0.01 + rng.normal(0.0, 0.3, 900)  # the same mean gain, wildly spread
    noisy += 0.01 - (noisy - base).mean()
    for name, values in (("consistent", consistent), ("noisy", noisy)):
        valid[name] = float(values.mean())
    per_user = {"ease": base, "consistent": consistent, "noisy": noisy}
    rec = {}
    assert train.choose(["ease", "noisy"], valid, min_gain=0.0, per_user=per_user,
                        confidence=0.95, record=rec) == "ease"
    assert rec["noisy"]["gain"] == pytest.approx(0.01) and rec["noisy"]["lower"] < 0
    assert train.choose(["ease", "consistent"], valid, min_gain=0.0, per_user=per_user,
                        confidence=0.95, record=rec) == "consistent"
    assert rec["consistent"]["lower"] == pytest.approx(0.01, abs=1e-6)
    # the gain must still clear min_gain (relative to the current choice's figure)
    assert train.choose(["ease", "consistent"], valid, min_gain=0.10, per_user=per_user,
                        confidence=0.95, record=rec) == "ease"
    assert rec["consistent"]["needed"] == pytest.approx(0.10 * valid["ease"], abs=1e-6)
    # no per-user figures, or confidence 0: the point estimates, as before
    assert train.choose(["ease", "noisy"], valid, min_gain=0.0) == "noisy"
    assert train.choose(["ease", "noisy"], valid, min_gain=0.0, per_user=per_user,
                        confidence=0.0) == "noisy"
    # the same spread over 100x the users: the interval narrows 10x and the gain counts
    many = {k: np.tile(v, 100) for k, v in per_user.items()}
    assert train.choose(["ease", "noisy"], valid, min_gain=0.0, per_user=many,
                        confidence=0.95) == "noisy"
    # a later challenger is measured against the current choice, not the first listed
    rec = {}
    better = consistent + 0.02
    valid["better"] = float(better.mean())
    got = train.choose(["ease", "consistent", "better"], valid, min_gain=0.0,
                       per_user={**per_user, "better": better}, confidence=0.95, record=rec)
    assert got == "better" and rec["better"]["against"] == "consistent"
    assert rec["better"]["gain"] == pytest.approx(0.02)


def test_train_records_each_challengers_paired_gain_and_follows_it(parts, tmp_path):
    p = _p(**{"train.candidates": ["ease", "rp3beta", "ials"], "train.ease.l2": [50.0],
              "train.ease.dropout": [0.0], "train.ease.recency_half_life": [None],
              "train.ials.regularization": [1.0], "train.rp3beta.recency_half_life": [None],
              "train.select_min_gain": 0.0, "train.select_confidence": 0.9})
    sel = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, p=p,
                           workdir=tmp_path)["selection"]
    choice = sel["choice"]
    assert choice["confidence"] == 0.9 and choice["min_gain"] == 0.0
    names = ["ease", "rp3beta", "ials", "blend"]
    assert list(choice["challengers"]) == names[1:]
    chosen = "ease"  # replay: each challenger against the choice so far
    for name in names[1:]:
        rec = choice["challengers"][name]
        assert rec["against"] == chosen and rec["lower"] < rec["gain"]
        figures = sel["candidates"]
        assert rec["gain"] == pytest.approx(figures[name]["valid_ndcg_at_10"]
                                            - figures[chosen]["valid_ndcg_at_10"], abs=1e-5)
        if rec["lower"] > rec["needed"]:
            chosen = name
    assert sel["chosen"] == chosen


TUNED = {"ds": "2026-11-20", "model": "ease", "value": 0.21, "baseline_value": 0.19,
         "params": {"train.ease.l2": 137.0, "train.ease.dropout": 0.3},
         "data": {"split_method": "global_time", "n_users": 300, "n_items": 120,
                  "train_events": 7000, "valid_until": 1_000}}


@pytest.mark.parametrize(("change", "why"), [
    ({}, None),
    ({"best": None}, "no tune result"),
    ({"value": 0.19}, "did not beat the params of its day"),
    ({"model": "mf_softmax"}, "not a candidate of this run"),
    ({"data.split_method": "random_per_user"}, "split methods"),
    ({"split.method": "leave_last_fraction"}, "split methods"),
    ({"data": {}}, "split methods"),  # written before the fingerprint
    ({"data.valid_until": 1_001}, "may be in this run's test split"),
    ({"data.n_items": 250}, "another data family"),
    ({"data.train_events": 3_000}, "another data family"),
])
def test_a_tune_result_is_adopted_only_from_the_same_data_family_and_before_this_test(change,
                                                                                      why):
    """The tune DAG's result joins a nightly run only when none of the events it was chosen on
    can be in this run's test split (both split by global_time, the study's latest event no
    later than this run's train + valid), it beat the params of its day, the sizes are within
    tune.max_size_ratio (2) and it tuned a candidate of this run."""
    best = {**TUNED, "data": dict(TUNED["data"])}
    for key, value in change.items():
        if key.startswith("data."):
            best["data"][key.removeprefix("data.")] = value
        elif key in best:
            best[key] = value
    if change.get("best", best) is None:
        best = None
    p = _p(**{"train.candidates": ["ease", "rp3beta"],
              "split.method": change.get("split.method", "global_time")})
    out = train.tune_adoption(best, ds="2026-11-30", tune_ds="2026-11-20", p=p, n_items=120,
                              events=7000, seen_until=1_000)
    assert out["adopted"] == (why is None), out
    if why is not None:
        assert why in out["why"]
        assert train.adopt(p, out) is p  # nothing changes
    else:
        assert out["params"] == TUNED["params"] and out["ds"] == "2026-11-20"


def test_an_adopted_point_joins_the_search_and_the_choice_stays_on_valid(parts, tmp_path):
    """An adopted EASE point is searched beside the grid (its l2 and dropout with every window
    and recency value, ahead of the grid's points of the same window, the windows still in
    params.yaml's order), the choice is still the best valid figure, the test split is never
    read, and the model version's hash covers the adoption."""
    p = _p(**{"train.candidates": ["ease"], "train.ship_fit": "train_valid",
              "train.ease.window": [None, 5], "train.ease.l2": [300.0, 1000.0],
              "train.ease.dropout": [0.0], "train.ease.recency_half_life": [None],
              "split.method": "global_time"})
    verdict = train.tune_adoption(TUNED, ds="2026-11-30", tune_ds="2026-11-20", p=p,
                                  n_items=120, events=7000, seen_until=1_000)
    adopted = train.adopt(p, verdict)
    assert adopted is not p and "tune.adopted" not in p
    points = train.search_points(adopted, "ease")
    assert [(pt["window"], pt["l2"], pt["dropout"]) for pt in points] == [
        (None, 137.0, 0.3), (None, 300.0, 0.0), (None, 1000.0, 0.0),
        (5.0, 137.0, 0.3), (5.0, 300.0, 0.0), (5.0, 1000.0, 0.0)]
    assert train.search_points(p, "ease") == [pt for pt in points if pt["l2"] != 137.0]
    res = train.train_both(TrainAndValidOnly(parts), n_users=N_USERS, n_items=N_ITEMS,
                           p=adopted, workdir=tmp_path)
    search = res["selection"]["candidates"]["ease"]["search"]
    assert "window=None,l2=137.0,dropout=0.3,recency_half_life=None" in search
    figures = {k: v["valid_ndcg_at_10"] for k, v in search.items()}
    assert train.point_key(res["selection"]["candidates"]["ease"]["params"]) == max(
        figures, key=figures.get)
    assert train.model_version("2026-11-30", "d", "ease", adopted, code_version="c") != \
        train.model_version("2026-11-30", "d", "ease", p, code_version="c")


def test_an_adopted_mf_softmax_result_replaces_its_params():
    """mf_softmax searches nothing in the run: an adopted result's values are its params."""
    p = _p(**{"train.candidates": ["ease", "mf_softmax"], "split.method": "global_time"})
    best = {**TUNED, "model": "mf_softmax",
            "params": {"train.mf_softmax.l2": 0.2, "train.mf_softmax.embedding_dim": 16}}
    verdict = train.tune_adoption(best, ds="2026-11-30", tune_ds="2026-11-20", p=p,
                                  n_items=120, events=7000, seen_until=1_000)
    adopted = train.adopt(p, verdict)
    assert verdict["adopted"]
    assert (adopted["train.mf_softmax.l2"], adopted["train.mf_softmax.embedding_dim"]) == (0.2, 16)
    assert p["train.mf_softmax.l2"] != 0.2  # the run's params are untouched
    assert train.search_points(adopted, "ease") == train.search_points(p, "ease")


def test_the_latest_tune_result_is_of_this_ds_or_earlier_within_max_age(bucket):
    """A backfill never adopts what a later night's study learned, and a result older than
    tune.max_age_days is not looked for."""
    from nightrec.store import layout, storage

    for ds, value in (("2026-11-20", 0.1), ("2026-11-24", 0.2), ("2026-11-28", 0.3)):
        storage.write_json(layout.report_uri(ds, "tune", "best_params.json"),
                           {**TUNED, "value": value})
    assert train.latest_tune("2026-11-27", 14)[0]["value"] == 0.2
    assert train.latest_tune("2026-11-27", 14)[1] == "2026-11-24"
    assert train.latest_tune("2026-11-28", 14)[1] == "2026-11-28"
    assert train.latest_tune("2026-11-23", 2) == (None, None)
    assert train.latest_tune("2026-11-19", 14) == (None, None)


def test_the_refits_reserve_follows_the_refits_that_will_run(parts):
    """The shares kept for the refits: each refit's rows over train's. Sizes only, and with
    ``ship_fit: train_valid`` (the gated refit is the shipped one) not even the test split's."""
    n_train, n_valid, n_test = (len(parts[k]) for k in ("train", "valid", "test"))
    defaults = _p()  # ship_fit all, gate_fit train_valid: two refits
    assert train.refit_rows(parts, defaults) == [n_train + n_valid, n_train + n_valid + n_test]
    assert train.refit_reserve(parts, defaults) == pytest.approx(
        (2 * n_train + 2 * n_valid + n_test) / n_train)
    assert train.refit_rows(parts, _p(**{"train.gate_fit": "train"})) == [
        n_train + n_valid + n_test]  # the selection fit is gated: one refit
    guarded = TrainAndValidOnly(parts)
    assert train.refit_rows(guarded, _p(**{"train.ship_fit": "train_valid"})) == [
        n_train + n_valid]
    # run() passes the frames: their lengths
    frames = {"train": parts["train"], "shipped": parts["train"].iloc[:7],
              "gated": parts["train"].iloc[:5]}
    assert train.refit_rows(frames, defaults) == [5, 7]


def test_a_refit_is_projected_from_what_it_repeats():
    # the epochs up to the best (tracing in the first), not the epochs after it
    assert train.one_fit_s({"epoch_s": [3.0, 2.0, 2.0, 2.0], "best_epoch": 2}, 99.0) == 5.0
    # a search's slowest point (EASE's first builds the Gram its refit builds again)
    search = {"a": {"fit_s": 4.0, "valid_ndcg_at_10": 0.1}, "b": {"fit_s": 0.5},
              "c": {"skipped": "time budget"}}
    assert train.one_fit_s({"search": search}, 99.0) == 4.0
    assert train.one_fit_s({}, 7.5) == 7.5  # else the whole selection fit
    # only candidates whose refits fit in what is left; the cheapest always can be chosen
    refits = {"ease": 2.0, "ials": 30.0, "blend": 32.0}
    over = train.refits_over_budget
    assert set(over(["ease", "ials", "blend"], refits, 31.0)) == {"blend"}
    assert "32 s, 31 s left" in over(["ease", "blend"], refits, 31.0)["blend"]
    assert over(["ials", "blend"], refits, -1.0) == {
        "blend": "its refits projected at 32 s, 0 s left in the time budget"}


def test_a_blend_whose_refits_would_overrun_the_budget_is_not_chosen(parts, tmp_path,
                                                                     monkeypatch):
    """The setting where the blend of EASE and iALS wins (the test above), with iALS's fit
    projected at 500 s: its refits and the blend's (which refits iALS too) would not end within
    the budget (900 s in the tests): EASE ships, and selection.json says why the others did
    not (``not_chosen``; ``skipped`` stays for what was not fitted)."""
    real = train.one_fit_s
    monkeypatch.setattr(train, "one_fit_s", lambda hist, fit_s: (
        500.0 if "regularization" in hist else real(hist, fit_s)))
    p = _p(**{"train.candidates": ["ease", "ials"], "train.ease.l2": [50.0],
              "train.ease.dropout": [0.0], "train.ials.regularization": [1.0],
              "train.ease.recency_half_life": [None],
              "train.blend.weights": [0.2, 0.5, 0.8], "train.select_min_gain": 0.0,
              "train.select_confidence": 0.0})
    res = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, p=p, workdir=tmp_path)
    sel = res["selection"]
    reserve = train.refit_reserve(parts, p)
    assert sel["refit_reserve_shares"] == pytest.approx(reserve, abs=0.01)
    assert sel["candidates"]["ials"]["refits_projected_s"] == pytest.approx(500 * reserve, 0.01)
    assert sel["candidates"]["blend"]["refits_projected_s"] > 500 * reserve
    assert res["chosen"] == "ease" and sel["chosen"] == "ease"
    assert set(sel["not_chosen"]) == {"ials", "blend"} and sel["skipped"] == {}
    assert all("left in the time budget" in why for why in sel["not_chosen"].values())
    assert sel["refits_left_s"] < 500 * reserve
    assert "blend" not in sel["choice"]["challengers"]


def test_the_time_budget_starts_after_the_kernels_are_compiled(parts, tmp_path, monkeypatch):
    """A compile as long as the whole budget (a cold numba cache on a busy machine) leaves the
    candidates' shares whole: both EASE points are fitted. Charged to the budget, the search
    would stop after its first point (at least one always runs), as a first run after a deploy
    did."""
    import time

    from nightrec.ml import ials, ranking

    compiled = []
    real = {(): ranking.warm_up, ("numba",): ials.warm_up, ("auto",): ials.warm_up}

    def slow_compile(*args):  # the real compile (so none is left for the shares), then a wait
        compiled.append(args)
        real[args](*args)
        if not args:  # the scoring kernels': as long as the budget
            time.sleep(10.0)

    monkeypatch.setattr(ranking, "warm_up", slow_compile)
    monkeypatch.setattr(ials, "warm_up", slow_compile)
    p = _p(**{"train.candidates": ["ease", "ials"], "train.blend.enabled": False,
              "train.ease.window": [None], "train.ease.l2": [30000.0, 300.0],
              "train.ease.dropout": [0.0], "train.ease.recency_half_life": [None],
              "train.ials.regularization": [100.0], "train.time_budget.min_s": 10.0,
              "train.time_budget.max_s": 10.0})
    res = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, p=p, workdir=tmp_path)
    assert compiled == [(), (p["train.ials.kernel"],)]  # scoring's and iALS's
    search = res["selection"]["candidates"]["ease"]["search"]
    assert len(search) == 2 and all("valid_ndcg_at_10" in v for v in search.values()), search


@pytest.mark.parametrize("names, gpus", [(["ease", "mf_softmax"], 0), (["ease", "ials"], 0),
                                         (["ease", "ials"], 1)])
def test_tensorflow_is_imported_before_the_budget_only_when_a_keras_fit_runs(
        parts, tmp_path, monkeypatch, names, gpus):
    """TensorFlow's import (6-7 s on 2 busy cores) is not a fit: with a Keras candidate, or a
    GPU (EASE's solve and iALS then run on Keras), it happens before the budget's clock starts,
    not inside a candidate's share; on CPU without one, the run never asks for Keras (EASE and
    iALS alone do not pay TensorFlow's memory). ``gpus``: what ials.gpu_count answers."""
    from nightrec.ml import ials, models

    monkeypatch.setattr(ials, "gpu_count", lambda: gpus)
    events = []
    real_keras, real_budget = models.keras_module, train.budget_s
    monkeypatch.setattr(models, "keras_module",
                        lambda: events.append("keras") or real_keras())
    monkeypatch.setattr(train, "budget_s",
                        lambda *a, **k: events.append("budget starts") or real_budget(*a, **k))
    p = _p(**{"train.candidates": names, "train.blend.enabled": False,
              "train.ease.window": [None], "train.ease.l2": [300.0], "train.ease.dropout": [0.0],
              "train.ease.recency_half_life": [None], "train.ials.regularization": [100.0]})
    res = train.train_both(parts, n_users=N_USERS, n_items=N_ITEMS, p=p, workdir=tmp_path)
    assert set(res["selection"]["candidates"]) == set(names)
    if "mf_softmax" in names or gpus:
        assert events[:2] == ["keras", "budget starts"], events[:5]
    else:
        assert events == ["budget starts"], events


def _staged_split(parts: dict, ds: str):
    """The module's split parts on S3 where split leaves them: the Split record train.run takes."""
    from nightrec.core.records import Split
    from nightrec.store import layout, storage

    uris = {}
    for name in ("train", "valid", "test"):
        uris[name] = layout.run_uri(ds, "split", f"{name}.parquet")
        storage.write_parquet(parts[name], uris[name])
    for kind, idx, n in (("user", schema.USER_IDX, N_USERS), ("item", schema.ITEM_IDX, N_ITEMS)):
        uris[f"{kind}_features"] = layout.run_uri(ds, "augment", f"{kind}_features.parquet")
        storage.write_parquet(pd.DataFrame({idx: np.arange(n)}), uris[f"{kind}_features"])
    return Split(ds=ds, data_version="0" * 32, feature_encoding="", validation="", meta="",
                 **uris)


def test_a_rerun_names_its_model_by_what_it_fitted(bucket, parts, monkeypatch):
    """Same data, params and code: the same version when the fit is the same; a rerun whose
    fit came out otherwise (on a busy machine the time budget cuts a search elsewhere) gets a
    version of its own, so register never meets the first run's version with other weights."""
    split_out = _staged_split(parts, "2026-11-30")
    params = settings.with_overrides(settings.load_params(), {
        "split.method": "global_time", "train.candidates": ["ease"], "tune.max_age_days": None,
        "train.ease.window": [None], "train.ease.l2": [30000.0, 300.0],
        "train.ease.dropout": [0.0], "train.ease.recency_half_life": [None]})
    first = train.run(split_out, params)
    assert train.run(split_out, params).model_version == first.model_version
    # the rerun's search is cut after its first point (l2 30000); the first run chose l2 300
    assert first.selection["candidates"]["ease"]["params"]["l2"] == 300.0
    real = train.search_item_item

    def cut(*args, **kwargs):
        return real(*args, **{**kwargs, "deadline": 0.0})

    monkeypatch.setattr(train, "search_item_item", cut)
    rerun = train.run(split_out, params)
    assert rerun.selection["candidates"]["ease"]["params"]["l2"] == 30000.0
    assert rerun.model_version != first.model_version
    assert rerun.model_version.split("-")[:2] == first.model_version.split("-")[:2]


def test_the_nightly_train_adopts_an_earlier_tune_result_and_records_it(bucket, parts):
    """train.run() end to end on S3 parts (global_time, the module's split): the tune result of
    an earlier ds whose study read nothing after this run's train + valid is found, adopted,
    searched, and recorded in selection.json; one of a later ds is not looked at."""
    from nightrec.store import layout, storage

    ds = "2026-11-30"
    split_out = _staged_split(parts, ds)
    seen = int(pd.concat([parts["train"], parts["valid"]])[schema.TIMESTAMP].max())
    assert seen < parts["test"][schema.TIMESTAMP].min()  # global_time
    params = settings.with_overrides(settings.load_params(), {
        "split.method": "global_time", "train.candidates": ["ease"],
        "train.ease.window": [None], "train.ease.l2": [300.0], "train.ease.dropout": [0.0],
        "train.ease.recency_half_life": [None]})
    later = {**TUNED, "data": {**TUNED["data"], "valid_until": seen,
                               "train_events": len(parts["train"])}}
    storage.write_json(layout.report_uri("2026-12-01", "tune", "best_params.json"), later)
    out = train.run(split_out, params)
    assert not out.selection["tune"]["adopted"]
    assert "no tune result" in out.selection["tune"]["why"]
    assert list(out.selection["candidates"]["ease"]["search"]) == [
        "window=None,l2=300.0,dropout=0.0,recency_half_life=None"]
    storage.write_json(layout.report_uri("2026-11-27", "tune", "best_params.json"), later)
    out = train.run(split_out, params)
    record = storage.read_json(layout.run_uri(ds, "train", "selection.json"))
    assert record["tune"] == out.selection["tune"]
    assert record["tune"]["adopted"] and record["tune"]["ds"] == "2026-11-27", record["tune"]
    search = record["candidates"]["ease"]["search"]
    assert list(search) == ["window=None,l2=137.0,dropout=0.3,recency_half_life=None",
                            "window=None,l2=300.0,dropout=0.0,recency_half_life=None"]
    figures = {k: v["valid_ndcg_at_10"] for k, v in search.items()}
    assert train.point_key(out.selection["candidates"]["ease"]["params"]) == max(
        figures, key=figures.get)
