# nightrec: `make demo` and `make test` are all a newcomer needs. Both run `make setup` first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DS     ?= 2026-11-28
SAMPLE := .nightrec/sample

.PHONY: setup demo test lint s3-up s3-down s3-status clean-state

setup: $(STAMP)

# Installs exactly what requirements.lock pins (uv resolves and installs; pip would take minutes),
# compiled to bytecode at install (--compile-bytecode: about 25 s on 2 cores): every process that
# imports TensorFlow, Great Expectations or Airflow (each task, each `python -m dvc`) would
# otherwise compile them from source again wherever PYTHONDONTWRITEBYTECODE is set.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$$(sed -n 's/^uv==//p' requirements.lock)"
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/nightrec sample --out $(SAMPLE)
	$(BIN)/nightrec run --ds $(DS) --interactions $(SAMPLE)/interactions.csv \
	    --items $(SAMPLE)/items.csv --users $(SAMPLE)/users.csv
	@echo "--- a few users' recommendations (nightrec recs --user ID) ---"
	@for u in 1 2 3; do $(BIN)/nightrec recs --user $$u -k 5 || exit 1; echo; done

test: setup
	scripts/run_tests.sh

lint: setup
	$(BIN)/ruff check nightrec tasks dags tests scripts benchmarks

s3-up: setup
	$(BIN)/python -m nightrec.store.s3server up

s3-down: setup
	$(BIN)/python -m nightrec.store.s3server down

s3-status: setup
	$(BIN)/python -m nightrec.store.s3server status

clean-state: s3-down
	rm -rf .nightrec
