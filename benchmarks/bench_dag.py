"""The whole nightly DAG at scale: generated interactions (default 10M events, 200k users x 20k
items) through ``scripts/run_dag.py`` (Airflow ``dag.test()`` in one process, what ``nightrec
run`` does), against a private SeaweedFS, state dir and bucket.

    .venv/bin/python benchmarks/bench_dag.py                         # 10M, 200k users x 20k items
    .venv/bin/python benchmarks/bench_dag.py --interactions 500000 --users 10000 --items 20000

Data: :func:`interactions`, the latent-factor model of ``tasks.sample_data`` drawn vectorised and
seeded (so a collaborative model can honestly beat popularity: data drawn from popularity
alone, as ``benchmarks/bench_data.py`` generates it, cannot pass the gate), written as
``--files`` Parquet parts into ``raw/interactions/ds=<ds>/`` with item and user side tables. It
is generated in a child process, so nothing of it is in the measured process tree.

Params: the repo's ``params.yaml`` plus the overrides below (each printed with its reason),
written to a private NIGHTREC_PARAMS file.

Measured, per DAG task: wall time from the run log's ``[DAG TEST] starting task_id=`` / ``end
task task_id=`` lines (their timestamps when the log has them, else when this process saw the
line; it follows the log every 0.2 s), and the peak RSS of the DAG process tree (``run_dag.py``
and every descendant: DVC runs subprocesses) sampled every ~0.2 s with psutil, each sample
attributed to the task running at that moment. The overall peak of the tree *with* the SeaweedFS
server is reported separately. Targets: <= 20 minutes and <= 8 GB on 2 cores.

Scoring 1M users with flat memory is shown by ``nightrec bench-scoring --users 1000000``
(benchmarks/RESULTS.md), not redone here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DS = "2026-11-28"
_START = re.compile(r"\[DAG TEST\] starting task_id=(\w+) map_index=(-?\d+)")
_END = re.compile(r"\[DAG TEST\] end task task_id=(\w+) map_index=(-?\d+)")
_TS = re.compile(r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?)")


def overrides(args) -> list[tuple[str, object, str]]:
    """``(dotted key, value, why)``: ``--set KEY=VALUE`` only. The default run uses params.yaml
    as shipped (issue 15: the defaults must size themselves); any override is printed and
    recorded next to the figures."""
    out = []
    for item in args.set:
        key, _, raw = item.partition("=")
        out.append((key, yaml.safe_load(raw), "--set on the command line"))
    return out


def targets(rows: int) -> tuple[float, float]:
    """Issue 15's targets: 10M events <= 8 min and <= 4 GB; 100M <= 60 min and <= 8 GB (the
    peak RSS of the tree with SeaweedFS)."""
    return (60 * 60.0, 8.0) if rows > 20_000_000 else (8 * 60.0, 4.0)


def write_params(path: Path, args) -> list[tuple[str, object, str]]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    ov = overrides(args)
    for key, value, _why in ov:
        node = params
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return ov


EXACT_MAX_CELLS = 5_000_000_000  # users x items up to which ``--generator auto`` is exact
CLUSTERS = 1024  # item clusters of the linear-time generator


def interactions(*, rows: int, users: int, items: int, seed: int, days: int = 200,
                 n_factors: int = 8, temperature: float = 0.25, chunk: int = 2048,
                 clusters: int = 0):
    """``(user, item, rating, timestamp)`` int arrays, about ``rows`` events, no repeated pair.

    The model of ``tasks.sample_data`` (unit-norm user and item factors, a user picks items with
    probability ``softmax(u . v / temperature + log popularity)``, Zipf popularity, log-normal
    activity, ratings rising with affinity), drawn vectorised a chunk of users at a time by
    inverse CDF (with replacement, oversampled, then the first draws of each distinct pair
    kept), so memory stays at a few chunk x items matrices. ``sample_data.generate_sample``
    itself loops over users in Python and grew past 16 GB at 10M events here.

    That costs users x items per draw (an hour at 2M x 100k on 2 cores). With ``clusters`` > 0
    the draw is linear in events instead: items are grouped by their nearest of ``clusters``
    random unit centres; a user picks a cluster with probability ``softmax(u . centre /
    temperature + log cluster popularity)`` and then an item of that cluster by popularity, so
    taste is kept at cluster grain and popularity at item grain. Ratings still rise with the
    exact affinity ``u . v``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    user_f = rng.normal(size=(users, n_factors)).astype(np.float32)
    item_f = rng.normal(size=(items, n_factors)).astype(np.float32)
    user_f /= np.linalg.norm(user_f, axis=1, keepdims=True)
    item_f /= np.linalg.norm(item_f, axis=1, keepdims=True)
    log_pop = -0.8 * np.log(rng.permutation(items) + 1.0).astype(np.float32)
    activity = rng.lognormal(0.0, 0.9, users)
    counts = np.maximum(5, np.round(activity / activity.sum() * rows)).astype(np.int64)
    counts = np.minimum(counts, items // 4)
    if clusters:
        u, i, a = _clustered(rng, user_f, item_f, log_pop, counts, clusters=clusters,
                             temperature=temperature)
    else:
        u, i, a = _exact(rng, user_f, item_f, log_pop, counts, temperature=temperature,
                         chunk=chunk)
    rating = np.clip(np.round(3.2 + 2.2 * a + rng.normal(scale=0.7, size=a.size)), 1, 5)
    t0 = dt.datetime.fromisoformat(DS).replace(tzinfo=dt.UTC).timestamp() - days * 86400
    user_start = rng.uniform(0, 0.7, size=users) * days * 86400
    ts = t0 + user_start[u] + rng.uniform(0, 0.3, size=u.size) * days * 86400
    return u, i, rating.astype(np.int64), ts.astype(np.int64), item_f


def _first_distinct(row, item, counts):
    """The first draws of each distinct ``(row, item)`` pair, at most ``counts[row]`` per row."""
    import pandas as pd

    df = pd.DataFrame({"r": row, "i": item}).drop_duplicates()
    df = df[df.groupby("r").cumcount().to_numpy() < counts[df["r"].to_numpy()]]
    return df["r"].to_numpy(), df["i"].to_numpy()


def _exact(rng, user_f, item_f, log_pop, counts, *, temperature, chunk):
    import numpy as np

    users, items = len(user_f), len(item_f)
    out_u, out_i, out_a = [], [], []
    for lo in range(0, users, chunk):
        hi = min(lo + chunk, users)
        n = hi - lo
        aff = user_f[lo:hi] @ item_f.T
        logits = (aff / temperature + log_pop).astype(np.float64)  # float64: exact row offsets
        logits -= logits.max(axis=1, keepdims=True)
        cdf = np.cumsum(np.exp(logits, out=logits), axis=1, out=logits)
        cdf /= cdf[:, -1:]
        cdf += np.arange(n, dtype=np.float64)[:, None]  # row r's CDF lives in [r, r + 1]
        draws = np.ceil(counts[lo:hi] * 1.5 + 10).astype(np.int64)
        row = np.repeat(np.arange(n), draws)
        flat = np.searchsorted(cdf.reshape(-1), row + rng.random(len(row)))
        item = np.minimum(flat - row * items, items - 1)
        r, i = _first_distinct(row, item, counts[lo:hi])
        out_u.append(r + lo)
        out_i.append(i)
        out_a.append(aff[r, i])
    return np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_a)


