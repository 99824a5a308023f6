"""The out-of-core engine of the data steps: a DuckDB connection under the step's memory budget.

Every data step (clean, validate, augment, seen, split) that touches whole tables does it in
DuckDB, not pandas. DuckDB won the measurement on this workload (benchmarks/bench_engines.py,
RESULTS.md "Which out-of-core engine"): at 30M events it kept to its memory limit where Polars'
streaming engine took 7 GB. ``connect(step)`` gives a connection with

- ``memory_limit`` = ``resources.memory_gb`` (or ``resources.steps.<step>.memory_gb``);
- ``threads`` = ``resources.threads`` (0: one per core);
- ``temp_directory`` under ``spill_root()/<step>-<pid>`` (``$NIGHTREC_SPILL``, default
  ``$NIGHTREC_STATE/spill``), where joins, sorts and
  window functions spill when the budget is reached, removed when the connection closes;
- insertion order not preserved (``preserve_insertion_order=false``) unless a query says
  ``ORDER BY``: that is what lets DuckDB stream large copies.

Nothing here downloads: DuckDB reads local files only (the steps download what they read from
S3 first), and extension autoloading is off, so a missing extension is an error, not a fetch.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from nightrec.core import settings

STEPS = ("ingest", "clean", "validate", "augment", "seen", "split", "monitor")


def budget(step: str, params: dict[str, Any] | None = None) -> dict[str, float]:
    """``{"memory_gb", "threads"}`` for ``step``: its override in ``resources.steps``, else the
    section's defaults."""
    if step not in STEPS:
        raise ValueError(f"resources: unknown step {step!r} (one of {STEPS})")
    params = params if params is not None else settings.load_params()
    res = params.get("resources") or {}
    own = (res.get("steps") or {}).get(step) or {}
    unknown = set((res.get("steps") or {})) - set(STEPS)
    if unknown:
        raise ValueError(f"resources.steps: unknown steps {sorted(unknown)} (known: {STEPS})")
    memory_gb = float(own.get("memory_gb", res.get("memory_gb", 1.0)))
    threads = int(own.get("threads", res.get("threads", 2)))
    if memory_gb <= 0 or threads < 0:
        raise ValueError(f"resources for {step}: memory_gb must be > 0 and threads >= 0, got "
                         f"{memory_gb}, {threads}")
    return {"memory_gb": memory_gb, "threads": threads or (os.cpu_count() or 1)}


def spill_root() -> Path:
    """The engine's spill folders and the data steps' local scratch: ``$NIGHTREC_SPILL`` (a
    worker's fast local disk, say), default ``$NIGHTREC_STATE/spill``."""
    env = os.environ.get("NIGHTREC_SPILL")
    path = Path(env) if env else settings.state_dir() / "spill"
    path.mkdir(parents=True, exist_ok=True)
    return path


def spill_dir(step: str) -> Path:
    return spill_root() / f"{step}-{os.getpid()}"


@contextlib.contextmanager
def connect(step: str, params: dict[str, Any] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection under ``step``'s budget; its spill folder goes with it."""
    b = budget(step, params)
    spill = spill_dir(step)
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={
        "memory_limit": f"{int(b['memory_gb'] * 1024)}MB",
        "threads": int(b["threads"]),
        "temp_directory": str(spill),
        "preserve_insertion_order": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    })
    try:
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def bucket_sql(column: str, n_buckets: int) -> str:
    """SQL for the user-hash bucket of ``column`` (a stripped user id): the low 64 bits of its
    md5, little-endian, modulo ``n_buckets``; :func:`bucket_of` is the same in Python."""
    return f"(md5_number_lower({column}) % {int(n_buckets)})"


def bucket_of(user_id: str, n_buckets: int) -> int:
    """The bucket of one user id, as :func:`bucket_sql` computes it."""
    digest = hashlib.md5(str(user_id).encode("utf-8")).digest()
    return int.from_bytes(digest[8:], "little") % int(n_buckets)


def quote(path: str | Path) -> str:
    """A path as a SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def release_memory() -> None:
    """Hand freed memory back to the OS: Arrow's pool, and glibc's arenas. Every task of a
    ``nightrec run`` shares one process (``dag.test()``), so what one step freed but did not
    return is still resident under the next. In clean, a batch's parse
    leaves hundreds of MB of freed blocks the engine's budget would otherwise sit on top of
    (measured at 10M rows: 528 MB resident after the batches with Arrow's default mimalloc pool,
    412 MB after its release, 363 MB with the system allocator trimmed, which clean uses)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
