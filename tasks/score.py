"""Step 8, score: every user against every item, seen items excluded, top-K, as Parquet parts.

Scores with a model dict: the run's own ``full`` refit, or a registered model (re-score, a pinned
``model_version``). Embeddings are read with numpy only (no deep-learning import). All of ds's
cleaned interactions, mapped by external id onto the model's index, are the seen set, so nothing
a user already interacted with is recommended. Users go in index order, which is ``user_id``
order, so the parts are sorted by ``user_id``. Parts are
written to ``staging/recommendations/ds=<ds>/<run_key>/``; only publish makes them visible.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from tasks import layout, ranking, schema, settings, storage

PARAMS = ["score.top_k", "score.user_chunk", "publish.rows_per_part", "publish.row_group_size"]


def recommendations_frame(
    users: np.ndarray, items: np.ndarray, scores: np.ndarray, *, user_ids: np.ndarray,
    item_ids: np.ndarray, model_version: str, ds: str,
) -> pd.DataFrame:
    """Long table from (n, K) top-K arrays; empty slots (item -1) are dropped."""
    k = items.shape[1]
    valid = items.reshape(-1) >= 0
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[valid]
    return pd.DataFrame(
        {
            schema.USER_ID: np.repeat(user_ids[users], k)[valid],
            schema.RANK: rank,
            schema.ITEM_ID: item_ids[items.reshape(-1)[valid]],
            schema.SCORE: scores.reshape(-1)[valid].astype(np.float32),
            schema.MODEL_VERSION: model_version,
            schema.DS: ds,
        }
    )


def score_all(
    emb: dict[str, np.ndarray], seen_df: pd.DataFrame, *, user_ids: np.ndarray,
    item_ids: np.ndarray, top_k: int, user_chunk: int, model_version: str, ds: str,
):
    """Yield recommendation frames, ``user_chunk`` users at a time, in user order."""
    n_users, n_items = emb["user"].shape[0], emb["item"].shape[0]
    seen = ranking.seen_matrix(
        seen_df, n_users=n_users, n_items=n_items, user_col=schema.USER_IDX,
        item_col=schema.ITEM_IDX,
    )
    for users, items, scores in ranking.iter_top_k(
        emb["user"], emb["item"], emb["item_bias"], seen, np.arange(n_users),
        k=top_k, chunk=user_chunk,
    ):
        yield recommendations_frame(
            users, items, scores, user_ids=user_ids, item_ids=item_ids,
            model_version=model_version, ds=ds,
        )


def ids_by_index(uri: str, idx_col: str, id_col: str) -> np.ndarray:
    """External ids in index order (position i holds the id of index i)."""
    table = storage.read_parquet(uri, columns=[idx_col, id_col]).sort_values(idx_col)
    if not np.array_equal(table[idx_col].to_numpy(), np.arange(len(table))):
        raise ValueError(f"{uri}: {idx_col} is not 0..n-1")
    return table[id_col].to_numpy(dtype=str)


def seen_in_model_space(
    seen: pd.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray
) -> pd.DataFrame:
    """Map (user_id, item_id) pairs onto the model's indices; pairs it does not know drop out
    (a user or item new since the model was trained has no embedding to score with)."""
    u = pd.Index(user_ids).get_indexer(seen[schema.USER_ID].astype(str))
    i = pd.Index(item_ids).get_indexer(seen[schema.ITEM_ID].astype(str))
    keep = (u >= 0) & (i >= 0)
    return pd.DataFrame({schema.USER_IDX: u[keep], schema.ITEM_IDX: i[keep]})


def run(ds: str, model: dict, seen_uri: str, run_key: str, params: dict | None = None,
        top_k: int | None = None) -> dict:
    """Score every user of ``model`` into staging; returns ``{"parts": [uri...], "rows": n, ...}``.

    ``model``: ``embeddings``, ``users``, ``items`` URIs and ``model_version``/``data_version``
    (a fresh training run's, or a registered one: tasks/registry.py). ``seen_uri``: the cleaned
    interactions up to ds, which are excluded from each user's recommendations.
    """
    p = settings.step_params(PARAMS, params)
    k = int(top_k or p["score.top_k"])
    emb = dict(np.load(io.BytesIO(storage.read_bytes(model["embeddings"]))))
    user_ids = ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID)
    item_ids = ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID)
    seen = storage.read_parquet(seen_uri, columns=[schema.USER_ID, schema.ITEM_ID])
    seen_df = seen_in_model_space(seen, user_ids, item_ids)
    prefix = layout.staging_prefix(ds, run_key)
    storage.delete(storage.list_uris(prefix))  # a retried task starts from an empty staging dir
    parts, rows, buffer, buffered = [], 0, [], 0

    def flush() -> None:
        nonlocal buffer, buffered, rows
        if not buffer:
            return
        frame = pd.concat(buffer, ignore_index=True)
        uri = storage.join(prefix, f"part-{len(parts):05d}.parquet")
        storage.write_parquet(frame, uri, row_group_size=int(p["publish.row_group_size"]))
        parts.append(uri)
        rows += len(frame)
        buffer, buffered = [], 0

    for frame in score_all(
        emb, seen_df, user_ids=user_ids, item_ids=item_ids, top_k=k,
        user_chunk=int(p["score.user_chunk"]), model_version=model["model_version"], ds=ds,
    ):
        buffer.append(frame)
        buffered += len(frame)
        if buffered >= int(p["publish.rows_per_part"]):
            flush()
    flush()
    return {
        "parts": parts, "rows": rows, "top_k": k, "staging": prefix,
        "model_version": model["model_version"], "data_version": model["data_version"],
        "metrics": model.get("metrics"),
    }
