"""Run one DAG for one ds through Airflow in this process (``dag.test()``), and report.

Called by ``nightrec run`` in a subprocess (its own session), so Airflow's settings are in the
environment before Airflow is imported. Writes ``--result-file`` (JSON) at the end: the ds, the
run's state, each task's state, and the first failed task with its error. Exit 0 only on
success.

This one process runs every task of the run, so it sets ``NIGHTREC_RUN_PID`` to its pid: the
run lease records it, and a rerun on this host takes over at once once this process is gone
(nightrec/store/locks.py). **SIGTERM / SIGINT** stop the run: Airflow's task runner installs its own
SIGTERM handler (which only calls ``on_kill`` and lets the task go on), so both signals are
blocked in every thread and taken by one watcher thread (``sigwait``); with ``--parent-pid``,
the death of that process (the CLI, even by kill -9) sends this one SIGTERM. It stops this process's
children (DVC and the like: SIGTERM, then SIGKILL after a grace), releases the run lease(s)
this process holds (``locks.release_all_held``, which also refuses any new one), writes the
result file with ``stopped_by``, and exits 128 + the signal number.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHILD_GRACE_S = 3.0  # children get this long after SIGTERM before SIGKILL (s)


def airflow_env(state: Path) -> dict[str, str]:
    home = state / "airflow"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": os.environ.get(
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home}/airflow.db"
        ),
    }


def ensure_db(state: Path) -> None:
    home = state / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    marker = home / ".migrated"
    if marker.exists():
        return
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL)
    marker.write_text("ok")


def stop_children(grace_s: float = CHILD_GRACE_S) -> list[int]:
    """SIGTERM every descendant of this process, SIGKILL those left after ``grace_s``, and reap
    our own children. Returns the pids signalled."""
    from nightrec.store import locks

    kids = locks.descendants(os.getpid())
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(locks.pid_alive(p) for p in kids):
        time.sleep(0.1)
    for pid in kids + locks.descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(50):  # reap our direct children (a zombie is no process left)
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    return kids


def die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when ``parent_pid`` (the ``nightrec run`` that started us) dies, even by
    kill -9 (Linux PR_SET_PDEATHSIG), so this run stops instead of going on as an orphan."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before we asked: stop now
        os.kill(os.getpid(), signal.SIGTERM)


def watch_signals(ds: str, result_file: Path) -> None:
    """Take SIGTERM/SIGINT in a watcher thread from now on (see the module docstring). Call it
    before any other thread starts: threads inherit the blocked mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def watch() -> None:
        signum = signal.sigwait(STOP_SIGNALS)
        name = signal.Signals(signum).name
        print(f"run_dag: {name}: stopping the run of ds={ds}", file=sys.stderr, flush=True)
        result = {"ds": ds, "state": "stopped", "stopped_by": name, "signal": int(signum),
                  "tasks": {}}
        try:
            from nightrec.store import locks

            locks.close()  # before the children die: no task takes the lease back
            result["children_stopped"] = stop_children()
            result["released"] = locks.release_all_held(close=True)
        except Exception as e:  # noqa: BLE001 - still exit; the lease's pid frees it here
            result["error"] = f"{type(e).__name__}: {e}"
        print(f"run_dag: stopped by {name}; released the run lease of "
              f"{result.get('released') or 'no ds'}", file=sys.stderr, flush=True)
        try:
            result_file.write_text(json.dumps(result))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)

    threading.Thread(target=watch, name="nightrec-stop-signals", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dag-id", default="nightly_recommendations")
    parser.add_argument("--ds", required=True)
    parser.add_argument("--conf", default="{}", help="JSON run conf (params)")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--result-file", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int, help="stop the run when this process dies")
    args = parser.parse_args(argv)
    for k, v in airflow_env(args.state).items():
        os.environ.setdefault(k, v)
    sys.path.insert(0, str(ROOT))
    watch_signals(args.ds, args.result_file)
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    # this process runs every task (dag.test()): the run lease may record its pid (nightrec/store/locks.py)
    os.environ["NIGHTREC_RUN_PID"] = str(os.getpid())
    ensure_db(args.state)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 2
    dag = bag.get_dag(args.dag_id)
    conf = {**json.loads(args.conf), "ds": args.ds}
    logical = dt.datetime.fromisoformat(args.ds).replace(hour=2, tzinfo=dt.UTC)
    dr = dag.test(logical_date=logical, run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    result = {"dag_id": args.dag_id, "ds": args.ds, "run_id": dr.run_id, "state": str(dr.state),
              "tasks": states}
    failed = [t for t, s in states.items() if s in ("failed", "upstream_failed")]
    if failed:
        from nightrec.ops.alerts import read_failure

        alert = read_failure(dr.run_id) or {}
        result["failed_task"] = alert.get("task_id") or failed[0]
        result["error"] = alert.get("error", "see the task log above")
    args.result_file.write_text(json.dumps(result))
    return 0 if result["state"] == "success" and states.get("publish") == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
