"""The gate checks what ships, and compares the champion only on events it never trained on
(issue 12, item 2).

- the core: a champion that memorised today's test events (its ``train_cutoff`` after them)
  wins on the whole test split, but the comparison leaves those events out and scores both
  models on the later ones only, where the new model wins; no later event, or no cutoff: no
  comparison, with the reason;
- ``evaluate.run`` against the real SeaweedFS: with ``train.ship_fit: train_valid`` it gates
  ``full_embeddings`` (the shipped train + valid refit, not the holdout fit); with ``all`` (the
  shipped refit saw the test split) the train + valid refit of its own (``gate_fit:
  train_valid``) or the selection fit (``gate_fit: train``). It reads the champion's cutoff from the
  registry's meta.json, scores the champion's gated fit, and records the subset's size and
  both figures in metrics.json.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from nightrec.core import schema, settings
from nightrec.core.records import Split, Trained
from nightrec.ml import models
from nightrec.store import layout, storage
from nightrec.tasks import evaluate, registry, split
from tests.conftest import labelled_events

KS = [10]
N_USERS, N_ITEMS = 200, 90


@pytest.fixture(scope="module")
def parts():
    df = labelled_events(n_users=N_USERS, n_items=N_ITEMS, n_interactions=6000,
                         seed=11).drop_duplicates([schema.USER_IDX, schema.ITEM_IDX])
    return split.split_interactions(df, method="global_time", valid_fraction=0.1,
                                     test_fraction=0.2, min_user_events_for_holdout=5)


def _ease(frames) -> dict:
    x = models.interaction_matrix(pd.concat(frames), n_users=N_USERS, n_items=N_ITEMS,
                                  user_col=schema.USER_IDX, item_col=schema.ITEM_IDX)
    return models.fit_ease(x, l2=50.0, dropout=0.0)


def _memoriser(frames) -> dict:
    """A factor model that scores 1 exactly the (user, item) pairs it trained on."""
    x = models.interaction_matrix(pd.concat(frames), n_users=N_USERS, n_items=N_ITEMS,
                                  user_col=schema.USER_IDX, item_col=schema.ITEM_IDX)
    return {"user": x.toarray().astype(np.float32), "item": np.eye(N_ITEMS, dtype=np.float32),
            "item_bias": np.zeros(N_ITEMS, np.float32)}


def _cutoff_inside_test(test: pd.DataFrame) -> int:
    return int(np.quantile(test[schema.TIMESTAMP], 0.6))


def test_a_champion_that_trained_on_todays_test_events_is_compared_only_on_later_ones(parts):
    test = parts["test"]
    model = _ease([parts["train"], parts["valid"]])  # what ships: never saw the test split
    cutoff = _cutoff_inside_test(test)
    # the champion trained on everything up to its cutoff, 60% of today's test events included
    champion = _memoriser([parts["train"], parts["valid"], test[test[schema.TIMESTAMP] <= cutoff]])

    # scored on the whole test split (what the gate did before), it wins: it saw the answers
    whole = evaluate.compare_with_champion(model, champion, parts, ks=KS, n_users=N_USERS,
                                           train_cutoff=int(test[schema.TIMESTAMP].min()) - 1)
    assert whole["compared"] and whole["later_events"] == len(test)
    assert whole["champion"]["ndcg_at_10"] > 1.5 * whole["model"]["ndcg_at_10"]

    got = evaluate.compare_with_champion(model, champion, parts, train_cutoff=cutoff, ks=KS,
                                         n_users=N_USERS)
    later = test[test[schema.TIMESTAMP] > cutoff]
    assert got["compared"] and got["train_cutoff"] == cutoff
    assert got["test_events"] == len(test) and got["later_events"] == len(later) < len(test)
    earlier = pd.concat([parts["train"], parts["valid"], test[test[schema.TIMESTAMP] <= cutoff]])
    # ranked: the later events' users with some history (a cold user is no ranking question)
    assert got["users"] == len(set(later[schema.USER_IDX]) & set(earlier[schema.USER_IDX])) > 0
    assert got["model"]["ndcg_at_10"] > got["champion"]["ndcg_at_10"]
    # and the gate uses those figures: blessed, the champion figure is the subset's
    verdict = evaluate.gate(
        {"model": {"ndcg_at_10": 0.3}, "popularity": {"ndcg_at_10": 0.1},
         "champion_comparison": got},
        gate_metric="ndcg_at_10", min_lift=0.05, max_regression=0.02)
    assert verdict["blessed"] and verdict["champion"] == got["champion"]["ndcg_at_10"]
    assert verdict["model_on_champion_events"] == got["model"]["ndcg_at_10"]
    refused = evaluate.gate(
        {"model": {"ndcg_at_10": 0.3}, "popularity": {"ndcg_at_10": 0.1},
         "champion_comparison": whole},
        gate_metric="ndcg_at_10", min_lift=0.05, max_regression=0.02)
    assert not refused["blessed"] and "champion tolerance" in refused["reason"]


def test_no_later_events_or_no_cutoff_means_no_comparison_and_says_why(parts):
    model = _ease([parts["train"], parts["valid"]])
    after_all = int(parts["test"][schema.TIMESTAMP].max())

    def never(*_):
        raise AssertionError("the champion is not loaded when there is nothing to compare on")

    got = evaluate.compare_with_champion(model, never, parts, train_cutoff=after_all, ks=KS,
                                         n_users=N_USERS)
    assert not got["compared"] and got["later_events"] == 0 and "after" in got["reason"]
    none = evaluate.compare_with_champion(model, never, parts, train_cutoff=None, ks=KS,
                                          n_users=N_USERS)
    assert not none["compared"] and "train_cutoff" in none["reason"]
    verdict = evaluate.gate({"model": {"ndcg_at_10": 0.3}, "popularity": {"ndcg_at_10": 0.1},
                             "champion_comparison": got},
                            gate_metric="ndcg_at_10", min_lift=0.05, max_regression=0.02)
    assert verdict["blessed"] and verdict["champion"] is None


def _npz(uri: str, emb: dict) -> str:
    buf = io.BytesIO()
    np.savez(buf, **emb)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def _trained(ds: str, parts: dict, *, full: dict, holdout: dict, version: str) -> Trained:
    uris = {}
    for name in ("train", "valid", "test"):
        uris[name] = layout.run_uri(ds, "split", f"{name}.parquet")
        storage.write_parquet(parts[name], uris[name])
    for kind, idx, col, n in (("user", schema.USER_IDX, schema.USER_ID, N_USERS),
                              ("item", schema.ITEM_IDX, schema.ITEM_ID, N_ITEMS)):
        uris[f"{kind}_features"] = layout.run_uri(ds, "augment", f"{kind}_features.parquet")
        storage.write_parquet(pd.DataFrame({idx: np.arange(n), col: [f"{kind}{i}"
                                                                     for i in range(n)]}),
                              uris[f"{kind}_features"])
    split_out = Split(ds=ds, data_version="0" * 32, feature_encoding="", validation="", meta="",
                      **uris)
    return Trained(
        ds=ds, model_version=version, data_version="0" * 32, chosen="ease", selection={},
        artifacts={},
        full_embeddings=_npz(layout.run_uri(ds, "train", "full", "embeddings.npz"), full),
        holdout_embeddings=_npz(layout.run_uri(ds, "train", "holdout", "embeddings.npz"), holdout),
        train_cutoff=int(pd.concat([parts["train"], parts["valid"]])[schema.TIMESTAMP].max()),
        split=split_out)


def _make_champion(ds: str, parts: dict, emb: dict, cutoff: int | None) -> str:
    version = "ease-" + ds.replace("-", "") + "-0000c0de"
    trained = _trained(ds, parts, full=emb, holdout=emb, version=version)
    model = {"embeddings": trained.full_embeddings, "users": trained.split.user_features,
             "items": trained.split.item_features, "model_version": version,
             "data_version": trained.data_version, "train_cutoff": cutoff}
    registry.register(model, ds=ds, metrics_uri=None)
    meta_uri = layout.model_file_uri(version, "meta.json")
    meta = storage.read_json(meta_uri)
    if meta.get("train_cutoff") != cutoff:  # what register records (the lead's change)
        meta["train_cutoff"] = cutoff
        storage.write_json(meta_uri, meta)
    registry.set_champion(version)
    return version


def test_evaluate_gates_the_shipped_model_and_compares_the_champion_on_unseen_events(
        bucket, parts):
    ds = "2026-11-28"
    test = parts["test"]
    cutoff = _cutoff_inside_test(test)
    champion = _make_champion(
        "2026-11-25", parts,
        _memoriser([parts["train"], parts["valid"], test[test[schema.TIMESTAMP] <= cutoff]]),
        cutoff)
    shipped = _ease([parts["train"], parts["valid"]])
    # a holdout fit that ranks the least popular items first: gating it would refuse
    counts = np.bincount(parts["train"][schema.ITEM_IDX], minlength=N_ITEMS).astype(np.float32)
    worst = {"user": np.zeros((N_USERS, 1), np.float32), "item": np.zeros((N_ITEMS, 1),
             np.float32), "item_bias": -counts}
    trained = _trained(ds, parts, full=shipped, holdout=worst, version="ease-20261128-00000001")
    params = settings.load_params()

    out = evaluate.run(trained, params)
    m = storage.read_json(out.metrics)
    want = evaluate.evaluate_embeddings(shipped, parts, ks=list(params["evaluate"]["k"]),
                                        n_users=N_USERS)
    assert m["model"]["ndcg_at_10"] == pytest.approx(want["model"]["ndcg_at_10"])
    assert m["popularity"]["ndcg_at_10"] == pytest.approx(want["popularity"]["ndcg_at_10"])
    assert out.blessed and out.model["embeddings"] == trained.full_embeddings
    assert out.model["train_cutoff"] == trained.train_cutoff

    c = m["champion_comparison"]
    assert m["champion_version"] == c["version"] == champion and m["champion_compared"]
    assert c["compared"] and c["train_cutoff"] == cutoff
    assert c["later_events"] == int((test[schema.TIMESTAMP] > cutoff).sum()) < len(test)
    assert c["model"]["ndcg_at_10"] > c["champion"]["ndcg_at_10"]
    assert m["gate"]["champion"] == c["champion"]["ndcg_at_10"]
    assert m["gate"]["model_on_champion_events"] == c["model"]["ndcg_at_10"]

    # a champion registered without a train_cutoff is recorded, not compared
    _make_champion("2026-11-26", parts, shipped, None)
    m = storage.read_json(evaluate.run(trained, params).metrics)
    assert not m["champion_compared"] and "train_cutoff" in m["champion_comparison"]["reason"]
    assert m["gate"]["champion"] is None and m["gate"]["blessed"]


@pytest.mark.parametrize("gate_fit", ["train_valid", "train"])
def test_with_ship_fit_all_a_fit_that_never_saw_test_is_gated_and_compared_and_the_refit_ships(
        bucket, parts, gate_fit):
    """``train.ship_fit: all``: the shipped refit saw the test split, so evaluate gates another
    fit of the same point: the train + valid refit (``gate_fit: train_valid``, the default: a
    third fit, ``gated``) or the selection fit (``train``: ``holdout``), against popularity
    counted on the parts that fit saw. The registry keeps that fit and records which it is and
    its cutoff, and a later run compares the champion's gated fit, not its shipped one (which
    trained on every test event and would leave nothing to compare on)."""
    ds = "2026-11-29" if gate_fit == "train" else "2026-11-30"
    everything = [parts["train"], parts["valid"], parts["test"]]
    gate_parts = [parts["train"]] if gate_fit == "train" else everything[:2]
    fit = "holdout" if gate_fit == "train" else "gated"
    shipped, gated = _ease(everything), _ease(gate_parts)
    holdout = gated if fit == "holdout" else _ease([parts["train"]])
    base = _trained(ds, parts, full=shipped, holdout=holdout,
                    version=f"ease-{ds.replace('-', '')}-00000002")
    gated_uri = (base.holdout_embeddings if fit == "holdout"
                 else _npz(layout.run_uri(ds, "train", "gated", "embeddings.npz"), gated))
    gated_cutoff = int(pd.concat(gate_parts)[schema.TIMESTAMP].max())
    trained = Trained(**{**{f: getattr(base, f) for f in base.__dataclass_fields__},
                         "gated_embeddings": gated_uri, "gated_fit": fit,
                         "gated_cutoff": gated_cutoff,
                         "train_cutoff": int(pd.concat(everything)[schema.TIMESTAMP].max())})
    params = settings.load_params()
    out = evaluate.run(trained, params)
    m = storage.read_json(out.metrics)
    seen = ["train"] if fit == "holdout" else ["train", "valid"]
    want = evaluate.evaluate_embeddings(gated, parts, ks=list(params["evaluate"]["k"]),
                                        n_users=N_USERS, fitted_on=seen)
    assert m["model"]["ndcg_at_10"] == pytest.approx(want["model"]["ndcg_at_10"])
    assert m["popularity"]["ndcg_at_10"] == pytest.approx(want["popularity"]["ndcg_at_10"])
    other = ["train", "valid"] if fit == "holdout" else ["train"]
    on_other = evaluate.evaluate_embeddings(gated, parts, ks=[10], n_users=N_USERS,
                                            fitted_on=other)
    assert m["popularity"]["ndcg_at_10"] != pytest.approx(on_other["popularity"]["ndcg_at_10"])
    assert m["gated_fit"] == fit and m["gated_cutoff"] == gated_cutoff
    assert out.model["embeddings"] == trained.full_embeddings  # what scores users
    assert out.model["gated_embeddings"] == gated_uri

    # registered as a blessed model would be (this small fixture's gated fit need not clear the
    # popularity floor: the gate's verdict is not what this test is about)
    model = registry.register(out.model, ds=ds, metrics_uri=out.metrics, gate=out.gate,
                              params=params)
    version = trained.model_version
    meta = registry.meta(version)
    assert meta["gated_fit"] == fit and meta["gated_cutoff"] == gated_cutoff
    assert meta["train_cutoff"] == trained.train_cutoff
    assert model["gated_embeddings"].endswith(f"{fit}_embeddings.npz")
    assert model["gated_embeddings"] != model["embeddings"]
    kept = dict(np.load(io.BytesIO(storage.read_bytes(model["gated_embeddings"]))))
    assert all(np.array_equal(kept[k], gated[k]) for k in gated)  # the gated fit, as it was
    registry.set_champion(version)
    # the next night (the same parts): the champion's gated fit is today's, on every test event
    again = storage.read_json(evaluate.run(trained, params).metrics)
    c = again["champion_comparison"]
    assert c["version"] == version and c["compared"] and c["train_cutoff"] == gated_cutoff
    assert c["later_events"] == c["test_events"] == len(parts["test"])
    assert c["champion"]["ndcg_at_10"] == pytest.approx(c["model"]["ndcg_at_10"])
