"""Step 4, augment: labels, weights and side features for training.

- ``label`` (int8): 1 when ``rating >= augment.positive_min_rating`` or when the feed has no
  rating (implicit feedback), else 0. Models train on positives; evaluation uses positives too.
- ``weight`` (float32): 1.0, or ``rating / clean.max_rating`` when ``augment.weight_by_rating``.
- Side features are kept as their own tables keyed by the dense index (``item_features`` by
  ``item_idx``, ``user_features`` by ``user_idx``) rather than joined onto every event: a join
  would copy each item's features once per event. Catalogue entries for items or users the
  interactions do not contain are dropped; interacting items missing from the catalogue get nulls.
  (Negative sampling belongs to the data-stages issue; the skeleton's full-softmax model needs none.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks import layout, schema, settings, storage

PARAMS = ["augment.positive_min_rating", "augment.weight_by_rating", "clean.max_rating"]


def label_interactions(
    clean: pd.DataFrame, *, positive_min_rating: float, weight_by_rating: bool, max_rating: float
) -> pd.DataFrame:
    """Add ``label`` (int8 in {0, 1}) and ``weight`` (float32 in (0, 1]) to cleaned interactions."""
    rating = clean[schema.RATING]
    implicit = rating.isna()
    out = clean.copy()
    out[schema.LABEL] = (implicit | (rating >= positive_min_rating)).astype("int8")
    w = np.where(implicit, 1.0, rating / max_rating) if weight_by_rating else 1.0
    out[schema.WEIGHT] = np.asarray(np.broadcast_to(w, len(out)), dtype="float32")
    return out


def index_features(
    clean: pd.DataFrame, side: pd.DataFrame | None, *, id_col: str, idx_col: str
) -> pd.DataFrame:
    """One row per dense index, in index order, with the side table's columns (nulls if absent)."""
    ids = clean.drop_duplicates(idx_col)[[idx_col, id_col]].sort_values(idx_col)
    if side is None or id_col not in side.columns:
        return ids.reset_index(drop=True)
    side = side.drop_duplicates(id_col, keep="last").astype({id_col: str})
    return ids.merge(side, on=id_col, how="left").sort_values(idx_col).reset_index(drop=True)


def run(ds: str, validated: dict[str, str], params: dict | None = None) -> dict[str, str]:
    p = settings.step_params(PARAMS, params)
    clean = storage.read_parquet(validated["interactions"])
    labelled = label_interactions(
        clean,
        positive_min_rating=p["augment.positive_min_rating"],
        weight_by_rating=p["augment.weight_by_rating"],
        max_rating=p["clean.max_rating"],
    )
    out = {
        "interactions": layout.run_uri(ds, "augment", "interactions.parquet"),
        "item_features": layout.run_uri(ds, "augment", "item_features.parquet"),
        "user_features": layout.run_uri(ds, "augment", "user_features.parquet"),
    }
    storage.write_parquet(labelled, out["interactions"])
    for kind, id_col, idx_col in (
        ("item", schema.ITEM_ID, schema.ITEM_IDX),
        ("user", schema.USER_ID, schema.USER_IDX),
    ):
        uri = validated.get(f"{kind}s")
        side = storage.read_parquet(uri) if uri else None
        feats = index_features(clean, side, id_col=id_col, idx_col=idx_col)
        storage.write_parquet(feats, out[f"{kind}_features"])
    return out
