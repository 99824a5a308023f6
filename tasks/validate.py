"""Step 3, validate: the data contracts. A broken contract stops the run before any training.

Suites are JSON in expectations/, one per table contract; their ``$PARAMETER`` bounds come from
params.yaml and the run's ds (:func:`suite_parameters`):

- ``raw_interactions`` (``validate.raw_suite``): ingest's raw-string table. Each raw row is one
  line (or Parquet row) of one file, parse errors are known codes, and at most
  ``validate.max_invalid_fraction`` of rows lack a user, item or timestamp or could not be split.
- ``clean_interactions`` (``validate.suite``): the cleaned interactions (unique (user, item),
  ratings and timestamps in range, dense indices).
- ``split`` (``validate.split_suite``): the train/valid/test parts as one table with a ``split``
  column; tasks/versioning.py runs it after ``dvc repro`` and before ``dvc push``, together with
  :func:`split_problems` (the leakage checks GE cannot express per user).
- ``recommendations``: the published table (tasks/publish.py).

How suites run: GE's SQL execution engine over DuckDB (a SQLAlchemy engine through
``duckdb-engine``) on a view of the table's local Parquet files, under the step's DuckDB budget
(``engine.connect("validate")``: memory limit, threads, spill folder). Every expectation sees
every row and no table is ever a pandas frame, at 100M rows too; a report's ``rows_checked``
says how many. A pandas frame (tests, small tables) is written to a temporary Parquet file and
checked the same way. As in pandas, a float NaN counts as missing (the view turns it into NULL).

This step runs the raw and clean suites and checks that the share of raw rows quarantined as
*invalid* (see nightrec/core/schema.py) is at most ``validate.max_invalid_fraction``. Every check runs
before the verdict, so one report names every failure.

Outputs: ``runs/ds=<ds>/validate/report.json`` (the verdict, the quarantine check, each suite's
failures with observed values) and, for every suite a step ran for the ds, GE's full result at
``reports/ds=<ds>/validations/<suite>.json``, from which the ds's Data Docs site
(``reports/ds=<ds>/data_docs/index.html``) is rebuilt each time a suite is recorded: one GE
index over all of the ds's suites. On failure the task raises :class:`ContractError` naming
each failing expectation and what was observed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from nightrec.core import engine, schema, settings
from nightrec.core.errors import PermanentError
from nightrec.core.records import Cleaned, Validated
from nightrec.store import layout, storage

PARAMS = [
    "validate.max_invalid_fraction",
    "validate.min_rows",
    "validate.raw_suite",
    "validate.suite",
    "validate.split_suite",
    "clean.min_rating",
    "clean.max_rating",
    "clean.min_timestamp",
]
SITE = "nightrec"
TEMPORAL_SPLITS = ("leave_last_fraction", "leave_last_n", "global_time")
SPLIT_PARTS = ("train", "valid", "test")
log = logging.getLogger(__name__)

# What a suite can check: a frame (small tables: tests, notebooks), or local Parquet (a file, or
# a glob such as '<dir>/bucket=*/*.parquet' for a bucketed table).
Table = pd.DataFrame | str | Path


class ContractError(PermanentError):
    """The data broke its contract; the message lists every failure."""


class CheckError(PermanentError):
    """A check raised instead of judging the data (the engine failed, e.g. DuckDB out of
    memory): not a broken contract, and rerunning with the same budget fails the same way."""


def unjudged(report: dict) -> bool:
    """True when the report failed only because checks raised (every failure carries an
    ``exception``): nothing says the data broke its contract."""
    q = report.get("quarantine", {"success": True})
    failures = [f for s in (report.get("suites") or {"clean": report.get("expectations", {})}
                            ).values() for f in s.get("failures", [])]
    return (bool(failures) and q["success"] and not report.get("problems")
            and all("exception" in f["observed"] for f in failures))


def load_suite(path: Path):
    """Load a suite JSON into a gx.ExpectationSuite, refusing one GE would silently shorten."""
    import great_expectations as gx

    spec = json.loads(path.read_text())
    suite = gx.ExpectationSuite(**spec)
    if len(suite.expectations) != len(spec["expectations"]):
        raise ContractError(
            f"{path}: GE loaded {len(suite.expectations)} of {len(spec['expectations'])} "
            "expectations; an entry is invalid"
        )
    return suite


def _context(docs_dir: Path | None = None):
    """An in-memory GE context, progress bars off, with a Data Docs site in ``docs_dir``."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name=SITE, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return ctx


