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

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nightrec.core import schema, settings
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
log = logging.getLogger(__name__)


class ContractError(PermanentError):
    """The data broke its contract; the message lists every failure."""


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
    from great_expectations.execution_engine import pandas_execution_engine

    # GE fingerprints every pandas batch under 1 GB (hash_pandas_object + md5) only to label
    # it: 7.5 s of a 20 s raw suite on 10M rows. The label is not worth it.
    pandas_execution_engine.HASH_THRESHOLD = 0
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


def run_suite(
    df: pd.DataFrame, suite_path: Path, parameters: dict[str, Any], docs_dir: Path | None = None,
    *, run_name: str | None = None,
) -> dict:
    """Run one GE suite on a frame. Returns ``{suite, success, n_expectations, failures: [...],
    ge_result}``; ``ge_result`` (``{"key", "result"}``, JSON) is GE's whole result, for
    :func:`record_results`, which pops it.

    With ``docs_dir``, GE also builds a Data Docs site (HTML) for this one validation there.
    ``run_name`` (the ds, say) names the validation run in Data Docs.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    ctx = _context(docs_dir)
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[SITE])] if (
        docs_dir is not None) else []
    suite = ctx.suites.add(load_suite(suite_path))
    asset = ctx.data_sources.add_pandas("nightrec").add_dataframe_asset(suite.name)
    batch = asset.add_batch_definition_whole_dataframe("whole")
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}_check", data=batch, suite=suite)
    )
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=f"{suite.name}_checkpoint", validation_definitions=[vd], actions=actions,
        result_format="SUMMARY",
    ))
    outcome = checkpoint.run(batch_parameters={"dataframe": df}, expectation_parameters=parameters,
                             run_id=RunIdentifier(run_name=run_name) if run_name else None)
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
            if r.exception_info and r.exception_info.get("raised_exception"):
                observed["exception"] = r.exception_info.get("exception_message")
            failures.append(
                {"expectation": r.expectation_config.type, "kwargs": kwargs, "observed": observed}
            )
    return {
        "suite": suite.name,
        "success": bool(res.success),
        "n_expectations": len(res.results),
        "failures": failures,
        "ge_result": {"key": list(key.to_tuple()),
                      "result": json.loads(ctx.validation_results_store.serialize(res))},
    }


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


def check_raw(raw: pd.DataFrame, *, ds: str, p: settings.StepParams) -> dict[str, Any]:
    """The raw suite on ingest's table (a :func:`run_suite` result)."""
    return run_suite(raw, _suite(p, "validate.raw_suite"), suite_parameters(p, ds), run_name=ds)


