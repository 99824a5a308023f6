"""The data benchmark's snapshot (``benchmarks/bench_data.py``), written one file at a time.

Popularity-only data, seeded, shaped like a raw drop of the night's snapshot:

- user activity log-normal (sigma 1): ``rows`` events spread over ``users`` by one multinomial
  draw, so heavy users meet popular items twice and clean sees some ``duplicate_event``;
- items Zipf (exponent 0.9) over a seeded permutation of ranks;
- ratings 1..5 uniform, timestamps uniform over the 200 days that end with ds;
- a ``bad_fraction`` share of malformed rows, in three equal kinds: rating ``"x"``, empty item id,
  a timestamp 30 days after ds;
- every column a string (``user_id``, ``item_id``, ``rating``, ``timestamp``), as a raw drop has;
- the item catalogue (``items.csv``: title, year, genres) and user attributes (``users.csv``).

Memory is one file's rows, not the snapshot's: each user's events are split over the ``files``
files by sequential binomial draws (the multinomial split of a shuffled table into equal parts,
up to the parts' exact sizes), and each file is drawn, shuffled and written before the next. A
100M-event snapshot in 8 Parquet files holds about 12.5M rows in memory at a time.

The per-row distribution is that of the generator ``bench_data.py`` had before issue 14 (which
built the whole table and sliced it): same laws, same parameters; not the same bytes.

    .venv/bin/python -m nightrec.dev.bench_data_gen --out /tmp/snap --rows 2000000 \\
        --users 40000 --items 2000 --files 8 --format parquet
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np

DS = "2026-11-28"
ZIPF_EXPONENT = 0.9
DAYS = 200


def _file_counts(rng: np.random.Generator, counts: np.ndarray, files: int):
    """Yield, per file, each user's events in it: a multinomial split with equal shares."""
    remaining = counts.copy()
    for k in range(files):
        if k == files - 1:
            yield remaining
            return
        part = rng.binomial(remaining, 1.0 / (files - k))
        remaining -= part
        yield part


def _interactions_part(rng: np.random.Generator, per_user: np.ndarray, *, cdf: np.ndarray,
                       item_of_rank: np.ndarray, end: int, bad_fraction: float):
    """One file's rows as a pyarrow table of strings, shuffled, malformed rows in place."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n_items = len(item_of_rank)
    u = np.repeat(np.arange(1, len(per_user) + 1, dtype=np.int64), per_user)
    u = u[rng.permutation(len(u))]
    n = len(u)
    i = item_of_rank[np.minimum(np.searchsorted(cdf, rng.random(n)), n_items - 1)] + 1
    ts = (end - rng.random(n) * DAYS * 86400).astype(np.int64)
    rating = rng.integers(1, 6, n)
    cols = {"user_id": pa.array(u).cast(pa.string()),
            "item_id": pa.array(i).cast(pa.string()),
            "rating": pa.array(rating).cast(pa.string()),
            "timestamp": pa.array(ts).cast(pa.string())}
    del u, i, ts, rating
    n_bad = int(bad_fraction * n)
    if n_bad:
        bad = rng.choice(n, n_bad, replace=False)
        kind = rng.integers(0, 3, n_bad)
        for col, k, value in (("rating", 0, "x"), ("item_id", 1, ""),
                              ("timestamp", 2, str(int(end) + 86400 * 30))):
            mask = np.zeros(n, dtype=bool)
            mask[bad[kind == k]] = True
            cols[col] = pc.if_else(pa.array(mask), pa.scalar(value, pa.string()), cols[col])
    return pa.table(cols)


def generate(out: Path, *, rows: int, users: int, items: int, files: int, fmt: str,
             bad_fraction: float, seed: int, ds: str = DS,
             log=print) -> dict[str, list[Path]]:
    """Write the snapshot under ``out`` (created): ``part-NNN.{csv,parquet}``, ``items.csv``,
    ``users.csv``. Returns ``{"interactions": [...], "items": [...], "users": [...]}``."""
    import pandas as pd
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from nightrec.dev import sample_data

    if min(rows, users, items, files) < 1 or not 0 <= bad_fraction < 1:
        raise ValueError("rows, users, items and files must be >= 1, bad_fraction in [0, 1)")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, users)
    counts = rng.multinomial(rows, activity / activity.sum())
    del activity
    popularity = 1.0 / np.arange(1, items + 1) ** ZIPF_EXPONENT
    item_of_rank = rng.permutation(items)
    cdf = np.cumsum(popularity) / popularity.sum()
    end = int(dt.datetime.fromisoformat(ds).replace(tzinfo=dt.UTC).timestamp()) + 86399
    paths: dict[str, list[Path]] = {"interactions": [], "items": [], "users": []}
    for k, per_user in enumerate(_file_counts(rng, counts, files)):
        t0 = time.perf_counter()
        table = _interactions_part(rng, per_user, cdf=cdf, item_of_rank=item_of_rank, end=end,
                                   bad_fraction=bad_fraction)
        if fmt == "parquet":
            path = out / f"part-{k:03d}.parquet"
            pq.write_table(table, path, compression="zstd")
        elif fmt == "csv":
            path = out / f"part-{k:03d}.csv"
            pcsv.write_csv(table, path, pcsv.WriteOptions(quoting_style="none"))
        else:
            raise ValueError(f"format {fmt!r}: csv or parquet")
        paths["interactions"].append(path)
        log(f"  {path.name}: {table.num_rows:,} rows, {path.stat().st_size / 2**20:,.0f} MiB "
            f"in {time.perf_counter() - t0:.1f} s")
        del table
    genres = np.array(sample_data.GENRES)
    picks = rng.integers(0, len(genres), (items, 3))
    n_genres = rng.integers(1, 4, items)
    items_df = pd.DataFrame({
        "item_id": np.arange(1, items + 1), "title": [f"Item {k}" for k in range(1, items + 1)],
        "year": rng.integers(1950, 2026, items),
        "genres": [" ".join(sorted(set(genres[picks[k, :n_genres[k]]]))) for k in range(items)]})
    users_df = pd.DataFrame({
        "user_id": np.arange(1, users + 1), "age": rng.integers(15, 75, users),
        "gender": rng.choice(["F", "M"], users),
        "occupation": rng.choice(sample_data.OCCUPATIONS, users),
        "zip_code": [f"{z:05d}" for z in rng.integers(0, 99999, users)]})
    for name, df in (("items", items_df), ("users", users_df)):
        path = out / f"{name}.csv"
        df.to_csv(path, index=False)
        paths[name].append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--bad-fraction", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=20261128)
    p.add_argument("--ds", default=DS)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    paths = generate(args.out, rows=args.rows, users=args.users, items=args.items,
                     files=args.files, fmt=args.format, bad_fraction=args.bad_fraction,
                     seed=args.seed, ds=args.ds)
    size = sum(f.stat().st_size for fs in paths.values() for f in fs)
    print(f"generated {args.rows:,} events ({args.users:,} users x {args.items:,} items, "
          f"{args.files} {args.format} files) in {time.perf_counter() - t0:.1f} s, "
          f"{size / 2**20:,.0f} MiB on disk", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
