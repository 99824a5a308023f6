"""Single-user lookup latency of ``nightrec serve`` over HTTP, against a local SeaweedFS.

    .venv/bin/python benchmarks/bench_serve.py --users 20000 --k 100 --requests 3000

Starts SeaweedFS (nightrec/store/s3server.py) on free ports in a temp folder, publishes a
synthetic table through the real publish step (GE suite, claim, manifest, conditional pointer),
starts the standalone endpoint ``python -m nightrec.table.serve`` (its defaults, no params.yaml:
as a reader-only install runs it) as its own process, and times
GET /recommendations/<user>?k=10 from one keep-alive connection (sequential: latency), then from
``--clients`` connections at once (throughput). Users are drawn uniformly from the table, so most lookups hit a different row
group; the first lookup of each part also fetches its footer (reported apart as "cold"). Prints
one line per figure, then one JSON object. Stops both servers it started and removes its
temp folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DS = "2026-11-28"


def free_port(pair: bool = False) -> int:
    """A free port (with ``pair``: one whose +10000 gRPC port is free too, below 55000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port < 55000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def stage_table(n_users: int, k: int, *, rows_per_part: int, row_group_size: int) -> dict:
    """A synthetic scored table in staging, as score's shards leave it (collect()'s dict)."""
    from nightrec.core import schema
    from nightrec.store import layout, storage
    from nightrec.tasks import score

    rng = np.random.default_rng(0)
    user_ids = np.array([f"{i:07d}" for i in range(n_users)])
    users_per_part = max(1, rows_per_part // k)
    results = []
    for shard, lo in enumerate(range(0, n_users, users_per_part)):
        users = user_ids[lo : lo + users_per_part]
        frame = pd.DataFrame({
            schema.USER_ID: np.repeat(users, k),
            schema.RANK: np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            schema.ITEM_ID: (np.argsort(rng.random((len(users), 4 * k)), axis=1)[:, :k]
                             .reshape(-1) + 1).astype(str),
            schema.SCORE: -np.sort(-rng.random((len(users), k), dtype=np.float32), axis=1)
            .reshape(-1),
            schema.MODEL_VERSION: "mf-20261128-0badcafe", schema.DS: DS,
        })
        uri = layout.shard_prefix(DS, "bench", shard) + "part-00000.parquet"
        storage.write_bytes(uri, score.part_bytes(frame, row_group_size=row_group_size))
        results.append({"ds": DS, "run_key": "bench", "shard": shard, "parts": [uri],
                        "rows": len(frame), "users": len(users)})
    for r in results:
        r["shards"] = len(results)
    spec = {"model": {"model_version": "mf-20261128-0badcafe", "data_version": "0" * 32},
            "top_k": k, "seen": None}
    return score.collect(results, [spec])


def get(conn: http.client.HTTPConnection, target: str) -> tuple[int, float]:
    t = time.perf_counter()
    conn.request("GET", target)
    resp = conn.getresponse()
    resp.read()
    return resp.status, time.perf_counter() - t


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2), "mean_ms": round(float(ms.mean()), 2)}


def wait_http(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            if get(conn, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("nightrec serve did not answer /healthz")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--k", type=int, default=100, help="rows per user in the table")
    ap.add_argument("--lookup-k", type=int, default=10, help="k asked per request")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    from nightrec.dev.bench_scoring import machine

    print(machine(), flush=True)  # the CPU's vector width and the BLAS: machines differ

    tmp = Path(tempfile.mkdtemp(prefix="nightrec-bench-serve-"))
    os.environ.update(NIGHTREC_STATE=str(tmp / "state"), GX_ANALYTICS_ENABLED="false")
    for var in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        os.environ.pop(var, None)
    from nightrec.core import settings
    from nightrec.store import s3server, storage
    from nightrec.tasks import publish

    cfg = s3server.ServerConfig(data_dir=tmp / "s3", s3_port=free_port(),
                                master_port=free_port(True), volume_port=free_port(True),
                                filer_port=free_port(True), admin_port=free_port(True))
    s3server.up(cfg)
    os.environ.update(s3server.client_env(cfg))
    storage._client.cache_clear()
    server = None
    try:
        p = settings.load_params()
        t = time.perf_counter()
        scored = stage_table(args.users, args.k, rows_per_part=int(p["publish"]["rows_per_part"]),
                             row_group_size=int(p["publish"]["row_group_size"]))
        out = publish.run(scored)
        print(f"published {out.rows:,} rows, {args.users:,} users, "
              f"{len(scored.parts)} parts in {time.perf_counter() - t:.1f} s "
              f"(row groups of {p['publish']['row_group_size']} rows)", flush=True)

        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "nightrec.table.serve", "--port", str(port)],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_http(port)
        rng = np.random.default_rng(args.seed)
        users = [f"{u:07d}" for u in rng.integers(0, args.users, args.requests)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        per_part = args.users / max(1, len(scored.parts))
        cold, warm, parts_seen = [], [], set()
        for u in users:
            status, took = get(conn, f"/recommendations/{u}?k={args.lookup_k}")
            assert status == 200, status
            part = int(int(u) // per_part)
            (warm if part in parts_seen else cold).append(took)
            parts_seen.add(part)
        unknown = [get(conn, f"/recommendations/x{i}")[1] for i in range(200)]
        conn.close()

        lat, lock = [], threading.Lock()

        def client(chunk: list[str]) -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine = [get(c, f"/recommendations/{u}?k={args.lookup_k}")[1] for u in chunk]
            c.close()
            with lock:
                lat.extend(mine)

        chunks = [users[i :: args.clients] for i in range(args.clients)]
        threads = [threading.Thread(target=client, args=(ch,)) for ch in chunks]
        t = time.perf_counter()
        [th.start() for th in threads]
        [th.join() for th in threads]
        wall = time.perf_counter() - t

        result = {
            "sequential_warm": percentiles(warm), "sequential_cold": percentiles(cold),
            "unknown_user_404": percentiles(unknown),
            f"concurrent_{args.clients}_clients": {**percentiles(lat),
                                                   "requests_per_s": round(len(lat) / wall)},
            "users": args.users, "rows": out.rows, "parts": len(scored.parts),
            "lookup_k": args.lookup_k, "cpus": len(os.sched_getaffinity(0)),
        }
        for name in ("sequential_warm", "sequential_cold", "unknown_user_404",
                     f"concurrent_{args.clients}_clients"):
            r = result[name]
            extra = f", {r['requests_per_s']} req/s" if "requests_per_s" in r else ""
            print(f"{name:24s} n={r['n']:5d}  p50 {r['p50_ms']:6.2f} ms  p90 {r['p90_ms']:6.2f} ms"
                  f"  p99 {r['p99_ms']:6.2f} ms  max {r['max_ms']:7.2f} ms{extra}")
        print(json.dumps(result))
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        s3server.down(cfg)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