def check_contract(
    clean: pd.DataFrame, stats: dict, *, ds: str, p: settings.StepParams,
    raw: pd.DataFrame | dict | None = None, docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Pure-ish core (runs GE in memory). Returns the report; ``report['success']`` is the verdict.

    ``raw``: ingest's table, or the result of :func:`check_raw` on it (so that a caller can
    free the raw table before loading the clean one), or None to skip the raw suite.
    ``report['expectations']`` is the clean suite's result; ``report['suites']`` has every
    suite run (raw and clean), each with its ``ge_result``.
    """
    max_frac = p["validate.max_invalid_fraction"]
    quarantine_ok = stats["invalid_fraction"] <= max_frac
    params = suite_parameters(p, ds)
    suites = {}
    if isinstance(raw, pd.DataFrame):
        suites["raw"] = check_raw(raw, ds=ds, p=p)
    elif raw is not None:
        suites["raw"] = raw
    suites["clean"] = run_suite(clean, _suite(p, "validate.suite"), params, docs_dir=docs_dir,
                                run_name=ds)
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


def split_problems(parts: dict[str, pd.DataFrame], *, method: str) -> list[str]:
    """The split's leakage checks, vectorised: no (user, item) pair in two parts and, for the
    temporal methods, no training on the future (per user for the per-user methods; globally
    for ``global_time``). Returns one line per broken rule (empty when the split is sound)."""
    problems = []
    names = [n for n in ("train", "valid", "test") if n in parts]
    keys = np.concatenate([(parts[n][schema.USER_IDX].to_numpy(np.int64) << 32)
                           | parts[n][schema.ITEM_IDX].to_numpy(np.int64) for n in names])
    part = np.repeat(np.arange(len(names)), [len(parts[n]) for n in names])
    order = np.argsort(keys, kind="stable")  # one sort; a pair in two parts sits side by side
    keys, part = keys[order], part[order]
    shared = np.flatnonzero((keys[1:] == keys[:-1]) & (part[1:] != part[:-1]))
    for a_i, a in enumerate(names):
        for b_i in range(a_i + 1, len(names)):
            hit = shared[(part[shared] == a_i) & (part[shared + 1] == b_i)]
            if len(hit):
                u, i = keys[hit[0]] >> 32, keys[hit[0]] & 0xFFFFFFFF
                problems.append(f"{len(hit)} (user_idx, item_idx) pairs are in both {a} and "
                                f"{names[b_i]}, e.g. ({u}, {i})")
    del keys, part, order
    if method not in TEMPORAL_SPLITS:
        return problems
    train = parts["train"]
    for later in [n for n in ("valid", "test") if n in parts and len(parts[n])]:
        f = parts[later]
        if method == "global_time":
            if len(train) and train[schema.TIMESTAMP].max() > f[schema.TIMESTAMP].min():
                problems.append(f"global_time: train has events after the first {later} event")
            continue
        last_train = train.groupby(schema.USER_IDX)[schema.TIMESTAMP].max()
        first = f.groupby(schema.USER_IDX)[schema.TIMESTAMP].min()
        common = first.index.intersection(last_train.index)
        bad = common[(last_train[common] > first[common]).to_numpy()]
        if len(bad):
            problems.append(f"{method}: {len(bad)} users have train events after their first "
                            f"{later} event, e.g. user_idx {int(bad[0])}")
    if method != "global_time" and {"valid", "test"} <= set(parts) and len(parts["valid"]):
        last_valid = parts["valid"].groupby(schema.USER_IDX)[schema.TIMESTAMP].max()
        first_test = parts["test"].groupby(schema.USER_IDX)[schema.TIMESTAMP].min()
        common = first_test.index.intersection(last_valid.index)
        bad = common[(last_valid[common] > first_test[common]).to_numpy()]
        if len(bad):
            problems.append(f"{method}: {len(bad)} users have valid events after their first "
                            f"test event, e.g. user_idx {int(bad[0])}")
    return problems


def check_split(
    parts: dict[str, pd.DataFrame], *, ds: str, method: str, p: settings.StepParams
) -> dict[str, Any]:
    """The split suite on the three parts (one table, ``split`` column) plus
    :func:`split_problems`. Returns the report (``success``, ``expectations``, ``problems``)."""
    table = pd.concat(
        [f.assign(**{schema.SPLIT: name}) for name, f in parts.items()], ignore_index=True)
    ge = run_suite(table, _suite(p, "validate.split_suite"), suite_parameters(p, ds),
                   run_name=ds)
    del table
    problems = split_problems(parts, method=method)
    return {"ds": ds, "success": ge["success"] and not problems, "expectations": ge,
            "suites": {"split": ge}, "problems": problems}


def _read_local(uri: str, tmp: str, name: str) -> pd.DataFrame:
    """A Parquet object read through a local file (half the peak of reading it from bytes)."""
    return pd.read_parquet(storage.download_to(uri, Path(tmp) / name))


def run(cleaned: Cleaned, params: dict | None = None) -> Validated:
    ds = cleaned.ds
    p = settings.step_params(PARAMS, params)
    raw_uri = cleaned.raw
    stats = storage.read_json(cleaned.stats)
    with tempfile.TemporaryDirectory(prefix="nightrec-validate-") as tmp:
        raw = None
        if storage.exists(raw_uri):  # one table in memory at a time
            raw = check_raw(_read_local(raw_uri, tmp, "raw.parquet"), ds=ds, p=p)
        clean = _read_local(cleaned.interactions, tmp, "clean.parquet")
        report = check_contract(clean, stats, ds=ds, p=p, raw=raw)
    del clean
    report["data_docs"] = record_results(ds, list(report["suites"].values()))
    out = Validated(ds=ds, interactions=cleaned.interactions, items=cleaned.items,
                    users=cleaned.users, report=layout.run_uri(ds, "validate", "report.json"))
    storage.write_json(out.report, report)
    if not report["success"]:
        raise ContractError(describe_failure(report))
    log.info(
        "contract holds: %s expectations passed, invalid fraction %.4f",
        {s["suite"]: s["n_expectations"] for s in report["suites"].values()},
        stats["invalid_fraction"],
    )
    return out


__all__ = ["ContractError", "check_contract", "check_raw", "check_split", "load_suite",
           "record_results", "run", "run_suite", "split_problems"]
