"""Which out-of-core engine for the data stages: DuckDB or Polars (streaming), measured on our
workload (issue 14, item 1), each in its own process, against the same generated snapshot.

    .venv/bin/python benchmarks/bench_engines.py                    # 10M events (issue 14's size)
    .venv/bin/python benchmarks/bench_engines.py --rows 1000000     # a quick look

The workload is what clean and split do, on the raw-string Parquet parts the generator of
``bench_data.py`` writes (200k users x 20k items at 10M, seeded, with a share of bad rows):

1. read every part, keeping each row's file and row number (the quarantine's raw position);
2. one reason per rejected row, first that applies: ``missing_field`` (empty user, item or
   timestamp), ``invalid_id`` (an id that fails the RE2 pattern or is too long),
   ``unparseable_value`` (rating or timestamp not a number), ``out_of_range`` (rating outside
   0.5..5, a timestamp after the end of ds); the timestamp unit (s/ms/us/ns) is detected from
   the median magnitude;
3. latest event wins per (user, item), ties to the later file and row (``duplicate_event``);
4. the k-core (5 per user, 5 per item), iterated until stable (``below_k_core``);
5. the split's per-user temporal rank (row_number per user, newest first) and the global-time
   cutoffs (the 80% and 90% quantiles of the timestamps);
6. the clean table and the quarantine (raw strings and reason) written as Parquet.

Both engines must give the same counts (kept rows, rows per reason, the k-core's rounds, the
split's part sizes); the script stops if they differ. Each run reports wall and CPU time and
the peak RSS of its process (VmHWM). DuckDB runs under ``--memory-gb`` (``memory_limit``,
spilling to ``--tmp``); Polars has no such setting: its streaming engine's memory is whatever it
takes. ``--threads`` for both (default 2: this machine's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DS_END = 1795910399  # 2026-11-28 23:59:59 UTC: the end of the generator's ds
ID_PATTERN = r"^[\pL\pN_][\pL\pN_.:@/=-]*$"  # clean.id_pattern's default
MAX_ID = 256
K_USER = K_ITEM = 5
REASONS = ("missing_field", "invalid_id", "unparseable_value", "out_of_range",
           "duplicate_event", "below_k_core")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- DuckDB ---------------------------------------------------------------------------------


def run_duckdb(parts: str, out: Path, *, threads: int, memory_gb: float, tmp: Path) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={threads}; SET memory_limit='{memory_gb}GB'; "
                f"SET temp_directory='{tmp}'; SET preserve_insertion_order=false")
    counts: dict = {}
    con.execute(f"""
        CREATE TEMP VIEW raw AS
        SELECT user_id, item_id, rating, timestamp, filename AS source_file,
               file_row_number + 1 AS raw_row
        FROM read_parquet('{parts}', filename=true, file_row_number=true)""")
    # the timestamp unit, from the median magnitude of the parseable ones
    median = con.execute("SELECT median(abs(TRY_CAST(timestamp AS DOUBLE))) FROM raw").fetchone()[0]
    div = 1 if median < 1e11 else 1e3 if median < 1e14 else 1e6 if median < 1e17 else 1e9
    con.execute(f"""
        CREATE TEMP TABLE judged AS
        SELECT *, TRY_CAST(rating AS DOUBLE) AS r, TRY_CAST(timestamp AS DOUBLE) / {div} AS t,
          CASE
            WHEN coalesce(trim(user_id), '') = '' OR coalesce(trim(item_id), '') = ''
                 OR coalesce(trim(timestamp), '') = '' THEN 'missing_field'
            WHEN NOT regexp_full_match(user_id, '{ID_PATTERN}') OR length(user_id) > {MAX_ID}
                 OR NOT regexp_full_match(item_id, '{ID_PATTERN}') OR length(item_id) > {MAX_ID}
                 THEN 'invalid_id'
            WHEN TRY_CAST(rating AS DOUBLE) IS NULL OR TRY_CAST(timestamp AS DOUBLE) IS NULL
                 THEN 'unparseable_value'
            WHEN TRY_CAST(rating AS DOUBLE) NOT BETWEEN 0.5 AND 5
                 OR TRY_CAST(timestamp AS DOUBLE) / {div} > {DS_END} THEN 'out_of_range'
          END AS reason
        FROM raw""")
    con.execute("""
        CREATE TEMP TABLE deduped AS
        SELECT *, row_number() OVER (PARTITION BY user_id, item_id
                                     ORDER BY t DESC, source_file DESC, raw_row DESC) AS latest
        FROM judged WHERE reason IS NULL""")
    con.execute("CREATE TEMP TABLE core AS SELECT user_id, item_id, r, t FROM deduped "
                "WHERE latest = 1")
    rounds = 0
    while True:
        rounds += 1
        before = con.execute("SELECT count(*) FROM core").fetchone()[0]
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE core AS
            SELECT * FROM core
            WHERE user_id IN (SELECT user_id FROM core GROUP BY 1 HAVING count(*) >= {K_USER})
              AND item_id IN (SELECT item_id FROM core GROUP BY 1 HAVING count(*) >= {K_ITEM})""")
        after = con.execute("SELECT count(*) FROM core").fetchone()[0]
        if after == before:
            break
    counts["k_core_rounds"] = rounds
    con.execute(f"COPY (SELECT user_id, item_id, r AS rating, t AS timestamp, "
                f"row_number() OVER (PARTITION BY user_id ORDER BY t DESC, item_id) AS user_rank "
                f"FROM core) TO '{out / 'clean.parquet'}' (FORMAT parquet, COMPRESSION zstd)")
    n = con.execute("SELECT count(*) FROM core").fetchone()[0]
    # the cutoffs as order statistics, index floor(q * (n - 1)) (Polars' "lower" quantile)
    q80, q90 = (con.execute(f"SELECT t FROM core ORDER BY t LIMIT 1 OFFSET {int(q * (n - 1))}"
                            ).fetchone()[0] for q in (0.8, 0.9))
    counts["split"] = dict(zip(("train", "valid", "test"), con.execute(
        f"SELECT count(*) FILTER (t <= {q80}), count(*) FILTER (t > {q80} AND t <= {q90}), "
        f"count(*) FILTER (t > {q90}) FROM core").fetchone()))
    counts["latest_per_user"] = con.execute(
        f"SELECT count(*) FROM read_parquet('{out / 'clean.parquet'}') WHERE user_rank = 1"
    ).fetchone()[0]
    con.execute(f"""
        COPY (
          SELECT user_id, item_id, rating, timestamp, source_file, raw_row, reason FROM judged
          WHERE reason IS NOT NULL
          UNION ALL
          SELECT user_id, item_id, rating, timestamp, source_file, raw_row, 'duplicate_event'
          FROM deduped WHERE latest > 1
          UNION ALL
          SELECT d.user_id, d.item_id, d.rating, d.timestamp, d.source_file, d.raw_row,
                 'below_k_core'
          FROM deduped d ANTI JOIN core c USING (user_id, item_id) WHERE d.latest = 1
        ) TO '{out / 'quarantine.parquet'}' (FORMAT parquet, COMPRESSION zstd)""")
    counts["raw"] = con.execute("SELECT count(*) FROM raw").fetchone()[0]
    counts["clean"] = con.execute("SELECT count(*) FROM core").fetchone()[0]
    counts["by_reason"] = dict(con.execute(
        f"SELECT reason, count(*) FROM read_parquet('{out / 'quarantine.parquet'}') GROUP BY 1"
    ).fetchall())
    return counts


