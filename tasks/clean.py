"""Step 2, clean: parse the raw strings, quarantine bad rows with a reason, dedupe, k-core, index.

Each raw row ends in exactly one of two tables (``tests/test_clean.py`` checks the sum):

- ``interactions``: ``user_id, item_id`` (str), ``rating`` (float, NaN when the feed has none),
  ``timestamp`` (int64 unix seconds), ``user_idx, item_idx`` (dense int32 indices);
- ``quarantine``: the raw strings plus ``source_file, raw_row, reason``.

Reasons, checked in this order (first match wins): ``missing_field`` (no user, item or
timestamp), ``unparseable_value`` (timestamp or rating not a number), ``not_finite`` (NaN/inf),
``rating_out_of_range`` (outside clean.min_rating..max_rating), ``timestamp_out_of_range``
(before clean.min_timestamp, or after the end of the run's day ``ds``), ``duplicate_event``
(policy: the latest event per (user, item) wins; on equal timestamps the later raw row wins), and
``below_k_core`` (users/items under clean.min_user_interactions/min_item_interactions, applied
until stable). Timestamps above 1e11 in a file are taken as milliseconds for that whole file.

Indices: users and items are numbered in sorted order of their external id. (Stable across runs
is the data-stages issue's job.)
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import pandas as pd

from tasks import layout, schema, settings, storage

PARAMS = [
    "clean.min_rating",
    "clean.max_rating",
    "clean.min_timestamp",
    "clean.min_user_interactions",
    "clean.min_item_interactions",
]
_MS_THRESHOLD = 1e11  # 1e11 s is year 5138; 1e11 ms is 1973


def _to_number(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").astype("float64")


def _seconds(ts: pd.Series, source: pd.Series) -> pd.Series:
    """Per source file: if its finite timestamps look like milliseconds, divide by 1000."""
    out = ts.copy()
    for idx in ts.groupby(source, sort=False).groups.values():
        finite = ts.loc[idx][np.isfinite(ts.loc[idx])]
        if len(finite) and finite.median() > _MS_THRESHOLD:
            out.loc[idx] = ts.loc[idx] / 1000.0
    return out


def kcore(df: pd.DataFrame, *, min_user: int, min_item: int) -> pd.Series:
    """Boolean mask of rows that survive the iterated (min_user, min_item) k-core."""
    keep = pd.Series(True, index=df.index)
    while True:
        sub = df[keep]
        ucount = sub.groupby(schema.USER_ID)[schema.ITEM_ID].transform("size")
        icount = sub.groupby(schema.ITEM_ID)[schema.USER_ID].transform("size")
        bad = sub.index[(ucount < min_user) | (icount < min_item)]
        if len(bad) == 0:
            return keep
        keep.loc[bad] = False


def clean_interactions(
    raw: pd.DataFrame,
    *,
    ds: str,
    min_rating: float,
    max_rating: float,
    min_timestamp: str,
    min_user_interactions: int,
    min_item_interactions: int,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pure core. Returns ``(interactions, quarantine, stats)``; see the module docstring."""
    settings.check_ds(ds)
    df = raw.reset_index(drop=True)
    reason = pd.Series(None, index=df.index, dtype=object)

    def mark(mask: pd.Series, code: str) -> None:
        reason.loc[mask & reason.isna()] = code

    user = df[schema.USER_ID].astype("string").str.strip()
    item = df[schema.ITEM_ID].astype("string").str.strip()
    ts_raw = df[schema.TIMESTAMP].astype("string").str.strip()
    rating_raw = df[schema.RATING].astype("string").str.strip()
    missing = (
        user.isna() | (user == "") | item.isna() | (item == "") | ts_raw.isna() | (ts_raw == "")
    )
    mark(missing.fillna(True), schema.REASON_MISSING_FIELD)

    ts = _to_number(ts_raw)
    rating = _to_number(rating_raw)
    has_rating = rating_raw.notna() & (rating_raw != "")
    nan_text = ts_raw.str.lower().isin(["nan", "inf", "-inf", "infinity"]) | rating_raw.str.lower(
    ).isin(["nan", "inf", "-inf", "infinity"])
    mark(nan_text.fillna(False), schema.REASON_NOT_FINITE)
    unparseable = ts.isna() | (has_rating & rating.isna())
    mark(unparseable.fillna(False), schema.REASON_UNPARSEABLE)
    mark(~np.isfinite(ts) | (has_rating & ~np.isfinite(rating)), schema.REASON_NOT_FINITE)

    ok = reason.isna()
    ts = ts.where(ok)
    ts.loc[ok] = _seconds(ts[ok], df.loc[ok, schema.SOURCE_FILE])
    rating = rating.where(has_rating)
    mark(has_rating & ((rating < min_rating) | (rating > max_rating)), schema.REASON_RATING_RANGE)
    lo = pd.Timestamp(min_timestamp, tz="UTC").timestamp()
    hi = (pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)).timestamp()
    mark(ok & ((ts < lo) | (ts >= hi)), schema.REASON_TIMESTAMP_RANGE)

    good = pd.DataFrame(
        {
            schema.USER_ID: user,
            schema.ITEM_ID: item,
            schema.RATING: rating,
            schema.TIMESTAMP: ts,
            schema.RAW_ROW: np.arange(len(df)),
        }
    )[reason.isna()]
    # Dedupe: the latest event per (user, item); on equal timestamps the later raw row.
    order = good.sort_values([schema.TIMESTAMP, schema.RAW_ROW], kind="stable")
    dup = order.duplicated([schema.USER_ID, schema.ITEM_ID], keep="last")
    reason.loc[dup[dup].index] = schema.REASON_DUPLICATE
    good = good[reason.loc[good.index].isna()]

    keep = kcore(good, min_user=min_user_interactions, min_item=min_item_interactions)
    reason.loc[keep[~keep].index] = schema.REASON_KCORE
    good = good[keep]

    users = np.sort(good[schema.USER_ID].unique())
    items = np.sort(good[schema.ITEM_ID].unique())
    clean = pd.DataFrame(
        {
            schema.USER_ID: good[schema.USER_ID].astype(str).to_numpy(),
            schema.ITEM_ID: good[schema.ITEM_ID].astype(str).to_numpy(),
            schema.RATING: good[schema.RATING].to_numpy(dtype="float64"),
            schema.TIMESTAMP: good[schema.TIMESTAMP].to_numpy(dtype="int64"),
            schema.USER_IDX: np.searchsorted(users, good[schema.USER_ID]).astype("int32"),
            schema.ITEM_IDX: np.searchsorted(items, good[schema.ITEM_ID]).astype("int32"),
        }
    )
    clean = clean.sort_values([schema.USER_IDX, schema.TIMESTAMP, schema.ITEM_IDX], kind="stable")
    clean = clean.reset_index(drop=True)

    quarantine = df[reason.notna()].copy()
    quarantine[schema.REASON] = reason[reason.notna()]
    for col in schema.INTERACTION_COLUMNS:
        quarantine[col] = quarantine[col].astype("string").astype(object)

    counts = Counter(reason.dropna())
    invalid = sum(n for r, n in counts.items() if r in schema.INVALID_REASONS)
    stats = {
        "raw_rows": len(df),
        "clean_rows": len(clean),
        "quarantined_rows": int(reason.notna().sum()),
        "by_reason": {k: int(v) for k, v in sorted(counts.items())},
        "invalid_rows": int(invalid),
        "invalid_fraction": float(invalid / len(df)) if len(df) else 0.0,
        "n_users": len(users),
        "n_items": len(items),
    }
    return clean, quarantine.reset_index(drop=True), stats


