"""Realized quality: the table readers were served, scored against what users did next.

Each nightly run for ds D takes the table that was latest before D (the published ds T < D with
the greatest T) and the events of D's clean table newer than T (timestamp at or after the end of
day T, up to the end of D), and measures:

- hit-rate, recall, NDCG and MRR at K = 10 and the table's K (``nightrec.ml.metrics``, the
  definitions evaluate uses), over every user with a new event; a user's relevant items are
  the distinct items of their new events;
- ``coverage``: distinct items in the table over distinct items in D's clean table;
- ``event_share_on_recommended``: the share of new (user, item) pairs whose item was in that
  user's list.

Users are split into segments: ``new`` (no event before the cutoff: the table has no list for
them, so they are scored on the manifest's ``popular`` items, what ``serve.unknown_user:
popular`` serves them) and ``returning`` (a returning user the table has no list for scores 0),
and the returning users into ``activity_t1..t3``, terciles of their event count before the
cutoff.

Written to ``runs/ds=D/monitor/realized.json``. With ``monitor.realized.history_runs`` earlier
figures, a drop of ``monitor.realized.metric`` by more than ``monitor.realized.max_drop``
(relative) below their median, measured on at least ``monitor.realized.min_users`` users,
writes an alert record (``alerts/ds=D/<run>.realized_drop.json``)
and a warning. This step never stops the run: any failure is logged and recorded in
realized.json as ``error``.

A caveat of the source: clean keeps the newest row of a repeated (user, item) pair, so a user who
met an item before T and again after counts as a new event on an item the table could not
recommend (it never recommends seen items). Memory: D's clean table is read by DuckDB under
``resources.steps.monitor``; the table of T is streamed a part at a time, keeping the rows of
users with new events.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.core import engine, schema, settings
from nightrec.core.records import Validated
from nightrec.ml import metrics
from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader

PARAMS = ["monitor.realized.metric", "monitor.realized.max_drop",
          "monitor.realized.history_runs", "monitor.realized.min_users"]
NAMES = ("hit_rate", "recall", "ndcg", "mrr")
log = logging.getLogger(__name__)


def end_of_day(ds: str) -> int:
    return int((dt.datetime.fromisoformat(ds).replace(tzinfo=dt.UTC)
                + dt.timedelta(days=1)).timestamp())


def previous_table(ds: str) -> str | None:
    """The greatest published ds before ``ds`` (one with a committed manifest), else None."""
    found = sorted({d for u in storage.list_prefixes(layout.recs_root())
                    if (d := layout.ds_of_prefix(u)) and d < ds}, reverse=True)
    return next((d for d in found if storage.exists(layout.manifest_uri(d))), None)


def _figures(recs: np.ndarray, relevant: list[set[int]], ks: list[int]) -> dict:
    per_user = metrics.user_metrics(recs, relevant, ks)
    return {f"{n}_at_{k}": float(np.mean(per_user[f"{n}_at_{k}"])) for k in ks for n in NAMES}


def realized(events: pd.DataFrame, lists: pd.DataFrame, history: pd.Series,
             popular: list[str], *, table_k: int, table_items: int,
             catalogue_items: int) -> dict:
    """The figures (pure). ``events``: ``user_id, item_id`` of the new events (distinct pairs);
    ``lists``: ``user_id, item_id, rank`` of the table's rows for those users; ``history``:
    events before the cutoff per user_id (absent: a new user); ``popular``: the manifest's
    popular item ids, in order."""
    users = np.sort(events[schema.USER_ID].unique())
    out = {"events": int(len(events)), "users": int(len(users)),
           "coverage": table_items / catalogue_items if catalogue_items else None}
    if not len(users):
        return {**out, "ks": [], "metrics": {}, "segments": {},
                "event_share_on_recommended": None}
    ks = sorted({min(10, table_k), table_k})
    codes, vocab = pd.factorize(pd.concat([events[schema.ITEM_ID], lists[schema.ITEM_ID],
                                           pd.Series(popular, dtype=object)], ignore_index=True))
    ev_items = codes[:len(events)]
    li_items = codes[len(events):len(events) + len(lists)]
    pop_items = codes[len(events) + len(lists):][:table_k]
    row = pd.Index(users)
    recs = np.full((len(users), table_k), -1, dtype=np.int64)
    hist = history.reindex(users).fillna(0).to_numpy()
    new = hist == 0
    recs[new, :len(pop_items)] = pop_items
    if len(lists):
        r = row.get_indexer(lists[schema.USER_ID])
        rank = lists[schema.RANK].to_numpy().astype(np.int64) - 1
        ok = (r >= 0) & (rank < table_k)
        recs[r[ok], rank[ok]] = li_items[ok]
    ev_row = row.get_indexer(events[schema.USER_ID])
    order = np.lexsort((ev_items, ev_row))
    relevant = [set(x) for x in np.split(ev_items[order],
                                         np.flatnonzero(np.diff(ev_row[order])) + 1)]
    width = len(vocab) + 1
    rec_keys = (np.arange(len(users), dtype=np.int64)[:, None] * width + recs)[recs >= 0]
    on_list = np.isin(ev_row.astype(np.int64) * width + ev_items, rec_keys)
    out.update(ks=ks, metrics=_figures(recs, relevant, ks),
               event_share_on_recommended=float(on_list.mean()))
    segments = {"new": new, "returning": ~new}
    if (~new).any():
        lo, hi = np.quantile(hist[~new], [1 / 3, 2 / 3])
        segments.update(activity_t1=~new & (hist <= lo),
                        activity_t2=~new & (hist > lo) & (hist <= hi),
                        activity_t3=~new & (hist > hi))
        out["activity_bounds"] = [float(lo), float(hi)]
    out["segments"] = {}
    for name, mask in segments.items():
        idx = np.flatnonzero(mask)
        out["segments"][name] = {"users": int(len(idx)), "metrics": _figures(
            recs[idx], [relevant[i] for i in idx], ks) if len(idx) else {}}
    return out


def trailing(ds: str, value: float | None, *, metric: str, runs: int, max_drop: float,
             users: int = 0, min_users: int = 0) -> dict:
    """The median of ``metric`` over the last ``runs`` realized.json before ``ds``, and whether
    ``value`` dropped more than ``max_drop`` (relative) below it; judged only on at least
    ``min_users`` users (a handful of users' figure swings by more than any threshold)."""
    earlier = sorted({d for u in storage.list_prefixes(layout.runs_root())
                      if (d := layout.ds_of_prefix(u)) and d < ds}, reverse=True)
    values = []
    for d in earlier:
        uri = layout.run_uri(d, "monitor", "realized.json")
        if storage.exists(uri):
            v = (storage.read_json(uri).get("metrics") or {}).get(metric)
            if v is not None:
                values.append(v)
        if len(values) >= runs:
            break
    median = float(np.median(values)) if values else None
    drop = (1 - value / median) if median and value is not None else None
    judged = users >= min_users
    return {"metric": metric, "runs": len(values), "median": median, "drop": drop,
            "max_drop": max_drop, "users": users, "min_users": min_users, "judged": judged,
            "alert": judged and drop is not None and drop > max_drop}


def measure(ds: str, clean_uri: str, params: dict) -> dict:
    """realized.json's content for ``ds`` (reads the store)."""
    table_ds = previous_table(ds)
    if table_ds is None:
        return {"ds": ds, "table": None,
                "note": f"no table was published before ds={ds}: nothing to measure"}
    manifest = storage.read_json(layout.manifest_uri(table_ds))
    cutoff, end = end_of_day(table_ds), end_of_day(ds)
    with tempfile.TemporaryDirectory(prefix="nightrec-monitor-",
                                     dir=engine.spill_root()) as tmp, \
            engine.connect("monitor", params) as con:
        glob = storage.download_table(clean_uri, Path(tmp) / "clean")
        con.execute(f"CREATE VIEW c AS SELECT {schema.USER_ID}, {schema.ITEM_ID}, "
                    f"{schema.TIMESTAMP} FROM read_parquet({engine.quote(glob)})")
        events = con.execute(
            f"SELECT DISTINCT {schema.USER_ID}, {schema.ITEM_ID} FROM c WHERE "
            f"{schema.TIMESTAMP} >= ? AND {schema.TIMESTAMP} < ?", [cutoff, end]).df()
        con.register("ev_users", pd.DataFrame({schema.USER_ID: events[schema.USER_ID].unique()}))
        history = con.execute(
            f"SELECT c.{schema.USER_ID}, count(*) AS n FROM c JOIN ev_users USING "
            f"({schema.USER_ID}) WHERE {schema.TIMESTAMP} < ? GROUP BY 1", [cutoff]).df()
        catalogue = con.execute(f"SELECT count(DISTINCT {schema.ITEM_ID}) FROM c").fetchone()[0]
    lists, items = _lists(table_ds, set(events[schema.USER_ID]))
    figures = realized(events, lists, history.set_index(schema.USER_ID)["n"],
                       [p["item_id"] for p in manifest.get("popular") or []],
                       table_k=int(manifest["top_k"]), table_items=items,
                       catalogue_items=int(catalogue))
    return {"ds": ds, "table": {"ds": table_ds, "publish_id": manifest.get("publish_id"),
                                "model_version": manifest.get("model_version"),
                                "source": manifest.get("source"), "top_k": manifest["top_k"]},
            "cutoff": dt.datetime.fromtimestamp(cutoff, dt.UTC).isoformat(), **figures}


def _lists(table_ds: str, users: set) -> tuple[pd.DataFrame, int]:
    """The table's rows of ``users`` (user_id, item_id, rank) and its distinct items, one part
    at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reader = RecommendationReader(storage.split_uri(layout.recs_root())[0])
    wanted = pa.array(sorted(users), type=pa.string())
    frames, items = [], set()
    for batch in reader.iter_batches(table_ds):
        items.update(pc.unique(batch.column(schema.ITEM_ID)).to_pylist())
        mine = batch.filter(pc.is_in(batch.column(schema.USER_ID), value_set=wanted))
        if mine.num_rows:
            frames.append(mine.select([schema.USER_ID, schema.ITEM_ID, schema.RANK]).to_pandas())
    cols = [schema.USER_ID, schema.ITEM_ID, schema.RANK]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)), \
        len(items)


def run(validated: Validated, *, run_id: str, params: dict | None = None) -> dict:
    """Measure, compare with the trailing median, write realized.json (and an alert on a
    drop). Never raises: a failure is logged and recorded."""
    ds = validated.ds
    uri = layout.run_uri(ds, "monitor", "realized.json")
    try:
        params = params if params is not None else settings.load_params()
        p = settings.step_params(PARAMS, params)
        out = measure(ds, validated.interactions, params)
        if out.get("table"):
            metric = str(p["monitor.realized.metric"])
            out["trailing"] = trailing(ds, (out.get("metrics") or {}).get(metric), metric=metric,
                                       runs=int(p["monitor.realized.history_runs"]),
                                       max_drop=float(p["monitor.realized.max_drop"]),
                                       users=int(out.get("users") or 0),
                                       min_users=int(p["monitor.realized.min_users"]))
            if out["trailing"]["alert"]:
                t = out["trailing"]
                what = (f"realized {metric} {out['metrics'][metric]:.4f} of the ds="
                        f"{out['table']['ds']} table is {t['drop']:.0%} below the median "
                        f"{t['median']:.4f} of the last {t['runs']} runs "
                        f"(monitor.realized.max_drop {t['max_drop']:g})")
                log.warning("realized quality dropped: %s", what)
                out["alert"] = layout.alert_uri(ds, run_id, "realized_drop")
                storage.write_json(out["alert"], {"kind": "realized_drop", "ds": ds,
                                                  "run_id": run_id, "error": what, **t})
        else:
            log.info(out["note"])
    except Exception as e:  # noqa: BLE001 - monitoring never stops the run
        log.warning("realized quality not measured for ds=%s: %s", ds, e, exc_info=True)
        out = {"ds": ds, "error": f"{type(e).__name__}: {e}"}
    try:
        storage.write_json(uri, out)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write %s: %s", uri, e)
    return out
