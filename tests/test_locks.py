"""The per-ds run lease (tasks/locks.py) on the real SeaweedFS: one run writes a ds at a time."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tasks import layout, locks, storage

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
