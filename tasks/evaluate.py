"""Step 7, evaluate and gate: full-ranking metrics on the test split, against popularity.

For each test user, every item is ranked (the user's train and valid items excluded) and the
top ``max(evaluate.k)`` is compared with the user's held-out positives (see tasks/metrics.py).
The popularity baseline ranks items by their count of train positives, with the same exclusions.

The current champion (tasks/registry.py), when there is one, is scored on the same split: its
*holdout* fit (see ``_champion_for`` for why not its scoring refit), re-indexed onto this run's
users and items by external id.

The gate blesses the model when both hold (``evaluate.gate_metric``):

- ``model >= popularity * (1 + evaluate.min_lift_over_popularity)``, the absolute floor;
- ``model >= champion * (1 - evaluate.max_regression_vs_champion)`` when there is a champion
  (a first run has none), so a worse model never replaces a better one.

``metrics.json`` records every side, the candidates train compared, and the verdict with its
reason. It is the ``evaluate`` stage's DVC metrics file.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import layout, metrics, models, ranking, schema, settings, storage

PARAMS = [
    "evaluate.k",
    "evaluate.gate_metric",
    "evaluate.min_lift_over_popularity",
    "evaluate.max_regression_vs_champion",
]


def recommend(emb: dict, seen, users: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` item indices (n_users, k) of ``users`` for either model kind, ``seen`` excluded
    (and, for an item-item model, used as the user vectors: tasks/models.py)."""
    user_vecs, item_vecs, bias = models.scoring_inputs(emb, seen)
    chunks = ranking.iter_top_k(user_vecs, item_vecs, bias, seen, users, k=k)
    return np.concatenate([items for _, items, _ in chunks])


def targets(known: pd.DataFrame, target: pd.DataFrame, *, n_users: int, n_items: int):
    """``(seen CSR of known, users to rank, their relevant item sets)``.

    Users to rank: those with a positive target event *and* some known history; a user with no
    history (cold) is not a ranking question any model here can answer, and is left out (counted
    by tasks/split.py's stats). Cold target items stay relevant: they count as misses.
    """
    seen = ranking.seen_matrix(
        known, n_users=n_users, n_items=n_items, user_col=schema.USER_IDX, item_col=schema.ITEM_IDX
    )
    pos = target[target[schema.LABEL] == 1]
    relevant = pos.groupby(schema.USER_IDX)[schema.ITEM_IDX].apply(set)
    warm = np.diff(seen.indptr)[relevant.index.to_numpy()] > 0
    return seen, relevant.index.to_numpy()[warm], [r for r, w in zip(relevant.values, warm) if w]


def ranking_metric(emb: dict, known: pd.DataFrame, target: pd.DataFrame, *, metric: str,
                   n_users: int) -> float:
    """One metric (``ndcg_at_10``...) of ``emb`` on ``target``, ``known`` excluded: what train
    uses to choose candidates and epochs on the valid split."""
    k = int(metric.rsplit("_at_", 1)[1])
    seen, users, rel = targets(known, target, n_users=n_users, n_items=models.n_items(emb))
    if len(users) == 0:
        raise ValueError("no positive target events to measure a ranking metric on")
    return metrics.all_metrics(recommend(emb, seen, users, k), rel, [k])[metric]


def popularity_model(train: pd.DataFrame, *, n_users: int, n_items: int) -> dict:
    """Popularity as a factor model: zero vectors, item bias = count of train positives."""
    pos = train[train[schema.LABEL] == 1]
    counts = np.bincount(pos[schema.ITEM_IDX], minlength=n_items).astype(np.float32)
    return {"user": np.zeros((n_users, 1), np.float32), "item": np.zeros((n_items, 1), np.float32),
            "item_bias": counts}


def evaluate_embeddings(
    emb: dict[str, np.ndarray], parts: dict[str, pd.DataFrame], *, ks: list[int], n_users: int,
    champion: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics on ``parts['test']`` of the model, of popularity and, when given, of the champion
    (its weights already aligned to this run's indices: :func:`tasks.models.align`)."""
    n_items = models.n_items(emb)
    known = pd.concat([parts["train"], parts["valid"]])
    seen, users, rel = targets(known, parts["test"], n_users=n_users, n_items=n_items)
    k = max(ks)
    pop = popularity_model(parts["train"], n_users=n_users, n_items=n_items)
    sides = {"model": emb, "popularity": pop}
    if champion is not None:
        sides["champion"] = champion
    recs = {name: recommend(e, seen, users, k) for name, e in sides.items()}
    share = pop["item_bias"] / max(1, parts["train"][schema.USER_IDX].nunique())
    out = {name: metrics.all_metrics(r, rel, ks) for name, r in recs.items()}
    for name, r in recs.items():
        shown = r[:, : min(ks)]
        shown = shown[shown >= 0]
        out[name]["catalogue_coverage"] = float(len(np.unique(shown)) / n_items)
        # mean share of train users who interacted with a recommended item (lower: less head)
        out[name]["mean_item_popularity"] = float(share[shown].mean()) if shown.size else 0.0
    out["n_test_users"] = len(users)
    return out


def _champion_for(trained: dict) -> tuple[str | None, dict | None]:
    """The current champion's *holdout* weights aligned to this run, or (None, None).

    The holdout fit is the comparable one: the champion's scoring model was refit on every
    event up to its ds, so it has seen most of this run's test events and would look better than
    it is. Its holdout fit saw only its own train split, the oldest events of each user, which a
    temporal split here never puts in test. A champion registered without a holdout fit is
    recorded but not compared.
    """
    from tasks import registry, score

    version = registry.champion()
    if version is None:
        return None, None
    model = registry.model_uris(version)
    if not model.get("holdout_embeddings"):
        return version, None
    emb = dict(np.load(io.BytesIO(storage.read_bytes(model["holdout_embeddings"]))))
    aligned = models.align(
        emb,
        model_users=score.ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID),
        model_items=score.ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID),
        user_ids=score.ids_by_index(trained["user_features"], schema.USER_IDX, schema.USER_ID),
        item_ids=score.ids_by_index(trained["item_features"], schema.ITEM_IDX, schema.ITEM_ID),
    )
    return version, aligned