def _clustered(rng, user_f, item_f, log_pop, counts, *, clusters, temperature, chunk=32768):
    import numpy as np

    users = len(user_f)
    centres = rng.normal(size=(clusters, item_f.shape[1])).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = np.argmax(item_f @ centres.T, axis=1)
    order = np.argsort(cluster, kind="stable")  # items grouped by cluster
    pop = np.exp(log_pop[order].astype(np.float64))
    mass = np.bincount(cluster, weights=np.exp(log_pop.astype(np.float64)), minlength=clusters)
    start = np.concatenate([[0], np.cumsum(np.bincount(cluster, minlength=clusters))])
    # within-cluster CDFs laid end to end, cluster c's in [c, c + 1] (as _exact does per row)
    csum = np.cumsum(pop)
    before = np.concatenate([[0.0], csum])[start[:-1]]
    c_of = cluster[order]
    within = (csum - before[c_of]) / np.maximum(mass[c_of], 1e-300) + c_of
    log_mass = np.log(np.maximum(mass, 1e-300))
    log_mass[mass == 0] = -np.inf
    out_u, out_i, out_a = [], [], []
    for lo in range(0, users, chunk):
        hi = min(lo + chunk, users)
        n = hi - lo
        logits = (user_f[lo:hi] @ centres.T / temperature).astype(np.float64) + log_mass
        logits -= logits.max(axis=1, keepdims=True)
        cdf = np.cumsum(np.exp(logits, out=logits), axis=1, out=logits)
        cdf /= cdf[:, -1:]
        cdf += np.arange(n, dtype=np.float64)[:, None]
        draws = np.ceil(counts[lo:hi] * 1.5 + 10).astype(np.int64)
        row = np.repeat(np.arange(n), draws)
        c = np.searchsorted(cdf.reshape(-1), row + rng.random(len(row))) - row * clusters
        c = np.clip(c, 0, clusters - 1)
        pos = np.searchsorted(within, c + rng.random(len(row)))
        pos = np.clip(pos, start[c], start[c + 1] - 1)
        r, i = _first_distinct(row, order[pos], counts[lo:hi])
        out_u.append(r + lo)
        out_i.append(i)
        out_a.append(np.einsum("nf,nf->n", user_f[r + lo], item_f[i]))
    return np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_a)


