"""The per-ds run lease (nightrec/store/locks.py) on the real SeaweedFS: one run writes a ds at a time."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from nightrec.ops import cli
from nightrec.store import layout, locks, storage

DS = "2026-11-28"


def params(ttl_s: float = 30.0, wait_s: float = 0.0) -> dict:
    return {"run": {"lock_ttl_s": ttl_s, "lock_wait_s": wait_s}}


def holder_owner() -> str | None:
    held = locks.holder(layout.run_lock_uri(DS))
    return held and held["owner"]


def test_second_run_is_refused_naming_the_holder_and_the_first_keeps_it(bucket):
    locks.hold_run(DS, "nightly.run-a@dep1", params())
    with pytest.raises(locks.RunLocked, match=r"ds=2026-11-28 is being written by run "
                                              r"nightly\.run-a@dep1.*refused before writing"):
        locks.hold_run(DS, "nightly.run-a@dep2", params())  # same run id, other deployment
    assert holder_owner() == "nightly.run-a@dep1"
    assert issubclass(locks.RunLocked, locks.PermanentError)  # not retried by the DAG
    # the refused run's teardown must not free the other run's lease
    assert locks.release_run(DS, "nightly.run-a@dep2") is False
    assert holder_owner() == "nightly.run-a@dep1"
    assert locks.release_run(DS, "nightly.run-a@dep1") is True
    assert holder_owner() is None


def test_same_owner_renews_its_own_lease(bucket):
    first = locks.hold_run(DS, "run-a", params())
    time.sleep(1.1)
    again = locks.hold_run(DS, "run-a", params())  # the run's next task, or a retry
    assert again["token"] != first["token"] and again["expires_at"] > first["expires_at"]
    assert locks.release_run(DS, "run-a")


def test_a_waiting_run_gets_the_ds_once_the_first_releases(bucket):
    locks.hold_run(DS, "run-a", params())
    threading.Timer(1.0, lambda: locks.release_run(DS, "run-a")).start()
    started = time.monotonic()
    locks.hold_run(DS, "run-b", params(wait_s=20))
    assert 0.9 < time.monotonic() - started < 15
    assert holder_owner() == "run-b"
    locks.release_run(DS, "run-b")


def test_a_dead_runs_lease_expires_and_a_rerun_takes_it_over(bucket):
    # a run killed with -9 leaves its lease behind, unrenewed
    stale = {"owner": "run-killed", "token": "t", "claimed_at": "2026-11-28T02:00:00+00:00",
             "expires_at": "2026-11-28T02:10:00+00:00"}
    storage.write_bytes(layout.run_lock_uri(DS), json.dumps(stale).encode())
    locks.hold_run(DS, "run-b", params())
    assert holder_owner() == "run-b"
    locks.release_run(DS, "run-b")


def test_the_heartbeat_keeps_a_long_task_s_lease_alive(bucket):
    lease = locks.hold_run(DS, "run-a", params(ttl_s=2.0))
    time.sleep(4.5)  # two TTLs: without renewals it would have expired
    held = locks.holder(layout.run_lock_uri(DS))
    assert held["owner"] == "run-a" and held["expires_at"] > lease["expires_at"]
    with pytest.raises(locks.RunLocked):
        locks.hold_run(DS, "run-b", params(ttl_s=2.0))
    assert locks.release_run(DS, "run-a")
    time.sleep(1.5)  # the stopped heartbeat never re-creates a released lease
    assert holder_owner() is None


def test_bad_settings_and_a_bad_ds_are_refused(bucket):
    with pytest.raises(ValueError, match="lock_ttl_s"):
        locks.hold_run(DS, "run-a", params(ttl_s=0))
    with pytest.raises(ValueError, match="ds must be a date"):
        locks.hold_run("../2026-11-28", "run-a", params())


# ------------------------------------------------ crash recovery: host, pid and boot id (item 6)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def plant_lease(*, renewed_ago_s: float = 1.0, ttl_s: float = 600.0, **fields) -> dict:
    """Write another run's live (unexpired) lease on DS as a crashed or running run leaves it."""
    now = dt.datetime.now(dt.UTC)
    renewed = now - dt.timedelta(seconds=renewed_ago_s)
    record = {"owner": "nightly.run-old@dep1", "token": uuid.uuid4().hex,
              "claimed_at": _iso(renewed - dt.timedelta(seconds=60)), "renewed_at": _iso(renewed),
              "expires_at": _iso(renewed + dt.timedelta(seconds=ttl_s)), "ttl_s": ttl_s,
              "host": socket.gethostname(), "boot_id": locks.boot_id(), "pid": None,
              "pid_start": None, **fields}
    storage.write_json(layout.run_lock_uri(DS), record)
    return record


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_run_lease_records_host_boot_id_and_the_run_pid_only_under_run_dag(bucket, monkeypatch):
    monkeypatch.delenv(locks.RUN_PID_ENV, raising=False)
    lease = locks.hold_run(DS, "run-a", params())  # an executor's task process: no pid
    stored = locks.holder(layout.run_lock_uri(DS))
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert stored["host"] == socket.gethostname() and stored["boot_id"] == boot
    assert lease["pid"] is None and stored["pid"] is None
    assert locks.release_run(DS, "run-a")
    monkeypatch.setenv(locks.RUN_PID_ENV, "1")  # inherited from another process: not ours
    assert locks.hold_run(DS, "run-a", params())["pid"] is None
    assert locks.release_run(DS, "run-a")
    monkeypatch.setenv(locks.RUN_PID_ENV, str(os.getpid()))  # as scripts/run_dag.py sets it
    locks.hold_run(DS, "run-a", params())
    stored = locks.holder(layout.run_lock_uri(DS))
    assert stored["pid"] == os.getpid() and stored["pid_start"] == locks.process_start(os.getpid())
    assert locks.release_run(DS, "run-a")


