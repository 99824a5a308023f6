"""Validate (tasks/validate.py): the raw suite, the step's report, and the ds's Data Docs site
built from every suite recorded for it, on the real S3."""

from __future__ import annotations

import importlib
import re

import pandas as pd
import pytest

from nightrec.core import settings
from nightrec.core.records import Cleaned
from nightrec.store import layout, storage
from nightrec.tasks import clean, ingest, split, validate

DS = "2026-11-18"  # after the sample data's last event


def _p():
    return settings.step_params(importlib.import_module("nightrec.tasks.validate").PARAMS)


def _suite_params():
    return validate.suite_parameters(_p(), DS)


def _csv(n: int, ragged: int = 0) -> bytes:
    good = "".join(f"{u},{i},4,1780000000\n" for u in range(n // 10) for i in range(10))
    return ("user_id,item_id,rating,timestamp\n" + good + "1,2\n" * ragged).encode()


def test_raw_suite_passes_on_ingest_output_and_names_what_breaks():
    raw = ingest.ingest_files({"a.csv": _csv(200)})
    suite = settings.project_root() / _p()["validate.raw_suite"]
    ok = validate.run_suite(raw, suite, _suite_params())
    assert ok["success"] is True and ok["n_expectations"] == len(validate.load_suite(
        suite).expectations)

    bad = ingest.ingest_files({"a.csv": _csv(200, ragged=30)})  # 30 of 230 lines unsplittable
    twice = pd.concat([bad, bad.iloc[:1]], ignore_index=True)  # one line counted twice
    report = validate.run_suite(twice, suite, _suite_params())
    failed = {(f["expectation"], f["kwargs"].get("column")): f["observed"]
              for f in report["failures"]}
    assert set(failed) == {
        ("expect_column_values_to_be_null", "parse_error"),
        ("expect_column_values_to_not_be_null", "user_id"),
        ("expect_column_values_to_not_be_null", "item_id"),
        ("expect_column_values_to_not_be_null", "timestamp"),
        ("expect_compound_columns_to_be_unique", None),
    }
    assert failed[("expect_column_values_to_be_null", "parse_error")]["unexpected_count"] == 30
    assert failed[("expect_compound_columns_to_be_unique", None)]["unexpected_count"] == 2


def test_contract_report_has_every_suite_and_the_message_names_the_suite():
    raw = ingest.ingest_files({"a.csv": _csv(200, ragged=30)})
    cleaned, _, stats = clean.clean_interactions(
        raw, ds=DS, min_rating=0.5, max_rating=5.0, min_timestamp="1995-01-01",
        min_user_interactions=1, min_item_interactions=1)
    report = validate.check_contract(cleaned, stats, ds=DS, p=_p(), raw=raw)
    assert set(report["suites"]) == {"raw", "clean"}
    assert report["suites"]["clean"]["success"] and not report["suites"]["raw"]["success"]
    assert not report["quarantine"]["success"] and report["success"] is False
    message = validate.describe_failure(report)
    assert message.startswith("data contract broken: invalid rows 13.04% > max 5.00%")
    assert "raw_interactions: expect_column_values_to_be_null({'column': 'parse_error'" in message


def _pages(docs: list[str], suite: str) -> list[str]:
    return [u for u in docs if f"/validations/{suite}/" in u and u.endswith(".html")]


def test_run_records_raw_and_clean_then_docs_gather_every_suite_of_the_ds(s3, sample):
    storage.delete(storage.list_uris(storage.s3_uri(f"reports/ds={DS}/")))
    for table in ("interactions", "items", "users"):
        storage.delete(storage.list_uris(layout.raw_prefix(DS, table)))
        storage.write_bytes(layout.raw_prefix(DS, table) + f"{table}.csv",
                            sample[table].read_bytes())
    params = settings.load_params()
    cleaned = clean.run(ingest.run(DS, params), params)
    out = validate.run(cleaned, params)
    report = storage.read_json(out.report)
    assert report["success"] and set(report["suites"]) == {"raw", "clean"}
    assert "ge_result" not in report["expectations"]  # kept apart, in reports/.../validations/
    assert storage.list_uris(validate.results_prefix(DS)) == [
        validate.results_prefix(DS) + n for n in ("clean_interactions.json",
                                                  "raw_interactions.json")]
    docs = storage.list_uris(validate.docs_prefix(DS))
    assert report["data_docs"] == validate.docs_prefix(DS) + "index.html" in docs
    assert len(_pages(docs, "raw_interactions")) == len(_pages(docs, "clean_interactions")) == 1

    # a later step records its suite: the one index now lists all three validations
    events = storage.read_parquet(cleaned.interactions).assign(label=1, weight=1.0)
    parts = split.split_interactions(events, valid_fraction=0.1, test_fraction=0.1,
                                     min_user_events_for_holdout=5)
    split_report = validate.check_split(parts, ds=DS, method="leave_last_fraction", p=_p())
    validate.record_results(DS, [split_report["expectations"]])
    docs = storage.list_uris(validate.docs_prefix(DS))
    index = storage.read_bytes(validate.docs_prefix(DS) + "index.html").decode()
    for suite in ("raw_interactions", "clean_interactions", "split"):
        (page,) = _pages(docs, suite)
        assert page.removeprefix(validate.docs_prefix(DS)) in index
        assert re.search(rf"expectations/{suite}\.html", index)

    # pages are named by ds (no wall clock): a rerun replaces its own, the split's stays
    (raw_page,) = _pages(docs, "raw_interactions")
    assert "/raw_interactions/2026-11-18/20261118T000000.000000Z/" in raw_page
    validate.run(cleaned, params)
    assert storage.list_uris(validate.docs_prefix(DS)) == docs


def test_run_fails_on_a_broken_raw_table_with_the_expectation_named(s3, monkeypatch):
    ds = "2026-09-29"
    storage.delete(storage.list_uris(storage.s3_uri(f"reports/ds={ds}/")))
    raw = ingest.ingest_files({"a.csv": _csv(200)})
    twice = pd.concat([raw, raw], ignore_index=True)  # every line read twice
    cleaned_df, _, stats = clean.clean_interactions(
        raw, ds=ds, min_rating=0.5, max_rating=5.0, min_timestamp="1995-01-01",
        min_user_interactions=1, min_item_interactions=1)
    uris = Cleaned(ds=ds, interactions=layout.run_uri(ds, "clean", "interactions.parquet"),
                   stats=layout.run_uri(ds, "clean", "stats.json"),
                   raw=layout.run_uri(ds, "ingest", "interactions.parquet"),
                   quarantine=layout.run_uri(ds, "clean", "quarantine.parquet"))
    storage.write_parquet(cleaned_df, uris.interactions)
    storage.write_json(uris.stats, stats)
    storage.write_parquet(twice, uris.raw)
    with pytest.raises(validate.ContractError, match=r"raw_interactions: "
                       r"expect_compound_columns_to_be_unique.*'unexpected_count': 400"):
        validate.run(uris)
    report = storage.read_json(layout.run_uri(ds, "validate", "report.json"))
    assert report["success"] is False and report["suites"]["clean"]["success"] is True
    assert _pages(storage.list_uris(validate.docs_prefix(ds)), "raw_interactions")
