"""Step 5, split: train / valid / test, as a DVC stage. ``split.method`` chooses how:

- ``global_time`` (temporal, global cutoff; the default): events after the ``1 - test_fraction``
  quantile of all timestamps go to test, those between the ``1 - test_fraction -
  valid_fraction`` quantile and it to valid. Nothing in train is later than anything in valid or
  test: no training on the future, for any user, and the gate's popularity baseline does not
  count tomorrow's hits either. It is the default because it is what a nightly job faces: the
  model fitted up to a time, judged on what came after (benchmarks/RESULTS.md, "Gating what
  ships", measures what the per-user split flattered).
- ``leave_last_fraction`` (temporal, per user): each user's events sorted by time (ties by item
  index); the latest ``ceil(test_fraction * n)`` go to test, the ``ceil(valid_fraction * n)``
  before them to valid, the rest to train. One user's train can be later than another's test:
  training on the future of the test period.
- ``leave_last_n`` (temporal, per user): the same with fixed counts ``split.test_n`` and
  ``split.valid_n``.
- ``random_per_user``: per user, a seeded random ``ceil(test_fraction * n)`` events go to test
  and ``ceil(valid_fraction * n)`` to valid. It matches a random-holdout evaluation protocol
  (the MovieLens benchmark's); it is not what a nightly job facing the future should select on.

For the per-user methods, users with fewer than ``split.min_user_events_for_holdout`` events stay
whole in train, so every evaluated user has history. No (user, item) pair is in two parts (clean
deduplicated them), so a test item is never in that user's train set (tests/test_split.py).

Cold users and items: a user or item whose events all fall in valid/test (possible with
``global_time``, and for items with any method) stays there, is trained on by the shipped refit
when it is in valid (tasks/train.py), and is *counted*, not hidden: ``split_stats`` gives ``cold_users`` / ``cold_items`` per part,
and evaluation (tasks/evaluate.py) ranks only users with known history while cold target items
count as misses, the honest cold-start cost.

Under Airflow, tasks/versioning.py runs this stage with ``dvc repro`` in a per-ds workspace and
pushes the outputs; the DVC hash of ``data/split`` is the run's ``data_version``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.core import schema, settings
from nightrec.store import storage

PARAMS = [
    "seed",
    "split.method",
    "split.valid_fraction",
    "split.test_fraction",
    "split.valid_n",
    "split.test_n",
    "split.min_user_events_for_holdout",
]
PARTS = ("train", "valid", "test")
METHODS = ("leave_last_fraction", "leave_last_n", "global_time", "random_per_user")


def split_interactions(
    df: pd.DataFrame,
    *,
    method: str = "global_time",
    valid_fraction: float,
    test_fraction: float,
    min_user_events_for_holdout: int,
    valid_n: int = 1,
    test_n: int = 1,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Return ``{"train", "valid", "test"}`` frames with the input's columns; see module doc."""
    if method not in METHODS:
        raise ValueError(f"split.method must be one of {METHODS}, got {method!r}")
    if not (0 <= valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError("split fractions must be in [0, 1) and sum below 1")
    if valid_n < 0 or test_n < 1:
        raise ValueError(f"split.valid_n must be >= 0 and split.test_n >= 1, got {valid_n}, {test_n}")
    ordered = df.sort_values(
        [schema.USER_IDX, schema.TIMESTAMP, schema.ITEM_IDX], kind="stable"
    ).reset_index(drop=True)
    if method == "global_time":
        ts = ordered[schema.TIMESTAMP].to_numpy()
        test_cut = np.quantile(ts, 1 - test_fraction, method="higher")
        valid_cut = np.quantile(ts, 1 - test_fraction - valid_fraction, method="higher")
        part = np.where(ts >= test_cut, 2, np.where((ts >= valid_cut) & (valid_fraction > 0), 1, 0))
        return {name: ordered[part == i].reset_index(drop=True) for i, name in enumerate(PARTS)}
    if method == "random_per_user":
        # a seeded random order within each user replaces time order
        key = np.random.default_rng(seed).random(len(ordered))
        ordered = ordered.assign(_key=key).sort_values(
            [schema.USER_IDX, "_key"], kind="stable").drop(columns="_key").reset_index(drop=True)
    g = ordered.groupby(schema.USER_IDX, sort=False)
    n = g[schema.ITEM_IDX].transform("size").to_numpy()
    pos_from_end = n - 1 - g.cumcount().to_numpy()  # 0 for the latest (or last drawn) event
    eligible = n >= min_user_events_for_holdout
    if method == "leave_last_n":
        n_test = np.where(eligible, np.minimum(test_n, n - 1), 0)
        n_valid = np.where(eligible, np.minimum(valid_n, n - 1 - n_test), 0)
    else:
        n_test = np.where(eligible, np.ceil(test_fraction * n), 0)
        n_valid = np.where(eligible, np.ceil(valid_fraction * n), 0)
    part = np.where(
        pos_from_end < n_test, 2, np.where(pos_from_end < n_test + n_valid, 1, 0)
    )
    out = {name: ordered[part == i] for i, name in enumerate(PARTS)}
    return {name: frame.sort_values([schema.USER_IDX, schema.TIMESTAMP, schema.ITEM_IDX],
                                     kind="stable").reset_index(drop=True)
            for name, frame in out.items()}


def split_stats(parts: dict[str, pd.DataFrame]) -> dict:
    """Rows per part, and the users/items of valid and test that train never saw."""
    train_users = set(parts["train"][schema.USER_IDX])
    train_items = set(parts["train"][schema.ITEM_IDX])
    out = {"rows": {name: len(f) for name, f in parts.items()}}
    for name in ("valid", "test"):
        f = parts[name]
        out[name] = {
            "cold_users": len(set(f[schema.USER_IDX]) - train_users),
            "cold_items": len(set(f[schema.ITEM_IDX]) - train_items),
            "cold_item_rows": int((~f[schema.ITEM_IDX].isin(train_items)).sum()),
        }
    return out


def split_kwargs(p: settings.StepParams) -> dict:
    kwargs = settings.core_kwargs({k: v for k, v in p.items() if k != "seed"})
    return {**kwargs, "seed": int(p["seed"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="split augmented interactions (dvc stage)")
    parser.add_argument("--input", required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    p = settings.step_params(PARAMS)
    parts = split_interactions(storage.read_parquet(args.input), **split_kwargs(p))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for name, frame in parts.items():
        storage.write_parquet(frame, str(Path(args.out_dir) / f"{name}.parquet"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
