"""How often a short process that has just read Parquet aborts at exit, by read path.

Each trial starts a fresh Python that imports pyarrow alone, reads one small Parquet object
(bytes in memory, as every step reads from S3) twice, writes a copy with ``pq.write_table`` and
exits: once through ``pq.read_table`` (Arrow's dataset scanner; what ``pd.read_parquet`` calls),
once through ``pq.ParquetFile(pa.BufferReader(data)).read()``, the one call
``nightrec.store.storage.parquet_table`` makes (``parquet_frame`` converts its result to pandas;
tests/test_parquet_reads.py checks both return what the scanner returned), and once with
``use_threads=False``, as the reader (``nightrec.table.reader``) decodes. Each child also
prints how many threads its reads started (``/proc/self/task``): the abort needs an Arrow pool
thread, so a path that starts none cannot abort that way. With nightrec's
modules imported first (3 s of imports under load), neither threaded path aborted in 50 trials each:
the race needs the exit to follow the read closely, as in a short script. A process that exits
with SIGABRT ("terminate called without an active exception", apache/arrow#39862) counts as an
abort. The two paths alternate, so both see the same machine load; ``--load N`` keeps N busy
processes running beside them (the abort is a race at exit, more frequent on a loaded machine,
like CI running three pytest sessions on two cores).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_parquet_exit.py --trials 300 --load 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.dev.bench_scoring import machine
from nightrec.store import storage

CHILD = """
import io, os, sys
import pyarrow as pa
import pyarrow.parquet as pq
data = open(sys.argv[2], "rb").read()
before = len(os.listdir("/proc/self/task"))
if sys.argv[1] == "pq.read_table":
    tables = [pq.read_table(io.BytesIO(data)) for _ in range(2)]
elif sys.argv[1] == "pq.ParquetFile.read":  # the one call storage.parquet_table makes
    tables = [pq.ParquetFile(pa.BufferReader(data)).read() for _ in range(2)]
else:  # the reader's (nightrec.table.reader): decoded on the calling thread
    tables = [pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False) for _ in range(2)]
print(len(os.listdir("/proc/self/task")) - before)
pq.write_table(pa.concat_tables(tables), sys.argv[3])
"""
PATHS = ("pq.read_table", "pq.ParquetFile.read", "ParquetFile.read(use_threads=False)")


def _busy(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=300, help="processes per read path")
    ap.add_argument("--load", type=int, default=0, help="busy processes running beside them")
    args = ap.parse_args(argv)
    print(machine(), flush=True)
    import pyarrow

    print(f"pyarrow {pyarrow.__version__}, pandas {pd.__version__}, python "
          f"{sys.version.split()[0]}; {args.trials} trials per path, load {args.load}", flush=True)
    rng = np.random.default_rng(0)
    n = 150
    frame = pd.DataFrame({"user_id": [f"u{i // 5:05d}" for i in range(n)],
                          "item_id": [f"i{i}" for i in range(n)],
                          "score": rng.random(n, dtype=np.float32),
                          "rank": np.arange(n) % 5 + 1})
    stop = mp.Event()
    workers = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.load)]
    for w in workers:
        w.start()
    aborts, other = dict.fromkeys(PATHS, 0), dict.fromkeys(PATHS, 0)
    threads = {path: set() for path in PATHS}  # threads the reads started, as the child saw
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "part.parquet"
            src.write_bytes(storage.parquet_bytes(frame))
            for trial in range(args.trials):
                for path in PATHS:
                    done = subprocess.run([sys.executable, "-c", CHILD, path, str(src),
                                           str(Path(tmp) / "out.parquet")],
                                          capture_output=True, text=True, check=False)
                    rc = done.returncode
                    if done.stdout.strip():
                        threads[path].add(int(done.stdout.split()[0]))
                    if rc == -6:
                        aborts[path] += 1
                    elif rc != 0:
                        other[path] += 1
                if (trial + 1) % 50 == 0:
                    print(f"  after {trial + 1} trials: aborts {aborts}", flush=True)
    finally:
        stop.set()
        for w in workers:
            w.join()
    out = {"trials": args.trials, "load": args.load, "aborts": aborts, "other_failures": other,
           "threads_started": {path: sorted(v) for path, v in threads.items()},
           "wall_s": round(time.monotonic() - t0, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
