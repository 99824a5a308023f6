"""``nightrec``: run the pipeline for a date, and read what it published.

    nightrec run --interactions FILE|DIR|GLOB --ds YYYY-MM-DD [--items PATH] [--users PATH] [--top-k N]
    nightrec recs --user ID [--ds DATE]
    nightrec export --out FILE.parquet [--ds DATE]
    nightrec status [--limit N]
    nightrec sample --out DIR
    nightrec models list | show VERSION | promote VERSION | rollback
    nightrec unlock --ds DATE --reason TEXT [--operator WHO]  (a dead run's lease; nightrec/store/locks.py)
    nightrec gc [--apply] | forget --user ID [--apply]      (nightrec/ops/retention.py)
    nightrec serve [--host H] [--port P] [--ds DATE]          (read-only HTTP, nightrec/table/serve.py)
    nightrec bench-scoring [--users N --items N --dim D --k K ...]   (nightrec/dev/bench_scoring.py)

Object store: with ``S3_ENDPOINT_URL`` set, that store is used as it is (AWS when it names AWS,
or with ``--no-embedded-s3`` and no endpoint at all). Otherwise the embedded SeaweedFS server is
started if needed (nightrec/store/s3server.py) and used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from nightrec.core import settings
from nightrec.store import layout, s3server, storage

# the progress bar's tasks (only the bar uses them: a task not listed still counts)
DAG_TASKS = ("ingest", "clean", "validate", "augment", "choose", "split", "train", "evaluate",
             "gate", "register", "plan_shards", "score", "publish", "promote", "report")


def use_object_store(embedded: bool = True) -> str:
    """Point this process at the object store; start the embedded one when that is the choice."""
    if settings.s3_endpoint_url() or not embedded:
        return settings.s3_endpoint_url() or "AWS (boto3 default endpoint)"
    cfg = s3server.up(s3server.ServerConfig.from_env())
    os.environ.update(s3server.client_env(cfg))
    storage._client.cache_clear()
    return cfg.endpoint_url


def snapshot_files(spec: str | Path) -> list[tuple[Path, str]]:
    """The files of an interactions snapshot, each with the object name it gets under
    ``raw/interactions/ds=<ds>/``: ``spec`` is one file, a directory (every file under it, as
    Spark and other engines write a table: ``part-*.parquet`` beside ``_SUCCESS``, maybe in
    ``key=value/`` folders) or a glob (``out/part-*.csv.gz``). Marker files (``_SUCCESS``,
    ``.crc``: names starting with ``_`` or ``.``) are left out, as ingest would ignore them. A
    file in a folder is named by its path under the directory, ``/`` as ``__``."""
    import glob

    from nightrec.tasks.ingest import is_ignored

    path = Path(spec)
    if path.is_file():
        found, base = [path], path.parent
    elif path.is_dir():
        found, base = sorted(p for p in path.rglob("*") if p.is_file()), path
    elif glob.has_magic(str(spec)):
        found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        base = Path(spec).parent
        while glob.has_magic(str(base)):
            base = base.parent
    else:
        raise FileNotFoundError(f"interactions not found: {spec} (a file, a folder or a glob)")
    out, names = [], {}
    for f in found:
        rel = f.relative_to(base) if f.is_relative_to(base) else Path(f.name)
        if any(is_ignored(part) for part in rel.parts):
            continue
        name = "__".join(layout.sanitize_token(part) for part in rel.parts)
        if name in names:
            raise ValueError(f"{f} and {names[name]} would both be uploaded as {name}")
        names[name] = f
        out.append((f, layout.safe_token(name, "file name")))
    if not out:
        raise FileNotFoundError(f"no interactions file in {spec} (marker files do not count)")
    return out


def upload_snapshot(ds: str, interactions: str | Path, items: Path | None,
                    users: Path | None) -> None:
    """Make ``raw/*/ds=<ds>/`` exactly these files (older files of that ds are removed);
    ``interactions`` is a file, a folder of parts or a glob (:func:`snapshot_files`)."""
    files = {"interactions": snapshot_files(interactions)}
    for table, path in (("items", items), ("users", users)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{table} file not found: {path}")
        files[table] = [(path, layout.safe_token(path.name, "file name"))] if path else []
    for table, found in files.items():
        prefix = layout.raw_prefix(ds, table)
        storage.delete(storage.list_uris(prefix))
        for path, name in found:
            storage.upload_from(path, prefix + name)


# `nightrec run` exit codes (README "nightrec run: exit codes"); 130/143: stopped by a signal
EXIT_PUBLISHED, EXIT_FAILED, EXIT_USAGE, EXIT_FALLBACK = 0, 1, 2, 3
EXIT_GATE_REFUSED, EXIT_LOCKED, EXIT_NOTHING_RAN = 4, 5, 6
SIGNAL_EXITS = {"SIGINT": 130, "SIGTERM": 143}
FALLBACK_SOURCES = ("champion_fallback", "popularity_fallback")
# task states that mean a task actually ran (Airflow's str(TaskInstanceState))
_RAN = ("success", "failed", "up_for_retry")
# after forwarding a signal, the DAG process gets this long to stop before SIGKILL (s)
STOP_GRACE_S = 20.0


def run_outcome(result: dict, manifest: dict | None) -> tuple[int, str]:
    """What a ``nightrec run`` did: ``(exit code, one line naming it)``.

    ``result``: the file scripts/run_dag.py wrote (``ds``, ``state``, ``tasks`` {task: state},
    ``failed_task`` and ``error`` when one failed, ``stopped_by`` when a signal stopped it).
    ``manifest``: the ds's manifest when this run wrote it (the CLI compares its ETag before
    and after the run), else None. Codes: 0 a new model's table was published; 1 a task failed;
    3 a fallback table was published (manifest ``source`` champion_fallback or
    popularity_fallback); 4 the gate refused and nothing was published; 5 refused by another
    run's lease (RunLocked); 6 no task ran; 130 / 143 stopped by SIGINT / SIGTERM.
    """
    ds = result.get("ds", "?")
    stopped = result.get("stopped_by")
    if stopped:
        code = SIGNAL_EXITS.get(stopped, 128 + int(result.get("signal") or 15))
        released = result.get("released")
        lease = (f"its lease on ds={ds} released" if released
                 else f"no lease on ds={ds} was held by it")
        return code, f"stopped by {stopped}: the run was stopped and {lease}"
    published = ""
    if manifest is not None:
        published = (f"{manifest.get('rows', '?')} rows for {manifest.get('users', '?')} users, "
                     f"model {manifest.get('model_version', '?')}")
    if result.get("failed_task"):
        error = result.get("error") or "see the run's log"
        if "RunLocked" in error:
            return EXIT_LOCKED, f"REFUSED: another run holds ds={ds}; nothing written: {error}"
        also = f" (the table was published first: {published})" if published else ""
        return EXIT_FAILED, f"FAILED in task {result['failed_task']}: {error}{also}"
    if manifest is not None:
        source = manifest.get("source") or "model"
        if source in FALLBACK_SOURCES:
            return EXIT_FALLBACK, (
                f"published a FALLBACK table for ds={ds} ({source}: "
                f"{manifest.get('source_reason') or 'no reason recorded'}): {published}; the "
                "new model was not blessed")
        return EXIT_PUBLISHED, f"published {published} for ds={ds} (source {source})"
    tasks = result.get("tasks") or {}
    if not any(s in _RAN for t, s in tasks.items() if t != "report"):
        return EXIT_NOTHING_RAN, (
            f"NO TASK RAN for ds={ds}: the DAG run ended {result.get('state', '?')} without "
            "running a task; nothing was published")
    if result.get("state") not in (None, "success"):
        return EXIT_FAILED, f"FAILED: the DAG run of ds={ds} ended {result['state']}"
    return EXIT_GATE_REFUSED, (
        f"nothing published for ds={ds}: the gate refused the model and no fallback was "
        f"published (publish.fallback off?); see runs/ds={ds}/evaluate/metrics.json; the "
        "previous table stays latest")


class _Stop:
    """The signal ``nightrec run`` got while its DAG process ran (forwarded to it)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at = 0.0
        self.proc: subprocess.Popen | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and self.proc is not None:  # a second signal: no grace
            _kill_group(self.proc.pid)
            return
        self.signum, self.at = signum, time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _cmd_run(args) -> int:
    from nightrec.store import locks

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
        "--result-file", str(result_path), "--parent-pid", str(os.getpid()),
    ]
    before = storage.head(layout.manifest_uri(ds))
    print(f"running nightly_recommendations for ds={ds} on {endpoint} (log: {log_path})",
          flush=True)
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with open(log_path, "w") as log:
            # its own session: a terminal's Ctrl-C reaches only us (we forward it), and its whole
            # group (DVC and the like) can be killed without killing us
            stop.proc = proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
            if stop.signum is not None:  # signalled while it was starting
                os.kill(proc.pid, stop.signum)
            _follow(proc, log_path, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if locks.group_pids(proc.pid):  # left behind (it stops its own children); while any is
        _kill_group(proc.pid)  # there, the group id cannot have passed to another process
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if stop.signum is not None or (result or {}).get("stopped_by"):
        name = signal.Signals(stop.signum).name if stop.signum else result["stopped_by"]
        released = locks.release_if_gone(ds, proc.pid)  # if it died before releasing its lease
        held = locks.holder(layout.run_lock_uri(ds))
        if held is not None and held.get("pid") == proc.pid:
            lease = f"its lease on ds={ds} is still there ({held['uri']})"
        elif released or (result or {}).get("released"):
            lease = f"its lease on ds={ds} was released"
        else:
            lease = f"it held no lease on ds={ds}"
        print(f"nightrec run: stopped by {name}: the run was stopped (exit {proc.returncode}) "
              f"and {lease}; log: {log_path}", file=sys.stderr)
        return SIGNAL_EXITS.get(name, 128 + (stop.signum or signal.SIGTERM))
    if result is None:
        print(f"nightrec run: FAILED before the DAG ran (exit {proc.returncode}); see {log_path}",
              file=sys.stderr)
        _tail(log_path)
        return EXIT_FAILED
    after = storage.head(layout.manifest_uri(ds))
    mine = after is not None and (before is None or after["etag"] != before["etag"])
    manifest = storage.read_json(layout.manifest_uri(ds)) if mine else None
    code, message = run_outcome(result, manifest)
    if code not in (EXIT_PUBLISHED, EXIT_FALLBACK):
        print(f"nightrec run: {message} (log: {log_path})", file=sys.stderr)
        return code
    print(message)
    print(f"data:     {manifest['data_version'][:12]}")
    print(f"table:    {layout.recs_prefix(ds)}")
    print(f"manifest: {layout.manifest_uri(ds)}")
    print(f"latest:   {layout.latest_uri()}")
    return code


_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(\w+)")


def _follow(proc: subprocess.Popen, log_path: Path, stop: _Stop | None = None) -> None:
    """Show a progress bar of finished tasks (read from the run's log) until ``proc`` exits;
    once ``stop`` holds a signal, give ``proc`` STOP_GRACE_S to stop, then kill its group. The
    bar's total is DAG_TASKS; a task it does not know still counts."""
    from tqdm import tqdm

    seen: set[str] = set()
    with tqdm(total=len(DAG_TASKS), desc="tasks", unit="task", file=sys.stdout,
              disable=not sys.stdout.isatty()) as bar:
        while proc.poll() is None:
            time.sleep(0.5)
            if stop is not None and stop.signum is not None \
                    and time.monotonic() - stop.at > STOP_GRACE_S:
                _kill_group(proc.pid)
            done = set(_TASK_END.findall(log_path.read_text(errors="replace")))
            for task in sorted(done - seen):
                if bar.n >= bar.total:
                    bar.total += 1
                bar.set_postfix_str(task)
                bar.update(1)
            seen |= done


def _tail(path: Path, n: int = 30) -> None:
    lines = path.read_text(errors="replace").splitlines()[-n:]
    print("\n".join(lines), file=sys.stderr)


def _cmd_recs(args) -> int:
    from nightrec.table.reader import RecommendationReader, TableNotFound

    use_object_store(not args.no_embedded_s3)
    try:
        df = RecommendationReader().for_user(args.user, ds=args.ds).to_pandas()
    except TableNotFound as e:
        print(f"nightrec recs: {e}", file=sys.stderr)
        return 1
    if df.empty:
        print(f"nightrec recs: user {args.user!r} has no recommendations", file=sys.stderr)
        return 1
    print(df.head(args.k).to_string(index=False))
    return 0


def _cmd_export(args) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from nightrec.table.reader import RecommendationReader, TableNotFound

    use_object_store(not args.no_embedded_s3)
    try:
        table = RecommendationReader().table(ds=args.ds)
    except TableNotFound as e:
        print(f"nightrec export: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    users = pc.count_distinct(table["user_id"]).as_py()
    print(f"wrote {table.num_rows} rows for {users} users to {args.out}")
    return 0


def run_summaries(limit: int) -> list[dict]:
    """The newest ``limit`` run summaries the report task left (``runs/ds=*/report/``)."""
    uris = [u for u in storage.list_uris(layout.runs_root())
            if (ds := layout.ds_of_run_key(u)) and u == layout.run_uri(ds, "report", "summary.json")]
    return [storage.read_json(u) for u in sorted(uris, reverse=True)[:limit]]


def realized_cell(r: dict | None) -> str:
    """``nightrec status``'s realized column: the watched figure of the previous table."""
    if not r or r.get("value") is None:
        return "-"
    return (f"{r['metric']} {r['value']:.4f} (table {r['table_ds']})"
            + (" ALERT" if r.get("alert") else ""))