# --- DuckDB under GE -----------------------------------------------------------------------------


@contextlib.contextmanager
def _connection(con=None) -> Iterator[Any]:
    """``con`` itself, or a new connection under the validate step's DuckDB budget."""
    if con is not None:
        yield con
    else:
        with engine.connect("validate") as new:
            yield new


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _parquet(files: str | Path) -> str:
    """SQL reading local Parquet ``files`` (a path or a glob). Hive partitioning is off: a
    bucketed table's ``bucket=NNN`` folders must not add a column the contract does not have."""
    return f"SELECT * FROM read_parquet({engine.quote(files)}, hive_partitioning = false)"


def _create_view(con, name: str, select_sql: str) -> str:
    """A view ``name`` over ``select_sql`` in which a float NaN reads as NULL, as pandas (and so
    the suites as first written) take it: clean's implicit ratings are NaN. Returns the name."""
    columns = con.execute(f"DESCRIBE {select_sql}").fetchall()
    floats = [c for c, t, *_ in columns if t in ("DOUBLE", "FLOAT", "REAL")]
    if floats:
        nan_free = ", ".join(f"CASE WHEN isnan({_ident(c)}) THEN NULL ELSE {_ident(c)} END AS "
                             f"{_ident(c)}" for c in floats)
        select_sql = f"SELECT * REPLACE ({nan_free}) FROM ({select_sql})"
    con.execute(f"CREATE OR REPLACE VIEW {_ident(name)} AS {select_sql}")
    return name


def _local(table: Table, tmp: str, name: str) -> str | Path:
    """Local Parquet of ``table``: a frame is written to ``tmp``; a path or glob is itself."""
    if isinstance(table, pd.DataFrame):
        path = Path(tmp) / f"{name}.parquet"
        table.to_parquet(path, index=False)
        return path
    return table


def _sql_datasource(ctx, con):
    """A GE SQL datasource whose queries run on ``con``'s DuckDB database.

    Why the wrapper: duckdb-engine 0.17 hands SQLAlchemy the DuckDB connection itself as every
    cursor, and a DuckDB connection holds one pending result. GE's ``execute_query`` returns a
    result after leaving ``with engine.connect()``, whose close rolls back the connection's
    transaction: that ROLLBACK runs on the same DuckDB connection and replaces the pending
    result, so ``fetchall()`` is ``[]`` and every metric fails with "list index out of range"
    (great_expectations#10738, #11579). Each cursor of ours is its own DuckDB cursor
    (``con.cursor()``: a handle on the same database), whose result the rollback leaves alone.
    """
    import duckdb_engine

    class _Connection(duckdb_engine.ConnectionWrapper):
        def __init__(self, handle):
            super().__init__(handle)
            self._handle = handle

        def cursor(self):
            return duckdb_engine.CursorWrapper(self._handle.cursor(), self)

    # every SQLAlchemy connection is a cursor of con: the same database, views and budget
    return ctx.data_sources.add_sql("nightrec", connection_string="duckdb:///:memory:",
                                    kwargs={"creator": lambda: _Connection(con.cursor())})


