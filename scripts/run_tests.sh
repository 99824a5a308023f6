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
# of the real schedulers and Celery workers, Airflow's components, dvc). Without .pyc files each
# of them compiles what it imports from source again: Great Expectations 7 CPU-s, TensorFlow 8,
# Airflow 3 per process, measured. `make setup` compiles the environment at install
# (uv pip sync --compile-bytecode); this machine's environment sets PYTHONDONTWRITEBYTECODE,
# which would also keep the repo's own modules (and an environment installed before that flag)
# from ever being cached, so it is unset here: the first process to import a module writes its
# .pyc next to it (__pycache__/, ignored by git). Measured: benchmarks/RESULTS.md, "Test suite".
unset PYTHONDONTWRITEBYTECODE
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
