"""Validate (tasks/validate.py): the raw suite, the step's report, and the ds's Data Docs site
built from every suite recorded for it, on the real S3. The suites run in GE's SQL engine over
DuckDB on every row: a bad row far past any sample is caught, a bucketed table is one table."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nightrec.core import settings
from nightrec.core.errors import PermanentError
from nightrec.core.records import Cleaned
from nightrec.store import layout, storage
from nightrec.tasks import clean, ingest, split, validate

DS = "2026-11-18"  # after the sample data's last event


def _p():
    return settings.step_params(importlib.import_module("nightrec.tasks.validate").PARAMS)


def _suite_params():
    return validate.suite_parameters(_p(), DS)


def _read_table(uri: str) -> pd.DataFrame:
    """A table on S3: one Parquet object, or a bucketed prefix (every bucket's part)."""
    if not uri.endswith("/"):
        return storage.read_parquet(uri)
    return pd.concat([storage.read_parquet(u) for u in storage.list_uris(uri)],
                     ignore_index=True)


def _clean_table(n: int) -> pd.DataFrame:
    """A sound clean-shaped table of ``n`` rows (100 distinct items per user; one rating in
    ten NaN, an implicit event)."""
    k = np.arange(n)
    user, item = k // 100, k % 100
    rating = np.where(k % 10 == 0, np.nan, 1.0 + k % 5)
    return pd.DataFrame({"user_id": (user + 1).astype(str), "item_id": (item + 1).astype(str),
                         "rating": rating, "timestamp": 1_780_000_000 + k,
                         "user_idx": user.astype("int32"), "item_idx": item.astype("int32")})


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
        ("unexpected_rows_expectation", None),
    }
    assert failed[("expect_column_values_to_be_null", "parse_error")]["unexpected_count"] == 30
    assert failed[("unexpected_rows_expectation", None)]["observed_value"] == 1  # one pair twice


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


def test_run_records_raw_and_clean_then_docs_gather_every_suite_of_the_ds(bucket, sample):
    # A bucket of its own: with an earlier accepted ds in the store, validate also records the
    # drift suite against it (tests/test_drift.py); here the ds is the store's first.
    for table in ("interactions", "items", "users"):
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
    events = _read_table(cleaned.interactions).assign(label=1, weight=1.0)
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
                       r"unexpected_rows_expectation.*'observed_value': 200"):
        validate.run(uris)
    report = storage.read_json(layout.run_uri(ds, "validate", "report.json"))
    assert report["success"] is False and report["suites"]["clean"]["success"] is True
    assert _pages(storage.list_uris(validate.docs_prefix(ds)), "raw_interactions")


def test_every_row_is_checked_one_bad_row_among_many_is_caught(tmp_path):
    """No sample: the suite's expectations each see all rows, in DuckDB, so one bad rating and
    one repeated (user, item) at the far end of 300k rows are counted exactly. NaN ratings are
    implicit events (missing, as pandas takes them), not out of range."""
    n = 300_000
    table = _clean_table(n)
    suite = settings.project_root() / _p()["validate.suite"]
    path = tmp_path / "clean.parquet"
    table.to_parquet(path, index=False)
    ok = validate.run_suite(path, suite, _suite_params())
    assert ok["success"] is True, ok["failures"]
    assert ok["rows_checked"] == n

    table.loc[n - 1, "rating"] = 9.0
    table.loc[n - 2, ["user_id", "item_id"]] = table.loc[n - 3, ["user_id", "item_id"]].values
    table.to_parquet(path, index=False)
    report = validate.run_suite(path, suite, _suite_params())
    failed = {(f["expectation"], f["kwargs"].get("column")): f["observed"]
              for f in report["failures"]}
    assert set(failed) == {("expect_column_values_to_be_between", "rating"),
                           ("unexpected_rows_expectation", None)}
    assert failed[("expect_column_values_to_be_between", "rating")]["unexpected_count"] == 1
    assert failed[("expect_column_values_to_be_between", "rating")][
        "partial_unexpected_list"] == [9.0]
    assert failed[("unexpected_rows_expectation", None)]["observed_value"] == 1  # one pair twice
    assert report["rows_checked"] == n


def _bucketed(table: pd.DataFrame, root: Path, name: str, n_buckets: int = 3) -> str:
    """``table`` as ``root/bucket=NNN/<name>``, split by user; returns the glob over them."""
    for b in range(n_buckets):
        folder = root / f"bucket={b:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        table[table["user_idx"] % n_buckets == b].to_parquet(folder / name, index=False)
    return str(root / "bucket=*" / name)


