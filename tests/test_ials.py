"""iALS (nightrec/ml/ials.py): known answers on tiny problems, seeding, the time budget, warm
start, and its place among train's candidates."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nightrec.core import schema, settings
from nightrec.ml import ials
from nightrec.tasks import train
from tests.conftest import labelled_events


def _exact(y: np.ndarray, users: np.ndarray, items: np.ndarray, *, n_users: int, alpha: float,
           reg: float) -> np.ndarray:
    """Every user's normal equations solved densely in float64 (duplicates add confidence)."""
    counts = np.zeros((n_users, y.shape[0]))
    np.add.at(counts, (users, items), 1.0)
    c = np.where(counts > 0, alpha * counts, 1.0)
    p = (counts > 0).astype(float)
    y64 = y.astype(np.float64)
    return np.stack([np.linalg.solve(y64.T @ (c[u][:, None] * y64) + reg * np.eye(y.shape[1]),
                                     y64.T @ (c[u] * p[u])) for u in range(n_users)])


@pytest.mark.parametrize("kernel", ["numba", "keras"])
def test_conjugate_gradient_reaches_the_exact_least_squares_solution(kernel):
    """With as many CG steps as factors, CG solves a d x d system exactly (up to round-off):
    each user's vector equals the closed-form ALS update. Users with no item get 0."""
    rng = np.random.default_rng(0)
    n_users, n_items, d = 50, 40, 5
    users, items = rng.integers(0, n_users - 3, 400), rng.integers(0, n_items, 400)
    m = ials.build_csr(users, items, None, n_rows=n_users, uniform=3.0)
    y = rng.standard_normal((n_items, d)).astype(np.float32)
    x0 = np.zeros((n_users, d), np.float32)
    want = _exact(y, users, items, n_users=n_users, alpha=3.0, reg=0.5)
    if kernel == "numba":
        got = ials.solve_numba(x0, y, m, regularization=0.5, cg_steps=2 * d)
    else:  # small chunks: rows split over several chunks give the same answer
        got = ials.solve(x0, y, m, regularization=0.5, cg_steps=2 * d, chunk_nnz=37)
    assert np.abs(got - want).max() < 1e-4
    assert np.all(got[-3:] == 0)
    # three steps (the default) are close but not exact: the comparison above is not vacuous
    three = ials.solve_numba(x0, y, m, regularization=0.5, cg_steps=3)
    assert np.abs(three - want).max() > 1e-3


def test_the_in_place_numba_solve_is_the_copying_one():
    """fit updates its factor tables in place (one user table, not two): the same rows as the
    copying solve, written into the array given; an array it cannot write into is refused."""
    rng = np.random.default_rng(3)
    m = ials.build_csr(rng.integers(0, 30, 300), rng.integers(0, 20, 300), None, n_rows=30,
                       uniform=4.0)
    y = rng.standard_normal((20, 4)).astype(np.float32)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    want = ials.solve_numba(x, y, m, regularization=0.3, cg_steps=3)
    assert not np.array_equal(want, x)  # the solve changes the rows
    got = ials.solve_numba(x, y, m, regularization=0.3, cg_steps=3, in_place=True)
    assert got is x and np.array_equal(got, want)
    with pytest.raises(ValueError, match="in_place"):
        ials.solve_numba(np.asfortranarray(x), y, m, regularization=0.3, cg_steps=3,
                         in_place=True)


def test_the_blocked_gram_is_the_whole_one():
    """solve_numba's Gram matrix is summed over row blocks (no float64 copy of the table): the
    same as the whole product in float64, for a last block shorter than the others too."""
    y = np.random.default_rng(2).standard_normal((1001, 7)).astype(np.float32)
    want = y.astype(np.float64).T @ y.astype(np.float64)
    for block_rows in (1, 100, 1001, 5000):
        assert np.allclose(ials.gram_f64(y, block_rows=block_rows), want, rtol=1e-12, atol=1e-9)


