"""Scoring throughput benchmark: a thin wrapper of ``nightrec.dev.bench_scoring.main`` (see there).

    .venv/bin/python benchmarks/bench_scoring.py --users 200000 --items 20000 --dim 64 --k 100
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nightrec.dev.bench_scoring import main

if __name__ == "__main__":
    main()
