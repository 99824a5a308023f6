"""Leases in the object store: who may write a ds, decided by create-if-absent PUTs.

Two kinds of lease use this module:

- publish's short locks (``tasks/publish.py``): the per-ds publish claim and the latest
  pointer's lock;
- the **per-ds run lease** ``runs/ds=<ds>/_run_lock.json`` (:func:`hold_run`): every task of
  a nightly or re-score run takes (or renews) it before it starts, so two runs for the same ds
  (two Airflow deployments, a re-score beside a nightly run, two ``nightrec run`` at once)
  never interleave their writes. The second run's first task waits up to ``run.lock_wait_s``
  for the first to finish, then is refused with :class:`RunLocked`, naming the holder.

A lease is a small JSON record ``{owner, token, claimed_at, renewed_at, expires_at, ttl_s,
host, boot_id, pid, pid_start}``. Only ``If-None-Match: *`` (create if absent) decides who
holds it: SeaweedFS 4.48, the embedded store, lets two racing ``If-Match`` PUTs both win now
and then (measured), while its create-if-absent holds, as both do on AWS S3. The same owner (a
task retry, the run's next task, the heartbeat) renews its lease in place, conditional on the
version it read, so the lease is never absent meanwhile; another owner's expired lease is
deleted and created again, and of two takers, one creates it.

A run's lease expires ``run.lock_ttl_s`` after its last renewal. While a task runs, a daemon
thread renews it every third of that (:class:`_Heartbeat`), so a long training task keeps it.
The run's teardown task releases it.

**Crash recovery: which process a lease belongs to.** A lease records the ``host``
(``socket.gethostname()``) and the ``boot_id`` (``/proc/sys/kernel/random/boot_id``) of the
process that wrote it, and a ``pid`` only when one process lives for the whole run: under a
real executor (LocalExecutor, Celery, Kubernetes) each task is its own short-lived process, so
between two tasks a live run has no live pid, and a pid would make its lease look abandoned.
``scripts/run_dag.py`` (``nightrec run``) runs every task of the DAG in its own process
(``dag.test()``) and says so by setting ``NIGHTREC_RUN_PID`` to its pid; :func:`hold_run`
records that pid (with the process's start time, so a reused pid does not pass for it) only
when it is the calling process. Then:

- on the same host, a holder whose process is gone (no such pid, a zombie, another process
  under that pid, or a different boot id: the host rebooted) is **taken over at once**, and the
  log says ``taken over at once: holder pid N on HOST is gone``;
- a lease without a pid, or one from another host, is freed only by its TTL (or
  :func:`unlock`).

Host names must be unique among the pid namespaces writing one bucket (true by default for
machines and containers, whose host name is their id).

**Operators**: :func:`unlock` (``nightrec unlock --ds D --reason TEXT``) removes a run lease
by hand, logged and recorded under ``audit/unlock/``; it refuses while the holder looks alive.
**Stopping a run**: :func:`release_all_held` releases every run lease this process holds and
refuses new ones (``scripts/run_dag.py`` on SIGTERM/SIGINT).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from nightrec.core import settings
from nightrec.core.errors import PermanentError
from nightrec.store import layout, storage

PARAMS = ["run.lock_ttl_s", "run.lock_wait_s"]
RUN_PID_ENV = "NIGHTREC_RUN_PID"
# unlock: a lease with no live pid to check is taken as alive while its last renewal is at most
# one heartbeat interval (ttl/3) plus this old; it covers a slow store and a busy host (s)
UNLOCK_MARGIN_S = 30.0
log = logging.getLogger(__name__)


class LeaseConflict(RuntimeError):
    """The lease kept changing hands while we tried to take it (transient: retry)."""


class RunLocked(PermanentError):
    """Another run holds this ds. Not retried: the run is refused, clearly, before writing."""


class UnlockRefused(RuntimeError):
    """``unlock`` would remove the lease of a run that looks alive (or the lease changed)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


# ---------------------------------------------------------------- which process holds a lease


def host() -> str:
    return socket.gethostname()