def test_a_parked_fit_reads_back_and_saves_as_it_was(tmp_path, monkeypatch):
    """The search's best fit and the chosen selection fit wait memory-mapped from a temporary
    file: the same values, saved by np.savez as before, writable without touching the file;
    small arrays stay in memory; a TMPDIR that cannot take the file keeps it in memory."""
    import tempfile

    rng = np.random.default_rng(0)
    emb = {"user": rng.random((5000, 64), dtype=np.float32), "item_bias": np.zeros(3, np.float32)}
    parked = train._parked(emb)
    assert isinstance(parked["user"], np.memmap) and parked["item_bias"] is emb["item_bias"]
    assert np.array_equal(parked["user"], emb["user"]) and train._parked(parked)["user"] is parked["user"]
    np.savez(tmp_path / "e.npz", **parked)
    assert np.array_equal(np.load(tmp_path / "e.npz")["user"], emb["user"])
    parked["user"][0, 0] = -1.0  # copy-on-write: private to the process
    assert parked["user"][0, 0] == -1.0

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    kept = train._parked(emb)
    assert kept["user"] is emb["user"]


def test_positive_columns_are_views_when_every_row_is_positive():
    """What train reads (no label column when every label is 1) costs no copy; a frame with
    negatives gives only its positive rows, and a missing weight column reads as 1."""
    import pandas as pd

    frame = pd.DataFrame({schema.USER_IDX: np.arange(6, dtype=np.int32),
                          schema.ITEM_IDX: np.arange(6, dtype=np.int32)[::-1].copy()})
    user, item, weight = schema.positive_columns(
        frame, [schema.USER_IDX, schema.ITEM_IDX, schema.WEIGHT])
    assert np.shares_memory(user, frame[schema.USER_IDX].to_numpy())
    assert weight.tolist() == [1.0] * 6
    labelled = frame.assign(**{schema.LABEL: [1, 0, 1, 1, 0, 1]})
    user, item = schema.positive_columns(labelled, [schema.USER_IDX, schema.ITEM_IDX])
    assert user.tolist() == [0, 2, 3, 5] and item.tolist() == [5, 3, 2, 0]
    assert schema.positives(frame) is frame and len(schema.positives(labelled)) == 4


def test_the_two_kernels_agree_and_fitting_lowers_the_objective():
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 60, 700), rng.integers(0, 30, 700)
    kw = dict(n_users=60, n_items=30, factors=6, iterations=6, regularization=0.1, alpha=4.0,
              cg_steps=3, seed=5)
    a, ha = ials.fit(users, items, None, kernel="numba", **kw)
    b, _ = ials.fit(users, items, None, kernel="keras", **kw)
    assert ha["kernel"] == "numba" and ha["iterations"] == 6
    # float32 sums in different orders: round-off grows over iterations of a 3-step CG
    assert np.allclose(a["user"], b["user"], atol=2e-2) and np.allclose(a["item"], b["item"],
                                                                        atol=2e-2)
    a1, _ = ials.fit(users, items, None, kernel="numba", **{**kw, "iterations": 1})
    b1, _ = ials.fit(users, items, None, kernel="keras", **{**kw, "iterations": 1})
    assert np.allclose(a1["user"], b1["user"], atol=1e-4)
    pairs = np.unique(np.stack([users, items], 1), axis=0).T
    one, _ = ials.fit(users, items, None, kernel="numba", **{**kw, "iterations": 1})
    loss = lambda w: ials.loss(w, *pairs, alpha=4.0, regularization=0.1)  # noqa: E731
    assert loss(a) < loss(one)


def test_checkerboard_blocks_are_recovered():
    """implicit's known-answer test: users and items in two blocks, each user has seen most of
    its block's items; a rank-2 iALS ranks the unseen items of the user's block above every
    item of the other block."""
    n, half = 40, 20
    users, items = [], []
    rng = np.random.default_rng(2)
    for u in range(n):
        block = np.arange(half) + (0 if u < half else half)
        for i in block:
            if rng.random() < 0.7:
                users.append(u)
                items.append(i)
    users, items = np.array(users), np.array(items)
    w, _ = ials.fit(users, items, None, n_users=n, n_items=n, factors=2, iterations=15,
                    regularization=0.01, alpha=10.0, cg_steps=3, seed=0)
    scores = w["user"] @ w["item"].T
    for u in range(n):
        own = slice(0, half) if u < half else slice(half, n)
        other = slice(half, n) if u < half else slice(0, half)
        assert scores[u, own].min() > scores[u, other].max()


