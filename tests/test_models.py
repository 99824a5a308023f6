"""Model families, candidate selection, early stopping, distribution and the gate (issue 4).

Small seeded data from the project's own generator; no S3 needed except where stated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from nightrec.core import schema, settings
from nightrec.ml import models
from nightrec.tasks import evaluate, split, train
from tests.conftest import labelled_events, reference_ease

ROOT = Path(__file__).resolve().parents[1]


def _params(**train_overrides) -> dict:
    base = {"train.mf_softmax.epochs": 6, "train.mf_softmax.embedding_dim": 16,
            "train.mf_softmax.patience": 2}
    return settings.with_overrides(
        settings.load_params(), {**base, **{f"train.{k}": v for k, v in train_overrides.items()}})


@pytest.fixture(scope="module")
def parts():
    df = labelled_events(n_users=300, n_items=120, n_interactions=9000, seed=7)
    out = split.split_interactions(df, valid_fraction=0.1, test_fraction=0.1,
                                   min_user_events_for_holdout=5)
    out["n_users"], out["n_items"] = 300, 120
    return out


def _numpy_edlae(x: np.ndarray, l2: float, dropout: float) -> np.ndarray:
    g = x.T @ x
    lam = l2 + dropout / (1 - dropout) * np.diag(g)
    p = np.linalg.inv(g + np.diag(lam))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_ease_in_keras_ops_matches_the_closed_form(dropout):
    rng = np.random.default_rng(3)
    x = (rng.random((60, 25)) < 0.2).astype(np.float64)
    got = models.fit_ease(sparse.csr_matrix(x), l2=5.0, dropout=dropout)
    want = _numpy_edlae(x, 5.0, dropout)
    assert got["item_item"].dtype == np.float32 and got["item_item"].shape == (25, 25)
    assert np.allclose(got["item_item"], want, atol=1e-5)
    assert (np.diag(got["item_item"]) == 0).all()
    with pytest.raises(ValueError, match="dropout"):
        models.fit_ease(sparse.csr_matrix(x), l2=5.0, dropout=1.0)


def test_item_item_scores_come_from_the_users_own_rows():
    # items 0 and 1 always co-occur; item 2 is unrelated: a user with item 0 gets item 1 first.
    x = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32)
    emb = models.fit_ease(sparse.csr_matrix(x), l2=0.5, dropout=0.0)
    seen = sparse.csr_matrix(x)
    recs = evaluate.recommend(emb, seen, np.array([4]), 1)
    assert recs.tolist() == [[1]]
    rows = models.InteractionRows(seen)
    assert rows[np.array([3, 4])].tolist() == [[0, 0, 1], [1, 0, 0]]


def test_align_maps_by_external_id_and_sinks_unknown_items():
    emb = {"user": np.array([[1.0], [2.0]], np.float32), "item": np.array([[3.0], [4.0]], np.float32),
           "item_bias": np.array([0.5, 0.25], np.float32)}
    out = models.align(emb, model_users=np.array(["a", "b"]), model_items=np.array(["x", "y"]),
                       user_ids=np.array(["b", "new"]), item_ids=np.array(["y", "z", "x"]))
    assert out["user"].ravel().tolist() == [2.0, 0.0]
    assert out["item"].ravel().tolist() == [4.0, 0.0, 3.0]
    assert out["item_bias"][[0, 2]].tolist() == [0.25, 0.5] and out["item_bias"][1] < -1e29
    ii = {"item_item": np.array([[0, 1], [2, 0]], np.float32), "item_bias": np.zeros(2, np.float32)}
    out = models.align(ii, model_users=np.array([]), model_items=np.array(["x", "y"]),
                       user_ids=np.array(["u"]), item_ids=np.array(["y", "z", "x"]))
    assert out["item_item"].tolist() == [[0, 0, 2], [0, 0, 0], [1, 0, 0]]
    assert out["item_bias"][1] < -1e29 and out["item_bias"][[0, 2]].tolist() == [0, 0]


def test_mf_early_stops_on_the_valid_ranking_metric_and_keeps_the_best_epoch(parts, tmp_path):
    p = settings.step_params(train.PARAMS, _params(**{"mf_softmax.epochs": 8,
                                                      "mf_softmax.patience": 1}))
    emb, hist, _ = train.fit_mf(parts["train"], parts["valid"], n_users=parts["n_users"],
                                n_items=parts["n_items"], p=p, workdir=tmp_path,
                                tensorboard_dir=tmp_path / "tb")
    curve = hist["val_ndcg_at_10"]
    assert len(curve) == len(hist["loss"]) <= 8
    assert hist["best_epoch"] == int(np.argmax(curve)) + 1
    if len(curve) < 8:  # stopped early: patience 1 means the last epoch was no better
        assert curve[-1] <= max(curve[:-1])
    # the returned weights are the best epoch's, not the last one's
    again = evaluate.ranking_metric(emb, parts["train"], parts["valid"], metric="ndcg_at_10",
                                    n_users=parts["n_users"])
    assert again == pytest.approx(max(curve), abs=1e-6)
    assert (tmp_path / "checkpoint.weights.h5").exists()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_sampled_softmax_learns_with_popularity_negatives_and_is_chosen_above_the_limit(
        parts, tmp_path):
    params = _params(**{"mf_softmax.loss": "auto", "mf_softmax.full_softmax_max_items": 100,
                        "mf_softmax.epochs": 8, "mf_softmax.learning_rate": 0.01})
    params["augment"].update(negatives_per_positive=8, negative_alpha=0.75)
    p = settings.step_params(train.PARAMS, params)
    assert train.softmax_kind(p, 100) == "full" and train.softmax_kind(p, 120) == "sampled"
    emb, hist, _ = train.fit_mf(parts["train"], parts["valid"], n_users=parts["n_users"],
                                n_items=parts["n_items"], p=p, workdir=tmp_path)
    assert hist["loss_kind"] == "sampled" and hist["loss"][-1] < hist["loss"][0]
    pop = evaluate.ranking_metric(
        evaluate.popularity_model(parts["train"], n_users=parts["n_users"],
                                  n_items=parts["n_items"]),
        parts["train"], parts["valid"], metric="ndcg_at_10", n_users=parts["n_users"])
    assert hist["best_val_ndcg_at_10"] > pop  # it learned more than popularity
    again, _, _ = train.fit_mf(parts["train"], parts["valid"], n_users=parts["n_users"],
                               n_items=parts["n_items"], p=p, workdir=tmp_path)
    assert all(np.array_equal(emb[k], again[k]) for k in emb)  # seeded negatives too


def test_side_features_are_encoded_and_enter_the_exported_vectors(parts, tmp_path):
    items = pd.DataFrame({"item_idx": range(3), "year": [1990.0, np.nan, 2000.0],
                          "genres_multi_hot": [np.array([1, 0], np.int8),
                                               np.array([0, 1], np.int8),
                                               np.array([1, 1], np.int8)]})
    users = pd.DataFrame({"user_idx": range(3), "gender": np.array([1, 2, 0], np.int32)})
    m = models.side_matrix(items, {"numeric": ["year"], "multi_hot": ["genres"]})
    assert m.shape == (3, 3) and m[1, 0] == 0.0 and m[0, 0] == -m[2, 0]  # standardised, NaN 0
    assert m[:, 1:].tolist() == [[1, 0], [0, 1], [1, 1]]
    u = models.side_matrix(users, {"categorical": ["gender"], "numeric": ["absent"]})
    assert u.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]  # code 0 (missing) has a column
    assert models.side_matrix(users, {"numeric": ["absent"]}) is None
    # a categorical with more values than max_categories keeps the most frequent, the rest
    # share the last ("other") column: codes 5 (x3) and 2 (x2) kept, 1, 3 and 4 pooled
    many = pd.DataFrame({"zip": np.array([5, 5, 5, 2, 2, 1, 3, 4], np.int32)})
    z = models.side_matrix(many, {"categorical": ["zip"]}, max_categories=3)
    assert z.tolist() == [[1, 0, 0]] * 3 + [[0, 1, 0]] * 2 + [[0, 0, 1]] * 3

    rng = np.random.default_rng(0)
    side = {"user": rng.random((parts["n_users"], 4)).astype(np.float32),
            "item": np.eye(parts["n_items"], 6, dtype=np.float32)}
    p = settings.step_params(train.PARAMS, _params(**{"mf_softmax.epochs": 2}))
    emb, hist, model = train.fit_mf(parts["train"], parts["valid"], n_users=parts["n_users"],
                                    n_items=parts["n_items"], p=p, workdir=tmp_path, side=side)
    ids = np.asarray(model.user.embeddings)
    w = np.asarray(model.user_map.kernel)
    assert np.abs(w).max() > 0  # the side map learned
    assert np.allclose(emb["user"], ids + side["user"] @ w, atol=1e-5)
    assert hist["best_val_ndcg_at_10"] > 0


def test_cpu_training_is_seeded_and_deterministic(parts, tmp_path):
    p = settings.step_params(train.PARAMS, _params(**{"mf_softmax.epochs": 2}))
    a, _, _ = train.fit_mf(parts["train"], None, n_users=parts["n_users"],
                           n_items=parts["n_items"], p=p, workdir=tmp_path)
    b, _, _ = train.fit_mf(parts["train"], None, n_users=parts["n_users"],
                           n_items=parts["n_items"], p=p, workdir=tmp_path)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_candidates_are_chosen_by_valid_metric_and_the_winner_shipped_from_train_and_valid(
        parts, tmp_path):
    """issue 12's rule (``train.ship_fit: train_valid``, the default; ``all`` is
    tests/test_tuning.py's)."""
    p = settings.step_params(train.PARAMS, _params(candidates=["ease", "ials", "mf_softmax"],
                                                   ship_fit="train_valid",
                                                   **{"blend.enabled": False}))
    res = train.train_both(parts, n_users=parts["n_users"], n_items=parts["n_items"], p=p,
                           workdir=tmp_path)
    sel = res["selection"]
    scores = {n: c["valid_ndcg_at_10"] for n, c in sel["candidates"].items()}
    assert set(scores) == {"ease", "ials", "mf_softmax"}
    chosen = "ease"  # each challenger against the choice so far, on its paired gain
    for name, rec in sel["choice"]["challengers"].items():
        assert rec["against"] == chosen
        chosen = name if rec["lower"] > rec["needed"] else chosen
    assert sel["chosen"] == chosen and list(sel["choice"]["challengers"]) == ["ials", "mf_softmax"]
    assert sel["chosen"] == res["chosen"]
    # what ships is refit on train + valid, never on the test split the gate scores it on
    shipped_on = pd.concat([parts["train"], parts["valid"]])
    assert res["train_cutoff"] == sel["train_cutoff"] == int(shipped_on[schema.TIMESTAMP].max())
    assert res["train_cutoff"] < int(parts["test"][schema.TIMESTAMP].min())  # global_time
    assert res["full"][1]["fitted_on"] == ["train", "valid"]
    if res["chosen"] == "ease":
        point = res["holdout"][1]["params"]  # chosen on valid (tests/test_tuning.py)
        assert res["full"][1]["params"] == point
        want = reference_ease(shipped_on, point, n_users=parts["n_users"],
                              n_items=parts["n_items"], window_weight=_params()["train"]["ease"][
                                  "window_weight"])
        assert np.allclose(res["full"][0]["item_item"], want["item_item"])
    elif res["chosen"] == "ials":
        assert res["full"][1]["iterations"] == res["holdout"][1]["best_epoch"]
    else:
        assert len(res["full"][1]["loss"]) == res["holdout"][1]["best_epoch"]
        p_mf = settings.step_params(train.PARAMS, _params(candidates=["ease", "ials",
                                                                  "mf_softmax"]))
        again, _, _ = train.fit_mf(shipped_on, None, n_users=parts["n_users"],
                                   n_items=parts["n_items"], p=p_mf, workdir=tmp_path,
                                   epochs=res["holdout"][1]["best_epoch"])
        assert all(np.array_equal(again[k], res["full"][0][k]) for k in again)