def test_a_bucketed_table_is_checked_as_one_table_without_a_bucket_column(tmp_path):
    table = _clean_table(3000)
    suite = settings.project_root() / _p()["validate.suite"]
    glob = _bucketed(table, tmp_path, "part-0.parquet")
    report = validate.run_suite(glob, suite, _suite_params())
    assert report["success"] is True, report["failures"]  # columns match exactly: no `bucket`
    assert report["rows_checked"] == len(table)
    dup = table.iloc[[0]].assign(timestamp=1_780_000_000)  # user 0's pair again, same bucket
    _bucketed(pd.concat([table, dup], ignore_index=True), tmp_path, "part-0.parquet")
    report = validate.run_suite(glob, suite, _suite_params())
    (failure,) = report["failures"]
    assert failure["expectation"] == "unexpected_rows_expectation"
    assert failure["observed"]["observed_value"] == 1  # one (user, item) pair repeated


def _parts() -> dict[str, pd.DataFrame]:
    from tests.conftest import labelled_events

    events = labelled_events(n_users=60, n_items=50, n_interactions=1500, seed=3)
    events["user_id"], events["item_id"] = (events["user_idx"].astype(str),
                                            events["item_idx"].astype(str))
    events["rating"] = np.nan
    return split.split_interactions(events, valid_fraction=0.1, test_fraction=0.2,
                                    min_user_events_for_holdout=5)


def test_check_split_files_on_bucket_globs_agrees_with_check_split_on_frames(tmp_path):
    p = _p()
    parts = _parts()
    leaked = dict(parts, train=pd.concat([parts["train"], parts["test"].iloc[:2]]))
    globs = {name: _bucketed(frame, tmp_path / "split", f"{name}.parquet")
             for name, frame in leaked.items()}
    on_files = validate.check_split_files(globs, ds=DS, method="leave_last_fraction", p=p)
    on_frames = validate.check_split(leaked, ds=DS, method="leave_last_fraction", p=p)
    assert on_files["success"] is on_frames["success"] is False
    assert on_files["problems"] == on_frames["problems"] == validate.split_problems(
        leaked, method="leave_last_fraction")
    assert any(p.startswith("2 (user_idx, item_idx) pairs are in both train and test, e.g. (")
               for p in on_files["problems"])
    assert any("users have train events after their first test event" in p
               for p in on_files["problems"])
    assert ([f["expectation"] for f in on_files["expectations"]["failures"]]
            == [f["expectation"] for f in on_frames["expectations"]["failures"]]
            == ["unexpected_rows_expectation"])
    assert on_files["expectations"]["rows_checked"] == sum(map(len, leaked.values()))
    assert set(on_files) == set(on_frames) == {"ds", "success", "expectations", "suites",
                                                "problems"}

    sound = {name: _bucketed(frame, tmp_path / "sound", f"{name}.parquet")
             for name, frame in parts.items()}
    assert validate.check_split_files(sound, ds=DS, method="leave_last_fraction",
                                      p=p)["success"] is True
    # a part with no file is an empty part: the split suite names the missing test part
    no_test = dict(sound, test=str(tmp_path / "none" / "bucket=*" / "test.parquet"))
    report = validate.check_split_files(no_test, ds=DS, method="leave_last_fraction", p=p)
    assert report["problems"] == [] and report["success"] is False
    assert ("expect_column_distinct_values_to_contain_set", "split") in {
        (f["expectation"], f["kwargs"].get("column")) for f in report["expectations"]["failures"]}
    with pytest.raises(validate.ContractError, match="no Parquet file matches"):
        validate.check_split_files({"train": str(tmp_path / "nothing.parquet")}, ds=DS,
                                   method="random_per_user", p=p)


def test_split_problems_pairs_in_three_parts_and_the_temporal_rules():
    base = {"user_idx": [0], "item_idx": [0], "timestamp": [10]}
    parts = {"train": pd.DataFrame(base), "valid": pd.DataFrame(base),
             "test": pd.DataFrame(base).assign(timestamp=5)}
    # a pair in all three parts is reported for train/valid and valid/test, as before
    assert validate.split_problems(parts, method="random_per_user") == [
        "1 (user_idx, item_idx) pairs are in both train and valid, e.g. (0, 0)",
        "1 (user_idx, item_idx) pairs are in both valid and test, e.g. (0, 0)"]
    assert validate.split_problems(parts, method="leave_last_n")[2:] == [
        "leave_last_n: 1 users have train events after their first test event, e.g. user_idx 0",
        "leave_last_n: 1 users have valid events after their first test event, e.g. user_idx 0"]
    assert validate.split_problems(parts, method="global_time")[2:] == [
        "global_time: train has events after the first test event"]