def generate(out: Path, *, rows: int, users: int, items: int, files: int, seed: int,
             generator: str = "auto") -> None:
    """Child mode: generate and upload the snapshot (env points at the private S3)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nightrec.dev import sample_data
    from nightrec.store import layout, storage

    t0 = time.perf_counter()
    if generator == "auto":
        generator = "exact" if users * items <= EXACT_MAX_CELLS else "clusters"
    clusters = CLUSTERS if generator == "clusters" else 0
    u, i, rating, ts, item_f = interactions(rows=rows, users=users, items=items, seed=seed,
                                            clusters=clusters)
    print(f"generated {len(u):,} events in {time.perf_counter() - t0:.0f} s ({generator}"
          + (f", {clusters} item clusters" if clusters else "") + ")", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(u))  # files are not time-sorted
    table = pa.table({"user_id": u[order] + 1, "item_id": i[order] + 1,
                      "rating": rating[order], "timestamp": ts[order]})
    del u, i, rating, ts, order
    rng = np.random.default_rng(seed + 1)
    genres = sample_data.GENRES
    dominant, second = np.argmax(item_f, axis=1), np.argsort(item_f, axis=1)[:, -2]
    items_df = pd.DataFrame({
        "item_id": np.arange(1, items + 1), "title": [f"Item {k}" for k in range(1, items + 1)],
        "year": rng.integers(1950, 2026, size=items),
        "genres": [f"{genres[d % len(genres)]} {genres[(s + 7) % len(genres)]}"
                   for d, s in zip(dominant, second, strict=True)]})
    users_df = pd.DataFrame({
        "user_id": np.arange(1, users + 1), "age": rng.integers(15, 75, size=users),
        "gender": rng.choice(["F", "M"], size=users),
        "occupation": rng.choice(sample_data.OCCUPATIONS, size=users),
        "zip_code": [f"{z:05d}" for z in rng.integers(0, 99999, size=users)]})
    step = -(-table.num_rows // files)
    for k in range(files):
        path = out / f"part-{k:03d}.parquet"
        pq.write_table(table.slice(k * step, step), path, compression="zstd")
        storage.upload_from(path, layout.raw_prefix(DS, "interactions") + path.name)
        path.unlink()
    for name, df in (("items", items_df), ("users", users_df)):
        path = out / f"{name}.csv"
        df.to_csv(path, index=False)
        storage.upload_from(path, layout.raw_prefix(DS, name) + path.name)
        path.unlink()
    print(f"generated and uploaded in {time.perf_counter() - t0:.0f} s", flush=True)


def quality(params_path: Path) -> dict:
    """NDCG@10 of nightrec's gated fit (the chosen point fitted on no test event: the train +
    valid refit under the default ``train.gate_fit``, the fit evaluate gates; with
    ``train.ship_fit: all`` the shipped refit has also seen the test split, so it is not the
    one scored here) against implicit's ``AlternatingLeastSquares`` and EASE over every item
    (numpy, float32),
    all fitted on the run's own train + valid split and ranked by one function
    (``evaluate.targets`` / ``evaluate.recommend``, train and valid items excluded) on the same
    test users. implicit and nightrec's iALS run with the same factors, iterations,
    regularization, alpha and CG steps (params.yaml's ``train.ials``), so their seconds per
    iteration and NDCG@10 compare at equal settings. EASE uses the ``l2`` / ``dropout`` the
    run's search chose on valid (the first of ``train.ease``'s lists when it searched none)
    without nightrec's ``max_items`` limit. The published table itself cannot be scored on the
    test split: it excludes every item seen up to ds, test events included."""
    import io

    import implicit
    import numpy as np
    from scipy import sparse

    from nightrec.core import schema
    from nightrec.ml import ials, metrics
    from nightrec.store import layout, storage
    from nightrec.tasks import evaluate, split

    params = yaml.safe_load(params_path.read_text())
    cols = [schema.USER_IDX, schema.ITEM_IDX, schema.LABEL]
    parts = {n: split.read_part(layout.bucketed_prefix(DS, "split", n), columns=cols)
             for n in split.PARTS}
    selection = storage.read_json(layout.run_uri(DS, "train", "selection.json"))
    # train's fits: holdout (train), gated (train + valid), full (selection["shipped_on"])
    fit = selection.get("gated", "full")
    if "test" in selection.get("shipped_on", []) and fit == "full":
        raise SystemExit("the gated fit saw the test split: nothing honest to score")
    gated = dict(np.load(io.BytesIO(storage.read_bytes(
        layout.run_uri(DS, "train", fit, "embeddings.npz")))))
    n_items = int(gated["item_bias"].shape[0])
    n_users = max(int(parts[n][schema.USER_IDX].max()) + 1 for n in split.PARTS)
    if "user" in gated:
        n_users = max(n_users, int(gated["user"].shape[0]))
    import pandas as pd

    known = pd.concat([parts["train"], parts["valid"]], ignore_index=True)
    seen, users, rel = evaluate.targets(known, parts["test"], n_users=n_users, n_items=n_items)
    pos = known[known[schema.LABEL] == 1]
    x = sparse.csr_matrix((np.ones(len(pos), np.float32),
                           (pos[schema.USER_IDX].to_numpy(), pos[schema.ITEM_IDX].to_numpy())),
                          shape=(n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0

    def ndcg(emb: dict) -> float:
        return metrics.all_metrics(evaluate.recommend(emb, seen, users, 10), rel, [10])[
            "ndcg_at_10"]

    out = {"test_users": int(len(users)), "train_pairs": int(x.nnz)}
    if "user" in gated:  # a factor export: align it to the split's user count
        pad = np.zeros((n_users, gated["user"].shape[1]), np.float32)
        pad[: gated["user"].shape[0]] = gated["user"]
        gated["user"] = pad
    out["nightrec_gated_fit"] = {"ndcg_at_10": ndcg(gated), "fit": fit,
                                 "fitted_on": selection.get("gated_on")}
    t = params["train"]["ials"]
    # train.ials.regularization is searched on the valid sample in the run: the peer gets the
    # value the run chose (selection.json), else the list's first (never a test-split choice)
    chosen = selection["candidates"].get("ials", {}).get("regularization")
    regs = t["regularization"] if isinstance(t["regularization"], list) else [t["regularization"]]
    kw = dict(factors=int(t["factors"]), iterations=int(t["iterations"]),
              regularization=float(chosen if chosen is not None else regs[0]),
              alpha=float(t["alpha"]))
    out["ials_regularization"] = kw["regularization"]
    als = implicit.cpu.als.AlternatingLeastSquares(random_state=int(params["seed"]), **kw)
    als.cg_steps = int(t["cg_steps"])
    t0 = time.perf_counter()
    als.fit(x, show_progress=False)
    secs = time.perf_counter() - t0
    out["implicit_ials"] = {"ndcg_at_10": ndcg({"user": als.user_factors,
                                                "item": als.item_factors,
                                                "item_bias": np.zeros(n_items, np.float32)}),
                            "fit_s": secs, "s_per_iteration": secs / kw["iterations"],
                            "version": implicit.__version__}
    coo = x.tocoo()
    t0 = time.perf_counter()
    mine, hist = ials.fit(coo.row, coo.col, None, n_users=n_users, n_items=n_items,
                          cg_steps=int(t["cg_steps"]), seed=int(params["seed"]), **kw)
    secs = time.perf_counter() - t0
    out["nightrec_ials"] = {"ndcg_at_10": ndcg(mine), "fit_s": secs,
                            "s_per_iteration": float(np.mean(hist["iteration_s"])),
                            "kernel": hist["kernel"]}
    # EASE over every item at the l2 and dropout the run's own search chose on its valid
    # sample (selection.json; never the test split), else the first of train.ease's lists:
    # the peer gets the run's tuning, without nightrec's max_items head
    e = {k: (v[0] if isinstance(v, list) else v) for k, v in params["train"]["ease"].items()}
    chose = ((selection.get("candidates") or {}).get("ease") or {}).get("params") or {}
    e.update({k: chose[k] for k in ("l2", "dropout") if chose.get(k) is not None})
    t0 = time.perf_counter()
    gram = (x.T @ x).toarray().astype(np.float32)
    diag = np.diag(gram).copy()
    gram[np.diag_indices(n_items)] += float(e["l2"]) + float(e["dropout"]) / (
        1.0 - float(e["dropout"])) * diag
    p_inv = np.linalg.inv(gram)
    del gram
    b = p_inv / (-np.diag(p_inv))[None, :]
    del p_inv
    np.fill_diagonal(b, 0.0)
    out["ease_all_items"] = {"ndcg_at_10": ndcg({"item_item": b,
                                                  "item_bias": np.zeros(n_items, np.float32)}),
                             "fit_s": time.perf_counter() - t0, "l2": e["l2"],
                             "dropout": e["dropout"],
                             "params_from": "the run's valid choice" if chose else "params.yaml"}
    del b
    best = max(out["implicit_ials"]["ndcg_at_10"], out["ease_all_items"]["ndcg_at_10"])
    out["gated_fit_over_best_baseline"] = out["nightrec_gated_fit"]["ndcg_at_10"] / best
    print("quality on the run's test split (ndcg@10, same users, train + valid excluded):")
    for name in ("nightrec_gated_fit", "nightrec_ials", "implicit_ials", "ease_all_items"):
        extra = {k: (round(v, 2) if isinstance(v, float) else v)
                 for k, v in out[name].items() if k != "ndcg_at_10"}
        print(f"  {name:18s} {out[name]['ndcg_at_10']:.4f}  {extra}")
    print(f"  gated fit / max(implicit iALS, EASE) = {out['gated_fit_over_best_baseline']:.3f} "
          f"on {out['test_users']:,} test users", flush=True)
    return out


def _log_time(line: str) -> float | None:
    m = _TS.search(line[:80])
    if not m:
        return None
    text = m.group(1).replace(",", ".").replace(" ", "T").replace("Z", "+00:00")
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.astimezone()
    return t.timestamp()


class Monitor:
    """Follows the run log and samples RSS every ``interval`` s until the run exits."""

    def __init__(self, proc, weed_pid: int | None, log_path: Path, interval: float = 0.2,
                 trace: Path | None = None):
        import psutil

        self.proc = psutil.Process(proc.pid)
        self.weed = psutil.Process(weed_pid) if weed_pid else None
        self.popen, self.log_path, self.interval = proc, log_path, interval
        self.running: dict[str, float] = {}  # task key -> seen start (wall clock)
        self.tasks: dict[str, dict] = {}      # task key -> start, end, peak, order
        self.outside_peak = 0                 # samples with no task running (DAG parse, db...)
        self.tree_peak = 0
        self.all_peak = 0
        self.weed_peak = 0
        self._pos = 0
        self._buf = ""
        # every sample (unix time, tree RSS, SeaweedFS RSS, bytes), to place a task's peak among
        # its own log lines (which carry the same clock)
        self.trace = open(trace, "w") if trace else None  # noqa: SIM115 - closed in run()

    def _read_log(self) -> None:
        if not self.log_path.exists():
            return
        with open(self.log_path, errors="replace") as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        self._buf += chunk
        *lines, self._buf = self._buf.split("\n")
        now = time.time()
        for line in lines:
            for rx, kind in ((_START, "start"), (_END, "end")):
                m = rx.search(line)
                if not m:
                    continue
                task, idx = m.group(1), int(m.group(2))
                key = task if idx < 0 else f"{task}[{idx}]"
                t = _log_time(line)
                rec = self.tasks.setdefault(key, {"task": task, "order": len(self.tasks),
                                                  "peak": 0})
                if kind == "start":
                    rec.update(start=t or now, start_seen=now)
                    self.running[key] = now
                else:
                    rec.update(end=t or now, end_seen=now)
                    self.running.pop(key, None)

    def run(self) -> None:
        from nightrec.dev.bench_scoring import tree_rss

        while True:
            self._read_log()
            rss = tree_rss(self.proc)
            weed = 0
            if self.weed is not None:
                try:
                    weed = self.weed.memory_info().rss
                except Exception:  # noqa: BLE001 - gone
                    weed = 0
            self.tree_peak = max(self.tree_peak, rss)
            self.weed_peak = max(self.weed_peak, weed)
            self.all_peak = max(self.all_peak, rss + weed)
            if self.trace is not None:
                self.trace.write(f"{time.time():.1f}\t{rss}\t{weed}\n")
            if self.running:
                for key in self.running:
                    self.tasks[key]["peak"] = max(self.tasks[key]["peak"], rss)
            else:
                self.outside_peak = max(self.outside_peak, rss)
            if self.popen.poll() is not None:
                self._read_log()
                if self.trace is not None:
                    self.trace.close()
                return
            time.sleep(self.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4, help="Parquet parts in the snapshot")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override (printed beside every figure); none by default")
    parser.add_argument("--baselines", choices=["auto", "on", "off"], default="auto",
                        help="quality against implicit's iALS and EASE on the run's own split "
                             "(auto: up to 20M events)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    parser.add_argument("--generator", choices=["auto", "exact", "clusters"], default="auto",
                        help="exact: per-item softmax, users x items work; clusters: linear in "
                        "events; auto: exact up to 5e9 users x items")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.generate:
        generate(args.generate, rows=args.interactions, users=args.users, items=args.items,
                 files=args.files, seed=args.seed, generator=args.generator)
        return 0
    from nightrec.dev.bench_scoring import machine

    print(machine(), flush=True)  # the CPU's vector width and the BLAS: machines differ

    from nightrec.store import s3server, storage

    work = Path(tempfile.mkdtemp(prefix="nightrec-bench-dag-"))
    ports = s3server.free_port_pairs(5)
    cfg = s3server.ServerConfig(data_dir=work / "s3", s3_port=ports[0], master_port=ports[1],
                                volume_port=ports[2], filer_port=ports[3], admin_port=ports[4],
                                bucket="nightrec-bench")
    params_path = work / "params.yaml"
    ov = write_params(params_path, args)
    print(f"work dir {work}; params.yaml as shipped" + (
        f", with overrides (in {params_path}):" if ov else " (no override)"))
    for key, value, why in ov:
        print(f"  {key} = {value}: {why}")
    target_s, target_gb = targets(args.interactions)
    env = {k: v for k, v in os.environ.items() if k not in (
        "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
        "NIGHTREC_PARAMS", "NIGHTREC_BUCKET", "AIRFLOW_HOME")}
    env.update(NIGHTREC_STATE=str(work / "state"), NIGHTREC_PARAMS=str(params_path),
               NIGHTREC_BUCKET=cfg.bucket, GX_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT),
               TF_CPP_MIN_LOG_LEVEL="2")
    os.environ.update(env)  # so that s3server reads this bucket
    s3server.up(cfg)
    weed_pid = int(cfg.pid_file.read_text())
    figures: dict = {"interactions": args.interactions, "users": args.users, "items": args.items,
                     "overrides": {k: v for k, v, _ in ov}}
    try:
        env.update(s3server.client_env(cfg))
        os.environ.update(env)
        storage._client.cache_clear()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate",
                        str(work / "input"), "--interactions", str(args.interactions),
                        "--users", str(args.users), "--items", str(args.items),
                        "--files", str(args.files), "--seed", str(args.seed),
                        "--generator", args.generator],
                       env=env, check=True)
        figures["generate_s"] = time.perf_counter() - t0
        print(f"input ready in {figures['generate_s']:.0f} s (not counted)", flush=True)

        state = work / "state"
        log_path = work / "run.log"
        result_path = work / "result.json"
        cmd = [sys.executable, str(ROOT / "scripts" / "run_dag.py"), "--ds", DS,
               "--conf", json.dumps({"force_publish": False}), "--state", str(state),
               "--result-file", str(result_path)]
        # the Airflow metadata DB is migrated before the run (run_dag.py does it once per state
        # dir): it is setup, not part of a night's run
        migrate_env = {**env, "AIRFLOW_HOME": str(work / "state" / "airflow"),
                       "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN":
                           f"sqlite:///{work / 'state' / 'airflow'}/airflow.db"}
        (work / "state" / "airflow").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                       env=migrate_env, check=True, stdout=subprocess.DEVNULL)
        (work / "state" / "airflow" / ".migrated").write_text("ok")
        print(f"airflow db migrate in {time.perf_counter() - t0:.0f} s (not counted)", flush=True)

        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(ROOT))
            mon = Monitor(proc, weed_pid, log_path, trace=work / "rss.tsv")
            th = threading.Thread(target=mon.run, daemon=True)
            th.start()
            last = 0.0
            while proc.poll() is None:
                time.sleep(1.0)
                if time.perf_counter() - last > 30:
                    last = time.perf_counter()
                    print(f"  t={time.perf_counter() - t0:5.0f} s running "
                          f"{sorted(mon.running) or '-'} tree RSS peak "
                          f"{mon.tree_peak / 2**30:.2f} GB", flush=True)
            th.join()
        wall = time.perf_counter() - t0
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        figures.update(total_s=wall, tree_peak_gb=mon.tree_peak / 2**30,
                       all_peak_gb=mon.all_peak / 2**30, weed_peak_gb=mon.weed_peak / 2**30,
                       outside_tasks_peak_gb=mon.outside_peak / 2**30, exit=proc.returncode,
                       result=result)
        rows = []
        covered = 0.0
        for key, rec in sorted(mon.tasks.items(), key=lambda kv: kv[1]["order"]):
            secs = rec["end"] - rec["start"] if "end" in rec and "start" in rec else None
            covered += secs or 0.0
            state_ = (result or {}).get("tasks", {}).get(rec["task"], "?")
            rows.append({"task": key, "wall_s": secs, "peak_rss_gb": rec["peak"] / 2**30,
                         "state": state_})
        figures["tasks"] = rows
        figures["outside_tasks_s"] = wall - covered
        print()
        print(f"{'task':16s} {'wall s':>8s} {'peak RSS GB':>12s}  state")
        for r in rows:
            w = f"{r['wall_s']:8.1f}" if r["wall_s"] is not None else "       ?"
            peak = f"{r['peak_rss_gb']:12.2f}" if r["peak_rss_gb"] else f"{'(no sample)':>12s}"
            print(f"{r['task']:16s} {w} {peak}  {r['state']}")
        print(f"{'(outside tasks)':16s} {wall - covered:8.1f} {mon.outside_peak / 2**30:12.2f}  "
              "DAG parse, dag.test() setup, scheduling between tasks")
        ok = wall <= target_s and mon.all_peak / 2**30 <= target_gb
        print(f"total {wall:.0f} s ({wall / 60:.1f} min) wall; peak RSS of the DAG process tree "
              f"{mon.tree_peak / 2**30:.2f} GB; with SeaweedFS {mon.all_peak / 2**30:.2f} GB "
              f"(SeaweedFS alone peaked at {mon.weed_peak / 2**30:.2f} GB). Targets <= "
              f"{target_s / 60:.0f} min and <= {target_gb:.0f} GB with SeaweedFS: "
              f"{'met' if ok else 'MISSED'}")
        if result is None or proc.returncode != 0:
            print(f"run exit {proc.returncode}; result {result}; log tail:")
            print("".join(log_path.read_text(errors="replace").splitlines(True)[-60:]))
        else:
            try:
                from nightrec.store import layout

                metrics = storage.read_json(layout.run_uri(DS, "evaluate", "metrics.json"))
                figures["metrics"] = metrics
                print("evaluate:", json.dumps(metrics)[:1500])
                m = storage.read_json(layout.manifest_uri(DS))
                figures["manifest"] = {k: m.get(k) for k in ("rows", "users", "model_version")}
                print(f"published {m['rows']:,} rows for {m['users']:,} users, model "
                      f"{m['model_version']}")
                sel = storage.read_json(layout.run_uri(DS, "train", "selection.json"))
                figures["selection"] = sel
                print("selection:", json.dumps(sel))
            except Exception as e:  # noqa: BLE001 - report what is there
                print(f"(could not read run outputs: {e})")
            if args.baselines == "on" or (args.baselines == "auto"
                                          and args.interactions <= 20_000_000):
                figures["quality"] = quality(params_path)
        if args.json_out:
            args.json_out.write_text(json.dumps(figures, indent=2, default=str))
    finally:
        s3server.down(cfg)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if figures.get("exit") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