def _exception_message(info: Any) -> str | None:
    """The error a failed expectation's metric raised: GE 1.x keeps it either flat
    (``{"raised_exception": True, "exception_message": ...}``) or per metric (a dict of
    those keyed by the metric's id)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    messages = [str(v.get("exception_message")) for v in info.values()
                if isinstance(v, dict) and v.get("raised_exception")]
    return "; ".join(messages) or None


def _validate_view(
    con, view: str, suite_path: Path, parameters: dict[str, Any], docs_dir: Path | None,
    run_name: str | None,
) -> dict:
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    ctx = _context(docs_dir)
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[SITE])] if (
        docs_dir is not None) else []
    suite = ctx.suites.add(load_suite(suite_path))
    source = _sql_datasource(ctx, con)
    try:
        batch = source.add_table_asset(suite.name, table_name=view).add_batch_definition_whole_table(
            "whole")
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite.name}_check", data=batch, suite=suite)
        )
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"{suite.name}_checkpoint", validation_definitions=[vd], actions=actions,
            result_format="SUMMARY",
        ))
        outcome = checkpoint.run(expectation_parameters=parameters,
                                 run_id=RunIdentifier(run_name=run_name) if run_name else None)
    finally:  # no pooled cursor outlives con
        source.get_execution_engine().engine.dispose()
        source.get_engine().dispose()
    key, res = next(iter(outcome.run_results.items()))
    failures = []
    for r in res.results:
        if not r.success:
            kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
            observed = {
                k: r.result.get(k)
                for k in ("observed_value", "unexpected_count", "unexpected_percent",
                          "partial_unexpected_list")
                if r.result.get(k) is not None
            }
            error = _exception_message(r.exception_info)
            if error:
                observed["exception"] = error
            failures.append(
                {"expectation": r.expectation_config.type, "kwargs": kwargs, "observed": observed}
            )
    (rows,) = con.execute(f"SELECT count(*) FROM {_ident(view)}").fetchone()
    return {
        "suite": suite.name,
        "success": bool(res.success),
        "n_expectations": len(res.results),
        "rows_checked": int(rows),
        "failures": failures,
        "ge_result": {"key": list(key.to_tuple()),
                      "result": json.loads(ctx.validation_results_store.serialize(res))},
    }


def run_suite(
    table: Table, suite_path: Path, parameters: dict[str, Any], docs_dir: Path | None = None,
    *, run_name: str | None = None, con=None,
) -> dict:
    """Run one GE suite on a table (a frame, or local Parquet: a file or a glob), every row of
    it, in DuckDB. Returns ``{suite, success, n_expectations, rows_checked, failures: [...],
    ge_result}``; ``ge_result`` (``{"key", "result"}``, JSON) is GE's whole result, for
    :func:`record_results`, which pops it. ``rows_checked``: the rows every expectation saw.

    With ``docs_dir``, GE also builds a Data Docs site (HTML) for this one validation there.
    ``run_name`` (the ds, say) names the validation run in Data Docs. ``con``: a DuckDB
    connection to run on (default: a new one under the validate step's budget).
    """
    name = json.loads(Path(suite_path).read_text())["name"]
    with _connection(con) as c, tempfile.TemporaryDirectory(prefix="nightrec-suite-") as tmp:
        view = _create_view(c, name, _parquet(_local(table, tmp, name)))
        return _validate_view(c, view, suite_path, parameters, docs_dir, run_name)


# --- Data Docs ------------------------------------------------------------------------------------


def results_prefix(ds: str) -> str:
    """Where GE's full result of each suite run for ``ds`` is kept (one JSON per suite)."""
    return layout.report_folder(ds, "validations")


def docs_prefix(ds: str) -> str:
    return layout.report_folder(ds, "data_docs")


def _suite_files() -> dict[str, Path]:
    """Suite name -> its JSON file, for every suite in expectations/."""
    out = {}
    for path in sorted((settings.project_root() / "expectations").glob("*.json")):
        out[json.loads(path.read_text())["name"]] = path
    return out


def build_data_docs(results: list[dict], docs_dir: Path) -> Path:
    """Build one GE Data Docs site in ``docs_dir`` from GE results (``ge_result`` dicts): an
    index over every validation given and every suite in expectations/. Returns the index."""
    from great_expectations.data_context.types.resource_identifiers import (
        ValidationResultIdentifier,
    )

    ctx = _context(docs_dir)
    for path in _suite_files().values():
        ctx.suites.add(load_suite(path))
    store = ctx.validation_results_store
    for r in results:
        store.set(ValidationResultIdentifier.from_tuple(tuple(r["key"])),
                  store.deserialize(json.dumps(r["result"])))
    ctx.build_data_docs(site_names=[SITE])
    return docs_dir / "index.html"


def record_results(ds: str, reports: list[dict]) -> str:
    """Keep each report's GE result for ``ds`` (popping ``ge_result`` from the report) and
    rebuild and upload the ds's Data Docs site from every result kept for it. Returns the
    site's index URI. Files of the site that the new build no longer has are deleted after the
    new ones are written, so the index never points at a missing page."""
    for report in reports:
        ge = report.pop("ge_result", None)
        if ge is not None:
            storage.write_json(layout.report_uri(ds, "validations", f"{report['suite']}.json"),
                               ge)
    results = [storage.read_json(u) for u in storage.list_uris(results_prefix(ds))
               if u.endswith(".json")]
    prefix = docs_prefix(ds)
    with tempfile.TemporaryDirectory(prefix="nightrec-docs-") as tmp:
        build_data_docs(results, Path(tmp))
        written = set()
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                uri = prefix + f.relative_to(tmp).as_posix()
                storage.upload_from(f, uri)
                written.add(uri)
    storage.delete([u for u in storage.list_uris(prefix) if u not in written])
    return layout.report_uri(ds, "data_docs", "index.html")


# --- the checks -----------------------------------------------------------------------------------


def suite_parameters(p: settings.StepParams, ds: str) -> dict[str, Any]:
    end_of_day = (pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)).timestamp() - 1
    return {
        "min_rows": p["validate.min_rows"],
        "min_timestamp": int(pd.Timestamp(p["clean.min_timestamp"], tz="UTC").timestamp()),
        "max_timestamp": int(end_of_day),
        "min_rating": p["clean.min_rating"],
        "max_rating": p["clean.max_rating"],
        "min_valid_fraction": 1.0 - float(p["validate.max_invalid_fraction"]),
    }


