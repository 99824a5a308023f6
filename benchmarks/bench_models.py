"""Model quality on MovieLens-100K: nightrec's published table vs in-script baselines.

    .venv/bin/python benchmarks/bench_models.py [--ml100k DIR] [--protocol random|temporal|both]
    .venv/bin/python benchmarks/bench_models.py --gate [--ml100k DIR] [--set KEY=VALUE ...]

For each protocol, a seeded 20% of every user's ratings is held out (``random``: drawn at random
per user; ``temporal``: each user's latest 20%); the other 80% goes through the whole pipeline
with ``nightrec run`` (real Airflow ``dag.test()``, a private SeaweedFS on free ports, DVC), and
the published top-K table is scored on the holdout. In the same run, on the same 80%/20%:
popularity and EASE (lambda = 500, the issue's reference), both in numpy here.

Relevant items are all of a user's held-out items (also those the 80% never shows, which no
method can recommend). Metrics are nightrec/ml/metrics.py's: full ranking, seen items excluded.

Params: the repo's params.yaml, except that the ``random`` protocol runs nightrec with
``split.method: random_per_user`` (its model selection then validates the way it is measured);
``temporal`` uses the default temporal split. The MovieLens licence forbids redistribution: the
data is read from ``--ml100k`` (default ``../shared/data/ml-100k``) and never copied into the
repo; without it the script says so and exits 0.

``--gate`` measures the gate itself, in process, on the whole log (no 20% holdout): the cores the
pipeline runs (clean's k-core, augment's labels and side features, ``split.split_interactions``,
``train.train_both``, ``evaluate.evaluate_embeddings``) with the repo's params (``--set``
overrides, named in the output). For each split method it prints the gate's model-vs-popularity
figures as the gate computed them before issue 12 (the train-only selection fit against
popularity counted on train) and as it computes them now (the shipped train + valid refit
against popularity counted on train + valid). Then the cost of shipping a model that never saw
the test split: the log cut at its 90% time quantile, the pipeline run on the first 90%, and the
shipped model (train + valid) against a refit on all of it (what shipped before), both scored
on the last 10% (the "next period", seen items excluded).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DS = "2026-11-28"
KS = [10, 20]


def holdout_split(df: pd.DataFrame, protocol: str, seed: int, fraction: float = 0.2):
    """``(train 80%, holdout 20%)`` per user: ``ceil(fraction * n)`` events held out."""
    df = df.copy()
    if protocol == "random":
        df["_k"] = np.random.default_rng(seed).random(len(df))
    else:
        df["_k"] = -df["t"].astype(np.int64) - df["i"].astype(np.int64) * 1e-7  # latest first
    rank = df.groupby("u")["_k"].rank(method="first")
    n = df.groupby("u")["u"].transform("size")
    held = rank <= np.ceil(fraction * n)
    return df[~held].drop(columns="_k"), df[held].drop(columns="_k")


def score_table(recs: dict[str, list[str]], holdout: pd.DataFrame, ks: list[int]) -> dict:
    """Metrics of ``{user: [item, ...]}`` (ranked) against the holdout, over holdout users."""
    from nightrec.ml.metrics import all_metrics

    relevant = holdout.groupby("u")["i"].apply(lambda s: set(s.astype(str)))
    vocab: dict[str, int] = {}
    k = max(ks)
    rows, rel = [], []
    for user, items in relevant.items():
        ranked = recs.get(str(user), [])[:k]
        rows.append([vocab.setdefault(i, len(vocab)) for i in ranked] + [-1] * (k - len(ranked)))
        rel.append({vocab.setdefault(i, len(vocab)) for i in items})
    out = all_metrics(np.array(rows), rel, ks)
    out["users"] = len(rows)
    return out


def interaction_matrix(train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, items, x)``: the sorted user and item ids of ``train`` and its binary
    (users x items) matrix, dense float64."""
    users = np.sort(train["u"].unique())
    items = np.sort(train["i"].unique())
    x = np.zeros((len(users), len(items)))
    x[pd.Index(users).get_indexer(train["u"]), pd.Index(items).get_indexer(train["i"])] = 1.0
    return users, items, x