def test_fit_is_seeded_and_weights_scale_the_confidence():
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 30, 300), rng.integers(0, 20, 300)
    kw = dict(n_users=30, n_items=20, factors=4, iterations=3, regularization=0.1, alpha=2.0,
              cg_steps=3, seed=9)
    a, _ = ials.fit(users, items, None, **kw)
    b, _ = ials.fit(users, items, np.ones(len(users), np.float32), **kw)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # weight 1 == no weight
    c, _ = ials.fit(users, items, np.full(len(users), 2.0, np.float32), **kw)
    d, _ = ials.fit(users, items, None, **{**kw, "alpha": 4.0})
    assert np.allclose(c["user"], d["user"], atol=1e-5)  # weight 2 at alpha 2 == alpha 4
    e, _ = ials.fit(users, items, None, **{**kw, "seed": 10})
    assert not np.allclose(a["user"], e["user"])


def test_deadline_stops_between_iterations_and_warm_start_copies_known_rows():
    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 30, 300), rng.integers(0, 20, 300)
    kw = dict(n_users=30, n_items=20, factors=4, regularization=0.1, alpha=2.0, cg_steps=3,
              seed=9)
    w, h = ials.fit(users, items, None, iterations=10, deadline=time.monotonic(), **kw)
    assert h["iterations"] == 1 and h["stopped"].startswith("time budget")
    init = {"user": np.zeros((30, 4), np.float32), "item": np.zeros((20, 4), np.float32)}
    init["user"][:5] = 1.0
    init["item"][:3] = 2.0
    _, h = ials.fit(users, items, None, iterations=1, init=init, **kw)
    assert h["warm_start_rows"] == 8
    with pytest.raises(ValueError, match="dim"):
        ials.fit(users, items, None, iterations=1, init={"user": np.ones((30, 3)),
                                                         "item": np.ones((20, 3))}, **kw)


def test_budget_is_linear_in_events_and_clamped():
    p = settings.step_params(train.PARAMS, settings.with_overrides(settings.load_params(), {
        "train.time_budget.s_per_million_events": 20, "train.time_budget.min_s": 100,
        "train.time_budget.max_s": 1000}))
    assert train.budget_s(p, 100_000) == 100
    assert train.budget_s(p, 10_000_000) == 200
    assert train.budget_s(p, 100_000_000) == 1000