def test_every_candidate_is_scored_on_one_valid_sample_by_one_function(parts, tmp_path):
    """EASE used to be scored on every valid user and mf_softmax on its best epoch over its own
    sample: now both on one seeded sample of ``train.valid_users`` users, final weights,
    ``evaluate.ranking_metric``."""
    sample = train.valid_sample(parts["valid"], max_users=40, seed=settings.load_params()["seed"])
    assert sample[schema.USER_IDX].nunique() == 40 < parts["valid"][schema.USER_IDX].nunique()
    figures = {}
    for name in ("ease", "mf_softmax"):
        p = settings.step_params(train.PARAMS, _params(candidates=[name], valid_users=40))
        res = train.train_both(parts, n_users=parts["n_users"], n_items=parts["n_items"], p=p,
                               workdir=tmp_path)
        assert res["selection"]["valid_users"] == 40
        assert res["selection"]["valid_rows"] == len(sample)
        figures[name] = res["selection"]["candidates"][name]["valid_ndcg_at_10"]
        again = evaluate.ranking_metric(res["holdout"][0], parts["train"], sample,
                                        metric="ndcg_at_10", n_users=parts["n_users"])
        assert figures[name] == pytest.approx(again, abs=1e-9)
        if name == "mf_softmax":  # it early-stopped on the same sample: its best epoch's figure
            assert figures[name] == pytest.approx(res["holdout"][1]["best_val_ndcg_at_10"],
                                                  abs=1e-6)
    everyone = evaluate.ranking_metric(
        train.fit_ease(parts["train"], n_users=parts["n_users"], n_items=parts["n_items"],
                       p=settings.step_params(train.PARAMS, _params()))[0],
        parts["train"], parts["valid"], metric="ndcg_at_10", n_users=parts["n_users"])
    assert figures["ease"] != pytest.approx(everyone, abs=1e-9)  # not all valid users