# --- Polars (streaming) -----------------------------------------------------------------------


def run_polars(parts: str, out: Path, *, threads: int) -> dict:
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    import polars as pl

    def collect(lf):
        return lf.collect(engine="streaming")

    raw = (pl.scan_parquet(parts, include_file_paths="source_file")
           .with_columns(pl.int_range(pl.len()).over("source_file").add(1).alias("raw_row")))
    ts_num = pl.col("timestamp").cast(pl.Float64, strict=False)
    median = collect(raw.select(ts_num.abs().median())).item()
    div = 1 if median < 1e11 else 1e3 if median < 1e14 else 1e6 if median < 1e17 else 1e9
    r_num = pl.col("rating").cast(pl.Float64, strict=False)

    def blank(c: str):
        return pl.col(c).is_null() | (pl.col(c).str.strip_chars() == "")

    def bad_id(c: str):
        return ~pl.col(c).str.contains(ID_PATTERN) | (pl.col(c).str.len_chars() > MAX_ID)

    judged = raw.with_columns(
        r_num.alias("r"), (ts_num / div).alias("t"),
        pl.when(blank("user_id") | blank("item_id") | blank("timestamp")).then(
            pl.lit("missing_field"))
        .when(bad_id("user_id") | bad_id("item_id")).then(pl.lit("invalid_id"))
        .when(r_num.is_null() | ts_num.is_null()).then(pl.lit("unparseable_value"))
        .when(~r_num.is_between(0.5, 5) | (ts_num / div > DS_END)).then(pl.lit("out_of_range"))
        .otherwise(None).alias("reason"))
    judged_path = out / "judged.parquet"
    judged.sink_parquet(judged_path)
    judged = pl.scan_parquet(judged_path)
    ok = judged.filter(pl.col("reason").is_null())
    # latest wins: rank within (user, item) by t, then file and row, newest first
    ranked = ok.with_columns(
        pl.struct("t", "source_file", "raw_row").rank("ordinal", descending=True)
        .over("user_id", "item_id").alias("latest"))
    deduped_path = out / "deduped.parquet"
    ranked.sink_parquet(deduped_path)
    deduped = pl.scan_parquet(deduped_path)
    core_path = out / "core-0.parquet"
    deduped.filter(pl.col("latest") == 1).select("user_id", "item_id", "r", "t").sink_parquet(
        core_path)
    rounds, before = 0, None
    while True:
        rounds += 1
        core = pl.scan_parquet(core_path)
        n = collect(core.select(pl.len())).item()
        if before is not None and n == before:
            break
        users = core.group_by("user_id").len().filter(pl.col("len") >= K_USER).select("user_id")
        items = core.group_by("item_id").len().filter(pl.col("len") >= K_ITEM).select("item_id")
        nxt = out / f"core-{rounds}.parquet"
        core.join(users, on="user_id", how="semi").join(items, on="item_id", how="semi"
                                                         ).sink_parquet(nxt)
        core_path, before = nxt, n
    counts: dict = {"k_core_rounds": rounds - 1}
    core = pl.scan_parquet(core_path)
    core.with_columns(pl.struct(pl.col("t").neg(), "item_id").rank("ordinal")
                      .over("user_id").alias("user_rank")).rename(
        {"r": "rating", "t": "timestamp"}).sink_parquet(out / "clean.parquet")
    q = collect(core.select(pl.col("t").quantile(0.8, "lower").alias("a"),
                            pl.col("t").quantile(0.9, "lower").alias("b")))
    q80, q90 = q["a"][0], q["b"][0]
    split = collect(core.select((pl.col("t") <= q80).sum().alias("train"),
                                ((pl.col("t") > q80) & (pl.col("t") <= q90)).sum().alias("valid"),
                                (pl.col("t") > q90).sum().alias("test")))
    counts["split"] = {k: int(split[k][0]) for k in ("train", "valid", "test")}
    counts["latest_per_user"] = collect(pl.scan_parquet(out / "clean.parquet")
                                        .filter(pl.col("user_rank") == 1).select(pl.len())).item()
    cols = ["user_id", "item_id", "rating", "timestamp", "source_file", "raw_row"]
    pl.concat([
        judged.filter(pl.col("reason").is_not_null()).select(*cols, "reason"),
        deduped.filter(pl.col("latest") > 1).select(*cols).with_columns(
            pl.lit("duplicate_event").alias("reason")),
        deduped.filter(pl.col("latest") == 1).join(core, on=["user_id", "item_id"], how="anti")
        .select(*cols).with_columns(pl.lit("below_k_core").alias("reason")),
    ]).sink_parquet(out / "quarantine.parquet")
    counts["raw"] = collect(pl.scan_parquet(parts).select(pl.len())).item()
    counts["clean"] = collect(core.select(pl.len())).item()
    counts["by_reason"] = {r: n for r, n in collect(
        pl.scan_parquet(out / "quarantine.parquet").group_by("reason").len()).iter_rows()}
    return counts


