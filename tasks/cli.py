"""``nightrec``: run the pipeline for a date, and read what it published.

    nightrec run --interactions PATH --ds YYYY-MM-DD [--items PATH] [--users PATH] [--top-k N]
    nightrec recs --user ID [--ds DATE]
    nightrec export --out FILE.parquet [--ds DATE]
    nightrec status [--limit N]
    nightrec sample --out DIR
    nightrec models list | show VERSION | promote VERSION | rollback
    nightrec serve [--host H] [--port P] [--ds DATE]          (read-only HTTP, tasks/serve.py)
    nightrec bench-scoring [--users N --items N --dim D --k K ...]   (tasks/bench_scoring.py)

Object store: with ``S3_ENDPOINT_URL`` set, that store is used as it is (AWS when it names AWS,
or with ``--no-embedded-s3`` and no endpoint at all). Otherwise the embedded SeaweedFS server is
started if needed (tasks/s3server.py) and used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tasks import layout, s3server, settings, storage

DAG_TASKS = ("ingest", "clean", "validate", "augment", "choose", "split", "train", "evaluate",
             "gate", "register", "plan_shards", "score", "publish", "report")


def use_object_store(embedded: bool = True) -> str:
    """Point this process at the object store; start the embedded one when that is the choice."""
    if settings.s3_endpoint_url() or not embedded:
        return settings.s3_endpoint_url() or "AWS (boto3 default endpoint)"
    cfg = s3server.up(s3server.ServerConfig.from_env())
    os.environ.update(s3server.client_env(cfg))
    storage._client.cache_clear()
    return cfg.endpoint_url


def upload_snapshot(ds: str, interactions: Path, items: Path | None, users: Path | None) -> None:
    """Make ``raw/*/ds=<ds>/`` exactly these files (older files of that ds are removed)."""
    for table, path in (("interactions", interactions), ("items", items), ("users", users)):
        prefix = layout.raw_prefix(ds, table)
        storage.delete(storage.list_uris(prefix))
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"{table} file not found: {path}")
            storage.upload_from(path, prefix + layout.safe_token(path.name, "file name"))


def _cmd_run(args) -> int:
    ds = settings.check_ds(args.ds)
    endpoint = use_object_store(not args.no_embedded_s3)
    upload_snapshot(ds, args.interactions, args.items, args.users)
    conf = {"force_publish": args.force_publish}
    if args.top_k:
        conf["top_k"] = args.top_k
    state = settings.state_dir()
    log_path = state / "logs" / f"run-ds={ds}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path = state / "logs" / f"result-ds={ds}.json"
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(settings.project_root() / "scripts" / "run_dag.py"),
        "--ds", ds, "--conf", json.dumps(conf), "--state", str(state),
        "--result-file", str(result_path),
    ]
    print(f"running nightly_recommendations for ds={ds} on {endpoint} (log: {log_path})",
          flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _follow(proc, log_path)
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if result is None:
        print(f"nightrec run: FAILED before the DAG ran (exit {proc.returncode}); see {log_path}",
              file=sys.stderr)
        _tail(log_path)
        return 1
    if result.get("failed_task"):
        print(f"nightrec run: FAILED in task {result['failed_task']}: {result['error']} "
              f"(log: {log_path})", file=sys.stderr)
        return 1
    if result["tasks"].get("publish") != "success":
        print(f"nightrec run: nothing published for ds={ds}: the model was not blessed by the "
              f"gate (see {layout.run_uri(ds, 'evaluate', 'metrics.json')}); the previous table "
              "stays latest", file=sys.stderr)
        return 1
    m = storage.read_json(layout.manifest_uri(ds))
    print(f"published {m['rows']} rows for {m['users']} users, model {m['model_version']}, "
          f"data {m['data_version'][:12]}")
    print(f"table:    {layout.recs_prefix(ds)}")
    print(f"manifest: {layout.manifest_uri(ds)}")
    print(f"latest:   {layout.latest_uri()}")
    return 0


_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(\w+)")


def _follow(proc: subprocess.Popen, log_path: Path) -> None:
    """Show a progress bar of finished tasks (read from the run's log) until ``proc`` exits."""
    from tqdm import tqdm

    total = len(DAG_TASKS)
    seen: set[str] = set()
    with tqdm(total=total, desc="tasks", unit="task", file=sys.stdout,
              disable=not sys.stdout.isatty()) as bar:
        while proc.poll() is None:
            time.sleep(0.5)
            done = set(_TASK_END.findall(log_path.read_text(errors="replace")))
            for task in sorted(done - seen):
                bar.set_postfix_str(task)
                bar.update(1)
            seen |= done


def _tail(path: Path, n: int = 30) -> None:
    lines = path.read_text(errors="replace").splitlines()[-n:]
    print("\n".join(lines), file=sys.stderr)


def _cmd_recs(args) -> int:
    from tasks.reader import RecommendationReader, TableNotFound

    use_object_store(not args.no_embedded_s3)
    try:
        df = RecommendationReader().for_user(args.user, ds=args.ds)
    except TableNotFound as e:
        print(f"nightrec recs: {e}", file=sys.stderr)
        return 1
    if df.empty:
        print(f"nightrec recs: user {args.user!r} has no recommendations", file=sys.stderr)
        return 1
    print(df.head(args.k).to_string(index=False))
    return 0


def _cmd_export(args) -> int:
    from tasks.reader import RecommendationReader, TableNotFound

    use_object_store(not args.no_embedded_s3)
    try:
        df = RecommendationReader().table(ds=args.ds)
    except TableNotFound as e:
        print(f"nightrec export: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(args.out, index=False)
    print(f"wrote {len(df)} rows for {df['user_id'].nunique()} users to {args.out}")
    return 0


def run_summaries(limit: int) -> list[dict]:
    """The newest ``limit`` run summaries the report task left (``runs/ds=*/report/``)."""
    prefix = storage.s3_uri("runs/")
    uris = [u for u in storage.list_uris(prefix) if u.endswith("/report/summary.json")]
    return [storage.read_json(u) for u in sorted(uris, reverse=True)[:limit]]


def _cmd_status(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tasks import registry

    use_object_store(not args.no_embedded_s3)
    console = Console()
    table = Table(title="last runs")
    for col in ("ds", "state", "duration", "failed", "rows", "model", "run"):
        table.add_column(col)
    for s in run_summaries(args.limit):
        duration = f"{s['duration_s']:.0f}s" if s.get("duration_s") is not None else "-"
        table.add_row(s["ds"], s["state"], duration, ", ".join(s.get("failed", {})) or "-",
                      f"{s.get('rows', '-')}", s.get("model_version", "-"), s["run_id"])
    console.print(table)
    latest = storage.read_json(layout.latest_uri()) if storage.exists(layout.latest_uri()) else None
    console.print(f"champion: {registry.champion() or 'none'}")
    if latest:
        console.print(f"latest table: ds={latest['ds']} model={latest['model_version']} "
                      f"({latest['manifest']})")
    else:
        console.print("latest table: none published yet")
    return 0


def _cmd_sample(args) -> int:
    from tasks import sample_data

    return sample_data.main(["--out", str(args.out)])


def _cmd_serve(args) -> int:
    from tasks import serve

    use_object_store(not args.no_embedded_s3)
    return serve.main(["--host", args.host]
                      + (["--port", str(args.port)] if args.port is not None else [])
                      + (["--ds", args.ds] if args.ds else [])) or 0


def _cmd_models(args) -> int:
    """The registry: list models, show one, promote one to champion, roll the champion back."""
    from tasks import registry

    use_object_store(not args.no_embedded_s3)
    try:
        if args.action == "list":
            champ = registry.champion()
            versions = registry.list_models()
            if not versions:
                print("no registered models")
            for v in versions:
                m = registry.meta(v)
                gate = m.get("gate") or {}
                print(f"{'*' if v == champ else ' '} {v}  ds={m['ds']}  data={m['data_version'][:12]}"
                      f"  {gate.get('metric', 'metric')}={gate.get('model', float('nan')):.4f}"
                      f"  registered={m['registered_at']}")
        elif args.action == "show":
            m = registry.meta(registry.check_version(args.version))
            m["champion"] = registry.champion() == args.version
            print(json.dumps(m, indent=2, sort_keys=True, default=str))
        elif args.action == "promote":
            rec = registry.set_champion(registry.check_version(args.version),
                                        reason=f"promoted by hand ({os.environ.get('USER', '?')})")
            print(f"champion: {rec['model_version']} (was {rec['previous']}); trigger "
                  "rescore_recommendations to publish with it")
        else:
            rec = registry.rollback()
            print(f"champion: {rec['model_version']} (rolled back from {rec['previous']}); "
                  "trigger rescore_recommendations to publish with it")
    except registry.ModelNotFound as e:
        print(f"nightrec models {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nightrec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--no-embedded-s3", action="store_true",
                       help="never start the embedded S3; use the AWS default chain")
        return p

    r = add("run", _cmd_run, "upload a snapshot for ds and run the DAG through Airflow")
    r.add_argument("--interactions", type=Path, required=True)
    r.add_argument("--ds", required=True)
    r.add_argument("--items", type=Path)
    r.add_argument("--users", type=Path)
    r.add_argument("--top-k", type=int)
    r.add_argument("--force-publish", action="store_true")
    c = add("recs", _cmd_recs, "print one user's published recommendations")
    c.add_argument("--user", required=True)
    c.add_argument("--ds")
    c.add_argument("-k", type=int, default=20, help="rows to print")
    e = add("export", _cmd_export, "write a whole published table to a local Parquet file")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--ds")
    st = add("status", _cmd_status, "last runs, the champion and the latest table")
    st.add_argument("--limit", type=int, default=10)
    s = add("sample", _cmd_sample, "write seeded sample data (sizes from params.yaml)")
    s.add_argument("--out", type=Path, required=True)
    # parsed by tasks/bench_scoring.py itself (main() hands it the arguments untouched)
    sub.add_parser("bench-scoring", add_help=False,
                   help="scoring kernel vs faiss and the sgemm floor; last line is JSON")
    sv = add("serve", _cmd_serve, "read-only HTTP: GET /recommendations/<user_id>?k=")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, help="default serve.port; 0 picks a free one")
    sv.add_argument("--ds", help="serve this ds instead of following the latest pointer")
    m = add("models", _cmd_models, "the model registry: list, show, promote, rollback")
    m.add_argument("action", choices=["list", "show", "promote", "rollback"])
    m.add_argument("version", nargs="?", help="model version (show, promote)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-scoring"]:
        from tasks import bench_scoring

        bench_scoring.main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.action in ("show", "promote") and not args.version:
        parser.error(f"models {args.action} needs a VERSION")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nightrec {args.command}: {e}", file=sys.stderr)
        return 2
    except ClientError as e:  # e.g. a wrong credential (403) or a missing bucket (404)
        err = e.response.get("Error", {})
        print(f"nightrec {args.command}: the object store refused "
              f"{e.operation_name}: {err.get('Code', '?')} {err.get('Message', '')} "
              f"(bucket {settings.bucket()!r} at {settings.s3_endpoint_url() or 'AWS'}; "
              "check the credentials and the bucket)", file=sys.stderr)
        return 1
    except BotoCoreError as e:  # no credentials, endpoint unreachable, ...
        print(f"nightrec {args.command}: object store error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