def _suite(p: settings.StepParams, key: str) -> Path:
    return settings.project_root() / p[key]


def check_raw(raw: Table, *, ds: str, p: settings.StepParams, con=None) -> dict[str, Any]:
    """The raw suite on ingest's table (a frame or local Parquet; a :func:`run_suite` result)."""
    return run_suite(raw, _suite(p, "validate.raw_suite"), suite_parameters(p, ds), run_name=ds,
                     con=con)


def check_contract(
    clean: Table, stats: dict, *, ds: str, p: settings.StepParams,
    raw: Table | dict | None = None, docs_dir: Path | None = None, con=None,
) -> dict[str, Any]:
    """Pure-ish core (runs GE in DuckDB). Returns the report; ``report['success']`` is the verdict.

    ``clean``: the cleaned interactions, a frame or local Parquet (a file or a glob).
    ``raw``: ingest's table (a frame or local Parquet), or the result of :func:`check_raw` on
    it, or None to skip the raw suite.
    ``report['expectations']`` is the clean suite's result; ``report['suites']`` has every
    suite run (raw and clean), each with its ``ge_result``.
    """
    max_frac = p["validate.max_invalid_fraction"]
    quarantine_ok = stats["invalid_fraction"] <= max_frac
    params = suite_parameters(p, ds)
    suites = {}
    with _connection(con) as c:
        if isinstance(raw, dict):
            suites["raw"] = raw
        elif raw is not None:
            suites["raw"] = check_raw(raw, ds=ds, p=p, con=c)
        suites["clean"] = run_suite(clean, _suite(p, "validate.suite"), params,
                                    docs_dir=docs_dir, run_name=ds, con=c)
    return {
        "ds": ds,
        "success": quarantine_ok and all(s["success"] for s in suites.values()),
        "quarantine": {
            "success": quarantine_ok,
            "invalid_fraction": stats["invalid_fraction"],
            "max_invalid_fraction": max_frac,
            "by_reason": stats["by_reason"],
        },
        "expectations": suites["clean"],
        "suites": suites,
    }


def describe_failure(report: dict) -> str:
    parts = []
    q = report.get("quarantine", {"success": True})
    if not q["success"]:
        parts.append(
            f"invalid rows {q['invalid_fraction']:.2%} > max {q['max_invalid_fraction']:.2%} "
            f"(by reason: {q['by_reason']})"
        )
    suites = report.get("suites") or {"clean": report["expectations"]}
    for s in suites.values():
        for f in s["failures"]:
            parts.append(
                f"{s['suite']}: {f['expectation']}({f['kwargs']}) observed {f['observed']}")
    parts += report.get("problems", [])
    return "data contract broken: " + "; ".join(parts)


def _split_view(con, files: dict[str, str | Path]) -> tuple[str, list[str]]:
    """The view ``split``: every part's rows with a ``split`` column naming the part. Returns
    the view and the parts in it, in ``SPLIT_PARTS`` order (a part whose files are missing is
    not in it)."""
    names = [n for n in SPLIT_PARTS
             if n in files and glob.glob(str(files[n]), recursive=True)]
    if not names:
        raise ContractError(f"split: no Parquet file matches any part of {files}")
    union = " UNION ALL BY NAME ".join(
        f"SELECT *, '{n}' AS {_ident(schema.SPLIT)} FROM ({_parquet(files[n])})" for n in names)
    return _create_view(con, "split", union), names


