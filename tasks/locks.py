"""Leases in the object store: who may write a ds, decided by create-if-absent PUTs.

Two kinds of lease use this module:

- publish's short locks (``tasks/publish.py``): the per-ds publish claim and the latest
  pointer's lock;
- the **per-ds run lease** ``runs/ds=<ds>/_run_lock.json`` (:func:`hold_run`): every task of
  a nightly or re-score run takes (or renews) it before it starts, so two runs for the same ds
  (two Airflow deployments, a re-score beside a nightly run, two ``nightrec run`` at once)
  never interleave their writes. The second run's first task waits up to ``run.lock_wait_s``
  for the first to finish, then is refused with :class:`RunLocked`, naming the holder.

A lease is a small JSON record ``{owner, token, claimed_at, expires_at}``. Only
``If-None-Match: *`` (create if absent) decides who holds it: SeaweedFS 4.48, the embedded
store, lets two racing ``If-Match`` PUTs both win now and then (measured), while its
create-if-absent holds, as both do on AWS S3. The same owner (a task retry, the run's next task,
the heartbeat) renews its lease in place, conditional on the version it read, so the lease is
never absent meanwhile; another owner's expired lease is deleted and created again, and of two
takers, one creates it.

A run's lease expires ``run.lock_ttl_s`` after its last renewal. While a task runs, a daemon
thread renews it every third of that (:class:`_Heartbeat`), so a long training task keeps it;
a task process killed with ``kill -9`` stops renewing, and after the TTL the ds is free again
for a rerun. The run's teardown task releases it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid

from tasks import layout, settings, storage
from tasks.errors import PermanentError

PARAMS = ["run.lock_ttl_s", "run.lock_wait_s"]
log = logging.getLogger(__name__)


class LeaseConflict(RuntimeError):
    """The lease kept changing hands while we tried to take it (transient: retry)."""


class RunLocked(PermanentError):
    """Another run holds this ds. Not retried: the run is refused, clearly, before writing."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def _record(owner: str, ttl_s: float, now: dt.datetime) -> dict:
    return {"owner": owner, "token": uuid.uuid4().hex, "claimed_at": _iso(now),
            "expires_at": _iso(now + dt.timedelta(seconds=float(ttl_s)))}


def acquire(uri: str, *, owner: str, ttl_s: float, busy) -> dict:
    """Take the lease object ``uri``; returns its record with ``uri`` and ``etag``.

    ``busy(held)`` builds the error raised while another owner's lease is live.
    """
    for _ in range(4):
        now = _now()
        record = _record(owner, ttl_s, now)
        try:
            return {**record, "uri": uri, "etag": storage.write_json(uri, record,
                                                                    if_none_match=True)}
        except storage.PreconditionFailed:
            pass
        found = storage.read_versioned(uri)
        if found is None:
            continue  # released between our two requests: try to create it again
        held, etag = json.loads(found[0]), found[1]
        expired = dt.datetime.fromisoformat(held["expires_at"]) <= now
        if held.get("owner") == owner:
            try:
                return _renew({**held, "uri": uri, "etag": etag}, ttl_s=ttl_s)
            except storage.PreconditionFailed:
                continue  # lost to a change (a taker after expiry): look again
        if not expired:
            raise busy(held)
        log.warning("replacing the expired lease %s of %s", uri, held.get("owner"))
        storage.delete_if_match(uri, etag)  # then create-if-absent decides between takers
    raise LeaseConflict(f"the lease {uri} kept changing; another writer is taking it")


def _renew(held: dict, *, ttl_s: float) -> dict:
    """Rewrite our lease ``held`` (a :func:`holder` record) with a new expiry, in place and
    conditional on the version read (If-Match), so it is never absent for a moment in which
    another run could create it. Raises PreconditionFailed when it changed meanwhile."""
    record = _record(held["owner"], ttl_s, _now())
    etag = storage.write_json(held["uri"], record, if_match=held["etag"])
    return {**record, "uri": held["uri"], "etag": etag}


def release(lock: dict) -> None:
    """Delete our lease, unless another owner has taken it over since (then leave theirs)."""
    if not storage.delete_if_match(lock["uri"], lock["etag"]):
        log.warning("the lease %s is no longer ours (taken over after it expired?)", lock["uri"])


