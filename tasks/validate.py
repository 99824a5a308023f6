"""Step 3, validate: the data contract. A broken contract stops the run before any training.

Two checks, both must pass:

- the share of raw rows quarantined as *invalid* (see tasks/schema.py) is at most
  ``validate.max_invalid_fraction``;
- the Great Expectations suite ``validate.suite`` (JSON in expectations/) passes on the cleaned
  interactions. Its ``$PARAMETER`` bounds come from params.yaml and the run's ds.

The report (``runs/ds=<ds>/validate/report.json``) and GE's Data Docs site
(``reports/ds=<ds>/data_docs/index.html``) are written either way; on failure the task raises
:class:`ContractError` naming each failing expectation and what was observed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from tasks import layout, settings, storage
from tasks.errors import PermanentError

PARAMS = [
    "validate.max_invalid_fraction",
    "validate.min_rows",
    "validate.suite",
    "clean.min_rating",
    "clean.max_rating",
    "clean.min_timestamp",
]
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


def run_suite(
    df: pd.DataFrame, suite_path: Path, parameters: dict[str, Any], docs_dir: Path | None = None
) -> dict:
    """Run one GE suite on a frame. Returns {success, n_expectations, failures: [...]}.

    With ``docs_dir``, GE also builds its Data Docs site (HTML) for this validation there.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    actions = []
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="local", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs"))
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
    outcome = checkpoint.run(batch_parameters={"dataframe": df}, expectation_parameters=parameters)
    res = next(iter(outcome.run_results.values()))
    failures = []
    for r in res.results:
        if not r.success:
            kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
            observed = {
                k: r.result.get(k)
                for k in ("observed_value", "unexpected_count", "partial_unexpected_list")
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
    }


def suite_parameters(p: settings.StepParams, ds: str) -> dict[str, Any]:
    end_of_day = (pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)).timestamp() - 1
    return {
        "min_rows": p["validate.min_rows"],
        "min_timestamp": int(pd.Timestamp(p["clean.min_timestamp"], tz="UTC").timestamp()),
        "max_timestamp": int(end_of_day),
        "min_rating": p["clean.min_rating"],
        "max_rating": p["clean.max_rating"],
    }


def check_contract(
    clean: pd.DataFrame, stats: dict, *, ds: str, p: settings.StepParams,
    docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Pure-ish core (runs GE in memory). Returns the report; ``report['success']`` is the verdict."""
    max_frac = p["validate.max_invalid_fraction"]
    quarantine_ok = stats["invalid_fraction"] <= max_frac
    suite_path = settings.project_root() / p["validate.suite"]
    ge = run_suite(clean, suite_path, suite_parameters(p, ds), docs_dir=docs_dir)
    return {
        "ds": ds,
        "success": quarantine_ok and ge["success"],
        "quarantine": {
            "success": quarantine_ok,
            "invalid_fraction": stats["invalid_fraction"],
            "max_invalid_fraction": max_frac,
            "by_reason": stats["by_reason"],
        },
        "expectations": ge,
    }


def describe_failure(report: dict) -> str:
    parts = []
    q = report["quarantine"]
    if not q["success"]:
        parts.append(
            f"invalid rows {q['invalid_fraction']:.2%} > max {q['max_invalid_fraction']:.2%} "
            f"(by reason: {q['by_reason']})"
        )
    for f in report["expectations"]["failures"]:
        parts.append(f"{f['expectation']}({f['kwargs']}) observed {f['observed']}")
    return "data contract broken: " + "; ".join(parts)


def run(ds: str, cleaned: dict[str, str], params: dict | None = None) -> dict[str, str]:
    p = settings.step_params(PARAMS, params)
    clean = storage.read_parquet(cleaned["interactions"])
    stats = storage.read_json(cleaned["stats"])
    with tempfile.TemporaryDirectory() as tmp:
        report = check_contract(clean, stats, ds=ds, p=p, docs_dir=Path(tmp))
        docs = storage.s3_uri(f"reports/ds={ds}/data_docs/")
        storage.delete(storage.list_uris(docs))
        for f in storage.list_uris(tmp):
            storage.upload_from(Path(f), docs + Path(f).relative_to(tmp).as_posix())
    report["data_docs"] = docs + "index.html"
    out = {**cleaned, "validation_report": layout.run_uri(ds, "validate", "report.json")}
    storage.write_json(out["validation_report"], report)
    if not report["success"]:
        raise ContractError(describe_failure(report))
    log.info(
        "contract holds: %d expectations passed, invalid fraction %.4f",
        report["expectations"]["n_expectations"],
        stats["invalid_fraction"],
    )
    return out


__all__ = ["ContractError", "check_contract", "load_suite", "run", "run_suite"]
