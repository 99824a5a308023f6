"""Replay N generated days through ``nightrec run``, one ds after another, and print what the
monitoring recorded: each night's realized quality of the previous night's table, the drift
verdict and the output checks.

    .venv/bin/python benchmarks/replay_days.py                       # 30 days
    .venv/bin/python benchmarks/replay_days.py --days 5 --set train.candidates='["ease"]'

Data: ``nightrec.dev.sample_data`` with params.yaml's ``sample`` sizes and seed (its events span
``sample.days`` from ``sample.start``); night D's snapshot is the log up to D's end, as a
cumulative export would be. The replay covers ``--days`` days ending at 70% of that span (where
the generator's events are densest). Each night
runs in its own ``nightrec run`` against an embedded SeaweedFS and a private state dir.

Params: params.yaml as shipped plus each ``--set KEY=VALUE`` (printed beside every figure).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--screenshot", type=Path, help="render the last night's report here (PNG, "
                    "headless Chromium)")
    args = ap.parse_args(argv)

    from nightrec.core import settings
    from nightrec.dev import sample_data
    from nightrec.dev.bench_scoring import machine

    print(machine(), flush=True)  # the CPU's vector width and the BLAS: machines differ

    work = Path(tempfile.mkdtemp(prefix="nightrec-replay-"))
    params = settings.load_params()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    params = settings.with_overrides(params, overrides)
    params_path = work / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ.update(NIGHTREC_STATE=str(work / "state"), NIGHTREC_PARAMS=str(params_path),
                      NIGHTREC_BUCKET="nightrec-replay", GX_ANALYTICS_ENABLED="false",
                      TF_CPP_MIN_LOG_LEVEL="2")
    for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(k, None)
    print(f"work dir {work}; params.yaml as shipped" + (
        f" with overrides {overrides}" if overrides else " (no override)"), flush=True)
    inter, items, users = sample_data.generate_sample(**sample_data.sample_kwargs(params))
    items.to_csv(work / "items.csv", index=False)
    users.to_csv(work / "users.csv", index=False)
    # users' activity windows start in the first 70% of the span and last 30% of it: events are
    # densest from 30% to 70% of the span, so the replay ends at 70%
    start = dt.date.fromisoformat(params["sample"]["start"])
    last = start + dt.timedelta(days=int(0.7 * int(params["sample"]["days"])))
    days = [(last - dt.timedelta(days=n)).isoformat() for n in range(args.days - 1, -1, -1)]
    nightrec = str(Path(sys.executable).parent / "nightrec")
    from nightrec.ops import cli
    from nightrec.store import layout, s3server, storage

    cli.use_object_store()
    rows = []
    try:
        for ds in days:
            end = dt.datetime.fromisoformat(ds).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)
            snap = work / "snapshot.csv"
            inter[inter["timestamp"] < end.timestamp()].to_csv(snap, index=False)
            t0 = time.perf_counter()
            run = subprocess.run([nightrec, "run", "--interactions", str(snap), "--items",
                                  str(work / "items.csv"), "--users", str(work / "users.csv"),
                                  "--ds", ds], capture_output=True, text=True, check=False)
            secs = time.perf_counter() - t0

            def read(uri):
                return storage.read_json(uri) if storage.exists(uri) else {}

            real = read(layout.run_uri(ds, "monitor", "realized.json"))
            drift = read(layout.run_uri(ds, "validate", "report.json")).get("drift") or {}
            out = read(layout.run_uri(ds, "publish", "output_checks.json"))
            m = real.get("metrics") or {}
            row = {"ds": ds, "exit": run.returncode, "run_s": round(secs, 1),
                   "table_ds": (real.get("table") or {}).get("ds"), "events": real.get("events"),
                   "users": real.get("users"), **{k: m.get(k) for k in (
                       "hit_rate_at_10", "recall_at_10", "ndcg_at_10", "mrr_at_10")},
                   "event_share": real.get("event_share_on_recommended"),
                   "coverage": real.get("coverage"),
                   "new_users": ((real.get("segments") or {}).get("new") or {}).get("users"),
                   "alert": bool((real.get("trailing") or {}).get("alert")),
                   "drift_warn": drift.get("warn"), "drift_stop": drift.get("stop"),
                   "output_breaches": out.get("breaches"), "refused": out.get("refused")}
            rows.append(row)
            f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            print(f"{ds} exit {run.returncode} {secs:5.0f} s  table {row['table_ds'] or '-':10s} "
                  f"events {row['events'] or 0:5d} users {row['users'] or 0:4d} "
                  f"hit@10 {f(row['hit_rate_at_10'])} ndcg@10 {f(row['ndcg_at_10'])} "
                  f"share {f(row['event_share'])} drift {row['drift_warn'] or '-'}"
                  f"{' STOP ' + str(row['drift_stop']) if row['drift_stop'] else ''} "
                  f"output {row['output_breaches'] or 'ok'}", flush=True)
            if run.returncode not in (0, 3):
                print(run.stderr[-2000:], flush=True)
        if args.screenshot:
            import shutil

            page = work / "report.html"
            page.write_bytes(storage.read_bytes(layout.report_uri(days[-1], "report.html")))
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--no-first-run", f"--user-data-dir={work / 'chromium'}",
                            "--virtual-time-budget=5000", f"--screenshot={args.screenshot}",
                            "--window-size=1000,4400", page.as_uri()], check=True,
                           capture_output=True, timeout=120)
            print(f"report of ds={days[-1]} rendered to {args.screenshot}")
    finally:
        s3server.down(s3server.ServerConfig.from_env())
    measured = [r for r in rows if r["ndcg_at_10"] is not None]
    if measured:
        import statistics

        for k in ("hit_rate_at_10", "ndcg_at_10", "event_share"):
            vals = [r[k] for r in measured]
            print(f"{k}: mean {statistics.mean(vals):.4f}, min {min(vals):.4f}, max "
                  f"{max(vals):.4f} over {len(vals)} nights")
    if args.json_out:
        args.json_out.write_text(json.dumps({"overrides": overrides, "nights": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
