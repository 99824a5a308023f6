"""Step 8, score: every user against every item, seen items excluded, top-K, as Parquet parts.

Scores with a model dict: the run's own ``full`` refit, or a registered model (re-score, a pinned
``model_version``). Embeddings are read with numpy only (no deep-learning import). All of ds's
cleaned interactions, mapped by external id onto the model's index, are the seen set, so nothing
a user already interacted with is recommended.

Sharded over users, for Airflow's dynamic task mapping (one mapped task per shard):

- ``plan`` splits the model's users, in ``user_id`` order, into ``score.shards`` contiguous
  ranges and returns one small spec per shard (it also empties the run's staging folder);
- ``run_shard`` scores one range into its own folder
  ``staging/recommendations/ds=<ds>/<run_key>/shard-NNNNN/part-NNNNN.parquet``, which it empties
  first: a retried shard rewrites only its own parts, under the same keys, and nothing else;
- ``collect`` checks that every shard of the plan reported, and lists all parts in shard order.

Contiguous ``user_id`` ranges rather than a user hash: the published table is sorted by
``user_id``, so the shards' parts concatenate into it as they are, and each part covers one
``user_id`` range that a point lookup can find from the manifest alone. The cost per user is the
same for every user (all items are scored), so equal ranges balance as well as a hash would.

Each part holds whole users, rows sorted by ``(user_id, rank)``, with row groups of about
``publish.row_group_size`` rows cut at user boundaries (a user's rows are in one row group, so a
point lookup reads one), zstd, column statistics and page CRCs on. Only publish makes parts
visible to readers.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd

from tasks import layout, models, ranking, schema, settings, storage
from tasks.publish import arrow_schema

PARAMS = ["score.top_k", "score.user_chunk", "score.shards", "publish.rows_per_part",
          "publish.row_group_size"]
COLUMNS = [schema.USER_ID, schema.RANK, schema.ITEM_ID, schema.SCORE, schema.MODEL_VERSION,
           schema.DS]


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
    users: np.ndarray | None = None,
):
    """Yield recommendation frames, ``user_chunk`` users at a time, in the order of ``users``
    (model indices; default all users in index order)."""
    n_users, n_items = len(user_ids), models.n_items(emb)
    seen = ranking.seen_matrix(
        seen_df, n_users=n_users, n_items=n_items, user_col=schema.USER_IDX,
        item_col=schema.ITEM_IDX,
    )
    order = np.arange(n_users) if users is None else np.asarray(users)
    for batch, items, scores in ranking.iter_top_k(
        *models.scoring_inputs(emb, seen), seen, order, k=top_k, chunk=user_chunk,
    ):
        yield recommendations_frame(
            batch, items, scores, user_ids=user_ids, item_ids=item_ids,
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


def shard_ranges(n_users: int, *, shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges covering ``0..n_users``, sizes differing by at most one.

    ``shards``: int >= 1; fewer ranges when there are fewer users (never an empty shard, but
    always at least one range).
    """
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    n = max(1, min(shards, n_users))
    bounds = [i * n_users // n for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def row_group_bounds(user_ids: np.ndarray, *, row_group_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` row ranges of about ``row_group_size`` rows, each cut where the user changes.

    ``user_ids`` must be grouped by user (sorted). No user is ever split over two row groups, so
    a group can exceed ``row_group_size`` by up to one user's rows.
    """
    n = len(user_ids)
    if n == 0:
        return []
    changes = np.flatnonzero(user_ids[1:] != user_ids[:-1]) + 1
    starts = np.concatenate([[0], changes, [n]])
    bounds, lo = [], 0
    while lo < n:
        j = int(np.searchsorted(starts, lo + max(1, row_group_size)))  # first start >= target
        hi = int(starts[min(j, len(starts) - 1)])
        bounds.append((lo, hi))
        lo = hi
    return bounds


def part_bytes(frame: pd.DataFrame, *, row_group_size: int) -> bytes:
    """One part as Parquet bytes: row groups cut at user boundaries, stats and page CRCs on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame[COLUMNS], schema=arrow_schema(), preserve_index=False)
    buf = io.BytesIO()
    sorting = [pq.SortingColumn(0), pq.SortingColumn(1)]  # user_id, then rank
    with pq.ParquetWriter(buf, table.schema, compression="zstd", write_statistics=True,
                          write_page_checksum=True, sorting_columns=sorting) as writer:
        ids = frame[schema.USER_ID].to_numpy(dtype=str)
        for lo, hi in row_group_bounds(ids, row_group_size=row_group_size):
            writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
    return buf.getvalue()


