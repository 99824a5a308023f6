"""``nightrec run`` as an operator lives with it (issue 12, items 6-8), on the real SeaweedFS:

- its exit code and one-line outcome for every way a run can end (``run_outcome``);
- a ``kill -9`` of the whole run, then an immediate rerun of the ds: no TTL wait, the lease is
  taken over at once and the rerun publishes;
- SIGTERM / SIGINT stop the run: the DAG process ends, its lease is released, exit 143 / 130;
  a ``kill -9`` of the CLI alone stops its DAG process too (no orphan holding the lease);
- ``nightrec status`` shows the latest table's age and source and warns when it is stale.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nightrec.core import settings
from nightrec.ops import cli
from nightrec.store import layout, locks, storage

NIGHTREC = str(Path(sys.executable).parent / "nightrec")
DS_KILL = "2026-12-05"
DS_STOP = {"SIGTERM": "2026-12-06", "SIGINT": "2026-12-07", "SIGKILL": "2026-12-08"}

# ------------------------------------------------------------ exit codes and outcome (item 8)

ALL_RAN = {t: "success" for t in ("ingest", "clean", "validate", "train", "evaluate", "gate",
                                  "score", "publish", "promote", "report")}
GATE_REFUSED = {**ALL_RAN, "register": "skipped", "score": "skipped", "publish": "skipped",
                "promote": "skipped"}
MANIFEST = {"rows": 6000, "users": 600, "model_version": "ease-20261128-0123abcd",
            "data_version": "f" * 64}


def result(**fields) -> dict:
    return {"dag_id": "nightly_recommendations", "ds": "2026-11-28",
            "run_id": "manual__2026-11-28T02:00:00+00:00", "state": "success",
            "tasks": ALL_RAN, **fields}


OUTCOMES = {
    "new model published": (result(), {**MANIFEST, "source": "model"}, 0, "published 6000 rows"),
    "published before sources existed": (result(), MANIFEST, 0, "source model"),
    "champion fallback": (
        result(tasks=GATE_REFUSED | {"publish": "success"}),
        {**MANIFEST, "source": "champion_fallback", "source_reason": "gate refused: 0.10<0.12"},
        3, "FALLBACK table for ds=2026-11-28 (champion_fallback: gate refused: 0.10<0.12)"),
    "popularity fallback": (
        result(), {**MANIFEST, "source": "popularity_fallback", "source_reason": "no champion"},
        3, "FALLBACK table for ds=2026-11-28 (popularity_fallback: no champion)"),
    "a task failed": (
        result(state="failed", failed_task="validate",
               error="ContractError: data contract broken: invalid rows"),
        None, 1, "FAILED in task validate: ContractError: data contract broken"),
    "failed after publishing": (
        result(state="failed", failed_task="promote", error="RegistryError: boom"),
        MANIFEST, 1, "FAILED in task promote: RegistryError: boom (the table was published"),
    "gate refused, no fallback": (result(tasks=GATE_REFUSED), None, 4,
                                  "nothing published for ds=2026-11-28: the gate refused"),
    "refused by another run's lease": (
        result(state="failed", failed_task="ingest",
               error="RunLocked: ds=2026-11-28 is being written by run nightly.x@dep2"),
        None, 5, "REFUSED: another run holds ds=2026-11-28"),
    "no task instance at all": (result(tasks={}), None, 6, "NO TASK RAN for ds=2026-11-28"),
    "no task got a state": (result(tasks=dict.fromkeys(ALL_RAN, "None")), None, 6,
                            "NO TASK RAN"),
    "only the teardown ran": (result(tasks={"report": "success"}), None, 6, "NO TASK RAN"),
    "SIGTERM": ({"ds": "2026-11-28", "state": "stopped", "stopped_by": "SIGTERM", "signal": 15,
                 "released": ["2026-11-28"]}, None, 143,
                "stopped by SIGTERM: the run was stopped and its lease on ds=2026-11-28 released"),
    "SIGINT": ({"ds": "2026-11-28", "state": "stopped", "stopped_by": "SIGINT", "signal": 2,
                "released": []}, None, 130, "stopped by SIGINT"),
}


@pytest.mark.parametrize("case", OUTCOMES)
def test_run_outcome_names_what_happened_with_its_exit_code(case):
    res, manifest, code, says = OUTCOMES[case]
    got_code, message = cli.run_outcome(res, manifest)
    assert (got_code, says in message) == (code, True), message
    assert "\n" not in message


# --------------------------------------------------------- nightrec status: the table's age


def test_status_shows_the_latest_table_s_age_and_source_and_warns_when_stale(bucket, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    max_age = float(settings.load_params()["publish"]["max_age_hours"])
    ds = "2026-11-20"

    def plant(hours_old: float, source: str) -> None:
        updated = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours_old)
        storage.write_json(layout.manifest_uri(ds), {**MANIFEST, "ds": ds, "source": source,
                                                     "source_reason": "gate refused"})
        storage.write_json(layout.latest_uri(), {
            "ds": ds, "manifest": layout.manifest_uri(ds), "publish_id": "p1",
            "model_version": MANIFEST["model_version"],
            "updated_at": updated.isoformat(timespec="seconds")})

    plant(max_age + 12, "champion_fallback")
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"latest table: ds={ds}" in out and "source=champion_fallback (gate refused)" in out
    assert f"{max_age + 12:.1f} h old" in out
    assert (f"WARNING: the latest table is {max_age + 12:.1f} h old, older than "
            f"publish.max_age_hours ({max_age:g} h)") in out

    plant(2, "model")
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "source=model" in out and "2.0 h old" in out and "WARNING" not in out


# ------------------------------------------------- kill -9, SIGTERM, SIGINT on a real run


def _log_path(ds: str) -> Path:
    return settings.state_dir() / "logs" / f"run-ds={ds}.log"


def start_run(ds: str, interactions: Path) -> subprocess.Popen:
    """``nightrec run`` in its own session (so the test can kill its group, not itself)."""
    _log_path(ds).unlink(missing_ok=True)
    return subprocess.Popen([NIGHTREC, "run", "--interactions", str(interactions), "--ds", ds],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_until_running(proc: subprocess.Popen, ds: str, task: str, timeout_s: float = 300) -> dict:
    """Poll the run's log until ``task`` has started; returns the run lease (with its pid)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"nightrec run ended ({proc.returncode}) before {task}: {err[-3000:]}")
        log = _log_path(ds).read_text(errors="replace") if _log_path(ds).exists() else ""
        if f"[DAG TEST] starting task_id={task}" in log:
            held = locks.holder(layout.run_lock_uri(ds))
            if held and held.get("pid"):
                return held
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{task} did not start within {timeout_s} s")


