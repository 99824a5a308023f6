"""Step 8, score: every user against every item, seen items excluded, top-K, as Parquet parts.

Scores with a model dict: the run's own ``full`` refit, a registered model (re-score, a pinned
``model_version``, the champion when the gate refused), or :func:`popularity_model` (the
popularity fallback). Embeddings are read with numpy only (no deep-learning import).

**Seen set.** ``seen_uri`` is ds's seen table (tasks/seen.py: every interaction up to ds with
valid ids, including rows clean quarantined for their value or by policy), mapped by external id
onto the model's items. Nothing in it is ever recommended to its user; its items the model does
not know cannot be recommended by that model anyway.

**Users.** The users scored are the model's users plus every user of the seen table, so a
re-score with a model fitted on an older ds covers today's new users too:

- a user the model knows keeps the model's vector (a factor model's user vector is not refitted,
  even if the user's seen set grew since; an item-item model's user vector is the user's seen
  row, so it always uses the whole seen set);
- a factor model's new user is *folded in*: the ridge solution of :func:`nightrec.ml.models.fold_in`
  (``score.fold_in_l2``) over their seen items the model knows;
- an item-item model's new user is scored from their seen row, as every user is;
- a user none of whose seen items the model knows (and, for a factor model, unknown to it) gets
  the most popular of the model's items by count in the seen table, seen items excluded (their
  ``score`` is that count).

Every scored user gets a list of ``min(top_k, unseen items)`` items.

Sharded over users, for Airflow's dynamic task mapping (one mapped task per shard):

- ``plan`` computes the sorted union of the model's and the seen table's user ids, splits it into
  ``score.shards`` contiguous ranges and returns one small spec per shard: positions ``[lo, hi)``
  and the range's first and last ``user_id``, never id lists (it also empties the run's staging
  folder);
- ``run_shard`` reads only its range (the seen table is sorted by ``user_id``, so row-group
  statistics skip the rest), checks it holds the ``hi - lo`` users the plan counted, and scores
  them into its own folder
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
import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import sparse

from nightrec.core import schema, settings
from nightrec.core.records import Evaluated, ModelChoice, RescorePlan, Scored, Seen
from nightrec.ml import models, ranking
from nightrec.store import layout, storage
from nightrec.tasks.publish import arrow_schema

PARAMS = ["score.top_k", "score.user_chunk", "score.shards", "score.fold_in_l2",
          "publish.rows_per_part", "publish.row_group_size"]
POPULARITY_SOURCE = "popularity_fallback"
log = logging.getLogger(__name__)
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


def ids_by_index(uri: str, idx_col: str, id_col: str) -> np.ndarray:
    """External ids in index order (position i holds the id of index i)."""
    table = storage.read_parquet(uri, columns=[idx_col, id_col]).sort_values(idx_col)
    if not np.array_equal(table[idx_col].to_numpy(), np.arange(len(table))):
        raise ValueError(f"{uri}: {idx_col} is not 0..n-1")
    return table[id_col].to_numpy(dtype=str)


def read_seen(uri: str, columns: list[str], *, first: str | None = None,
              last: str | None = None) -> pa.Table:
    """Columns of a seen table, only users in ``[first, last]`` (inclusive) when given. The
    table is sorted by user_id (tasks/seen.py), so row-group statistics skip other users."""
    filters = None
    if first is not None:
        filters = [(schema.USER_ID, ">=", first), (schema.USER_ID, "<=", last)]
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns, filters=filters)
    return table.cast(pa.schema([(c, pa.string()) for c in columns]))


def sorted_union(*id_arrays) -> pa.Array:
    """The distinct ids of all arrays, sorted (code point order: Python's, and Arrow's)."""
    chunks = []
    for a in id_arrays:
        if isinstance(a, pa.ChunkedArray):
            chunks.extend(a.chunks)
        elif isinstance(a, pa.Array):
            chunks.append(a)
        else:
            chunks.append(pa.array(np.asarray(a, dtype=object), pa.string()))
    ids = pa.chunked_array([c.cast(pa.string()) for c in chunks], pa.string())
    unique = pc.unique(ids)
    return pc.take(unique, pc.sort_indices(unique))


def seen_rows(seen: pa.Table, user_ids, item_ids: np.ndarray) -> sparse.csr_matrix:
    """CSR (len(user_ids) x len(item_ids)) of the seen pairs; items the model does not know drop
    out (it cannot recommend them); a user not in ``user_ids`` is an error."""
    u = pd.Index(np.asarray(user_ids, dtype=object)).get_indexer(
        seen.column(schema.USER_ID).to_numpy(zero_copy_only=False))
    i = pd.Index(item_ids).get_indexer(seen.column(schema.ITEM_ID).to_numpy(zero_copy_only=False))
    if (u < 0).any():
        raise ValueError("seen pairs of users outside the shard")
    keep = i >= 0
    return ranking.seen_matrix(pd.DataFrame({"u": u[keep], "i": i[keep]}), n_users=len(user_ids),
                               n_items=len(item_ids), user_col="u", item_col="i")


def user_inputs(emb: dict, seen: sparse.csr_matrix, model_rows: np.ndarray, *,
                fold_in_l2: float):
    """``(user_vecs, item_vecs, item_bias, cold, folded)`` for the users that are ``seen``'s rows.

    ``model_rows``: each user's index in the model, -1 for a user it does not know. ``cold``
    (bool per user): nothing to score the user with (no model vector and none of their seen items
    known to the model), so they get popular items; ``folded``: new users of a factor model whose
    vector :func:`nightrec.ml.models.fold_in` solved from their seen items.
    """
    has_seen = np.diff(seen.indptr) > 0
    if models.is_item_item(emb):
        # the seen row is the user vector, for known and new users alike
        user_vecs, item_vecs, bias = models.scoring_inputs(emb, seen)
        return user_vecs, item_vecs, bias, ~has_seen, np.zeros(len(has_seen), bool)
    known = model_rows >= 0
    folded = ~known & has_seen
    user_vecs = np.zeros((len(model_rows), emb["user"].shape[1]), np.float32)
    user_vecs[known] = emb["user"][model_rows[known]]
    if folded.any():
        user_vecs[folded] = models.fold_in(emb["item"], emb["item_bias"], seen[folded],
                                           l2=fold_in_l2)
    return user_vecs, emb["item"], emb["item_bias"], ~known & ~has_seen, folded


def item_counts(seen_items: pa.ChunkedArray, item_ids: np.ndarray) -> np.ndarray:
    """float32 per item of ``item_ids``: its rows in ``seen_items`` (the seen table's item_id
    column: one row per user who interacted with it). Exact up to 2^24 users an item."""
    counts = pc.value_counts(seen_items)
    index = pd.Index(counts.field("values").to_numpy(zero_copy_only=False))
    pos = index.get_indexer(item_ids)
    n = np.asarray(counts.field("counts").to_numpy(), np.float32)
    return np.where(pos >= 0, n[np.maximum(pos, 0)], np.float32(0)).astype(np.float32)


def popular_bias(seen_uri: str, item_ids: np.ndarray) -> np.ndarray:
    """:func:`item_counts` of the model's items over the whole seen table."""
    return item_counts(read_seen(seen_uri, [schema.ITEM_ID]).column(schema.ITEM_ID), item_ids)