def gate(result: dict, *, gate_metric: str, min_lift: float, max_regression: float) -> dict:
    """Bless when the model beats popularity by ``min_lift`` (relative) and, if a champion was
    scored, is not worse than it by more than ``max_regression`` (relative)."""
    model, pop = result["model"][gate_metric], result["popularity"][gate_metric]
    floor = pop * (1.0 + min_lift)
    verdict = {
        "metric": gate_metric,
        "model": model,
        "popularity": pop,
        "threshold": floor,
        "beats_popularity": bool(model >= floor),
        "champion": None,
        "champion_threshold": None,
        "no_regression": True,
    }
    if "champion" in result:
        champ = result["champion"][gate_metric]
        verdict.update(champion=champ, champion_threshold=champ * (1.0 - max_regression),
                       no_regression=bool(model >= champ * (1.0 - max_regression)))
    verdict["blessed"] = verdict["beats_popularity"] and verdict["no_regression"]
    reasons = []
    if not verdict["beats_popularity"]:
        reasons.append(f"{gate_metric} {model:.4f} < popularity floor {floor:.4f}")
    if not verdict["no_regression"]:
        reasons.append(f"{gate_metric} {model:.4f} < champion tolerance "
                       f"{verdict['champion_threshold']:.4f}")
    verdict["reason"] = "; ".join(reasons) or "passed"
    return verdict


def record_decision(ds: str, verdict: dict, *, forced: bool) -> dict:
    """Write ``runs/ds=<ds>/gate/decision.json``: the verdict, whether ops forced publication
    (``force_publish``, an override of an unblessed model), and so whether it publishes."""
    import datetime as dt

    decision = {
        "ds": ds,
        "blessed": bool(verdict["blessed"]),
        "override": bool(forced and not verdict["blessed"]),
        "publish": bool(verdict["blessed"] or forced),
        "verdict": verdict,
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(layout.run_uri(ds, "gate", "decision.json"), decision)
    return decision


def _evaluate(emb, parts, p: settings.StepParams, *, n_users: int, champion=None) -> dict:
    result = evaluate_embeddings(emb, parts, ks=list(p["evaluate.k"]), n_users=n_users,
                                 champion=champion)
    result["gate"] = gate(
        result, gate_metric=p["evaluate.gate_metric"],
        min_lift=float(p["evaluate.min_lift_over_popularity"]),
        max_regression=float(p["evaluate.max_regression_vs_champion"]),
    )
    return result


def run(ds: str, trained: dict[str, str], params: dict | None = None) -> dict:
    p = settings.step_params(PARAMS, params)
    emb = dict(np.load(io.BytesIO(storage.read_bytes(trained["holdout_embeddings"]))))
    parts = {n: storage.read_parquet(trained[n]) for n in ("train", "valid", "test")}
    n_users = len(storage.read_parquet(trained["user_features"], columns=[schema.USER_IDX]))
    champion_version, champion = _champion_for(trained)
    result = _evaluate(emb, parts, p, n_users=n_users, champion=champion)
    result.update(
        ds=ds, model_version=trained["model_version"], data_version=trained["data_version"],
        champion_version=champion_version, champion_compared=champion is not None,
        selection=trained.get("selection"),
    )
    uri = layout.run_uri(ds, "evaluate", "metrics.json")
    storage.write_json(uri, result)
    model = {
        "embeddings": trained["full_embeddings"],
        "holdout_embeddings": trained["holdout_embeddings"],
        "users": trained["user_features"],
        "items": trained["item_features"],
        "model_version": trained["model_version"],
        "data_version": trained["data_version"],
        "metrics": uri,
        "artifacts": trained.get("artifacts", {}),
    }
    return {"model": model, "metrics": uri, "blessed": result["gate"]["blessed"],
            "gate": result["gate"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="evaluate a local model folder (dvc stage)")
    parser.add_argument("--split-dir", required=True, type=Path)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    p = settings.step_params(PARAMS)
    emb = dict(np.load(args.model_dir / "holdout" / "embeddings.npz"))
    parts = {n: pd.read_parquet(args.split_dir / f"{n}.parquet") for n in ("train", "valid", "test")}
    n_users = int(pd.concat(parts.values())[schema.USER_IDX].max()) + 1
    storage.write_json(args.out, _evaluate(emb, parts, p, n_users=n_users))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