@functools.cache
def boot_id() -> str | None:
    """This boot's id (Linux); None where the kernel does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first; start time at index 19), or None when
    there is no such process. Raises OSError where there is no /proc at all."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), or None (gone, or no /proc)."""
    try:
        fields = _proc_stat(pid)
    except OSError:
        return None
    return None if fields is None else int(fields[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs: not gone, not a zombie, and (when ``start``
    is given) the same process that had that pid then, not a later one reusing it."""
    try:
        fields = _proc_stat(pid)
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == int(start)


def group_pids(pgid: int) -> list[int]:
    """The processes (not zombies) of process group ``pgid`` on this host (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _proc_stat(int(entry.name))
        except OSError:
            continue
        if fields and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _proc_stat(int(entry.name))
            except OSError:
                continue
            if fields and fields[0] not in ("Z", "X"):
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def run_pid() -> int | None:
    """The pid to record in a run lease: ``NIGHTREC_RUN_PID`` when it names this process (set by
    scripts/run_dag.py, whose one process runs the whole DAG), else None (an executor's task
    process, which ends long before its run does)."""
    value = os.environ.get(RUN_PID_ENV, "")
    return int(value) if value.isdigit() and int(value) == os.getpid() else None


def holder_gone(held: dict) -> str | None:
    """Why the process holding lease ``held`` is known to be gone, or None when it may live.
    Only a lease that records a pid on this host can be known gone."""
    pid = held.get("pid")
    if not pid or held.get("host") != host():
        return None
    if held.get("boot_id") and boot_id() and held["boot_id"] != boot_id():
        return f"the host rebooted since (boot id {held['boot_id']}, now {boot_id()})"
    if not pid_alive(int(pid), held.get("pid_start")):
        return "no such process (or a zombie, or another process under that pid)"
    return None


def _beat_interval(ttl_s: float) -> float:
    return max(0.5, float(ttl_s) / 3.0)


# ------------------------------------------------------------------------------------- leases


def _record(owner: str, ttl_s: float, now: dt.datetime, *, pid: int | None = None,
            claimed_at: str | None = None) -> dict:
    return {"owner": owner, "token": uuid.uuid4().hex, "claimed_at": claimed_at or _iso(now),
            "renewed_at": _iso(now),
            "expires_at": _iso(now + dt.timedelta(seconds=float(ttl_s))), "ttl_s": float(ttl_s),
            "host": host(), "boot_id": boot_id(), "pid": pid,
            "pid_start": process_start(pid) if pid else None}


def acquire(uri: str, *, owner: str, ttl_s: float, busy, pid: int | None = None) -> dict:
    """Take the lease object ``uri``; returns its record with ``uri`` and ``etag``.

    ``busy(held)`` builds the error raised while another owner's lease is live. ``pid``: the
    process that holds it for its whole life (see the module docstring), or None. Another
    owner's lease whose recorded process on this host is gone is taken over at once.
    """
    for _ in range(4):
        now = _now()
        record = _record(owner, ttl_s, now, pid=pid)
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
                return _renew({**held, "uri": uri, "etag": etag}, ttl_s=ttl_s, pid=pid)
            except storage.PreconditionFailed:
                continue  # lost to a change (a taker after expiry): look again
        if expired:
            log.warning("replacing the expired lease %s of %s", uri, held.get("owner"))
        else:
            gone = holder_gone(held)
            if gone is None:
                raise busy(held)
            log.warning("taken over at once: holder pid %s on %s is gone (%s); lease %s of %s, "
                        "renewed %s", held.get("pid"), held.get("host"), gone, uri,
                        held.get("owner"), held.get("renewed_at") or held.get("claimed_at"))
        storage.delete_if_match(uri, etag)  # then create-if-absent decides between takers
    raise LeaseConflict(f"the lease {uri} kept changing; another writer is taking it")


class _Busy(Exception):
    def __init__(self, held: dict):
        super().__init__(held.get("owner"))
        self.held = held


@contextlib.contextmanager
def short_lock(uri: str, *, owner: str, ttl_s: float, busy, poll_s: float = 0.05):
    """Hold the lock object ``uri`` for a read-then-write of one small record (the latest
    pointer, the champion pointer, the forgotten-users list), then release it.

    Waits while another owner holds it, up to ``ttl_s`` + 5 s (a crashed holder's lock has
    expired by then and is taken over), then raises ``busy(held)``.
    """
    deadline = time.monotonic() + float(ttl_s) + 5
    while True:
        try:
            lock = acquire(uri, owner=owner, ttl_s=ttl_s, busy=_Busy)
            break
        except (_Busy, LeaseConflict) as e:
            if time.monotonic() > deadline:
                raise busy(getattr(e, "held", {})) from e
            time.sleep(poll_s)
    try:
        yield lock
    finally:
        release(lock)


def _renew(held: dict, *, ttl_s: float, pid: int | None = None) -> dict:
    """Rewrite our lease ``held`` (a :func:`holder` record) with a new expiry, in place and
    conditional on the version read (If-Match), so it is never absent for a moment in which
    another run could create it. Raises PreconditionFailed when it changed meanwhile."""
    record = _record(held["owner"], ttl_s, _now(), pid=pid, claimed_at=held.get("claimed_at"))
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

    def __init__(self, ds: str, owner: str, ttl_s: float, pid: int | None):
        super().__init__(daemon=True, name=f"nightrec-lease-{ds}")
        self.ds, self.owner, self.ttl_s, self.pid = ds, owner, ttl_s, pid
        self.interval = _beat_interval(ttl_s)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                held = holder(layout.run_lock_uri(self.ds))
                if held is None or held.get("owner") != self.owner or self.stopped.is_set():
                    return  # released by the teardown, or lost: never re-create it from here
                _renew(held, ttl_s=self.ttl_s, pid=self.pid)
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried next beat
                log.warning("could not renew the run lease of ds=%s: %s", self.ds, e)


_BEATS: dict[tuple[str, str], _Heartbeat] = {}
_BEATS_LOCK = threading.Lock()
# set by release_all_held(close=True): this process is stopping and takes no run lease again
_CLOSED = threading.Event()


def hold_run(ds: str, owner: str, params: dict | None = None, *, sleep=time.sleep) -> dict:
    """Take or renew the per-ds run lease for ``owner`` (a run id) and keep it renewed while
    this process lives. Waits up to ``run.lock_wait_s`` while another live run holds it, then
    raises :class:`RunLocked` naming that run; a holder known gone (see the module docstring)
    is taken over at once. Records this process's pid only under ``NIGHTREC_RUN_PID``.
    Returns the lease record."""
    p = settings.step_params(PARAMS, params)
    ttl_s, wait_s = float(p["run.lock_ttl_s"]), float(p["run.lock_wait_s"])
    if ttl_s <= 0 or wait_s < 0:
        raise ValueError(f"run.lock_ttl_s must be > 0 and run.lock_wait_s >= 0, got {ttl_s}, "
                         f"{wait_s}")
    uri = layout.run_lock_uri(ds)
    if _CLOSED.is_set():
        raise RunLocked(f"this process (pid {os.getpid()}) is stopping (signalled) and has "
                        f"released its run leases; ds={ds} is not taken again")
    pid = run_pid()
    deadline = time.monotonic() + wait_s
    waited = False

    def busy(held: dict) -> RunLocked:
        where = (f"pid {held['pid']} on {held.get('host')}" if held.get("pid")
                 else f"host {held.get('host', '?')}, no pid recorded")
        return RunLocked(
            f"ds={ds} is being written by run {held.get('owner')} ({where}; lease since "
            f"{held.get('claimed_at')}, expires {held.get('expires_at')} unless renewed); run "
            f"{owner} waited {wait_s:.0f} s (run.lock_wait_s) and is refused before writing "
            f"anything. Rerun it when that run has ended; {uri} is the lease."
        )

    while True:
        try:
            lease = acquire(uri, owner=owner, ttl_s=ttl_s, busy=busy, pid=pid)
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
            beat = _BEATS[(ds, owner)] = _Heartbeat(ds, owner, ttl_s, pid)
            beat.start()
    log.info("run lease of ds=%s held by %s until %s (host %s, pid %s)", ds, owner,
             lease["expires_at"], lease["host"], pid)
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
        if beat is not threading.current_thread():
            beat.join(timeout=10)  # a renewal in flight would change the ETag under our delete
    for _ in range(3):
        held = holder(layout.run_lock_uri(ds))
        if held is None or held.get("owner") != owner:
            return False
        if storage.delete_if_match(held["uri"], held["etag"]):
            return True
    return False


def close() -> None:
    """This process is stopping: :func:`hold_run` refuses from now on (a task that starts
    meanwhile must not take a released lease back)."""
    _CLOSED.set()


def release_all_held(*, close: bool = False) -> list[str]:
    """Release every run lease this process holds (its heartbeat registry); returns their ds.
    ``close``: the process is stopping, so :func:`hold_run` refuses from now on (a task that
    starts meanwhile must not take the lease back)."""
    if close:
        _CLOSED.set()  # the function close() is shadowed by the argument here
    with _BEATS_LOCK:
        held = list(_BEATS)
    released = []
    for ds, owner in held:
        try:
            if release_run(ds, owner):
                released.append(ds)
        except Exception as e:  # noqa: BLE001 - release the others; the TTL frees this one
            log.warning("could not release the run lease of ds=%s: %s", ds, e)
    return released


def release_if_gone(ds: str, pid: int) -> bool:
    """Delete ds's run lease when it records ``pid`` on this host and that process is gone
    (``nightrec run`` after it stopped its DAG process). Returns whether it deleted one."""
    held = holder(layout.run_lock_uri(ds))
    if held is None or held.get("pid") != pid or holder_gone(held) is None:
        return False
    log.warning("released the lease of ds=%s: holder pid %s on %s is gone", ds, pid, host())
    return storage.delete_if_match(held["uri"], held["etag"])


# ------------------------------------------------------------------------------------- unlock


def holder_alive(held: dict, now: dt.datetime | None = None) -> tuple[bool, str]:
    """Whether the run holding lease ``held`` looks alive, and why. On this host with a pid:
    that process runs. Otherwise (another host, or no pid recorded): it was renewed within one
    heartbeat interval (ttl/3) plus ``UNLOCK_MARGIN_S``."""
    now = now or _now()
    expires = dt.datetime.fromisoformat(held["expires_at"])
    pid, where = held.get("pid"), held.get("host", "?")
    if expires <= now:
        return False, f"its lease expired at {held['expires_at']}"
    if pid and where == host():
        gone = holder_gone(held)
        if gone:
            return False, f"its process, pid {pid} on {where}, is gone: {gone}"
        return True, f"its process, pid {pid} on {where}, is running"
    renewed = dt.datetime.fromisoformat(held.get("renewed_at") or held["claimed_at"])
    ttl_s = float(held.get("ttl_s") or (expires - renewed).total_seconds())
    age, limit = (now - renewed).total_seconds(), _beat_interval(ttl_s) + UNLOCK_MARGIN_S
    who = f"pid {pid} on {where}" if pid else f"{where}, no pid recorded"
    if age <= limit:
        return True, (f"it was renewed {age:.0f} s ago ({who}), within one heartbeat interval "
                      f"({_beat_interval(ttl_s):.0f} s) plus {UNLOCK_MARGIN_S:.0f} s")
    return False, (f"it was last renewed {age:.0f} s ago ({who}), more than one heartbeat "
                   f"interval ({_beat_interval(ttl_s):.0f} s) plus {UNLOCK_MARGIN_S:.0f} s")


def unlock(ds: str, *, reason: str, operator: str) -> dict:
    """An operator removes ds's run lease (``nightrec unlock``). Refused with
    :class:`UnlockRefused` while its holder looks alive (:func:`holder_alive`) or when the lease
    changed meanwhile. Logged, and recorded at ``audit/unlock/<stamp>-<lease token>.json`` with
    who, why and the lease removed. Returns that record (``unlocked`` False: there was none)."""
    reason, operator = (reason or "").strip(), (operator or "").strip()
    if not reason or not operator:
        raise ValueError("unlock needs a reason and an operator")
    uri = layout.run_lock_uri(ds)
    held = holder(uri)
    if held is None:
        return {"unlocked": False, "ds": ds, "why": f"no run lease at {uri}"}
    now = _now()
    alive, why = holder_alive(held, now)
    if alive:
        log.warning("unlock of ds=%s by %s refused: %s holds it and %s", ds, operator,
                    held.get("owner"), why)
        raise UnlockRefused(f"refused: the run lease of ds={ds} is held by {held.get('owner')} "
                            f"and its holder looks alive: {why}. Stop that run, or wait for "
                            f"its lease to lapse ({held['expires_at']} unless renewed).")
    if not storage.delete_if_match(uri, held["etag"]):
        raise UnlockRefused(f"refused: the run lease of ds={ds} changed while unlocking "
                            "(renewed or taken over); look again")
    lease = {k: v for k, v in held.items() if k not in ("uri", "etag")}
    record = {"kind": "unlock", "unlocked": True, "ds": ds, "at": _iso(now),
              "operator": operator, "reason": reason, "why_free": why, "lease_uri": uri,
              "lease": lease, "by": {"host": host(), "pid": os.getpid()}}
    audit = layout.audit_uri("unlock", now.strftime("%Y%m%dT%H%M%SZ"),
                             layout.sanitize_token(str(held.get("token") or "none"), 40))
    storage.write_json(audit, record)
    log.warning("unlocked ds=%s by %s (%s): removed the lease of %s (%s); audit %s", ds,
                operator, reason, held.get("owner"), why, audit)
    return {**record, "audit": audit}