def _split_problems_sql(con, view: str, names: list[str], *, method: str) -> list[str]:
    """:func:`split_problems` on the view of :func:`_split_view`, in DuckDB (every row, under
    the connection's memory limit: the pair check is one spilling GROUP BY)."""
    u, i, ts, part = (_ident(c) for c in (schema.USER_IDX, schema.ITEM_IDX, schema.TIMESTAMP,
                                          schema.SPLIT))
    problems = []
    # A pair's parts as a bit set; a pair in several parts is reported for each two parts
    # that are next to each other among its own (train+valid+test: train/valid, valid/test).
    index = "CASE " + " ".join(f"WHEN {part} = '{n}' THEN {k}" for k, n in enumerate(names)) + \
        " END"
    pairs = []
    for a_i in range(len(names)):
        for b_i in range(a_i + 1, len(names)):
            between = sum(1 << k for k in range(a_i + 1, b_i))
            pairs.append(((a_i, b_i), f"(m & {1 << a_i}) != 0 AND (m & {1 << b_i}) != 0 AND "
                                      f"(m & {between}) = 0"))
    if pairs:
        counts = ", ".join(f"count(*) FILTER (WHERE {cond}), min(k) FILTER (WHERE {cond})"
                           for _, cond in pairs)
        row = con.execute(f"""
            SELECT {counts} FROM (
                SELECT k, bit_or(1 << p) AS m FROM (
                    SELECT ({u}::BIGINT * 4294967296) | {i}::BIGINT AS k, {index} AS p
                    FROM {_ident(view)} WHERE {u} IS NOT NULL AND {i} IS NOT NULL)
                GROUP BY k HAVING count(DISTINCT p) > 1)""").fetchone()
        for n, ((a_i, b_i), _) in enumerate(pairs):
            hits, key = row[2 * n], row[2 * n + 1]
            if hits:
                problems.append(f"{hits} (user_idx, item_idx) pairs are in both {names[a_i]} "
                                f"and {names[b_i]}, e.g. ({key >> 32}, {key & 0xFFFFFFFF})")
    if method not in TEMPORAL_SPLITS:
        return problems
    sizes = dict(con.execute(
        f"SELECT {part}, count(*) FROM {_ident(view)} GROUP BY {part}").fetchall())
    later = [n for n in ("valid", "test") if sizes.get(n)]
    if method == "global_time":
        if not sizes.get("train"):
            return problems
        for n in later:
            (bad,) = con.execute(
                f"SELECT max({ts}) FILTER (WHERE {part} = 'train') > "
                f"min({ts}) FILTER (WHERE {part} = '{n}') FROM {_ident(view)}").fetchone()
            if bad:
                problems.append(f"global_time: train has events after the first {n} event")
        return problems
    # per user: (earlier part, later part) whose last and first events must be in order
    rules = [("train", n) for n in later]
    if {"valid", "test"} <= set(names) and sizes.get("valid"):
        rules.append(("valid", "test"))
    if not rules:
        return problems
    checks = ", ".join(
        f"count(*) FILTER (WHERE last_{e} > first_{n}), "
        f"min({u}) FILTER (WHERE last_{e} > first_{n})" for e, n in rules)
    per_user = ", ".join(
        [f"max({ts}) FILTER (WHERE {part} = '{e}') AS last_{e}" for e in {e for e, _ in rules}]
        + [f"min({ts}) FILTER (WHERE {part} = '{n}') AS first_{n}"
           for n in {n for _, n in rules}])
    row = con.execute(f"""
        SELECT {checks} FROM (
            SELECT {u}, {per_user} FROM {_ident(view)} WHERE {u} IS NOT NULL GROUP BY {u})
        """).fetchone()
    for n, (e, later_part) in enumerate(rules):
        bad, user = row[2 * n], row[2 * n + 1]
        if bad:
            problems.append(f"{method}: {bad} users have {e} events after their first "
                            f"{later_part} event, e.g. user_idx {int(user)}")
    return problems


def _write_parts(parts: dict[str, pd.DataFrame], tmp: str) -> dict[str, Path]:
    out = {}
    for name, frame in parts.items():
        out[name] = Path(tmp) / f"{name}.parquet"
        frame.to_parquet(out[name], index=False)
    return out


def split_problems(parts: dict[str, pd.DataFrame], *, method: str) -> list[str]:
    """The split's leakage checks: no (user, item) pair in two parts and, for the temporal
    methods, no training on the future (per user for the per-user methods; globally for
    ``global_time``). Returns one line per broken rule (empty when the split is sound).

    Frames (small: tests) go through the same DuckDB SQL as :func:`check_split_files`."""
    with engine.connect("validate") as con, tempfile.TemporaryDirectory(
            prefix="nightrec-split-") as tmp:
        view, names = _split_view(con, _write_parts(parts, tmp))
        return _split_problems_sql(con, view, names, method=method)