def score_users(
    user_vecs, item_vecs: np.ndarray, item_bias: np.ndarray, seen: sparse.csr_matrix,
    cold: np.ndarray, popular: np.ndarray | None, *, top_k: int, user_chunk: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(rows, items, scores)`` per ``user_chunk`` rows of ``seen``, in row order: warm rows
    ranked by the model, ``cold`` rows by ``popular`` (one count per item), seen items excluded
    for both, ties to the lower item index (nightrec/ml/ranking.py)."""
    n = seen.shape[0]
    if cold.any() and popular is None:
        raise ValueError("cold users need popular item counts")
    no_vecs = np.zeros((n, 1), np.float32)
    no_items = np.zeros((len(item_bias), 1), np.float32)
    # items packed once per shard, not once per chunk (iter_top_k runs per chunk and kind)
    kinds = ((user_vecs, item_vecs, item_bias, ranking.pack_items(item_vecs)),
             (no_vecs, no_items, popular, ranking.pack_items(no_items)))
    for lo in range(0, n, max(1, user_chunk)):
        rows = np.arange(lo, min(n, lo + max(1, user_chunk)))
        items = np.empty((len(rows), top_k), np.int32)
        scores = np.empty((len(rows), top_k), np.float32)
        for mask, (vecs, ivecs, bias, panels) in zip((~cold[rows], cold[rows]), kinds,
                                                    strict=True):
            if mask.any():
                for batch, it, sc in ranking.iter_top_k(vecs, ivecs, bias, seen, rows[mask],
                                                        k=top_k, chunk=len(rows),
                                                        panels=panels):
                    items[batch - lo], scores[batch - lo] = it, sc
        yield rows, items, scores




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


def _digest(*parts: str) -> str:
    return storage.sha256("|".join(parts).encode())


def scorable(user_ids: np.ndarray) -> np.ndarray:
    """``user_ids`` without the tombstones of users erased on request (``nightrec forget``):
    a model keeps their rows (zeroed) so its indices stay valid, but they get no list."""
    if len(user_ids) == 0:
        return user_ids
    return user_ids[~np.char.startswith(user_ids.astype(str), schema.FORGOTTEN_PREFIX)]


def plan(ds: str, model: dict, seen_uri: str, run_key: str, params: dict | None = None,
         top_k: int | None = None, shards: int | None = None) -> list[dict]:
    """One spec per shard (small dicts for XCom). Empties the run's staging folder first, so a
    re-planned run starts clean.

    The users are the sorted union of the model's users and the seen table's; each spec names
    its share as positions ``users: [lo, hi)`` in that order and the ``user_ids: [first, last]``
    it spans (None for the one empty shard when there are no users at all).
    """
    p = settings.step_params(PARAMS, params)
    k = int(top_k or p["score.top_k"])
    n_shards = int(shards or p["score.shards"])
    union = sorted_union(scorable(ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID)),
                         read_seen(seen_uri, [schema.USER_ID]).column(schema.USER_ID))
    storage.delete(storage.list_uris(layout.staging_prefix(ds, run_key)))
    ranges = shard_ranges(len(union), shards=n_shards)
    return [
        {"ds": settings.check_ds(ds), "run_key": run_key, "shard": i, "shards": len(ranges),
         "users": [lo, hi],
         "user_ids": [union[lo].as_py(), union[hi - 1].as_py()] if hi > lo else None,
         "model": model, "seen": seen_uri, "top_k": k}
        for i, (lo, hi) in enumerate(ranges)
    ]


def shard_users(spec: dict, model_user_ids: np.ndarray) -> tuple[np.ndarray, pa.Table]:
    """The shard's users (sorted ids, object array) and its seen pairs; raises if the range does
    not hold the ``hi - lo`` users the plan counted (the model or the seen table changed)."""
    lo, hi = spec["users"]
    if not spec.get("user_ids"):
        empty = pa.schema([(schema.USER_ID, pa.string()), (schema.ITEM_ID, pa.string())])
        return np.array([], dtype=object), empty.empty_table()
    first, last = spec["user_ids"]
    seen = read_seen(spec["seen"], [schema.USER_ID, schema.ITEM_ID], first=first, last=last)
    in_range = scorable(model_user_ids[(model_user_ids >= first) & (model_user_ids <= last)])
    users = sorted_union(in_range, seen.column(schema.USER_ID)).to_numpy(zero_copy_only=False)
    if len(users) != hi - lo:
        raise RuntimeError(
            f"shard {spec['shard']}: user_ids {first!r}..{last!r} hold {len(users)} users, the "
            f"plan counted {hi - lo}: the model or the seen table changed since plan; re-plan")
    return users, seen


def run_shard(spec: dict, params: dict | None = None) -> dict:
    """Score one shard's users into its own staging folder; returns its parts and counts."""
    p = settings.step_params(PARAMS, params)
    ds, model, shard = spec["ds"], spec["model"], int(spec["shard"])
    emb = dict(np.load(io.BytesIO(storage.read_bytes(model["embeddings"]))))
    model_user_ids = ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID)
    item_ids = ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID)
    users, seen_pairs = shard_users(spec, model_user_ids)
    seen = seen_rows(seen_pairs, users, item_ids)
    del seen_pairs
    model_rows = pd.Index(model_user_ids).get_indexer(users)
    user_vecs, item_vecs, bias, cold, folded = user_inputs(
        emb, seen, model_rows, fold_in_l2=float(p["score.fold_in_l2"]))
    popular = popular_bias(spec["seen"], item_ids) if cold.any() else None
    prefix = layout.shard_prefix(ds, spec["run_key"], shard)
    storage.delete(storage.list_uris(prefix))  # a retried shard starts from its own empty folder
    parts, rows, buffer, buffered = [], 0, [], 0
    rows_per_part, rg_size = int(p["publish.rows_per_part"]), int(p["publish.row_group_size"])

    def flush() -> None:
        nonlocal buffer, buffered, rows
        if not buffer:
            return
        frame = pd.concat(buffer, ignore_index=True)
        uri = layout.shard_part_uri(ds, spec["run_key"], shard, len(parts))
        storage.write_bytes(uri, part_bytes(frame, row_group_size=rg_size))
        parts.append(uri)
        rows += len(frame)
        buffer, buffered = [], 0

    for batch, items, scores in score_users(
        user_vecs, item_vecs, bias, seen, cold, popular, top_k=int(spec["top_k"]),
        user_chunk=int(p["score.user_chunk"]),
    ):
        frame = recommendations_frame(batch, items, scores, user_ids=users, item_ids=item_ids,
                                      model_version=model["model_version"], ds=ds)
        buffer.append(frame)
        buffered += len(frame)
        if buffered >= rows_per_part:
            flush()
    flush()
    counts = {"known": int((model_rows >= 0).sum()), "folded_in": int(folded.sum()),
              "popular": int(cold.sum())}
    log.info("score shard %d: %d users (%s), %d rows", shard, len(users), counts, rows)
    return {"ds": ds, "run_key": spec["run_key"], "shard": shard, "shards": int(spec["shards"]),
            "parts": parts, "rows": rows, "users": len(users), "user_kinds": counts,
            "model": model, "top_k": int(spec["top_k"]), "seen": spec["seen"]}