def run(ds: str, ingested: dict[str, str], params: dict | None = None) -> dict[str, str]:
    p = settings.step_params(PARAMS, params)
    raw = storage.read_parquet(ingested["interactions"])
    clean, quarantine, stats = clean_interactions(raw, ds=ds, **settings.core_kwargs(p))
    out = {
        "interactions": layout.run_uri(ds, "clean", "interactions.parquet"),
        "quarantine": layout.run_uri(ds, "clean", "quarantine.parquet"),
        "stats": layout.run_uri(ds, "clean", "stats.json"),
    }
    storage.write_parquet(clean, out["interactions"])
    storage.write_parquet(quarantine, out["quarantine"])
    storage.write_json(out["stats"], stats)
    for side in ("items", "users"):
        if side in ingested:
            out[side] = ingested[side]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="clean a raw-string interactions parquet")
    parser.add_argument("--input", required=True)
    parser.add_argument("--ds", required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    p = settings.step_params(PARAMS)
    clean, quarantine, stats = clean_interactions(
        storage.read_parquet(args.input), ds=args.ds, **settings.core_kwargs(p)
    )
    storage.write_parquet(clean, storage.join(args.out_dir, "interactions.parquet"))
    storage.write_parquet(quarantine, storage.join(args.out_dir, "quarantine.parquet"))
    storage.write_json(storage.join(args.out_dir, "stats.json"), stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