def test_mf_batch_auto_caps_the_steps_per_epoch():
    base = settings.load_params()
    p = settings.step_params(train.PARAMS, settings.with_overrides(
        base, {"train.mf_softmax.batch_size": "auto", "train.mf_softmax.learning_rate": 0.003}))
    assert train.mf_batch(p, 80_000) == (512, 0.003)
    batch, lr = train.mf_batch(p, 7_800_000)
    assert batch == 8192 and -(-7_800_000 // batch) <= train.MAX_STEPS_PER_EPOCH
    assert lr == pytest.approx(0.003 * 4)
    fixed = settings.step_params(train.PARAMS, settings.with_overrides(
        base, {"train.mf_softmax.batch_size": 1024}))
    assert train.mf_batch(fixed, 7_800_000)[0] == 1024


@pytest.fixture(scope="module")
def parts():
    from nightrec.tasks import split

    df = labelled_events(n_users=300, n_items=120, n_interactions=9000, seed=7)
    out = split.split_interactions(df, valid_fraction=0.1, test_fraction=0.1,
                                   min_user_events_for_holdout=5)
    return out


def test_ials_is_a_candidate_and_its_refit_repeats_the_iterations(parts, tmp_path):
    p = settings.step_params(train.PARAMS, settings.with_overrides(settings.load_params(), {
        "train.candidates": ["ials"], "train.ials.factors": 8, "train.ials.iterations": 4}))
    res = train.train_both(parts, n_users=300, n_items=120, p=p, workdir=tmp_path)
    assert res["chosen"] == "ials"
    assert res["selection"]["candidates"]["ials"]["best_epoch"] == 4
    assert res["full"][1]["iterations"] == 4 and res["full"][0]["user"].shape == (300, 8)
    assert res["selection"]["time_budget_s"] >= float(p["train.time_budget.min_s"])
    from nightrec.tasks import evaluate

    again = evaluate.ranking_metric(res["holdout"][0], parts["train"], parts["valid"],
                                    metric="ndcg_at_10", n_users=300)
    assert res["selection"]["candidates"]["ials"]["valid_ndcg_at_10"] == again
    # the shipped refit saw train + valid: users whose only events are in valid get a vector
    valid_only = np.setdiff1d(parts["valid"][schema.USER_IDX], parts["train"][schema.USER_IDX])
    if len(valid_only):
        assert np.any(res["full"][0]["user"][valid_only] != 0)


def test_an_mf_fit_projected_past_its_share_is_skipped(parts, tmp_path):
    """A deadline already passed: mf_softmax stops after its probe steps and is skipped, with the
    reason in selection.json; the run goes on with the others."""
    p = settings.step_params(train.PARAMS, settings.with_overrides(settings.load_params(), {
        "train.candidates": ["ials", "mf_softmax"], "train.ials.factors": 8,
        "train.ials.iterations": 2, "train.mf_softmax.batch_size": 16,
        "train.mf_softmax.embedding_dim": 8, "train.time_budget.min_s": 0.01,
        "train.time_budget.max_s": 0.01}))
    res = train.train_both(parts, n_users=300, n_items=120, p=p, workdir=tmp_path)
    assert "mf_softmax" in res["selection"]["skipped"]
    assert "projected" in res["selection"]["skipped"]["mf_softmax"]
    assert set(res["selection"]["candidates"]) == {"ials"} and res["chosen"] == "ials"


def test_a_regularization_list_is_searched_on_valid_and_the_refit_uses_the_choice(parts,
                                                                                   tmp_path):
    from nightrec.tasks import evaluate

    p = settings.step_params(train.PARAMS, settings.with_overrides(settings.load_params(), {
        "train.candidates": ["ials"], "train.ials.factors": 8, "train.ials.iterations": 3,
        "train.ials.regularization": [0.01, 30.0, 5000.0]}))
    res = train.train_both(parts, n_users=300, n_items=120, p=p, workdir=tmp_path)
    cand = res["selection"]["candidates"]["ials"]
    figures = {float(r): s["valid_ndcg_at_10"] for r, s in cand["search"].items()}
    assert set(figures) == {0.01, 30.0, 5000.0}
    assert cand["regularization"] == max(figures, key=figures.get)
    assert res["full"][1]["regularization"] == cand["regularization"]
    # each searched fit is scored like the candidates: the chosen one's figure is reproducible
    again, _ = train.fit_ials(parts["train"], n_users=300, n_items=120, p=p,
                              regularization=cand["regularization"])
    sample = train.valid_sample(parts["valid"], max_users=int(p["train.valid_users"]),
                                seed=int(p["seed"]))
    assert evaluate.ranking_metric(again, parts["train"], sample, metric="ndcg_at_10",
                                   n_users=300) == figures[cand["regularization"]]
    with pytest.raises(ValueError, match="regularization"):
        train.ials_regularizations(settings.step_params(train.PARAMS, settings.with_overrides(
            settings.load_params(), {"train.ials.regularization": [1.0, -2.0]})))


def test_a_machine_without_gpu_device_files_counts_none_without_loading_tensorflow():
    """gpu_count answers 0 from the device files alone (TensorFlow's import is ~0.5 GB resident
    for the rest of a ``nightrec run`` process); where a GPU's device file exists it asks the
    backend, so this check is for CPU machines only."""
    import glob
    import subprocess
    import sys

    if any(glob.glob(p) for p in ials.GPU_DEVICE_FILES):
        pytest.skip("a GPU device file exists: the backend is asked")
    code = ("import sys; from nightrec.ml import ials; n = ials.gpu_count(); "
            "print(n, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False", "False"]


def test_the_first_epoch_projection_counts_the_tracing_step_once(monkeypatch):
    """mf_softmax's first epoch is projected from a probe of its first steps. The first step
    traces and compiles the train function (seconds on a busy CPU): counted once, not spread
    over every step of the epoch, so a fit that fits its share is not skipped for it."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def probe(step_s: float):
        cb = train._budget_callback(deadline=130.0, steps=1000, probe=20)

        class Model:
            stop_training = False

        cb.set_model(Model())
        clock[0] = 100.0
        cb.on_epoch_begin(0)
        clock[0] += 5.0  # the tracing step
        cb.on_train_batch_end(0)
        for batch in range(1, 20):
            clock[0] += step_s
            cb.on_train_batch_end(batch)
        return cb

    fits = probe(0.02)  # 5 s + 999 x 20 ms = 25 s of a 30 s share (the mean pace said 269 s)
    assert fits.over_budget is None and not fits.model.stop_training
    slow = probe(0.04)  # 5 s + 999 x 40 ms = 45 s: skipped, and the message says why
    assert slow.model.stop_training and "projected at 45 s" in slow.over_budget