def holder(uri: str) -> dict | None:
    """The lease record at ``uri`` with its ``etag``, or None when nobody holds it."""
    found = storage.read_versioned(uri)
    return None if found is None else {**json.loads(found[0]), "uri": uri, "etag": found[1]}


class _Heartbeat(threading.Thread):
    """Renews one run's lease every ``interval`` s while it is still that run's; stops when the
    lease is released, taken over or stopped. One per (ds, owner) in a process: under
    ``dag.test()`` every task runs in the same process and shares it."""

    def __init__(self, ds: str, owner: str, ttl_s: float):
        super().__init__(daemon=True, name=f"nightrec-lease-{ds}")
        self.ds, self.owner, self.ttl_s = ds, owner, ttl_s
        self.interval = max(0.5, ttl_s / 3.0)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                held = holder(layout.run_lock_uri(self.ds))
                if held is None or held.get("owner") != self.owner:
                    return  # released by the teardown, or lost: never re-create it from here
                _renew(held, ttl_s=self.ttl_s)
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried next beat
                log.warning("could not renew the run lease of ds=%s: %s", self.ds, e)


_BEATS: dict[tuple[str, str], _Heartbeat] = {}
_BEATS_LOCK = threading.Lock()


def hold_run(ds: str, owner: str, params: dict | None = None, *, sleep=time.sleep) -> dict:
    """Take or renew the per-ds run lease for ``owner`` (a run id) and keep it renewed while
    this process lives. Waits up to ``run.lock_wait_s`` while another live run holds it, then
    raises :class:`RunLocked` naming that run. Returns the lease record."""
    p = settings.step_params(PARAMS, params)
    ttl_s, wait_s = float(p["run.lock_ttl_s"]), float(p["run.lock_wait_s"])
    if ttl_s <= 0 or wait_s < 0:
        raise ValueError(f"run.lock_ttl_s must be > 0 and run.lock_wait_s >= 0, got {ttl_s}, "
                         f"{wait_s}")
    uri = layout.run_lock_uri(ds)
    deadline = time.monotonic() + wait_s
    waited = False

    def busy(held: dict) -> RunLocked:
        return RunLocked(
            f"ds={ds} is being written by run {held.get('owner')} (lease since "
            f"{held.get('claimed_at')}, expires {held.get('expires_at')} unless renewed); run "
            f"{owner} waited {wait_s:.0f} s (run.lock_wait_s) and is refused before writing "
            f"anything. Rerun it when that run has ended; {uri} is the lease."
        )

    while True:
        try:
            lease = acquire(uri, owner=owner, ttl_s=ttl_s, busy=busy)
            break
        except RunLocked as e:
            if time.monotonic() >= deadline:
                raise
            if not waited:
                log.warning("waiting up to %.0f s: %s", wait_s, e)
                waited = True
            sleep(min(max(0.2, ttl_s / 10.0), 5.0))
    with _BEATS_LOCK:
        beat = _BEATS.get((ds, owner))
        if beat is None or not beat.is_alive():
            beat = _BEATS[(ds, owner)] = _Heartbeat(ds, owner, ttl_s)
            beat.start()
    log.info("run lease of ds=%s held by %s until %s", ds, owner, lease["expires_at"])
    return lease


def held_by_another(ds: str, owner: str) -> dict | None:
    """The live lease of another run on ``ds``, or None (free, expired, or ``owner``'s)."""
    held = holder(layout.run_lock_uri(ds))
    if held is None or held.get("owner") == owner:
        return None
    return held if dt.datetime.fromisoformat(held["expires_at"]) > _now() else None


def release_run(ds: str, owner: str) -> bool:
    """The run's teardown: stop renewing and delete the lease if it is still ``owner``'s.
    Returns whether a lease of ours was deleted."""
    with _BEATS_LOCK:
        beat = _BEATS.pop((ds, owner), None)
    if beat is not None:
        beat.stopped.set()
    held = holder(layout.run_lock_uri(ds))
    if held is None or held.get("owner") != owner:
        return False
    return storage.delete_if_match(held["uri"], held["etag"])