def test_a_gone_holder_on_this_host_is_taken_over_at_once(bucket, caplog):
    pid = dead_pid()
    plant_lease(pid=pid)  # renewed a second ago, 10 minutes to go: only its pid says it is gone
    caplog.set_level(logging.INFO, logger="nightrec.store.locks")
    started = time.monotonic()
    locks.hold_run(DS, "run-b", params(ttl_s=600, wait_s=60))
    assert time.monotonic() - started < 5
    assert holder_owner() == "run-b"
    assert f"taken over at once: holder pid {pid} on {socket.gethostname()} is gone" in caplog.text
    assert "waiting up to" not in caplog.text
    locks.release_run(DS, "run-b")


@pytest.mark.parametrize("case", ["rebooted", "pid reused"])
def test_a_rebooted_host_or_a_reused_pid_means_the_holder_is_gone(bucket, case):
    me = os.getpid()  # a live process, but not the one that wrote the lease
    if case == "rebooted":
        plant_lease(pid=me, pid_start=locks.process_start(me), boot_id="another-boot")
    else:
        plant_lease(pid=me, pid_start=locks.process_start(me) + 1)
    locks.hold_run(DS, "run-b", params())
    assert holder_owner() == "run-b"
    locks.release_run(DS, "run-b")


@pytest.mark.parametrize("case", ["live pid", "other host", "no pid"])
def test_a_live_holder_another_host_s_or_a_pidless_lease_waits_for_its_ttl(bucket, live_pid,
                                                                          case):
    fields = {"live pid": {"pid": live_pid, "pid_start": locks.process_start(live_pid)},
              "other host": {"pid": dead_pid(), "host": "another-host"},
              "no pid": {}}[case]
    plant_lease(**fields)
    with pytest.raises(locks.RunLocked, match="nightly.run-old@dep1"):
        locks.hold_run(DS, "run-b", params())
    assert holder_owner() == "nightly.run-old@dep1"


def test_release_all_held_frees_every_lease_of_this_process_and_takes_no_new_one(bucket):
    other = "2026-11-29"
    locks.hold_run(DS, "run-a", params())
    locks.hold_run(other, "run-a", params())
    try:
        assert sorted(locks.release_all_held(close=True)) == [DS, other]
        assert holder_owner() is None and locks.holder(layout.run_lock_uri(other)) is None
        with pytest.raises(locks.RunLocked, match="is stopping"):
            locks.hold_run(DS, "run-a", params())  # a task starting meanwhile
        assert holder_owner() is None
    finally:
        locks._CLOSED.clear()


# -------------------------------------------------------------------- nightrec unlock (item 6)


@pytest.mark.parametrize("case", ["live pid here", "another host, renewed now",
                                  "no pid, renewed now"])
def test_unlock_refuses_a_lease_whose_holder_is_alive_and_says_why(bucket, live_pid, case,
                                                                   capsys):
    fields = {"live pid here": {"pid": live_pid, "pid_start": locks.process_start(live_pid)},
              "another host, renewed now": {"pid": 4242, "host": "another-host"},
              "no pid, renewed now": {}}[case]
    plant_lease(renewed_ago_s=5, **fields)
    why = "is running" if case == "live pid here" else r"renewed \d s ago"
    with pytest.raises(locks.UnlockRefused, match=f"holder looks alive: .*{why}"):
        locks.unlock(DS, reason="stuck", operator="ops")
    assert holder_owner() == "nightly.run-old@dep1"
    assert cli.main(["unlock", "--ds", DS, "--reason", "stuck"]) == 1
    assert "nightrec unlock: refused" in capsys.readouterr().err
    assert holder_owner() == "nightly.run-old@dep1"
    assert storage.list_uris(storage.s3_uri("audit/unlock/")) == []


@pytest.mark.parametrize("case", ["dead pid here", "another host, silent"])
def test_unlock_removes_a_dead_holder_s_lease_logged_and_audited(bucket, case, capsys, caplog):
    if case == "dead pid here":
        planted = plant_lease(pid=dead_pid())
    else:  # no renewal for 400 s: more than a heartbeat (200 s) plus the margin; TTL not over
        planted = plant_lease(renewed_ago_s=400, pid=4242, host="another-host")
    assert cli.main(["unlock", "--ds", DS, "--reason", "night of 28 Nov crashed",
                     "--operator", "alice"]) == 0
    out = capsys.readouterr()
    assert holder_owner() is None
    assert f"unlocked ds={DS}" in out.out and "nightly.run-old@dep1" in out.out
    [audit] = storage.list_uris(storage.s3_uri("audit/unlock/"))
    assert audit.endswith(f"-{planted['token']}.json") and audit in out.out
    record = storage.read_json(audit)
    assert record["operator"] == "alice" and record["reason"] == "night of 28 Nov crashed"
    assert record["ds"] == DS and record["lease"]["token"] == planted["token"]
    assert record["lease"]["owner"] == "nightly.run-old@dep1" and record["why_free"]
    assert "unlocked ds=2026-11-28 by alice (night of 28 Nov crashed)" in caplog.text
    # nothing left: a second unlock says so and succeeds
    assert locks.unlock(DS, reason="again", operator="alice")["unlocked"] is False