def collect(results: list[dict], specs: list[dict] | None = None) -> Scored:
    """Merge the shards' results into what publish takes; refuses an incomplete set of shards.

    ``specs``: where the model, ``top_k`` and seen set come from (default: the results, which
    carry them). ``source``/``source_reason`` come from the model dict (``model`` unless it says
    otherwise: a fallback's dict does), for publish to write into the manifest.
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
    kinds = [r["user_kinds"] for r in results if r.get("user_kinds")]
    return Scored(
        ds=ds, run_key=run_key, shards=n,
        parts=[u for r in results for u in r["parts"]],
        rows=sum(r["rows"] for r in results), users=sum(r["users"] for r in results),
        user_kinds={k: sum(c[k] for c in kinds) for k in kinds[0]} if kinds else None,
        top_k=int(spec["top_k"]), staging=layout.staging_prefix(ds, run_key),
        seen=spec["seen"], model_version=model["model_version"],
        data_version=model["data_version"], metrics=model.get("metrics"),
        source=model.get("source") or "model", source_reason=model.get("source_reason"))


def fallback(evaluated: Evaluated, seen: Seen) -> ModelChoice:
    """The ``fallback`` task (the gate refused): the champion, re-scored on today's seen items,
    or with no champion yet the popularity model of the seen table."""
    from nightrec.tasks import registry

    why = f"the gate refused the new model: {evaluated.gate['reason']}"
    version = registry.champion()  # read once: the model scored is the one named here
    if version:
        model = {**registry.model_uris(version), "source": "champion_fallback",
                 "source_reason": why}
    else:
        model = {**popularity_model(evaluated.ds, seen.seen), "source": "popularity_fallback",
                 "source_reason": why + "; there is no champion yet"}
    return ModelChoice(ds=evaluated.ds, model=model)


def rescore_ds(ds: str | None, event_ds: list[str]) -> str:
    """The ds a re-score publishes: the ``ds`` param, else the newest champion asset event's,
    else the latest published table's."""
    from nightrec.core import settings
    from nightrec.table.reader import RecommendationReader

    return settings.check_ds(ds or (event_ds[-1] if event_ds else
                                    RecommendationReader().latest_ds()))


