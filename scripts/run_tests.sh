#!/usr/bin/env bash
# `make test`: the whole suite as two pytest sessions side by side. Alone, the suite keeps one of
# the two cores idle most of the time (measured: 16 CPU-minutes in 17 wall-minutes), because its
# heaviest tests mostly wait on other processes (Airflow components, Celery workers, killed and
# restarted runs, an S3 outage). Each session has its own SeaweedFS, Airflow DB and temp folder
# (tests/conftest.py), and the Postgres/Redis tests use their own database and queue names.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HEAVY=(tests/test_faults.py tests/test_scheduler.py tests/test_celery.py)
mkdir -p .nightrec
log=.nightrec/test-heavy.log
"$PY" -m pytest -q --durations=10 -p no:cacheprovider "${HEAVY[@]}" > "$log" 2>&1 &
heavy=$!
ignore=()
for f in "${HEAVY[@]}"; do ignore+=("--ignore=$f"); done
"$PY" -m pytest -q --durations=20 "${ignore[@]}"
rest=$?
wait "$heavy"
heavy_rc=$?
echo
echo "=== ${HEAVY[*]} (run beside the rest) ==="
cat "$log"
echo "exit codes: rest $rest, heavy $heavy_rc"
exit $(( rest != 0 || heavy_rc != 0 ))
