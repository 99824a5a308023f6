"""Split (tasks/split.py): every method partitions the events without leakage, and the split
contract (expectations/split.json plus tasks/validate.py split_problems) holds on its output."""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest

from nightrec.core import settings
from nightrec.dev import sample_data
from nightrec.tasks import augment, split, validate

KW = {"valid_fraction": 0.1, "test_fraction": 0.2, "min_user_events_for_holdout": 5,
      "valid_n": 2, "test_n": 3}


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    inter, _, _ = sample_data.generate_sample(n_users=120, n_items=80, n_interactions=3000, seed=5)
    df = inter.rename(columns={"user_id": "user_idx", "item_id": "item_idx"})
    df["user_idx"] -= 1
    df["item_idx"] -= 1
    df["timestamp"] = df["timestamp"] // 86400 * 86400  # coarse: equal timestamps in a user
    df["user_id"], df["item_id"] = df["user_idx"].astype(str), df["item_idx"].astype(str)
    return augment.label_interactions(df.astype({"rating": "float64"}), positive_min_rating=0.0,
                                      weight_by_rating=True, max_rating=5.0)


def _key(f: pd.DataFrame) -> set:
    return set(zip(f["user_idx"], f["item_idx"]))


@pytest.mark.parametrize("method", split.METHODS)
def test_each_method_partitions_the_events_without_leakage(events, method):
    parts = split.split_interactions(events, method=method, seed=1, **KW)
    assert sum(len(f) for f in parts.values()) == len(events)
    assert set().union(*map(_key, parts.values())) == _key(events)
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not _key(parts[a]) & _key(parts[b]), (a, b)
    assert validate.split_problems(parts, method=method) == []
    train, test = parts["train"], parts["test"]
    if method == "global_time":
        assert train["timestamp"].max() < test["timestamp"].min()
        assert train["timestamp"].max() < parts["valid"]["timestamp"].min()
    elif method != "random_per_user":
        last = train.groupby("user_idx")["timestamp"].max()
        first = test.groupby("user_idx")["timestamp"].min()
        assert (last.reindex(first.index).dropna() <= first[last.index.intersection(
            first.index)]).all()
    n = events.groupby("user_idx").size()
    held = (parts["valid"].groupby("user_idx").size().reindex(n.index, fill_value=0)
            + test.groupby("user_idx").size().reindex(n.index, fill_value=0))
    if method != "global_time":
        assert (held[n < KW["min_user_events_for_holdout"]] == 0).all()
    if method == "leave_last_n":
        assert (test.groupby("user_idx").size() <= KW["test_n"]).all()
        assert (test.groupby("user_idx").size()[n[n >= 5].index] == KW["test_n"]).all()


def test_random_per_user_is_seeded(events):
    a = split.split_interactions(events, method="random_per_user", seed=1, **KW)
    b = split.split_interactions(events, method="random_per_user", seed=1, **KW)
    c = split.split_interactions(events, method="random_per_user", seed=2, **KW)
    assert a["test"].equals(b["test"]) and not a["test"].equals(c["test"])


def test_global_time_can_leave_users_and_items_cold_and_stats_count_them():
    df = pd.DataFrame({"user_idx": [0, 0, 0, 0, 1, 1], "item_idx": [0, 1, 2, 3, 0, 4],
                       "timestamp": [1, 2, 3, 4, 9, 10]})
    parts = split.split_interactions(df, method="global_time", valid_fraction=0.0,
                                     test_fraction=0.3, min_user_events_for_holdout=1)
    assert parts["test"][["user_idx", "item_idx"]].values.tolist() == [[1, 0], [1, 4]]
    stats = split.split_stats(parts)
    assert stats["test"] == {"cold_users": 1, "cold_items": 1, "cold_item_rows": 1}


def test_split_problems_find_planted_leaks(events):
    parts = split.split_interactions(events, method="leave_last_fraction", **KW)
    leaked = dict(parts, train=pd.concat([parts["train"], parts["test"].iloc[:3]]))
    problems = validate.split_problems(leaked, method="leave_last_fraction")
    assert any("3 (user_idx, item_idx) pairs are in both train and test" in p for p in problems)
    assert any("train events after their first test event" in p for p in problems)
    assert validate.split_problems(leaked, method="random_per_user") == [problems[0]]
    future = parts["train"].copy()
    future.loc[future.index[0], "timestamp"] = parts["test"]["timestamp"].max() + 1
    moved = dict(parts, train=future)
    assert any("global_time: train has events after" in p
               for p in validate.split_problems(moved, method="global_time"))


