"""Step 5, split: train / valid / test, per user and in time order, as a DVC stage.

``leave_last_fraction`` (the one method so far): each user's events are sorted by time (ties by
item index); the latest ``ceil(test_fraction * n)`` go to test, the ones before them
``ceil(valid_fraction * n)`` to valid, the rest to train. Users with fewer than
``split.min_user_events_for_holdout`` events stay whole in train, so every evaluated user has
history. No test event is earlier than that user's train events, and no (user, item) pair is in
two parts (clean deduplicated them). Items whose only events fall in valid/test stay there and
count as misses in evaluation rather than being removed: that is the honest cold-item cost.

Under Airflow, tasks/versioning.py runs this stage with ``dvc repro`` in a per-ds workspace and
pushes the outputs; the DVC hash of ``data/split`` is the run's ``data_version``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import schema, settings, storage

PARAMS = [
    "split.method",
    "split.valid_fraction",
    "split.test_fraction",
    "split.min_user_events_for_holdout",
]
PARTS = ("train", "valid", "test")


def split_interactions(
    df: pd.DataFrame,
    *,
    method: str = "leave_last_fraction",
    valid_fraction: float,
    test_fraction: float,
    min_user_events_for_holdout: int,
) -> dict[str, pd.DataFrame]:
    """Return ``{"train", "valid", "test"}`` frames with the input's columns; see module doc."""
    if method != "leave_last_fraction":
        raise ValueError(f"unknown split.method {method!r}")
    if not (0 <= valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError("split fractions must be in [0, 1) and sum below 1")
    ordered = df.sort_values(
        [schema.USER_IDX, schema.TIMESTAMP, schema.ITEM_IDX], kind="stable"
    ).reset_index(drop=True)
    g = ordered.groupby(schema.USER_IDX, sort=False)
    n = g[schema.ITEM_IDX].transform("size").to_numpy()
    pos_from_end = n - 1 - g.cumcount().to_numpy()  # 0 for the latest event
    eligible = n >= min_user_events_for_holdout
    n_test = np.where(eligible, np.ceil(test_fraction * n), 0)
    n_valid = np.where(eligible, np.ceil(valid_fraction * n), 0)
    part = np.where(
        pos_from_end < n_test, 2, np.where(pos_from_end < n_test + n_valid, 1, 0)
    )
    return {name: ordered[part == i].reset_index(drop=True) for i, name in enumerate(PARTS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="split augmented interactions (dvc stage)")
    parser.add_argument("--input", required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    p = settings.step_params(PARAMS)
    parts = split_interactions(
        storage.read_parquet(args.input), **settings.core_kwargs(p)
    )
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for name, frame in parts.items():
        storage.write_parquet(frame, str(Path(args.out_dir) / f"{name}.parquet"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