def test_model_version_includes_the_code_version(monkeypatch):
    p = settings.step_params(train.PARAMS, _params())
    a = train.model_version("2026-11-28", "d" * 32, "ease", p, code_version="abc123")
    b = train.model_version("2026-11-28", "d" * 32, "ease", p, code_version="abc124")
    assert a != b and a.split("-")[:2] == b.split("-")[:2] == ["ease", "20261128"]
    assert a == train.model_version("2026-11-28", "d" * 32, "ease", p, code_version="abc123")
    # by default, registry.code_version(): what a deploy stamps
    monkeypatch.setenv("NIGHTREC_CODE_VERSION", "abc123")
    assert train.model_version("2026-11-28", "d" * 32, "ease", p) == a
    monkeypatch.setenv("NIGHTREC_CODE_VERSION", "abc124")
    assert train.model_version("2026-11-28", "d" * 32, "ease", p) == b
    # and the shipped weights: the same inputs fitted to other weights are another version
    w1 = train.model_version("2026-11-28", "d" * 32, "ease", p, code_version="abc123",
                             weights="1" * 64)
    assert w1 == train.model_version("2026-11-28", "d" * 32, "ease", p, code_version="abc123",
                                     weights="1" * 64)
    assert w1 != train.model_version("2026-11-28", "d" * 32, "ease", p, code_version="abc123",
                                     weights="2" * 64)