def rescore_plan(ds: str, model_version: str | None) -> RescorePlan | None:
    """What a re-score of ``ds`` scores: ``model_version`` (else the champion) and ds's seen
    table; None when ds's table is already published by that model and none was pinned."""
    from nightrec.tasks import registry
    from nightrec.tasks import seen as seen_step

    model = registry.resolve(model_version)
    version = model["model_version"]
    current = (storage.read_json(layout.manifest_uri(ds))
               if storage.exists(layout.manifest_uri(ds)) else {})
    if current.get("model_version") == version and not model_version:
        log.info("ds=%s is already published by %s: nothing to do", ds, version)
        return None
    model = {**model, "source": "champion_rescore",
             "source_reason": f"re-score with {version} (rescore_recommendations)"}
    return RescorePlan(ds=ds, model=model, seen=seen_step.build(ds))


def popularity_model(ds: str, seen_uri: str, reason: str | None = None) -> dict:
    """The popularity baseline as a factor model, for the fallback when the gate refuses and no
    champion exists: every user of the seen table (zero vector, d = 1) and every item of it, with
    ``item_bias`` = the number of users who interacted with the item. Scored like any model, each
    user gets the most popular items they have not seen, ties to the lower item index (items are
    numbered in item_id order, so: the lower item_id).

    Writes ``runs/ds=<ds>/fallback/{embeddings.npz, users.parquet, items.parquet}``; returns the
    model dict, ``model_version`` ``popular-YYYYMMDD-<8 hex>``, ``data_version`` a hash of the
    seen table's ETag, ``source: popularity_fallback`` and ``source_reason`` (``reason``).
    """
    settings.check_ds(ds)
    seen = read_seen(seen_uri, [schema.USER_ID, schema.ITEM_ID])
    users = sorted_union(seen.column(schema.USER_ID)).to_numpy(zero_copy_only=False)
    items = sorted_union(seen.column(schema.ITEM_ID)).to_numpy(zero_copy_only=False)
    counts = item_counts(seen.column(schema.ITEM_ID), items)
    del seen
    emb = {"user": np.zeros((len(users), 1), np.float32),
           "item": np.zeros((len(items), 1), np.float32), "item_bias": counts}
    out = {name: layout.run_uri(ds, "fallback", f"{name}.{ext}") for name, ext in (
        ("embeddings", "npz"), ("users", "parquet"), ("items", "parquet"))}
    buf = io.BytesIO()
    np.savez(buf, **emb)
    storage.write_bytes(out["embeddings"], buf.getvalue())
    storage.write_parquet(pd.DataFrame({schema.USER_IDX: np.arange(len(users), dtype=np.int32),
                                        schema.USER_ID: pd.Series(users, dtype=object)}),
                          out["users"])
    storage.write_parquet(pd.DataFrame({schema.ITEM_IDX: np.arange(len(items), dtype=np.int32),
                                        schema.ITEM_ID: pd.Series(items, dtype=object)}),
                          out["items"])
    etag = (storage.head(seen_uri) or {}).get("etag") or ""
    data_version = _digest(seen_uri, etag)[:32]
    version = f"popular-{ds.replace('-', '')}-{_digest('popular', data_version)[:8]}"
    return {**out, "model_version": version, "data_version": data_version,
            "source": POPULARITY_SOURCE, "source_reason": reason,
            "metrics": None}


def run(ds: str, model: dict, seen_uri: str, run_key: str, params: dict | None = None,
        top_k: int | None = None, shards: int | None = None) -> Scored:
    """Every shard in this process, one after another (what the DAG does with mapped tasks).

    ``model``: ``embeddings``, ``users``, ``items`` URIs and ``model_version``/``data_version``
    (a fresh training run's, a registered one: tasks/registry.py, or :func:`popularity_model`).
    ``seen_uri``: ds's seen table (tasks/seen.py), excluded from each user's recommendations;
    its users are scored too.
    """
    specs = plan(ds, model, seen_uri, run_key, params, top_k=top_k, shards=shards)
    return collect([run_shard(s, params) for s in specs], specs)
