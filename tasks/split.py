"""Step 5, split: train / valid / test, as a DVC stage. ``split.method`` chooses how:

- ``global_time`` (temporal, global cutoff; the default): events after the ``1 - test_fraction``
  quantile of all timestamps go to test, those between the ``1 - test_fraction -
  valid_fraction`` quantile and it to valid. Nothing in train is later than anything in valid or
  test: no training on the future, for any user, and the gate's popularity baseline does not
  count tomorrow's hits either. It is the default because it is what a nightly job faces: the
  model fitted up to a time, judged on what came after (benchmarks/RESULTS.md, "Gating what
  ships", measures what the per-user split flattered).
- ``leave_last_fraction`` (temporal, per user): each user's events sorted by time (ties by item
  index); the latest ``ceil(test_fraction * n)`` go to test, the ``ceil(valid_fraction * n)``
  before them to valid, the rest to train. One user's train can be later than another's test:
  training on the future of the test period.
- ``leave_last_n`` (temporal, per user): the same with fixed counts ``split.test_n`` and
  ``split.valid_n``.
- ``random_per_user``: per user, a seeded random ``ceil(test_fraction * n)`` events go to test
  and ``ceil(valid_fraction * n)`` to valid. It matches a random-holdout evaluation protocol
  (the MovieLens benchmark's); it is not what a nightly job facing the future should select on.

For the per-user methods, users with fewer than ``split.min_user_events_for_holdout`` events stay
whole in train, so every evaluated user has history. No (user, item) pair is in two parts (clean
deduplicated them), so a test item is never in that user's train set (tests/test_split.py).

Cold users and items: a user or item whose events all fall in valid/test (possible with
``global_time``, and for items with any method) stays there, is trained on by the shipped refit
when it is in valid (tasks/train.py), and is *counted*, not hidden: ``split_stats`` gives ``cold_users`` / ``cold_items`` per part,
and evaluation (tasks/evaluate.py) ranks only users with known history while cold target items
count as misses, the honest cold-start cost.

Under Airflow, tasks/versioning.py runs this stage with ``dvc repro`` in a per-ds workspace and
pushes the outputs; the DVC hash of ``data/split`` is the run's ``data_version``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.core import engine, schema, settings
from nightrec.store import storage

PARAMS = [
    "seed",
    "split.method",
    "split.valid_fraction",
    "split.test_fraction",
    "split.valid_n",
    "split.test_n",
    "split.min_user_events_for_holdout",
]
PARTS = ("train", "valid", "test")
METHODS = ("leave_last_fraction", "leave_last_n", "global_time", "random_per_user")


def split_interactions(
    df: pd.DataFrame,
    *,
    method: str = "global_time",
    valid_fraction: float,
    test_fraction: float,
    min_user_events_for_holdout: int,
    valid_n: int = 1,
    test_n: int = 1,
    seed: int | list[int] = 0,
    cutoffs: tuple[int, int] | None = None,
) -> dict[str, pd.DataFrame]:
    """Return ``{"train", "valid", "test"}`` frames with the input's columns; see module doc.

    ``cutoffs``: ``global_time``'s (valid, test) timestamps, computed over every bucket
    (:func:`global_cutoffs`) when ``df`` is one bucket; None computes them from ``df``.
    ``seed``: an int, or a list (``[seed, bucket]``: each bucket's own stream)."""
    if method not in METHODS:
        raise ValueError(f"split.method must be one of {METHODS}, got {method!r}")
    if not (0 <= valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError("split fractions must be in [0, 1) and sum below 1")
    if valid_n < 0 or test_n < 1:
        raise ValueError(f"split.valid_n must be >= 0 and split.test_n >= 1, got {valid_n}, {test_n}")
    ordered = df.sort_values(
        [schema.USER_IDX, schema.TIMESTAMP, schema.ITEM_IDX], kind="stable"
    ).reset_index(drop=True)
    if method == "global_time":
        ts = ordered[schema.TIMESTAMP].to_numpy()
        if cutoffs is None:
            cutoffs = (np.quantile(ts, 1 - test_fraction - valid_fraction, method="higher"),
                       np.quantile(ts, 1 - test_fraction, method="higher"))
        valid_cut, test_cut = cutoffs
        part = np.where(ts >= test_cut, 2, np.where((ts >= valid_cut) & (valid_fraction > 0), 1, 0))
        return {name: ordered[part == i].reset_index(drop=True) for i, name in enumerate(PARTS)}
    if method == "random_per_user":
        # a seeded random order within each user replaces time order
        key = np.random.default_rng(seed).random(len(ordered))
        ordered = ordered.assign(_key=key).sort_values(
            [schema.USER_IDX, "_key"], kind="stable").drop(columns="_key").reset_index(drop=True)
    g = ordered.groupby(schema.USER_IDX, sort=False)
    n = g[schema.ITEM_IDX].transform("size").to_numpy()
    pos_from_end = n - 1 - g.cumcount().to_numpy()  # 0 for the latest (or last drawn) event
    eligible = n >= min_user_events_for_holdout
    if method == "leave_last_n":
        n_test = np.where(eligible, np.minimum(test_n, n - 1), 0)
        n_valid = np.where(eligible, np.minimum(valid_n, n - 1 - n_test), 0)
    else:
        n_test = np.where(eligible, np.ceil(test_fraction * n), 0)
        n_valid = np.where(eligible, np.ceil(valid_fraction * n), 0)
    part = np.where(
        pos_from_end < n_test, 2, np.where(pos_from_end < n_test + n_valid, 1, 0)
    )
    out = {name: ordered[part == i] for i, name in enumerate(PARTS)}
    return {name: frame.sort_values([schema.USER_IDX, schema.TIMESTAMP, schema.ITEM_IDX],
                                     kind="stable").reset_index(drop=True)
            for name, frame in out.items()}


def global_cutoffs(con, glob: str, *, test_fraction: float, valid_fraction: float
                   ) -> tuple[int, int] | None:
    """``global_time``'s (valid, test) cutoffs over every row of the local Parquet files
    ``glob``, in the engine: exactly ``np.quantile(ts, q, method="higher")`` (the index numpy
    would pick in the sorted timestamps, then the value there). None when there are no rows."""
    src = f"read_parquet({engine.quote(glob)})"
    n = con.execute(f"SELECT count(*) FROM {src}").fetchone()[0]
    if not n:
        return None
    positions = np.arange(n, dtype=np.int64)  # 8 bytes a row, no more: the index rule alone
    at = [int(np.quantile(positions, q, method="higher"))
          for q in (1 - test_fraction - valid_fraction, 1 - test_fraction)]
    del positions
    rows = dict(con.execute(f"""
        SELECT rn, {schema.TIMESTAMP} FROM (
            SELECT {schema.TIMESTAMP}, row_number() OVER (ORDER BY {schema.TIMESTAMP}) - 1 AS rn
            FROM {src}) WHERE rn IN ({at[0]}, {at[1]})""").fetchall())
    return int(rows[at[0]]), int(rows[at[1]])


def bucket_seed(seed: int, bucket: int) -> list[int]:
    """The seed of one bucket's split: its own stream, whatever the other buckets hold."""
    return [int(seed), int(bucket)]


def split_bucket(path: Path, out_dir: Path, *, bucket: int, kwargs: dict,
                 cutoffs: tuple[int, int] | None) -> dict[str, int]:
    """Split one bucket's file into ``out_dir/{train,valid,test}.parquet``; rows per part.
    A bucket holds whole users, so the per-user methods need nothing else; ``global_time``
    takes the cutoffs computed over every bucket."""
    kw = {**kwargs, "seed": bucket_seed(kwargs.get("seed", 0), bucket)}
    frame = storage.parquet_frame(path)
    if kw["method"] == "global_time" and cutoffs is None and len(frame):
        raise ValueError("global_time needs the cutoffs over every bucket")
    parts = split_interactions(frame, cutoffs=cutoffs, **kw)
    del frame
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        storage.write_parquet(part, str(out_dir / f"{name}.parquet"))
    return {name: len(part) for name, part in parts.items()}


def bucket_of_path(path: Path) -> int:
    """``.../bucket=007/part-0.parquet`` -> 7."""
    return int(path.parent.name.split("=", 1)[1])


def split_stats_sql(con, globs: dict[str, str]) -> dict:
    """Rows per part, and the users/items of valid and test that train never saw, in the engine
    over local Parquet files (``globs``: part -> glob)."""
    def src(name: str) -> str:
        return f"read_parquet({engine.quote(globs[name])})"

    out = {"rows": {name: int(con.execute(f"SELECT count(*) FROM {src(name)}").fetchone()[0])
                    for name in PARTS}}
    for name in ("valid", "test"):
        cold_users, cold_items, cold_rows = con.execute(f"""
            SELECT
              (SELECT count(DISTINCT {schema.USER_IDX}) FROM {src(name)}
               WHERE {schema.USER_IDX} NOT IN (SELECT {schema.USER_IDX} FROM {src("train")})),
              (SELECT count(DISTINCT {schema.ITEM_IDX}) FROM {src(name)}
               WHERE {schema.ITEM_IDX} NOT IN (SELECT {schema.ITEM_IDX} FROM {src("train")})),
              (SELECT count(*) FROM {src(name)}
               WHERE {schema.ITEM_IDX} NOT IN (SELECT {schema.ITEM_IDX} FROM {src("train")}))
        """).fetchone()
        out[name] = {"cold_users": int(cold_users), "cold_items": int(cold_items),
                     "cold_item_rows": int(cold_rows)}
    return out


def split_stats(parts: dict[str, pd.DataFrame]) -> dict:
    """:func:`split_stats_sql` on in-memory frames (small data: tests)."""
    import duckdb

    con = duckdb.connect()
    with tempfile.TemporaryDirectory(prefix="split-stats-") as tmp:
        globs = {}
        for name, frame in parts.items():
            path = Path(tmp) / f"{name}.parquet"
            frame[[schema.USER_IDX, schema.ITEM_IDX]].to_parquet(path, index=False)
            globs[name] = str(path)
        return split_stats_sql(con, globs)


def read_part(uri: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A split part (one Parquet object, or the bucketed prefix) as one frame in the order the
    unbucketed split had: user index, time, item index. Whole in memory: trainers' input."""
    frame = storage.read_parquet(uri, columns=columns)
    keys = [c for c in (schema.USER_IDX, schema.TIMESTAMP, schema.ITEM_IDX) if c in frame]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True) if keys else frame


def read_parts(uris: list[str], columns: list[str] | None = None) -> tuple[pd.DataFrame, list[int]]:
    """Several split parts as one frame, part after part (each in its buckets' key order, not
    re-sorted), and each part's row count: ``frame.iloc[a:b]`` is then part n without a copy.
    Arrow tables are concatenated without copying and converted column by column
    (``self_destruct``), so the peak is about one copy of the rows, where :func:`read_part`
    per part, a concat and a sort held three."""
    import pyarrow as pa

    tables, lengths = [], []
    for uri in uris:
        part = [storage.parquet_table(storage.read_bytes(u), columns)
                for u in _objects(uri)]
        lengths.append(sum(t.num_rows for t in part))
        tables.extend(part)
    table = pa.concat_tables(tables)
    del tables
    frame = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    return frame, lengths


def _objects(uri: str) -> list[str]:
    """A part's Parquet objects: the prefix's (``.../train/``), or the one object."""
    objs = ([u for u in storage.list_uris(uri) if u.endswith(".parquet")]
            if uri.endswith("/") else [uri])
    if not objs:
        raise FileNotFoundError(f"no Parquet parts under {uri}")
    return objs


def column_ranges(uris: list[str], columns: list[str]) -> dict[str, tuple | None]:
    """Each column's ``(min, max)`` over every row of the parts ``uris``, from the Parquet
    footers' row-group statistics alone (one ranged read per object, no data): None for a
    column some non-empty row group has no complete statistics for (min, max, no nulls), or
    that no object has. What lets train skip reading a column that holds one value (every
    label 1, every weight 1) and take the latest timestamp without reading timestamps."""
    found: dict[str, list] = {c: [None, None] for c in columns}
    unknown = set()
    for uri in uris:
        for obj in _objects(uri):
            with storage.ParquetScan(obj) as scan:
                meta = scan.metadata
            # leaf columns by their path (a nested column has several leaves: Arrow field
            # positions are not leaf positions)
            paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
            for c in columns:
                if c not in paths:
                    unknown.add(c)
                    continue
                at = paths.index(c)
                for g in range(meta.num_row_groups):
                    group = meta.row_group(g)
                    if group.num_rows == 0:
                        continue
                    stats = group.column(at).statistics
                    if (stats is None or not stats.has_min_max or not stats.has_null_count
                            or stats.null_count):
                        unknown.add(c)
                        break
                    lo, hi = found[c]
                    found[c] = [stats.min if lo is None else min(lo, stats.min),
                                stats.max if hi is None else max(hi, stats.max)]
    return {c: None if c in unknown or found[c][0] is None else tuple(found[c]) for c in columns}


def split_kwargs(p: settings.StepParams) -> dict:
    kwargs = settings.core_kwargs({k: v for k, v in p.items() if k != "seed"})
    return {**kwargs, "seed": int(p["seed"])}


def split_dir(input_dir: Path, out_dir: Path, p: settings.StepParams, con) -> dict[int, dict]:
    """The whole split, bucket by bucket (memory: one bucket): what the DVC stage runs, and
    what the DAG's mapped tasks do one bucket each. Returns rows per part per bucket."""
    kw = split_kwargs(p)
    files = sorted(Path(input_dir).glob("bucket=*/*.parquet"))
    cutoffs = (global_cutoffs(con, str(Path(input_dir) / "bucket=*" / "*.parquet"),
                              test_fraction=kw["test_fraction"],
                              valid_fraction=kw["valid_fraction"])
               if kw["method"] == "global_time" and files else None)
    return {bucket_of_path(f): split_bucket(f, Path(out_dir) / f.parent.name,
                                            bucket=bucket_of_path(f), kwargs=kw, cutoffs=cutoffs)
            for f in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="split augmented interactions (dvc stage)")
    parser.add_argument("--input", required=True, help="a bucketed table's folder (bucket=NNN/)")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    params = settings.load_params()
    p = settings.step_params(PARAMS, params)
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    with engine.connect("split", params) as con:
        split_dir(Path(args.input), out, p, con)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