def plan(ds: str, model: dict, seen_uri: str, run_key: str, params: dict | None = None,
         top_k: int | None = None, shards: int | None = None) -> list[dict]:
    """One spec per shard (small dicts for XCom). Empties the run's staging folder first, so a
    re-planned run starts clean; each spec names its users as a ``[lo, hi)`` range of positions
    in ``user_id`` order."""
    p = settings.step_params(PARAMS, params)
    k = int(top_k or p["score.top_k"])
    n_shards = int(shards or p["score.shards"])
    n_users = len(ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID))
    storage.delete(storage.list_uris(layout.staging_prefix(ds, run_key)))
    ranges = shard_ranges(n_users, shards=n_shards)
    return [
        {"ds": settings.check_ds(ds), "run_key": run_key, "shard": i, "shards": len(ranges),
         "users": [lo, hi], "model": model, "seen": seen_uri, "top_k": k}
        for i, (lo, hi) in enumerate(ranges)
    ]


def run_shard(spec: dict, params: dict | None = None) -> dict:
    """Score one shard's users into its own staging folder; returns its parts and counts."""
    p = settings.step_params(PARAMS, params)
    ds, model, shard = spec["ds"], spec["model"], int(spec["shard"])
    emb = dict(np.load(io.BytesIO(storage.read_bytes(model["embeddings"]))))
    user_ids = ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID)
    item_ids = ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID)
    lo, hi = spec["users"]
    # Indices in user_id order, whatever order the model numbered its users in.
    users = np.argsort(user_ids, kind="stable")[lo:hi]
    seen = storage.read_parquet(spec["seen"], columns=[schema.USER_ID, schema.ITEM_ID])
    seen_df = seen_in_model_space(seen, user_ids, item_ids)
    seen_df = seen_df[np.isin(seen_df[schema.USER_IDX].to_numpy(), users)]
    prefix = layout.shard_prefix(ds, spec["run_key"], shard)
    storage.delete(storage.list_uris(prefix))  # a retried shard starts from its own empty folder
    parts, rows, buffer, buffered = [], 0, [], 0
    rows_per_part, rg_size = int(p["publish.rows_per_part"]), int(p["publish.row_group_size"])

    def flush() -> None:
        nonlocal buffer, buffered, rows
        if not buffer:
            return
        frame = pd.concat(buffer, ignore_index=True)
        uri = storage.join(prefix, f"part-{len(parts):05d}.parquet")
        storage.write_bytes(uri, part_bytes(frame, row_group_size=rg_size))
        parts.append(uri)
        rows += len(frame)
        buffer, buffered = [], 0

    for frame in score_all(
        emb, seen_df, user_ids=user_ids, item_ids=item_ids, top_k=int(spec["top_k"]),
        user_chunk=int(p["score.user_chunk"]), model_version=model["model_version"], ds=ds,
        users=users,
    ):
        buffer.append(frame)
        buffered += len(frame)
        if buffered >= rows_per_part:
            flush()
    flush()
    return {"ds": ds, "run_key": spec["run_key"], "shard": shard, "shards": int(spec["shards"]),
            "parts": parts, "rows": rows, "users": hi - lo, "model": model,
            "top_k": int(spec["top_k"]), "seen": spec["seen"]}


def collect(results: list[dict], specs: list[dict] | None = None) -> dict:
    """Merge the shards' results into what publish takes; refuses an incomplete set of shards.

    ``specs``: where the model, ``top_k`` and seen set come from (default: the results, which
    carry them).
    """
    results = sorted(results, key=lambda r: r["shard"])
    if not results:
        raise ValueError("no shard results to collect")
    n, run_key, ds = results[0]["shards"], results[0]["run_key"], results[0]["ds"]
    got = [r["shard"] for r in results]
    if got != list(range(n)) or {(r["run_key"], r["ds"]) for r in results} != {(run_key, ds)}:
        raise ValueError(f"shards of run {run_key} ds={ds}: expected 0..{n - 1}, got {got}")
    spec = (specs or results)[0]
    model = spec["model"]
    return {
        "ds": ds, "run_key": run_key, "shards": n,
        "parts": [u for r in results for u in r["parts"]],
        "rows": sum(r["rows"] for r in results), "users": sum(r["users"] for r in results),
        "top_k": int(spec["top_k"]), "staging": layout.staging_prefix(ds, run_key),
        "seen": spec["seen"], "model_version": model["model_version"],
        "data_version": model["data_version"], "metrics": model.get("metrics"),
    }


def run(ds: str, model: dict, seen_uri: str, run_key: str, params: dict | None = None,
        top_k: int | None = None, shards: int | None = None) -> dict:
    """Every shard in this process, one after another (what the DAG does with mapped tasks).

    ``model``: ``embeddings``, ``users``, ``items`` URIs and ``model_version``/``data_version``
    (a fresh training run's, or a registered one: tasks/registry.py). ``seen_uri``: the cleaned
    interactions up to ds, which are excluded from each user's recommendations.
    """
    specs = plan(ds, model, seen_uri, run_key, params, top_k=top_k, shards=shards)
    return collect([run_shard(s, params) for s in specs], specs)