def test_run_validates_a_bucketed_clean_prefix(s3):
    ds = "2026-09-30"
    storage.delete(storage.list_uris(storage.s3_uri(f"reports/ds={ds}/")))
    table = _clean_table(1000)
    prefix = layout.bucketed_prefix(ds, "clean", "interactions")
    storage.delete(storage.list_uris(prefix))
    for b in range(3):
        storage.write_parquet(table[table["user_idx"] % 3 == b],
                              layout.bucket_uri(ds, "clean", "interactions", b))
    stats = {"invalid_fraction": 0.0, "by_reason": {}}
    uris = Cleaned(ds=ds, interactions=prefix, stats=layout.run_uri(ds, "clean", "stats.json"),
                   raw=layout.run_uri(ds, "ingest", "absent.parquet"),
                   quarantine=layout.run_uri(ds, "clean", "quarantine.parquet"))
    storage.write_json(uris.stats, stats)
    out = validate.run(uris)
    report = storage.read_json(out.report)
    assert report["success"] and set(report["suites"]) == {"clean"}
    assert report["expectations"]["rows_checked"] == len(table)
    assert out.interactions == prefix


def test_an_expectation_whose_query_fails_names_the_engine_error(tmp_path):
    """A metric that raises inside GE (here DuckDB refusing to compare text with a number; at
    scale, DuckDB out of memory) fails the suite with the engine's message in the report, not
    with an empty observed value."""
    suite = {"name": "broken", "expectations": [
        {"type": "expect_column_values_to_be_between",
         "kwargs": {"column": "user_id", "min_value": 0}}]}
    suite_path = tmp_path / "broken.json"
    suite_path.write_text(__import__("json").dumps(suite))
    table = tmp_path / "t.parquet"
    pd.DataFrame({"user_id": ["1", "x1"], "item_id": ["a", "b"]}).to_parquet(table)
    report = validate.run_suite(table, suite_path, {})
    assert report["success"] is False
    (failure,) = report["failures"]
    assert failure["expectation"] == "expect_column_values_to_be_between"
    assert "Cannot compare values of type VARCHAR" in failure["observed"]["exception"]


def test_each_step_gets_its_resources_budget_and_its_spill_folder_goes_with_it(monkeypatch,
                                                                                 tmp_path):
    """The shipped params give validate (which also checks the split) more memory than the
    other steps; a step's override wins over the section's default; DuckDB runs under it."""
    from nightrec.core import engine

    monkeypatch.setenv("NIGHTREC_SPILL", str(tmp_path / "spill"))
    shipped = settings.load_params()
    assert engine.budget("validate", shipped)["memory_gb"] > engine.budget("clean",
                                                                          shipped)["memory_gb"]
    params = {"resources": {"memory_gb": 0.5, "threads": 1,
                            "steps": {"split": {"memory_gb": 0.25}}}}
    assert engine.budget("clean", params) == {"memory_gb": 0.5, "threads": 1}
    assert engine.budget("split", params) == {"memory_gb": 0.25, "threads": 1}
    with engine.connect("split", params) as con:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
        # engine.connect passes int(memory_gb * 1024) "MB", which DuckDB reads as 10^6 bytes
        assert limit == f"{256e6 / 2**20:.1f} MiB"
        spill = engine.spill_dir("split")
        assert spill.is_dir()
    assert not spill.exists()
    with pytest.raises(ValueError, match="unknown step"):
        engine.budget("train", params)
    with pytest.raises(ValueError, match="unknown steps"):
        engine.budget("clean", {"resources": {"steps": {"scoring": {}}}})


def test_a_report_whose_checks_only_raised_is_not_called_a_broken_contract():
    """A check that raised (DuckDB out of memory) is the engine's failure: ``unjudged`` tells it
    from a real breach, so run() raises CheckError naming the memory knob, not ContractError."""
    raised = {"expectation": "expect_compound_columns_to_be_unique", "kwargs": {},
              "observed": {"exception": "Out of Memory Error"}}
    breach = {"expectation": "expect_column_values_to_not_be_null", "kwargs": {},
              "observed": {"unexpected_count": 3}}
    ok_q = {"success": True}
    assert validate.unjudged({"quarantine": ok_q, "suites": {"c": {"failures": [raised]}}})
    assert not validate.unjudged({"quarantine": ok_q,
                                  "suites": {"c": {"failures": [raised, breach]}}})
    assert not validate.unjudged({"quarantine": {"success": False},
                                  "suites": {"c": {"failures": [raised]}}})
    assert not validate.unjudged({"quarantine": ok_q, "suites": {"c": {"failures": []}}})
    assert issubclass(validate.CheckError, PermanentError)
    assert not issubclass(validate.CheckError, validate.ContractError)