def ease_scores(x: np.ndarray, ease_lambda: float, gram: np.ndarray | None = None) -> np.ndarray:
    """Plain EASE (closed form, no dropout) scores ``x @ B`` in float64; ``gram``: ``x.T @ x``
    when already computed (a lambda grid shares it)."""
    g = x.T @ x if gram is None else gram
    p = np.linalg.inv(g + ease_lambda * np.eye(g.shape[0]))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return x @ b


def top_k_lists(scores: np.ndarray, x: np.ndarray, users: np.ndarray, items: np.ndarray,
                k: int) -> dict[str, list[str]]:
    """``{user: [item, ...]}``: each row's top ``k`` of ``scores``, the items ``x`` marks seen
    excluded (ties broken by item order)."""
    scores = np.where(x > 0, -np.inf, scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {str(u): [str(i) for i in items[row]] for u, row in zip(users, top)}


def baselines(train: pd.DataFrame, k: int, ease_lambda: float) -> dict[str, dict[str, list]]:
    """Popularity and EASE top-k per user on ``train`` (numpy, float64), seen excluded."""
    users, items, x = interaction_matrix(train)
    return {"popularity": top_k_lists(np.tile(x.sum(0), (len(users), 1)), x, users, items, k),
            "ease": top_k_lists(ease_scores(x, ease_lambda), x, users, items, k)}


def run_nightrec(train: pd.DataFrame, ml: Path, params: dict, work: Path,
                 outputs: dict | None = None) -> tuple[dict, float]:
    """``nightrec run`` on ``train`` in a private state folder and S3 server; the published table
    as ``{user: [items]}`` and the wall time. ``outputs``, when given, receives the run's
    ``evaluate/metrics.json`` (``"metrics"``) and ``train/selection.json`` (``"selection"``),
    each None when it could not be read."""
    from nightrec.store import s3server

    data = work / "u.data"
    train[["u", "i", "r", "t"]].to_csv(data, sep="\t", header=False, index=False)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    state = work / "state"
    ports = s3server.free_port_pairs(5)
    cfg = s3server.ServerConfig(
        data_dir=state / "s3", s3_port=ports[0], master_port=ports[1], volume_port=ports[2],
        filer_port=ports[3], admin_port=ports[4])
    env = {k: v for k, v in os.environ.items()
           if k not in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(NIGHTREC_STATE=str(state), NIGHTREC_PARAMS=str(work / "params.yaml"))
    bin_dir = Path(sys.executable).parent
    s3server.up(cfg)
    try:
        env.update(s3server.client_env(cfg))
        started = time.perf_counter()
        cmd = [str(bin_dir / "nightrec"), "run", "--interactions", str(data), "--items",
               str(ml / "items.csv"), "--users", str(ml / "users.csv"), "--ds", DS]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"nightrec run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        out = work / "recs.parquet"
        subprocess.run([str(bin_dir / "nightrec"), "export", "--out", str(out)], env=env,
                       check=True, capture_output=True)
        read_outputs = (
            "import json\nfrom nightrec.store import layout, storage\nout = {}\n"
            "for step, name, key in (('evaluate', 'metrics.json', 'metrics'), "
            "('train', 'selection.json', 'selection')):\n"
            "    try:\n"
            f"        out[key] = storage.read_json(layout.run_uri('{DS}', step, name))\n"
            "    except Exception:\n"
            "        out[key] = None\n"
            "print(json.dumps(out))")
        outputs_json = subprocess.run([sys.executable, "-c", read_outputs], env=env,
                                      capture_output=True, text=True, check=False)
    finally:
        s3server.down(cfg)
    table = pd.read_parquet(out).sort_values(["user_id", "rank"])
    recs = table.groupby("user_id")["item_id"].apply(list).to_dict()
    try:
        read = json.loads(outputs_json.stdout)
    except json.JSONDecodeError:
        read = {"metrics": None, "selection": None}
    if outputs is not None:
        outputs.update(read)
    try:
        internal = read["metrics"]
        valid = {name: round(c[f"valid_{internal['selection'].get('metric', 'ndcg_at_10')}"], 4)
                 if isinstance(c, dict) else c
                 for name, c in internal["selection"]["candidates"].items()}
        print(f"  nightrec chose {internal['selection']['chosen']} (valid: {valid}); "
              f"model {internal['model_version']}")
    except (KeyError, TypeError):
        pass
    return recs, wall


def protocol_table(protocol: str, ml: Path, seed: int, ease_lambda: float) -> list[dict]:
    ratings = pd.read_csv(ml / "u.data", sep="\t", names=["u", "i", "r", "t"])
    train, holdout = holdout_split(ratings, protocol, seed)
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    if protocol == "random":
        params["split"]["method"] = "random_per_user"
    k = max(params["score"]["top_k"], max(KS))
    rows = []
    with tempfile.TemporaryDirectory(prefix="nightrec-bench-") as tmp:
        recs, wall = run_nightrec(train, ml, params, Path(tmp))
    rows.append({"method": "nightrec (published table)", **score_table(recs, holdout, KS),
                 "wall_s": round(wall, 1)})
    seen = set(zip(train["u"].astype(str), train["i"].astype(str)))
    rows[0]["seen_recommended"] = sum((u, i) in seen for u, items in recs.items() for i in items)
    started = time.perf_counter()
    for name, r in baselines(train, k, ease_lambda).items():
        label = "popularity" if name == "popularity" else f"EASE lambda={ease_lambda:g} (numpy)"
        rows.append({"method": label, **score_table(r, holdout, KS)})
    rows[-1]["wall_s"] = round(time.perf_counter() - started, 1)
    return rows


def print_table(protocol: str, rows: list[dict]) -> None:
    cols = ["ndcg_at_10", "recall_at_10", "map_at_10", "mrr_at_10", "ndcg_at_20", "recall_at_20"]
    print(f"\n{protocol} 20% per-user holdout ({rows[0]['users']} users)")
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['method']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    print(f"nightrec: wall time {rows[0]['wall_s']} s; seen items recommended: "
          f"{rows[0]['seen_recommended']}")


def _pipeline_frames(ml: Path, params: dict, cut_quantile: float | None = None):
    """ML-100K as the pipeline's cores see it after clean and augment: ``(labelled interactions,
    side features for mf_softmax or None, future events or None)``. With ``cut_quantile`` the log
    is cut at that time quantile and the later events come back separately (indexed alike)."""
    from nightrec.core import schema
    from nightrec.ml import models
    from nightrec.tasks import augment, clean

    ratings = pd.read_csv(ml / "u.data", sep="\t", names=["u", "i", "r", "t"])
    df = pd.DataFrame({schema.USER_ID: ratings["u"].astype(str),
                       schema.ITEM_ID: ratings["i"].astype(str),
                       schema.RATING: ratings["r"].astype("float64"),
                       schema.TIMESTAMP: ratings["t"].astype("int64")})
    future = None
    if cut_quantile is not None:
        cut = np.quantile(df[schema.TIMESTAMP], cut_quantile, method="higher")
        future = df[df[schema.TIMESTAMP] >= cut]
        df = df[df[schema.TIMESTAMP] < cut]
    c = params["clean"]
    df = df[clean.kcore(df, min_user=c["min_user_interactions"],
                        min_item=c["min_item_interactions"])].reset_index(drop=True)
    df[schema.USER_IDX] = pd.factorize(df[schema.USER_ID], sort=True)[0].astype("int64")
    df[schema.ITEM_IDX] = pd.factorize(df[schema.ITEM_ID], sort=True)[0].astype("int64")
    a = params["augment"]
    labelled = augment.label_interactions(df, positive_min_rating=a["positive_min_rating"],
                                          weight_by_rating=a["weight_by_rating"],
                                          max_rating=c["max_rating"])
    side = None
    if params["train"]["mf_softmax"]["side_features"]:
        side = {}
        for kind, file, id_col, idx_col in (("user", "users.csv", schema.USER_ID, schema.USER_IDX),
                                            ("item", "items.csv", schema.ITEM_ID, schema.ITEM_IDX)):
            table = pd.read_csv(ml / file, dtype=str)
            feats = augment.index_features(df, table, id_col=id_col, idx_col=idx_col)
            spec = a[f"{kind}_features"] or {}
            feats, _ = augment.encode_features(
                feats, **{k: list(spec.get(k) or []) for k in augment.FEATURE_KINDS})
            side[kind] = models.side_matrix(
                feats.sort_values(idx_col), spec,
                max_categories=int(params["train"]["mf_softmax"]["max_side_categories"]))
    if future is not None:
        users = pd.Index(df.drop_duplicates(schema.USER_IDX).sort_values(schema.USER_IDX)[
            schema.USER_ID])
        items = pd.Index(df.drop_duplicates(schema.ITEM_IDX).sort_values(schema.ITEM_IDX)[
            schema.ITEM_ID])
        item_idx = items.get_indexer(future[schema.ITEM_ID])
        future = future.assign(**{schema.USER_IDX: users.get_indexer(future[schema.USER_ID]),
                                  # a new item: relevant, never recommended, so a miss
                                  schema.ITEM_IDX: np.where(item_idx >= 0, item_idx, 2**40)})
        future = future[future[schema.USER_IDX] >= 0]  # new users: no model ranks them
        future = future.assign(**{schema.LABEL: np.int8(1)})
    return labelled, side, future


def _gate_row(split_method: str, gated: str, result: dict, chosen: str, parts: dict) -> dict:
    m, pop = result["model"], result["popularity"]
    return {"split": split_method, "gated": gated, "chosen": chosen,
            "model_ndcg_at_10": m["ndcg_at_10"], "popularity_ndcg_at_10": pop["ndcg_at_10"],
            "lift": m["ndcg_at_10"] / pop["ndcg_at_10"] - 1,
            "model_recall_at_10": m["recall_at_10"], "popularity_recall_at_10":
            pop["recall_at_10"], "test_users": result["n_test_users"],
            "test_events": len(parts["test"])}


def gate_table(ml: Path, overrides: dict) -> dict:
    """The gate's figures before and after issue 12 per split method, and the next-period cost
    of a shipped model that never saw the test split (see the module doc)."""
    from nightrec.core import settings
    from nightrec.tasks import evaluate, split, train

    params = settings.with_overrides(settings.load_params(), overrides)
    p_train = settings.step_params(train.PARAMS, params)
    ks = list(params["evaluate"]["k"])
    labelled, side, _ = _pipeline_frames(ml, params)
    n_users, n_items = int(labelled["user_idx"].max()) + 1, int(labelled["item_idx"].max()) + 1
    rows, timings = [], {}
    for method in ("leave_last_fraction", "global_time"):
        started = time.perf_counter()
        sp = settings.with_overrides(params, {"split.method": method})
        parts = split.split_interactions(labelled, **split.split_kwargs(
            settings.step_params(split.PARAMS, sp)))
        with tempfile.TemporaryDirectory() as tmp:
            res = train.train_both(parts, n_users=n_users, n_items=n_items, p=p_train,
                                   workdir=Path(tmp), side=side)
        shipped = evaluate.evaluate_embeddings(res["full"][0], parts, ks=ks, n_users=n_users)
        rows.append(_gate_row(method, "shipped (train+valid) vs popularity(train+valid)",
                              shipped, res["chosen"], parts))
        # today's gate before issue 12: the train-only fit, popularity counted on train only
        old = evaluate.evaluate_embeddings(res["holdout"][0], parts, ks=ks, n_users=n_users)
        known = pd.concat([parts["train"], parts["valid"]])
        seen, users, rel = evaluate.targets(known, parts["test"], n_users=n_users,
                                            n_items=n_items)
        pop = evaluate.popularity_model(parts["train"], n_users=n_users, n_items=n_items)
        from nightrec.ml import metrics as metrics_mod

        old["popularity"] = metrics_mod.all_metrics(
            evaluate.recommend(pop, seen, users, max(ks)), rel, ks)
        rows.insert(len(rows) - 1, _gate_row(method, "holdout (train) vs popularity(train)",
                                             old, res["chosen"], parts))
        rows[-1]["selection"] = res["selection"]["candidates"]
        timings[method] = round(time.perf_counter() - started, 1)

    # the next period: what excluding the test split costs the model that ships
    started = time.perf_counter()
    labelled, side, future = _pipeline_frames(ml, params, cut_quantile=0.9)
    n_users, n_items = int(labelled["user_idx"].max()) + 1, int(labelled["item_idx"].max()) + 1
    parts = split.split_interactions(labelled, **split.split_kwargs(
        settings.step_params(split.PARAMS, params)))
    with tempfile.TemporaryDirectory() as tmp:
        res = train.train_both(parts, n_users=n_users, n_items=n_items, p=p_train,
                               workdir=Path(tmp), side=side)
        everything = pd.concat([parts["train"], parts["valid"], parts["test"]], ignore_index=True)
        if res["chosen"] == "ease":
            refit_all, _ = train.fit_ease(everything, n_users=n_users, n_items=n_items, p=p_train)
        else:
            refit_all, _, _ = train.fit_mf(
                everything, None, n_users=n_users, n_items=n_items, p=p_train, workdir=Path(tmp),
                epochs=res["holdout"][1]["best_epoch"], side=side)
    nxt = {"train": everything, "valid": everything.iloc[:0], "test": future}
    a = evaluate.evaluate_embeddings(res["full"][0], nxt, ks=ks, n_users=n_users)
    b = evaluate.evaluate_embeddings(refit_all, nxt, ks=ks, n_users=n_users)
    next_period = {
        "chosen": res["chosen"], "future_events": len(future), "users": a["n_test_users"],
        "shipped_train_valid": {k: a["model"][k] for k in ("ndcg_at_10", "recall_at_10")},
        "refit_on_everything": {k: b["model"][k] for k in ("ndcg_at_10", "recall_at_10")},
        "popularity_everything": {k: a["popularity"][k] for k in ("ndcg_at_10", "recall_at_10")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return {"overrides": overrides, "rows": rows, "timings_s": timings, "next_period": next_period}


def print_gate(out: dict) -> None:
    from nightrec.dev import bench_scoring

    print(f"\ngate figures on ML-100K (params.yaml; overrides: {out['overrides'] or 'none'})")
    print(bench_scoring.machine())
    print("| split | gated | chosen | model NDCG@10 | popularity NDCG@10 | lift | model R@10 | "
          "popularity R@10 | test users | test events |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['split']} | {r['gated']} | {r['chosen']} | {r['model_ndcg_at_10']:.4f} | "
              f"{r['popularity_ndcg_at_10']:.4f} | {r['lift']:+.1%} | "
              f"{r['model_recall_at_10']:.4f} | {r['popularity_recall_at_10']:.4f} | "
              f"{r['test_users']} | {r['test_events']} |")
    print("timings (s):", out["timings_s"])
    print("next period:", json.dumps(out["next_period"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "NIGHTREC_ML100K", ROOT.parent / "shared" / "data" / "ml-100k")))
    parser.add_argument("--protocol", choices=["random", "temporal", "both"], default="both")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--ease-lambda", type=float, default=500.0)
    parser.add_argument("--gate", action="store_true",
                        help="in-process gate figures before/after issue 12 (see the module doc)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--gate: a params.yaml override (YAML value), repeatable")
    args = parser.parse_args(argv)
    if not (args.ml100k / "u.data").exists():
        print(f"MovieLens-100K not found at {args.ml100k}; nothing to benchmark")
        return {}
    if args.gate:
        overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
        out = gate_table(args.ml100k, overrides)
        print_gate(out)
        print(json.dumps(out, default=str))
        return out
    results = {}
    for protocol in (["random", "temporal"] if args.protocol == "both" else [args.protocol]):
        rows = protocol_table(protocol, args.ml100k, args.seed, args.ease_lambda)
        print_table(protocol, rows)
        results[protocol] = rows
    print(json.dumps({p: {r["method"]: {"ndcg_at_10": round(r["ndcg_at_10"], 4),
                                        "recall_at_10": round(r["recall_at_10"], 4)}
                          for r in rows} for p, rows in results.items()}))
    return results


if __name__ == "__main__":
    main()
