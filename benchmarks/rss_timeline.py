"""Where in a task its memory went: the task's log lines of a kept ``bench_dag.py`` run, each
with the process tree's RSS when it was written and the peak until the next line.

    .venv/bin/python benchmarks/rss_timeline.py WORK_DIR [--task train] [--min-gb 0]

``WORK_DIR``: a ``bench_dag.py --keep`` work dir (``run.log`` and ``rss.tsv``, the monitor's
samples every ~0.2 s). Lines between the task's ``[DAG TEST] starting`` and ``end task`` are
printed; ``--min-gb`` hides lines whose interval peaked below it.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dag import _log_time  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--task", default="train")
    parser.add_argument("--min-gb", type=float, default=0.0)
    args = parser.parse_args(argv)
    samples = [
        tuple(map(float, line.split("\t")))
        for line in (args.work / "rss.tsv").read_text().splitlines()
        if line
    ]
    times = [s[0] for s in samples]
    lines, inside = [], False
    for line in (args.work / "run.log").read_text(errors="replace").splitlines():
        if f"starting task_id={args.task} " in line:
            inside = True
        if inside and (t := _log_time(line)) is not None:
            lines.append((t, line))
        if inside and f"end task task_id={args.task} " in line:
            break
    if not lines:
        print(f"no log lines of task {args.task}")
        return 1
    for (t, line), nxt in zip(lines, [*lines[1:], (lines[-1][0] + 0.5, "")], strict=True):
        lo, hi = bisect.bisect_left(times, t), bisect.bisect_right(times, nxt[0])
        now = samples[min(lo, len(samples) - 1)][1] / 2**30
        peak = max((s[1] for s in samples[lo : hi + 1]), default=0) / 2**30
        if peak >= args.min_gb:
            print(f"{now:6.2f} {peak:6.2f}  {line[:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