def test_choose_keeps_the_preferred_candidate_unless_another_clearly_wins():
    names = ["ease", "mf_softmax"]
    assert train.choose(names, {"ease": 0.20, "mf_softmax": 0.209}, min_gain=0.05) == "ease"
    assert train.choose(names, {"ease": 0.20, "mf_softmax": 0.211}, min_gain=0.05) == "mf_softmax"
    assert train.choose(names, {"ease": 0.20, "mf_softmax": 0.201}, min_gain=0.0) == "mf_softmax"
    assert train.choose(names[::-1], {"ease": 0.30, "mf_softmax": 0.20}, min_gain=0.05) == "ease"


def test_candidate_list_is_checked_and_ease_fits_the_head_above_its_catalogue_limit():
    p = settings.step_params(train.PARAMS, _params(**{"ease.max_items": 100},
                                                   candidates=["ease", "ials", "mf_softmax"]))
    assert train.candidates(p, 101) == (["ease", "ials", "mf_softmax"], {})
    for bad in ([], ["ease", "deep_magic"]):
        with pytest.raises(ValueError, match="train.candidates"):
            train.candidates(settings.step_params(train.PARAMS, _params(candidates=bad)), 10)
    # without a GPU, mf_softmax is not a candidate above cpu_max_events train events (with one, or
    # at or below the limit, or as the only candidate, it is)
    limit = int(p["train.mf_softmax.cpu_max_events"])
    names, skipped = train.candidates(p, 101, events=limit + 1, gpus=0)
    assert names == ["ease", "ials"] and "cpu_max_events" in skipped["mf_softmax"]
    assert train.candidates(p, 101, events=limit, gpus=0) == (["ease", "ials", "mf_softmax"], {})
    assert train.candidates(p, 101, events=limit + 1, gpus=1)[1] == {}
    only = settings.step_params(train.PARAMS, _params(candidates=["mf_softmax"]))
    assert train.candidates(only, 101, events=limit + 1, gpus=0) == (["mf_softmax"], {})
    rng = np.random.default_rng(5)
    x = (rng.random((80, 30)) < 0.25).astype(np.float64)
    x[:, 3] = 1.0  # the most interacted item is in the head
    emb = models.fit_ease(sparse.csr_matrix(x), l2=5.0, dropout=0.0, max_items=10)
    head = models.item_index(emb)
    counts = x.sum(axis=0)
    assert len(head) == 10 and 3 in head and np.all(np.diff(head) > 0)
    assert counts[head].min() >= np.delete(counts, head).max()  # the 10 most interacted
    # the head model is EASE on the head's columns, exactly
    want = _numpy_edlae(x[:, head], 5.0, 0.0)
    assert np.allclose(emb["item_item"], want, atol=1e-5)
    assert np.all(emb["item_bias"][head] == 0)
    assert np.all(np.delete(emb["item_bias"], head) == models.UNKNOWN_ITEM_BIAS)
    # ranked over the head only, items mapped back, seen items never recommended
    seen = sparse.csr_matrix(x[:5])
    recs = evaluate.recommend(emb, seen, np.arange(5), k=5)
    assert np.all(np.isin(recs[recs >= 0], head))
    for u in range(5):
        assert not set(recs[u][recs[u] >= 0]) & set(np.flatnonzero(x[u]))
        dense = x[u, head] @ want  # the head model's scores, by hand
        unseen = np.flatnonzero(x[u, head] == 0)
        best = head[unseen[np.argsort(-dense[unseen], kind="stable")[:5]]]
        assert np.array_equal(recs[u][:len(best)], best)
        assert np.all(recs[u][len(best):] == -1)