def test_split_suite_passes_on_a_split_and_names_what_breaks(events):
    p = settings.step_params(importlib.import_module("nightrec.tasks.validate").PARAMS)
    parts = split.split_interactions(events, method="leave_last_fraction", **KW)
    report = validate.check_split(parts, ds="2026-11-28", method="leave_last_fraction", p=p)
    assert report["success"] is True, report
    spec = validate.load_suite(settings.project_root() / p["validate.split_suite"])
    assert report["expectations"]["n_expectations"] == len(spec.expectations)

    bad_train = parts["train"].copy()
    bad_train.loc[bad_train.index[0], "label"] = 2
    bad_train.loc[bad_train.index[1], "weight"] = 0.0
    broken = {"train": pd.concat([bad_train, parts["test"].iloc[:1]]), "valid": parts["valid"],
              "test": parts["test"]}
    report = validate.check_split(broken, ds="2026-11-28", method="leave_last_fraction", p=p)
    assert report["success"] is False
    failed = {(f["expectation"], f["kwargs"].get("column")) for f in
              report["expectations"]["failures"]}
    assert {("unexpected_rows_expectation", None),
            ("expect_column_values_to_be_in_set", "label"),
            ("expect_column_values_to_be_between", "weight")} <= failed
    message = validate.describe_failure(report)
    assert "split: unexpected_rows_expectation" in message
    assert "pairs are in both train and test" in message
    weight = next(f for f in report["expectations"]["failures"] if f["kwargs"].get("column")
                  == "weight")
    assert weight["observed"]["unexpected_count"] == 1
    no_test = dict(parts, test=parts["test"].iloc[:0])
    report = validate.check_split(no_test, ds="2026-11-28", method="leave_last_fraction", p=p)
    assert ("expect_column_distinct_values_to_contain_set", "split") in {
        (f["expectation"], f["kwargs"].get("column")) for f in
        report["expectations"]["failures"]}
    assert report["problems"] == []


def test_the_default_split_trains_on_nothing_later_than_what_it_is_judged_on(events):
    """The gate's default split (params.yaml, and the core's default) is ``global_time``: no
    user's train event is later than any valid or test event, so neither the model nor the
    popularity baseline the gate compares it with counts the test period's hits. The per-user
    split it replaced does train on the test period (other users' later events)."""
    p = settings.step_params(split.PARAMS)
    assert p["split.method"] == "global_time"
    parts = split.split_interactions(events, **split.split_kwargs(p))
    assert parts["train"]["timestamp"].max() <= parts["valid"]["timestamp"].min()
    assert parts["valid"]["timestamp"].max() <= parts["test"]["timestamp"].min()
    assert split.split_interactions(events, **{k: v for k, v in split.split_kwargs(p).items()
                                               if k != "method"})["test"].equals(parts["test"])
    per_user = split.split_interactions(events, **{**split.split_kwargs(p),
                                                   "method": "leave_last_fraction"})
    assert per_user["train"]["timestamp"].max() > per_user["test"]["timestamp"].min()


@pytest.mark.parametrize("n", [1, 2, 11, 1000, 1237])
def test_the_engines_global_cutoffs_are_numpys_higher_quantiles(n, tmp_path):
    """Buckets split alone with cutoffs the engine computed over every bucket; they must be
    what the whole-table split computed with ``np.quantile(..., method="higher")``."""
    import duckdb

    ts = np.random.default_rng(n).integers(0, 50, n)  # many ties, as real clocks have
    for b, part in enumerate(np.array_split(ts, 3)):
        pd.DataFrame({"timestamp": part}).to_parquet(tmp_path / f"b{b}.parquet")
    for test_fraction, valid_fraction in ((0.1, 0.1), (0.2, 0.0), (0.5, 0.25)):
        got = split.global_cutoffs(duckdb.connect(), str(tmp_path / "b*.parquet"),
                                   test_fraction=test_fraction, valid_fraction=valid_fraction)
        want = (np.quantile(ts, 1 - test_fraction - valid_fraction, method="higher"),
                np.quantile(ts, 1 - test_fraction, method="higher"))
        assert got == (int(want[0]), int(want[1]))


def test_column_ranges_come_from_the_footers_and_decide_what_train_reads(tmp_path):
    """The parts' row-group statistics give each column's range over every part (no data
    read); train then skips a label or weight column that holds only 1 and takes the cutoff
    from the timestamps' maximum. A column some row group has no statistics for is unknown
    (None), and train reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nightrec.core import schema
    from nightrec.tasks import train

    def write(path, ts, label, weight, **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({schema.USER_IDX: np.arange(len(ts), dtype=np.int32),
                                 schema.ITEM_IDX: np.zeros(len(ts), np.int32),
                                 schema.LABEL: np.asarray(label, np.int8),
                                 schema.WEIGHT: np.asarray(weight, np.float32),
                                 schema.TIMESTAMP: np.asarray(ts, np.int64)}),
                       path, row_group_size=2, **kw)

    write(tmp_path / "train" / "bucket=000.parquet", [5, 9, 7], [1, 1, 1], [1, 1, 1])
    write(tmp_path / "train" / "bucket=001.parquet", [3, 4], [1, 1], [1, 1])
    write(tmp_path / "valid.parquet", [12, 11], [1, 1], [1, 1])
    uris = [str(tmp_path / "train") + "/", str(tmp_path / "valid.parquet")]
    cols = train.COLUMNS[2:]
    ranges = split.column_ranges(uris, cols)
    assert ranges == {schema.LABEL: (1, 1), schema.WEIGHT: (1.0, 1.0), schema.TIMESTAMP: (3, 12)}
    assert train.columns_to_read(ranges) == ([schema.USER_IDX, schema.ITEM_IDX], 12)
    frame, lengths = split.read_parts(uris, columns=train.columns_to_read(ranges)[0])
    assert lengths == [5, 2] and list(frame.columns) == [schema.USER_IDX, schema.ITEM_IDX]

    # a negative label and a weight other than 1 are read; timestamps without statistics too
    write(tmp_path / "valid.parquet", [12, 11], [1, 0], [1, 0.5], write_statistics=[schema.LABEL,
                                                                                    schema.WEIGHT])
    ranges = split.column_ranges(uris, cols)
    assert ranges == {schema.LABEL: (0, 1), schema.WEIGHT: (0.5, 1.0), schema.TIMESTAMP: None}
    assert train.columns_to_read(ranges) == (train.COLUMNS, None)