# --- the harness --------------------------------------------------------------------------------


def child(engine: str, parts: str, out: Path, args) -> None:
    started = time.perf_counter()
    if engine == "duckdb":
        counts = run_duckdb(parts, out, threads=args.threads, memory_gb=args.memory_gb,
                            tmp=Path(args.tmp))
    else:
        counts = run_polars(parts, out, threads=args.threads)
    wall = time.perf_counter() - started
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"engine": engine, "wall_s": round(wall, 1),
                      "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
                      "peak_rss_mb": round(_peak_mb()), "counts": counts}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--bad-fraction", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, default=1.0)
    parser.add_argument("--engines", default="duckdb,polars")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--parts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.parts, Path(args.out), args)
        return

    import duckdb
    import polars

    from benchmarks.bench_data import generate
    from nightrec.dev.bench_scoring import machine

    print(machine())
    print(f"duckdb {duckdb.__version__}, polars {polars.__version__}; {args.threads} threads; "
          f"DuckDB memory_limit {args.memory_gb} GB")
    with tempfile.TemporaryDirectory(prefix="nightrec-engines-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        generate(work, rows=args.rows, users=args.users, items=args.items, files=args.files,
                 fmt="parquet", bad_fraction=args.bad_fraction, seed=args.seed)
        print(f"generated {args.rows:,} events in {time.perf_counter() - t0:.0f} s", flush=True)
        parts = str(work / "part-*.parquet")
        results = []
        for engine in args.engines.split(","):
            out = work / engine
            out.mkdir()
            spill = work / f"{engine}-spill"
            spill.mkdir()
            cmd = [sys.executable, __file__, "--child", engine, "--parts", parts, "--out", str(out),
                   "--tmp", str(spill), "--threads", str(args.threads),
                   "--memory-gb", str(args.memory_gb)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{engine} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"{engine:7s} wall {res['wall_s']:7.1f} s  CPU {res['cpu_s']:7.1f} s  peak RSS "
                  f"{res['peak_rss_mb']:6d} MB  counts {json.dumps(res['counts'])}", flush=True)
    first = results[0]["counts"]
    for res in results[1:]:
        if res["counts"] != first:
            raise SystemExit(f"the engines disagree:\n{first}\n{res['counts']}")
    kept = first["clean"] + sum(first["by_reason"].values())
    assert kept == first["raw"], (kept, first["raw"])  # every row in exactly one of the two
    print("same counts from every engine; every raw row is clean or quarantined exactly once")


if __name__ == "__main__":
    main()