def test_warm_start_copies_the_champions_rows_and_leaves_new_ones_random(parts):
    p = settings.step_params(train.PARAMS, _params())
    model = models.build_mf(n_users=3, n_items=4, embedding_dim=2, l2=0.0, seed=1)
    before = models.mf_weights(model)
    init = {"user": np.array([[1, 1], [0, 0], [2, 2]], np.float32),
            "item": np.full((4, 2), 5, np.float32),
            "item_bias": np.array([1, models.UNKNOWN_ITEM_BIAS, 2, 3], np.float32)}
    assert models.warm_start(model, init) == 2 + 3
    after = models.mf_weights(model)
    assert after["user"][[0, 2]].tolist() == [[1, 1], [2, 2]]
    assert np.array_equal(after["user"][1], before["user"][1])
    assert np.array_equal(after["item"][1], before["item"][1])
    assert after["item_bias"].tolist() == [1, 0, 2, 3]
    assert p["train.mf_softmax.warm_start"] is False  # off unless params ask


@pytest.mark.parametrize(
    ("model", "pop", "champ", "blessed", "reason"),
    [
        (0.30, 0.20, None, True, "passed"),             # first run: no champion
        (0.20, 0.20, None, False, "popularity floor"),  # no lift over popularity
        (0.30, 0.20, 0.30, True, "passed"),             # as good as the champion
        (0.295, 0.20, 0.30, True, "passed"),            # within the 2% tolerance
        (0.29, 0.20, 0.30, False, "champion tolerance"),  # a regression beyond it
    ],
)
def test_gate_floor_and_champion_tolerance(model, pop, champ, blessed, reason):
    result = {"model": {"ndcg_at_10": model}, "popularity": {"ndcg_at_10": pop}}
    if champ is not None:  # compared on the champion's unseen events (tests/test_gate.py)
        result["champion_comparison"] = {"compared": True, "later_events": 10,
                                         "model": {"ndcg_at_10": model},
                                         "champion": {"ndcg_at_10": champ}}
    v = evaluate.gate(result, gate_metric="ndcg_at_10", min_lift=0.05, max_regression=0.02)
    assert v["blessed"] is blessed and reason in v["reason"]
    assert v["champion"] == champ