def check_split_files(
    globs: dict[str, str | Path], *, ds: str, method: str, p: settings.StepParams,
    params: dict | None = None,
) -> dict[str, Any]:
    """The split suite on the parts' local Parquet files (``{"train": '<dir>/bucket=*/
    train.parquet', "valid": ..., "test": ...}``, each a path or a glob) as one table with a
    ``split`` column, plus :func:`split_problems`, all in DuckDB on every row under the
    validate step's budget (``params``' ``resources``; default params.yaml). A part whose glob
    matches no file counts as empty. Returns the report (``success``, ``expectations``,
    ``suites``, ``problems``)."""
    with engine.connect("validate", params) as con:
        view, names = _split_view(con, globs)
        ge = _validate_view(con, view, _suite(p, "validate.split_suite"),
                            suite_parameters(p, ds), None, ds)
        problems = _split_problems_sql(con, view, names, method=method)
    return {"ds": ds, "success": ge["success"] and not problems, "expectations": ge,
            "suites": {"split": ge}, "problems": problems}


def check_split(
    parts: dict[str, pd.DataFrame], *, ds: str, method: str, p: settings.StepParams,
    params: dict | None = None,
) -> dict[str, Any]:
    """:func:`check_split_files` on the parts as frames (small: tests), through temporary
    Parquet files."""
    with tempfile.TemporaryDirectory(prefix="nightrec-split-") as tmp:
        return check_split_files(_write_parts(parts, tmp), ds=ds, method=method, p=p,
                                 params=params)


def _download_table(uri: str, dest: Path) -> str:
    """``storage.download_table``, a table without files being a broken contract."""
    try:
        return storage.download_table(uri, dest)
    except FileNotFoundError as e:
        raise ContractError(f"{uri}: the table has no files") from e


def run(cleaned: Cleaned, params: dict | None = None, run_id: str | None = None) -> Validated:
    """The contract, then (when it holds) the input drift checks against the previous ds
    (tasks/drift.py): a ``stop`` check that breaks raises DriftError, a ``warn`` one is logged
    and recorded. ``run_id``: names the drift alert record."""
    from nightrec.tasks import drift

    ds = cleaned.ds
    params = params if params is not None else settings.load_params()
    p = settings.step_params(PARAMS, params)
    raw_uri = cleaned.raw
    stats = storage.read_json(cleaned.stats)
    with tempfile.TemporaryDirectory(prefix="nightrec-validate-", dir=engine.spill_root()) as tmp, \
            engine.connect("validate", params) as con:
        raw = None
        if storage.exists(raw_uri):
            local = _download_table(raw_uri, Path(tmp) / "raw")
            raw = check_raw(local, ds=ds, p=p, con=con)
            os.remove(local)  # one table on disk at a time
        clean = _download_table(cleaned.interactions, Path(tmp) / "clean")
        report = check_contract(clean, stats, ds=ds, p=p, raw=raw, con=con)
        if report["success"]:
            report["drift"] = drift.run_checks(ds, clean, stats, con=con, params=params,
                                               run_suite=run_suite, run_id=run_id)
            if report["drift"].get("suite"):
                report["suites"]["drift"] = report["drift"].pop("suite")
    report["data_docs"] = record_results(ds, list(report["suites"].values()))
    out = Validated(ds=ds, interactions=cleaned.interactions, items=cleaned.items,
                    users=cleaned.users, report=layout.run_uri(ds, "validate", "report.json"))
    storage.write_json(out.report, report)
    if not report["success"]:
        if unjudged(report):
            budget = engine.budget("validate", params)["memory_gb"]
            raise CheckError(
                "validate: checks raised instead of judging the data (not a broken contract); "
                f"if DuckDB ran out of memory, raise resources.steps.validate.memory_gb (now "
                f"{budget} GB): " + describe_failure(report).removeprefix("data contract broken: "))
        raise ContractError(describe_failure(report))
    if report["drift"]["stop"]:
        raise drift.DriftError(f"{report['drift']['message']}; the run stops before training "
                               "(monitor.drift: a check's action 'warn' lets it go on)")
    log.info(
        "contract holds: %s expectations passed on %s rows, invalid fraction %.4f",
        {s["suite"]: s["n_expectations"] for s in report["suites"].values()},
        {s["suite"]: s["rows_checked"] for s in report["suites"].values()},
        stats["invalid_fraction"],
    )
    return out


__all__ = ["ContractError", "check_contract", "check_raw", "check_split", "check_split_files",
           "load_suite", "record_results", "run", "run_suite", "split_problems"]
