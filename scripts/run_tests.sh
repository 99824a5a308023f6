#!/usr/bin/env bash
# `make test`: the whole suite as three pytest sessions side by side. Alone, the suite keeps one
# of the two cores idle much of the time (measured: 16 CPU-minutes in 17 wall-minutes), because
# its heaviest tests mostly wait on other processes (Airflow components, Celery workers, killed
# and restarted runs, an S3 outage, DAG runs in `nightrec run` subprocesses). Each session has its
# own SeaweedFS, Airflow DB and temp folder (tests/conftest.py), and the Postgres/Redis tests use
# their own database and queue names. Timings: benchmarks/RESULTS.md, "Test suite".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HEAVY=(tests/test_faults.py tests/test_scheduler.py tests/test_celery.py)
RUNS=(tests/test_e2e.py tests/test_cli_lifecycle.py)
mkdir -p .nightrec
# Bytecode: the suite starts hundreds of Python processes (nightrec run, run_dag.py, every task
# of the real schedulers and Celery workers, Airflow's components, dvc). uv installs the
# environment without .pyc files, and with PYTHONDONTWRITEBYTECODE set (as in this machine's
# environment) none is ever written, so each process compiled every module it imported from
# source again: Great Expectations 7 CPU-s, TensorFlow 8, Airflow 3 per process, measured.
# Here every process of the suite reads and writes one bytecode cache of its own (under
# .nightrec/, ignored by git; the venv and the sources stay as they are), so a module is
# compiled once, by the first process that imports it. Measured on one `nightrec run` test:
# 28 CPU-s without, 18 with a warm cache.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$PWD/.nightrec/pycache"
"$PY" -m pytest -q --durations=10 -p no:cacheprovider "${HEAVY[@]}" > .nightrec/test-heavy.log 2>&1 &
heavy=$!
"$PY" -m pytest -q --durations=10 -p no:cacheprovider "${RUNS[@]}" > .nightrec/test-runs.log 2>&1 &
runs=$!
ignore=()
for f in "${HEAVY[@]}" "${RUNS[@]}"; do ignore+=("--ignore=$f"); done
"$PY" -m pytest -q --durations=20 "${ignore[@]}"
rest=$?
wait "$runs"
runs_rc=$?
wait "$heavy"
heavy_rc=$?
for part in runs heavy; do
  echo
  echo "=== .nightrec/test-$part.log (run beside the rest) ==="
  cat ".nightrec/test-$part.log"
done
echo "exit codes: rest $rest, runs $runs_rc, heavy $heavy_rc"
exit $(( rest != 0 || runs_rc != 0 || heavy_rc != 0 ))