def test_mirrored_strategy_trains_on_two_cpu_replicas(tmp_path):
    """The distributed path on CPU: two logical CPU devices, MirroredStrategy over both."""
    script = textwrap.dedent(f"""
        import json, os, sys
        os.environ["KERAS_BACKEND"] = "tensorflow"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np, pandas as pd
        from pathlib import Path
        from nightrec.core import settings
        from nightrec.tasks import train
        params = json.loads(sys.argv[1])
        rng = np.random.default_rng(0)
        df = pd.DataFrame({{"user_idx": rng.integers(0, 50, 2000), "item_idx": rng.integers(0, 30, 2000),
                           "label": 1, "weight": np.float32(1)}})
        p = settings.step_params(train.PARAMS, params)
        emb, hist, _ = train.fit_mf(df, None, n_users=50, n_items=30, p=p, workdir=Path(sys.argv[2]))
        print(json.dumps({{"plan": hist["device_plan"], "loss": hist["loss"],
                          "finite": bool(np.isfinite(emb["user"]).all())}}))
    """)
    params = _params(strategy="mirrored", **{"mf_softmax.epochs": 3})
    out = subprocess.run([sys.executable, "-c", script, json.dumps(params), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["plan"]["strategy"] == "mirrored" and res["plan"]["replicas"] == 2
    assert res["finite"] and res["loss"][-1] < res["loss"][0]


def _gpus() -> int:
    try:
        return train.device_plan()["gpus"]
    except Exception:  # noqa: BLE001 - no backend, no GPU
        return 0


@pytest.mark.skipif(_gpus() == 0, reason="needs a GPU")
def test_gpu_training_uses_mixed_precision_and_learns(parts, tmp_path):
    p = settings.step_params(train.PARAMS, _params())
    emb, hist, _ = train.fit_mf(parts["train"], parts["valid"], n_users=parts["n_users"],
                                n_items=parts["n_items"], p=p, workdir=tmp_path)
    assert hist["device_plan"]["mixed_precision"] and hist["device_plan"]["gpus"] >= 1
    assert all(np.isfinite(v).all() for v in emb.values())
    pop = evaluate.ranking_metric(
        evaluate.popularity_model(parts["train"], n_users=parts["n_users"],
                                  n_items=parts["n_items"]),
        parts["train"], parts["valid"], metric="ndcg_at_10", n_users=parts["n_users"])
    assert hist["best_val_ndcg_at_10"] > pop


def test_l2_penalises_only_the_rows_a_batch_uses():
    """Under Adam, a whole-table L2 moves every row a step towards zero each batch, whatever
    the row's data; at 200k users that erased the user vectors (the model tied popularity).
    A step on user 0's events must leave every other user's vector as it was."""
    keras = models.keras_module()
    model = models.build_mf(n_users=50, n_items=20, embedding_dim=4, l2=0.5, seed=3)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = np.asarray(model.user.embeddings).copy()
    model.fit(np.zeros(8, np.int32), np.arange(8, dtype=np.int32), epochs=1, batch_size=8,
              verbose=0)
    after = np.asarray(model.user.embeddings)
    assert not np.allclose(after[0], before[0])
    np.testing.assert_array_equal(after[1:], before[1:])
    # the penalty is part of the loss: the same step with l2 = 0 reports a smaller loss
    plain = models.build_mf(n_users=50, n_items=20, embedding_dim=4, l2=0.0, seed=3)
    plain.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    penalised = models.build_mf(n_users=50, n_items=20, embedding_dim=4, l2=0.5, seed=3)
    penalised.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    x, y = np.zeros(8, np.int32), np.arange(8, dtype=np.int32)
    assert penalised.evaluate(x, y, verbose=0) > plain.evaluate(x, y, verbose=0)


def _window_gram_by_pairs(user, item, ts, *, n_items, head, window):
    """window_gram the slow way: each user's items (latest event per item) at the position of
    their timestamp among the user's distinct timestamps, every pair weighted
    max(0, 1 - d / (window + 1)) by its distance d in positions, the diagonal once per user."""
    keep = np.arange(n_items) if head is None else head
    pos = {int(i): k for k, i in enumerate(keep)}
    w = np.zeros((len(keep), len(keep)))
    for u in np.unique(user):
        latest = {}
        for i, t in zip(item[user == u], ts[user == u], strict=True):
            latest[int(i)] = max(latest.get(int(i), t), t)
        times = sorted(set(latest.values()))
        at = {i: times.index(t) for i, t in latest.items() if i in pos}
        for a in at:
            for b in at:
                d = abs(at[a] - at[b])
                w[pos[a], pos[b]] += max(0.0, 1.0 - d / (window + 1))
    return w


@pytest.mark.parametrize("head", [None, np.array([0, 2, 3, 5, 8])])
@pytest.mark.parametrize("window", [1, 3, 20])
@pytest.mark.parametrize("ties", [False, True])
def test_window_gram_weighs_each_users_pairs_by_their_distance_and_stays_psd(head, window,
                                                                               ties):
    rng = np.random.default_rng(3)
    rows = [(u, i) for u in range(12) for i in rng.choice(10, size=rng.integers(1, 9),
                                                          replace=False)]
    rows += rows[:6]  # pairs met twice: counted once, at their latest event
    user = np.array([r[0] for r in rows])
    item = np.array([r[1] for r in rows])
    # distinct times, or (ties) a few seconds only, so that most events share theirs
    ts = (rng.integers(0, 4, len(rows)) if ties else rng.permutation(len(rows))).astype(np.int64)
    got = models.window_gram(user, item, ts, n_items=10, head=head, window=window)
    want = _window_gram_by_pairs(user, item, ts, n_items=10, head=head, window=window)
    assert got.shape == want.shape and np.allclose(got, want)
    # the plain Gram's diagonal, and positive semi-definite: EASE's Cholesky needs no more l2
    x = sparse.csr_matrix((np.ones(len(rows)), (user, item)), shape=(12, 10))
    x.data[:] = 1.0
    plain = models.item_gram(x)[0]
    assert np.allclose(np.diag(got), np.diag(plain)[slice(None) if head is None else head])
    assert np.linalg.eigvalsh(got).min() > -1e-9
    # the order of tied events plays no part: renaming the items permutes the matrix only
    perm = rng.permutation(10)
    renamed = models.window_gram(user, perm[item], ts, n_items=10, head=None, window=window)
    full = models.window_gram(user, item, ts, n_items=10, head=None, window=window)
    assert np.allclose(renamed[np.ix_(perm, perm)], full)
    with pytest.raises(ValueError, match="window"):
        models.window_gram(user, item, ts, n_items=10, head=head, window=0)


def test_a_windowed_ease_ranks_the_session_partner_first_where_plain_co_occurrence_ties():
    """Items 0..9 come in five session pairs (0, 1), (2, 3), ...; every user meets every item,
    the five sessions in a random order, a session's two items one after the other. Plain
    co-occurrence is the same for every pair of items (every user has both): it cannot find
    an item's partner. The windowed Gram can: partners are one event apart for every user."""
    from nightrec.tasks import train

    rng = np.random.default_rng(5)
    rows, t = [], 0
    for u in range(40):
        for s in rng.permutation(5):
            for i in rng.permutation([2 * s, 2 * s + 1]):
                rows.append((u, int(i), t))
                t += 1
    df = pd.DataFrame(rows, columns=[schema.USER_IDX, schema.ITEM_IDX, schema.TIMESTAMP])
    n_users = int(df[schema.USER_IDX].max()) + 1
    p = settings.step_params(train.PARAMS, _params())
    x = models.interaction_matrix(df, n_users=n_users, n_items=10, user_col=schema.USER_IDX,
                                  item_col=schema.ITEM_IDX)
    plain, _ = train.ease_gram(x, df, p=p, window=None)
    windowed, _ = train.ease_gram(x, df, p=p, window=1)
    for i in range(10):
        partner = i ^ 1
        others = [j for j in range(10) if j not in (i, partner)]
        assert plain[i, partner] == max(plain[i, j] for j in others)  # plain: a tie
        assert windowed[i, partner] > max(windowed[i, j] for j in others)
    b = models.ease_from_gram(windowed, None, 10, l2=1.0, dropout=0.0)["item_item"]
    assert all(np.argmax(b[i]) == i ^ 1 for i in range(10))
    with pytest.raises(ValueError, match="timestamps"):
        train.ease_gram(x, df.drop(columns=schema.TIMESTAMP), p=p, window=1)


def test_keras_tensor_conversions_leave_no_numpy_2_warning_in_the_task_log():
    # Keras converts variables with np.array(x); TensorFlow's __array__ has no copy keyword,
    # so NumPy 2 warns once per conversion: dozens of lines per fit in an Airflow task's log.
    import warnings

    keras = models.keras_module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras.ops.convert_to_numpy(keras.Variable([1.0, 2.0]))
        if not any("copy keyword" in str(w.message) for w in caught):
            pytest.skip("this TensorFlow no longer warns: the filter has nothing to hide")
        del caught[:]
        models.keras_module()  # what every model-building path calls first
        assert keras.ops.convert_to_numpy(keras.Variable([1.0, 2.0])).tolist() == [1.0, 2.0]
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == []
