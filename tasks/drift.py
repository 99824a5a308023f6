"""Input drift against the previous ds: a valid snapshot can still be the wrong one.

Every row can pass the contract while the snapshot is half of what it should be, or carries a new
id scheme, or a popularity shift. Validate (tasks/validate.py) runs these checks after the
contract, as the Great Expectations suite ``expectations/drift.json`` on one row of this ds's
figures, whose ``$PARAMETER`` bounds (GE expectation parameters) come from the previous ds's
recorded figures and ``monitor.drift.<check>`` (:func:`bounds`):

- ``rows``, ``users``, ``items``: the clean table's counts, within ``[previous x (1 - max_drop),
  previous x (1 + max_growth)]``;
- ``new_user_share``, ``new_item_share``: users (items) whose first event is after the previous
  ds's end, at most the previous ds's share + ``max_increase`` (a new id scheme makes everyone
  new);
- ``rating_mean``: within ``max_change`` of the previous mean;
- ``timestamp_median_days``: the median event time (days since the epoch) within
  ``max_shift_days`` of the previous one (a unit or clock bug moves it by years);
- ``popularity_js``: the Jensen-Shannon distance (base 2, in [0, 1]) between the item shares of
  the two ds, at most ``max``;
- ``quarantine_share``: the largest per-reason share of raw rows quarantined, at most the
  previous share of that reason + ``max_increase`` (the figure is the largest increase).

Each check's ``action`` is ``warn`` (a warning, an alert record ``alerts/ds=<ds>/<run>.drift.json``
and the report) or ``stop`` (the run stops with :class:`DriftError`, before anything is trained
or published). With no earlier ds recorded (a first run), nothing is compared and the report
says so. This ds's figures (``runs/ds=<ds>/drift/stats.json`` and ``item_counts.parquet``) are
recorded whatever the verdict, with ``accepted`` false when a ``stop`` check broke: the next ds
compares with the last accepted ds, never with a refused one.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pandas as pd

from nightrec.core import engine, schema, settings
from nightrec.core.errors import PermanentError
from nightrec.store import layout, storage

SUITE = "expectations/drift.json"
CHECKS = ("rows", "users", "items", "new_user_share", "new_item_share", "rating_mean",
          "timestamp_median_days", "popularity_js", "quarantine_share")
PARAMS = [f"monitor.drift.{c}" for c in CHECKS]
ACTIONS = ("warn", "stop")
DAY = 86400
OPEN = 1e300  # an unbounded side of a check
log = logging.getLogger(__name__)


class DriftError(PermanentError):
    """A drift check whose action is ``stop`` broke: the run stops before training."""


def end_of_day(ds: str) -> int:
    return int((pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)).timestamp())


def previous_ds(ds: str) -> str | None:
    """The greatest ds before ``ds`` whose figures were accepted (recorded, and no ``stop``
    check broke): a refused snapshot is never the baseline, so the same bad input the next day
    is refused again."""
    days = sorted({d for u in storage.list_prefixes(layout.runs_root())
                   if (d := layout.ds_of_prefix(u)) and d < ds}, reverse=True)
    for d in days:
        uri = layout.run_uri(d, "drift", "stats.json")
        if storage.exists(uri) and storage.read_json(uri).get("accepted", True):
            return d
    return None


def measure(con, clean_glob: str, clean_stats: dict, *, since: int | None) -> tuple[dict, pd.DataFrame]:
    """This ds's figures from the clean table (local Parquet, in DuckDB) and clean's stats:
    ``(stats, item_counts)``. ``since``: the previous ds's end (new users/items are those whose
    first event is at or after it); None on a first run."""
    src = f"read_parquet({engine.quote(clean_glob)})"
    u, i, r, t = schema.USER_ID, schema.ITEM_ID, schema.RATING, schema.TIMESTAMP
    rows, users, items, rating_mean, ts_median = con.execute(
        f"SELECT count(*), count(DISTINCT {u}), count(DISTINCT {i}), avg({r}), "
        f"median({t}) FROM {src}").fetchone()
    stats = {"rows": int(rows), "users": int(users), "items": int(items),
             "rating_mean": None if rating_mean is None else float(rating_mean),
             "timestamp_median_days": None if ts_median is None else float(ts_median) / DAY}
    if since is not None:
        for col, name in ((u, "new_user_share"), (i, "new_item_share")):
            (new,) = con.execute(f"SELECT count(*) FROM (SELECT min({t}) AS f FROM {src} "
                                 f"GROUP BY {col}) WHERE f >= ?", [since]).fetchone()
            stats[name] = new / max(users if col == u else items, 1)
    raw = max(int(clean_stats.get("raw_rows") or 0), 1)
    stats["quarantine_shares"] = {k: v / raw for k, v in (clean_stats.get("by_reason") or {}).items()}
    counts = con.execute(f"SELECT CAST({i} AS VARCHAR) AS {i}, count(*) AS n FROM {src} "
                         f"GROUP BY 1").df()
    return stats, counts


def js_distance(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Jensen-Shannon distance (base 2) between the item shares of two ``item_id, n`` tables."""
    both = a.set_index(schema.ITEM_ID)["n"].to_frame("a").join(
        b.set_index(schema.ITEM_ID)["n"].to_frame("b"), how="outer").fillna(0.0)
    p, q = both["a"].to_numpy(float), both["b"].to_numpy(float)
    if p.sum() == 0 or q.sum() == 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x):
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def figures(stats: dict, prev: dict, counts: pd.DataFrame, prev_counts: pd.DataFrame) -> dict:
    """One value per check (the row the suite sees); NaN where it cannot be measured."""
    shares, before = stats["quarantine_shares"], prev.get("quarantine_shares") or {}
    increase = max([shares.get(k, 0.0) - before.get(k, 0.0) for k in set(shares) | set(before)]
                   or [0.0])
    row = {c: stats.get(c) for c in ("rows", "users", "items", "new_user_share",
                                      "new_item_share", "rating_mean", "timestamp_median_days")}
    row["popularity_js"] = js_distance(counts, prev_counts)
    row["quarantine_share"] = increase
    return {k: (math.nan if v is None else float(v)) for k, v in row.items()}


def bounds(prev: dict, p) -> dict:
    """The suite's ``$PARAMETER`` values: ``<check>_min`` / ``<check>_max`` from the previous
    ds's figures and ``monitor.drift``."""
    out = {}
    for c in ("rows", "users", "items"):
        cfg = p[f"monitor.drift.{c}"]
        out[f"{c}_min"] = prev[c] * (1 - float(cfg["max_drop"]))
        out[f"{c}_max"] = prev[c] * (1 + float(cfg["max_growth"]))
    for c in ("new_user_share", "new_item_share"):
        # the previous ds's own share of new ones (0 when it had no ds before it)
        out[f"{c}_max"] = min(1.0, float(prev.get(c) or 0.0)
                              + float(p[f"monitor.drift.{c}"]["max_increase"]))
    change = float(p["monitor.drift.rating_mean"]["max_change"])
    mean = prev.get("rating_mean")
    out["rating_mean_min"] = -math.inf if mean is None else mean - change
    out["rating_mean_max"] = math.inf if mean is None else mean + change
    shift = float(p["monitor.drift.timestamp_median_days"]["max_shift_days"])
    med = prev.get("timestamp_median_days")
    out["timestamp_median_days_min"] = -math.inf if med is None else med - shift
    out["timestamp_median_days_max"] = math.inf if med is None else med + shift
    out["popularity_js_max"] = float(p["monitor.drift.popularity_js"]["max"])
    out["quarantine_share_max"] = float(p["monitor.drift.quarantine_share"]["max_increase"])
    return out


def check_params(p) -> None:
    for c in CHECKS:
        action = p[f"monitor.drift.{c}"].get("action")
        if action not in ACTIONS:
            raise ValueError(f"monitor.drift.{c}.action must be one of {ACTIONS}, got {action!r}")


def verdict(suite_result: dict, row: dict, params_used: dict, p) -> dict:
    """Each check's outcome from the suite's result: ``{"checks": [...], "stop": [...],
    "warn": [...]}``."""
    broken = {f["kwargs"].get("column") for f in suite_result["failures"]}
    checks = []
    for c in CHECKS:
        value = row.get(c)
        measurable = value is not None and not math.isnan(value)
        ok = c not in broken or not measurable
        checks.append({"check": c, "value": value if measurable else None,
                       "min": params_used.get(f"{c}_min"), "max": params_used.get(f"{c}_max"),
                       "action": p[f"monitor.drift.{c}"]["action"], "ok": ok,
                       "measured": measurable})
    return {"checks": checks,
            "stop": [x["check"] for x in checks if not x["ok"] and x["action"] == "stop"],
            "warn": [x["check"] for x in checks if not x["ok"] and x["action"] == "warn"]}


def run_checks(ds: str, clean_glob: str, clean_stats: dict, *, con, params: dict,
               run_suite, run_id: str | None = None) -> dict:
    """Measure, record this ds's figures, compare with the previous ds through the suite.
    ``run_suite``: validate's (passed in: validate imports this module). Returns the report;
    the caller raises on ``stop``."""
    p = settings.step_params(PARAMS, params)
    check_params(p)
    prev_ds = previous_ds(ds)
    stats, counts = measure(con, clean_glob, clean_stats,
                            since=end_of_day(prev_ds) if prev_ds else None)
    stats["ds"] = ds
    buf = io.BytesIO()
    counts.to_parquet(buf, index=False)
    storage.write_bytes(layout.run_uri(ds, "drift", "item_counts.parquet"), buf.getvalue())
    if prev_ds is None:
        storage.write_json(layout.run_uri(ds, "drift", "stats.json"), {**stats, "accepted": True})
        return {"ds": ds, "previous": None, "checks": [], "stop": [], "warn": [],
                "note": "no earlier ds recorded: nothing to compare with (a first run)"}
    prev = storage.read_json(layout.run_uri(prev_ds, "drift", "stats.json"))
    prev_counts = storage.parquet_frame(storage.read_bytes(
        layout.run_uri(prev_ds, "drift", "item_counts.parquet")))
    row = figures(stats, prev, counts, prev_counts)
    used = bounds(prev, p)
    # NaN (not measurable) goes to GE as null: expect_column_values_to_be_between skips nulls
    frame = pd.DataFrame([{k: (None if math.isnan(v) else v) for k, v in row.items()}],
                         dtype="float64")
    result = run_suite(frame, settings.project_root() / SUITE,
                       {k: _finite(v) for k, v in used.items()}, run_name=ds, con=con)
    out = {"ds": ds, "previous": prev_ds, **verdict(result, row, used, p), "suite": result}
    storage.write_json(layout.run_uri(ds, "drift", "stats.json"),
                       {**stats, "accepted": not out["stop"]})
    if out["warn"] or out["stop"]:
        what = ", ".join(f"{x['check']}={x['value']:.4g} not in [{_fmt(x['min'])}, "
                         f"{_fmt(x['max'])}] ({x['action']})"
                         for x in out["checks"] if not x["ok"])
        out["message"] = f"input drift against ds={prev_ds}: {what}"
        log.warning("%s", out["message"])
        if run_id:
            try:
                storage.write_json(layout.alert_uri(ds, run_id, "drift"), {
                    "kind": "drift", "ds": ds, "run_id": run_id, "error": out["message"],
                    "stop": out["stop"], "warn": out["warn"]})
            except Exception as e:  # noqa: BLE001 - the alert must not mask the verdict
                log.warning("could not write the drift alert: %s", e)
    return out


def _finite(v: float) -> float:
    """A bound GE takes: an open side as a huge finite one (GE refuses two null bounds)."""
    if v is None or math.isnan(v):
        return OPEN
    return max(-OPEN, min(OPEN, float(v)))


def _fmt(v) -> str:
    return "-inf" if v is None or (isinstance(v, float) and math.isinf(v) and v < 0) else (
        "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.4g}")