def output_cell(c: dict | None) -> str:
    if not c:
        return "-"
    if not c.get("breaches"):
        return "ok"
    return ("REFUSED: " if c.get("refused") else "breach: ") + ", ".join(c["breaches"])


def _cmd_status(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from nightrec.tasks import registry

    use_object_store(not args.no_embedded_s3)
    console = Console()
    table = Table(title="last runs")
    for col in ("ds", "state", "duration", "failed", "rows", "model", "realized", "output",
                "run"):
        table.add_column(col)
    for s in run_summaries(args.limit):
        duration = f"{s['duration_s']:.0f}s" if s.get("duration_s") is not None else "-"
        table.add_row(s["ds"], s["state"], duration, ", ".join(s.get("failed", {})) or "-",
                      f"{s.get('rows', '-')}", s.get("model_version", "-"),
                      realized_cell(s.get("realized")), output_cell(s.get("output_checks")),
                      s["run_id"])
    console.print(table)
    console.print(f"champion: {registry.champion() or 'none'}")
    for line, warn in latest_table_lines():
        console.print(line, style="bold red" if warn else None, soft_wrap=True, markup=False)
    return 0


def latest_table_lines(now: dt.datetime | None = None) -> list[tuple[str, bool]]:
    """``nightrec status``'s lines on the latest table: where it is, its manifest ``source``,
    its age (hours since its pointer's ``updated_at``: nightrec/ops/alerts.py), and a warning (True)
    when that age is over ``publish.max_age_hours``."""
    from nightrec.ops import alerts

    age = alerts.latest_table_age(now)
    if age is None:
        return [("latest table: none published yet", False)]
    reason = f" ({age['source_reason']})" if age["source_reason"] else ""
    lines = [((f"latest table: ds={age['ds']} model={age['model_version']} "
              f"source={age['source']}{reason}, {age['age_hours']:.1f} h old (published "
              f"{age['updated_at']}) ({age['manifest']})"), False)]
    max_age = float(settings.step_params(["publish.max_age_hours"])["publish.max_age_hours"])
    if age["age_hours"] > max_age:
        lines.append(((f"WARNING: the latest table is {age['age_hours']:.1f} h old, older than "
                      f"publish.max_age_hours ({max_age:g} h): nothing was published since "
                      f"{age['updated_at']}"), True))
    return lines


def _cmd_unlock(args) -> int:
    """An operator removes a dead run's lease on a ds (nightrec/store/locks.py ``unlock``)."""
    import getpass

    from nightrec.store import locks

    ds = settings.check_ds(args.ds)
    use_object_store(not args.no_embedded_s3)
    operator = args.operator or f"{getpass.getuser()}@{locks.host()}"
    try:
        done = locks.unlock(ds, reason=args.reason, operator=operator)
    except locks.UnlockRefused as e:
        print(f"nightrec unlock: {e}", file=sys.stderr)
        return 1
    if not done["unlocked"]:
        print(f"nightrec unlock: nothing to unlock: {done['why']}")
        return 0
    print(f"unlocked ds={ds}: removed the run lease of {done['lease'].get('owner')} "
          f"({done['why_free']}); audit: {done['audit']}")
    return 0


def _cmd_sample(args) -> int:
    from nightrec.dev import sample_data

    return sample_data.main(["--out", str(args.out)])


def _cmd_serve(args) -> int:
    from nightrec.table import serve

    use_object_store(not args.no_embedded_s3)
    # serve reads no file: params.yaml's serve group and clean's id rule are passed in
    params = settings.load_params()
    return serve.main(["--host", args.host]
                      + (["--port", str(args.port)] if args.port is not None else [])
                      + (["--ds", args.ds] if args.ds else []),
                      config=serve.ServeConfig.from_params(params),
                      port=int(params["serve"]["port"])) or 0


def _cmd_models(args) -> int:
    """The registry: list models, show one, promote one to champion, roll the champion back."""
    from nightrec.tasks import registry

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
            # An operator's deliberate choice: it may move the champion back in ds.
            rec = registry.set_champion(registry.check_version(args.version), force=True,
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


def _delegate_retention(args) -> int:
    """``nightrec gc ...`` / ``nightrec forget ...``: nightrec/ops/retention.py parses and runs them
    (``cli_main(argv)`` gets the argv from the command name on, ``--no-embedded-s3`` taken out
    here once the object store is chosen)."""
    from nightrec.ops import retention

    use_object_store("--no-embedded-s3" not in args.argv)
    return retention.cli_main([a for a in args.argv if a != "--no-embedded-s3"]) or 0


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
    r.add_argument("--interactions", required=True,
                   help="a file, a folder of parts (part-*.parquet, _SUCCESS...) or a glob")
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
    # parsed by nightrec/dev/bench_scoring.py itself (main() hands it the arguments untouched)
    sub.add_parser("bench-scoring", add_help=False,
                   help="scoring kernel vs faiss and the sgemm floor; last line is JSON")
    sv = add("serve", _cmd_serve, "read-only HTTP: GET /recommendations/<user_id>?k=")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, help="default serve.port; 0 picks a free one")
    sv.add_argument("--ds", help="serve this ds instead of following the latest pointer")
    u = add("unlock", _cmd_unlock,
            "remove a dead run's lease on a ds (logged; refused while its holder is alive)")
    u.add_argument("--ds", required=True)
    u.add_argument("--reason", required=True, help="why (kept in the audit record)")
    u.add_argument("--operator", help="who (default: $USER@host)")
    # parsed by nightrec/ops/retention.py itself (cli_main() gets the arguments from the command on)
    sub.add_parser("gc", add_help=False, help="prune old runs, models, id maps, DVC data "
                   "(a dry-run listing unless --apply)")
    sub.add_parser("forget", add_help=False, help="remove one user's data (--user ID [--apply])")
    m = add("models", _cmd_models, "the model registry: list, show, promote, rollback")
    m.add_argument("action", choices=["list", "show", "promote", "rollback"])
    m.add_argument("version", nargs="?", help="model version (show, promote)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-scoring"]:
        from nightrec.dev import bench_scoring

        bench_scoring.main(argv[1:])
        return 0
    delegated = argv[:1] in (["gc"], ["forget"])
    if delegated:
        args = argparse.Namespace(command=argv[0], fn=_delegate_retention, argv=argv)
    else:
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
