"""Data stages at scale: ingest, clean, validate, augment and split (DVC repro + push) on a
generated snapshot, each stage's ``run()`` in its own process, against a private SeaweedFS.

    .venv/bin/python benchmarks/bench_data.py                 # 10M events, 200k users x 20k items
    .venv/bin/python benchmarks/bench_data.py --rows 1000000  # a quick look

The snapshot is generated vectorised and seeded: log-normal user activity, Zipf item popularity
(so heavy users meet popular items twice: some ``duplicate_event``), ratings 1..5, timestamps
over the 200 days before ds, and a small share of malformed rows (bad rating, empty item,
timestamp in the future) for the quarantine; written as ``--files`` CSV parts (or Parquet) with
item and user side tables, and uploaded to ``raw/.../ds=<ds>/``.

Per stage it prints the wall time and the peak RSS of the stage process and everything it
waited for (``max(RUSAGE_SELF, RUSAGE_CHILDREN)``: DVC runs the split in a grandchild), which
includes the ~0.3-0.5 GB that importing pandas, pyarrow and Great Expectations costs. The S3
server's own memory is not counted. Targets: <= 6 minutes in all and <= 6 GB peak on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DS = "2026-11-28"
STAGES = ("ingest", "clean", "validate", "augment", "split")
TARGET_S, TARGET_GB = 360.0, 6.0


def generate(work: Path, *, rows: int, users: int, items: int, files: int, fmt: str,
             bad_fraction: float, seed: int) -> dict[str, list[Path]]:
    """Write the snapshot's interaction parts and side tables under ``work``; returns paths."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from nightrec.dev import sample_data

    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, users)
    counts = rng.multinomial(rows, activity / activity.sum())
    u = np.repeat(np.arange(users, dtype=np.int64), counts)
    u = u[rng.permutation(len(u))]
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    item_of_rank = rng.permutation(items)
    cdf = np.cumsum(popularity) / popularity.sum()
    i = item_of_rank[np.minimum(np.searchsorted(cdf, rng.random(len(u))), items - 1)]
    end = pd.Timestamp(DS, tz="UTC").timestamp() + 86399
    ts = (end - rng.random(len(u)) * 200 * 86400).astype(np.int64)
    rating = rng.integers(1, 6, len(u))
    table = pa.table({"user_id": pa.array(u + 1).cast(pa.string()),
                      "item_id": pa.array(i + 1).cast(pa.string()),
                      "rating": pa.array(rating).cast(pa.string()),
                      "timestamp": pa.array(ts).cast(pa.string())})
    n_bad = int(bad_fraction * len(u))
    if n_bad:
        bad = rng.choice(len(u), n_bad, replace=False)
        kind = rng.integers(0, 3, n_bad)
        cols = {c: table.column(c).to_numpy(zero_copy_only=False).astype(object)
                for c in ("item_id", "rating", "timestamp")}
        cols["rating"][bad[kind == 0]] = "x"
        cols["item_id"][bad[kind == 1]] = ""
        cols["timestamp"][bad[kind == 2]] = str(int(end) + 86400 * 30)
        for c, v in cols.items():
            table = table.set_column(table.schema.get_field_index(c), c, pa.array(v, pa.string()))
    del u, i, ts, rating
    out: dict[str, list[Path]] = {"interactions": [], "items": [], "users": []}
    step = -(-table.num_rows // files)
    for k in range(files):
        part = table.slice(k * step, step)
        if fmt == "parquet":
            path = work / f"part-{k:03d}.parquet"
            pq.write_table(part, path, compression="zstd")
        else:
            path = work / f"part-{k:03d}.csv"
            pcsv.write_csv(part, path, pcsv.WriteOptions(quoting_style="none"))
        out["interactions"].append(path)
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
    out["items"].append(work / "items.csv")
    items_df.to_csv(out["items"][0], index=False)
    out["users"].append(work / "users.csv")
    users_df.to_csv(out["users"][0], index=False)
    return out



def _vm_hwm_kb() -> int:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries that over from the parent
    across fork and exec, so a child would report at least its parent's RSS at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_stage(stage: str, upstream_file: Path, out_file: Path) -> None:
    """Child mode: run one stage's ``run()`` on the upstream outputs, report time and memory."""
    import importlib

    upstream = json.loads(upstream_file.read_text())
    started = time.perf_counter()
    from nightrec.core import records

    if stage == "ingest":
        from nightrec.tasks import ingest

        out = ingest.run(DS).to_xcom()
    else:  # the upstream step's record, as the DAG hands it over (XCom JSON)
        module = importlib.import_module("nightrec.tasks.versioning" if stage == "split" else
                                         f"nightrec.tasks.{stage}")
        out = module.run(getattr(records, upstream["record"]).from_xcom(upstream)).to_xcom()
    wall = time.perf_counter() - started
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
              resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    self_kb = _vm_hwm_kb()
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out_file.write_text(json.dumps({"out": out, "wall_s": wall, "cpu_s": cpu,
                                    "peak_rss_mb": max(self_kb, child_kb) / 1024,
                                    "self_rss_mb": self_kb / 1024,
                                    "children_rss_mb": child_kb / 1024}, default=str))


def _rows(stage: str, out: dict) -> str:
    from nightrec.store import storage

    if stage == "clean":
        s = storage.read_json(out["stats"])
        return (f"{s['clean_rows']:,} kept, {s['quarantined_rows']:,} quarantined "
                f"{s['by_reason']}")
    if stage == "split":
        meta = storage.read_json(out["meta"])
        rows = meta["stats"]["rows"]
        return "train/valid/test " + "/".join(f"{rows[p]:,}" for p in ("train", "valid", "test"))
    if stage == "ingest":
        return f"{storage.read_json(out['files'])['rows']:,} raw rows"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4, help="interaction files in the snapshot")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--bad-fraction", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--upstream", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # child: make the input
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage, args.upstream, args.out)
        return 0
    if args.generate:
        from nightrec.store import layout, storage

        args.generate.mkdir(parents=True)
        paths = generate(args.generate, rows=args.rows, users=args.users, items=args.items,
                         files=args.files, fmt=args.format, bad_fraction=args.bad_fraction,
                         seed=args.seed)
        for table, files in paths.items():
            for f in files:
                storage.upload_from(f, layout.raw_prefix(DS, table) + f.name)
                f.unlink()
        return 0
    from nightrec.dev.bench_scoring import machine

    print(machine(), flush=True)  # the CPU's vector width and the BLAS: machines differ

    from nightrec.store import s3server, storage

    work = Path(tempfile.mkdtemp(prefix="nightrec-bench-data-"))
    ports = s3server.free_port_pairs(5)
    cfg = s3server.ServerConfig(data_dir=work / "s3", s3_port=ports[0], master_port=ports[1],
                                volume_port=ports[2], filer_port=ports[3], admin_port=ports[4])
    env = {k: v for k, v in os.environ.items() if k not in (
        "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "NIGHTREC_PARAMS")}
    env.update(NIGHTREC_STATE=str(work / "state"), GX_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT))
    s3server.up(cfg)
    results = []
    try:
        env.update(s3server.client_env(cfg))
        os.environ.update(env)
        storage._client.cache_clear()
        t0 = time.perf_counter()
        # generated in a child, so that this process stays small: a stage process inherits
        # nothing from it, and DVC's grandchildren inherit only the stage process's RSS
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate",
                        str(work / "input"), "--rows", str(args.rows), "--users", str(args.users),
                        "--items", str(args.items), "--files", str(args.files), "--format",
                        args.format, "--bad-fraction", str(args.bad_fraction), "--seed",
                        str(args.seed)], env=env, check=True)
        print(f"generated and uploaded {args.rows:,} events ({args.users:,} users x "
              f"{args.items:,} items, {args.files} {args.format} files) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        upstream = work / "upstream.json"
        upstream.write_text("{}")
        for stage in STAGES:
            out = work / f"{stage}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage,
                   "--upstream", str(upstream), "--out", str(out)]
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            process_s = time.perf_counter() - started
            if proc.returncode != 0:
                raise SystemExit(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(out.read_text())
            res.update(stage=stage, process_s=process_s, rows=_rows(stage, res["out"]))
            if stage == "split":
                res["rows"] += f"; {storage.read_json(res['out']['meta'])['timings_s']}"
            results.append(res)
            upstream.write_text(json.dumps(res["out"]))
            print(f"{stage:9s} {res['wall_s']:7.1f} s (process {process_s:6.1f} s, CPU "
                  f"{res['cpu_s']:6.1f} s)  peak RSS "
                  f"{res['peak_rss_mb']:7.0f} MB  {res['rows']}", flush=True)
    finally:
        s3server.down(cfg)
        shutil.rmtree(work, ignore_errors=True)
    total = sum(r["process_s"] for r in results)
    peak = max(r["peak_rss_mb"] for r in results)
    core = sum(r["process_s"] for r in results if r["stage"] != "augment")
    print(f"total {total:.0f} s (ingest+clean+validate+split {core:.0f} s), peak RSS "
          f"{peak / 1024:.2f} GB; target <= {TARGET_S:.0f} s and <= {TARGET_GB:.0f} GB: "
          f"{'met' if total <= TARGET_S and peak / 1024 <= TARGET_GB else 'MISSED'}")
    print(json.dumps([{k: r[k] for k in ("stage", "wall_s", "process_s", "cpu_s", "peak_rss_mb",
                                         "self_rss_mb", "children_rss_mb", "rows")}
                      for r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