def wait_gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not locks.pid_alive(pid) and not locks.group_pids(pid):
            return True
        time.sleep(0.2)
    return False


def test_kill_9_of_the_whole_run_then_an_immediate_rerun_takes_the_lease_over(s3, sample, bucket, ease_only):
    ttl_s = float(settings.load_params()["run"]["lock_ttl_s"])
    run = start_run(DS_KILL, sample["interactions"])
    lease = wait_until_running(run, DS_KILL, "train")
    dag_pid = lease["pid"]  # scripts/run_dag.py, which runs every task (NIGHTREC_RUN_PID)
    assert lease["host"] == socket.gethostname() and lease["boot_id"] == locks.boot_id()
    # the whole run at once: the DAG process's group (its own session) and the CLI's
    os.killpg(dag_pid, signal.SIGKILL)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate()
    assert wait_gone(dag_pid)
    left = locks.holder(layout.run_lock_uri(DS_KILL))
    assert left["pid"] == dag_pid  # the crash left its lease, minutes from expiry
    expires = dt.datetime.fromisoformat(left["expires_at"])
    assert expires > dt.datetime.now(dt.UTC)

    started = time.monotonic()
    rerun = start_run(DS_KILL, sample["interactions"])
    while rerun.poll() is None:  # fail at once if it waits for the dead run's lease
        log = _log_path(DS_KILL).read_text(errors="replace") if _log_path(DS_KILL).exists() else ""
        if "waiting up to" in log or time.monotonic() - started > ttl_s:
            rerun.kill()
            pytest.fail(f"the rerun waited for the dead run's lease: {log[-2000:]}")
        time.sleep(0.5)
    took = time.monotonic() - started
    _out, err = rerun.communicate()
    log = _log_path(DS_KILL).read_text(errors="replace")
    assert rerun.returncode in (0, 3), err[-2000:] + log[-3000:]  # it published
    assert f"taken over at once: holder pid {dag_pid} on {socket.gethostname()} is gone" in log
    assert "waiting up to" not in log
    # done before the dead run's lease would have expired: no TTL freed it
    assert dt.datetime.now(dt.UTC) < expires, f"the rerun took {took:.0f} s"
    assert took < ttl_s / 2, f"the rerun took {took:.0f} s (lease TTL {ttl_s:.0f} s)"
    assert storage.exists(layout.manifest_uri(DS_KILL))
    assert not storage.exists(layout.run_lock_uri(DS_KILL))  # the rerun's teardown freed it


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_releases_its_lease_and_leaves_no_process(s3, sample, bucket, ease_only, sig):
    ds = DS_STOP[sig]
    run = start_run(ds, sample["interactions"])
    # SIGTERM mid-training; SIGINT as soon as the run holds its lease (a shorter test)
    lease = wait_until_running(run, ds, "train" if sig == "SIGTERM" else "ingest")
    dag_pid = lease["pid"]
    assert locks.pid_alive(dag_pid)
    run.send_signal(getattr(signal, sig))
    _out, err = run.communicate(timeout=60)
    assert run.returncode == {"SIGTERM": 143, "SIGINT": 130}[sig], err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("nightrec run: stopped"))
    assert f"stopped by {sig}: the run was stopped" in line
    assert f"its lease on ds={ds} was released" in line
    assert not storage.exists(layout.run_lock_uri(ds))
    assert wait_gone(dag_pid, timeout_s=5), f"run_dag.py ({dag_pid}) or its group is still there"
    res = json.loads((settings.state_dir() / "logs" / f"result-ds={ds}.json").read_text())
    assert res["stopped_by"] == sig and res["released"] == [ds]
    assert not storage.exists(layout.manifest_uri(ds))  # nothing published


def test_kill_9_of_the_cli_alone_stops_its_dag_process_too(s3, sample, bucket, ease_only):
    """The orphan of issue 12: the CLI gone, its run_dag.py trained on, holding the lease."""
    ds = DS_STOP["SIGKILL"]
    run = start_run(ds, sample["interactions"])
    dag_pid = wait_until_running(run, ds, "ingest")["pid"]
    run.kill()  # the CLI only: its DAG process is in a session of its own
    run.communicate()
    assert wait_gone(dag_pid, timeout_s=30), f"run_dag.py ({dag_pid}) outlived its CLI"
    assert not storage.exists(layout.run_lock_uri(ds))  # it released its lease on the way out
    res = json.loads((settings.state_dir() / "logs" / f"result-ds={ds}.json").read_text())
    assert res["stopped_by"] == "SIGTERM" and res["released"] == [ds]
