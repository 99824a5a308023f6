"""Step 4, augment: what training needs beyond the cleaned events. Three parts, each for a reason:

1. **Labels and weights** (:func:`label_interactions`), so that one table serves explicit and
   implicit feeds alike:

   - ``label`` (int8 in {0, 1}): 1 when ``rating >= augment.positive_min_rating`` or when the
     feed has no rating (implicit feedback: an event is a positive), else 0. Models train on
     positives and evaluation counts positives as hits; a 0 is an *observed* dislike, never a
     sampled negative.
   - ``weight`` (float32 in (0, 1]): how much a positive counts in the loss. 1.0, or
     ``rating / clean.max_rating`` when ``augment.weight_by_rating``; times
     ``0.5 ** (age / augment.recency_half_life_days)`` when that is set, the age in days of the
     event at the end of the run's day (recent taste counts more); floored at ``MIN_WEIGHT`` so
     no event weighs 0.

2. **Side features** (:func:`index_features`, :func:`encode_features`), typed for a model to use.
   They are kept as their own tables keyed by the dense index (``item_features`` by
   ``item_idx``, ``user_features`` by ``user_idx``, one row per index in index order) rather
   than joined onto every event: a join would copy each item's features once per event, and
   training looks rows up by index anyway. Catalogue entries for items or users the
   interactions do not contain are dropped; interacting ones missing from the catalogue get
   missing values. Columns are typed by ``augment.item_features`` / ``augment.user_features``:

   - ``numeric``: float32, NaN when missing or not a number (``year``, ``age``);
   - ``categorical``: int32 codes, 0 for missing, 1..V in sorted order of the values
     (``gender``, ``occupation``): an embedding table of V + 1 rows takes them as they are;
   - ``multi_hot``: the column becomes a sorted list of tokens, and ``<column>_multi_hot`` an
     int8 list of length V over the sorted vocabulary (``genres``). Tokens are split on ``|``
     when any value of the column has one (ML-20M), else on ``,`` when any has one, else on
     blanks (ML-100K's ``Animation Children's Comedy``);
   - any other column stays text (``title``). A listed column the side table lacks comes out
     all-missing, so the tables' schema does not depend on the input.

   The vocabularies are this run's (codes can change between runs, as the dense indices do);
   ``feature_encoding.json`` records them, and the registry keeps the feature tables with the
   model that used them.

3. **Negative sampling** (:func:`sample_negatives`), called by train at fit time rather than
   stored here. With ``seen`` = the train split's items, a user's valid/test item is drawn as a
   negative as often as any other unseen item, so the negatives say nothing about the held-out
   events; sampling here, before the split, with every event as seen, would leak them (their
   items would never be negatives). And each epoch gets fresh negatives. Items are drawn with
   probability proportional to ``count ** augment.negative_alpha`` (0: uniform, 0.75: word2vec's
   smoothed popularity, 1: popularity), never one the user has seen,
   ``augment.negatives_per_positive`` per positive, seeded. Popular items are the informative
   negatives (the user likely knew them and did not choose them), and sampling them often
   counters the popularity bias a uniform sampler leaves in the scores.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from nightrec.core import engine, schema, settings
from nightrec.core.records import Augmented, Validated
from nightrec.store import layout, storage

PARAMS = [
    "augment.positive_min_rating",
    "augment.weight_by_rating",
    "augment.recency_half_life_days",
    "augment.item_features",
    "augment.user_features",
    "clean.max_rating",
]
MIN_WEIGHT = 1e-6  # the floor of a decayed weight: old events count little, never nothing
FEATURE_KINDS = ("numeric", "categorical", "multi_hot")
MULTI_HOT_SUFFIX = "_multi_hot"
_REJECTION_ROUNDS = 16  # rounds of redrawing collisions before exact per-user sampling
_CHUNK_ROWS = 1 << 20  # users sampled per block (bounds memory; part of what a seed gives)
log = logging.getLogger(__name__)


# --- 1. labels and weights -------------------------------------------------------------------


def label_interactions(
    clean: pd.DataFrame, *, positive_min_rating: float, weight_by_rating: bool, max_rating: float,
    recency_half_life_days: float | None = None, now: float | None = None,
) -> pd.DataFrame:
    """Add ``label`` (int8 in {0, 1}) and ``weight`` (float32 in (0, 1]) to cleaned interactions.

    ``recency_half_life_days`` (> 0, or None for no decay) needs ``now`` (unix seconds, the end
    of the run's day) and the ``timestamp`` column; events after ``now`` count as age 0.
    """
    rating = clean[schema.RATING]
    implicit = rating.isna()
    out = clean.copy()
    out[schema.LABEL] = (implicit | (rating >= positive_min_rating)).astype("int8")
    w = np.where(implicit, 1.0, rating / max_rating) if weight_by_rating else np.ones(len(out))
    if recency_half_life_days is not None:
        if not recency_half_life_days > 0 or now is None:
            raise ValueError("augment.recency_half_life_days must be > 0 and needs `now`, got "
                             f"{recency_half_life_days!r}, now={now!r}")
        age_days = np.maximum(0.0, now - clean[schema.TIMESTAMP].to_numpy("float64")) / 86400.0
        w = w * np.exp2(-age_days / float(recency_half_life_days))
    out[schema.WEIGHT] = np.clip(np.asarray(w, dtype="float64"), MIN_WEIGHT, 1.0).astype("float32")
    return out


# --- 2. side features --------------------------------------------------------------------------


def index_features(
    clean: pd.DataFrame, side: pd.DataFrame | None, *, id_col: str, idx_col: str
) -> pd.DataFrame:
    """One row per dense index, in index order, with the side table's columns (nulls if absent)."""
    ids = clean.drop_duplicates(idx_col)[[idx_col, id_col]].sort_values(idx_col)
    if side is None or id_col not in side.columns:
        return ids.reset_index(drop=True)
    side = side.drop_duplicates(id_col, keep="last").astype({id_col: str})
    side = side.drop(columns=[c for c in side.columns if c == idx_col])
    return ids.merge(side, on=id_col, how="left").sort_values(idx_col).reset_index(drop=True)


def _text(values: pd.Series) -> pd.Series:
    """Stripped text, None for missing or blank."""
    cells = [None if pd.isna(v) else (str(v).strip() or None) for v in values.tolist()]
    return pd.Series(cells, index=values.index, dtype="object")


def _separator(values: pd.Series) -> str:
    present = values.dropna()
    for sep in ("|", ","):
        if present.str.contains(sep, regex=False).any():
            return re.escape(sep)
    return r"\s+"


def encode_features(
    table: pd.DataFrame, *, numeric: list[str] = (), categorical: list[str] = (),
    multi_hot: list[str] = (),
) -> tuple[pd.DataFrame, dict]:
    """Type the listed columns of a feature table (see the module doc); returns (table,
    encoding), ``encoding[column] = {"kind", "vocabulary"?, "separator"?}``."""
    out = table.copy()
    encoding: dict[str, dict] = {}
    listed = [*numeric, *categorical, *multi_hot]
    if len(set(listed)) != len(listed):
        raise ValueError(f"a feature column is listed under two kinds: {listed}")
    for col in listed:
        if col not in out.columns:
            out[col] = pd.Series([None] * len(out), dtype="object", index=out.index)
    for col in numeric:
        out[col] = pd.to_numeric(_text(out[col]), errors="coerce").astype("float32")
        encoding[col] = {"kind": "numeric"}
    for col in categorical:
        values = _text(out[col])
        vocab = sorted(set(values.dropna()))
        codes = pd.Categorical(values, categories=vocab).codes.astype("int32") + 1
        out[col] = codes  # pandas gives -1 for missing: 0 after the shift
        encoding[col] = {"kind": "categorical", "vocabulary": vocab}
    for col in multi_hot:
        values = _text(out[col])
        sep = _separator(values)
        tokens = [sorted({t for t in re.split(sep, v) if t}) if v is not None else []
                  for v in values]
        vocab = sorted({t for row in tokens for t in row})
        position = {t: k for k, t in enumerate(vocab)}
        hot = np.zeros((len(tokens), len(vocab)), dtype=np.int8)
        for r, row in enumerate(tokens):
            hot[r, [position[t] for t in row]] = 1
        out[col] = pd.Series(tokens, index=out.index, dtype="object")
        out[col + MULTI_HOT_SUFFIX] = pd.Series(list(hot), index=out.index, dtype="object")
        encoding[col] = {"kind": "multi_hot", "vocabulary": vocab,
                         "separator": {re.escape("|"): "|", re.escape(","): ","}.get(sep, "blank")}
    return out, encoding


# --- 3. negative sampling ---------------------------------------------------------------------


def item_popularity(item_idx: np.ndarray, *, n_items: int) -> np.ndarray:
    """Events per item (int64, length ``n_items``): the ``item_counts`` of sample_negatives."""
    return np.bincount(np.asarray(item_idx, dtype=np.int64), minlength=n_items)


def seen_matrix(user_idx: np.ndarray, item_idx: np.ndarray, *, n_users: int,
                n_items: int) -> sp.csr_matrix:
    """A binary users x items CSR matrix of the given (user, item) pairs (duplicates once)."""
    u = np.asarray(user_idx, dtype=np.int64)
    i = np.asarray(item_idx, dtype=np.int64)
    m = sp.csr_matrix((np.ones(len(u), dtype=np.int8), (u, i)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1
    return m


def _binary(seen) -> sp.csr_matrix:
    """``seen`` as CSR with sorted, unique column indices and no explicit zeros."""
    m = sp.csr_matrix(seen, copy=True)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    return m


@numba.njit(cache=True, nogil=True)
def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table (Vose's construction): O(1) draws from ``weights`` (>= 0)."""
    n = len(weights)
    scaled = weights / weights.sum() * n
    prob = np.zeros(n)
    alias = np.arange(n)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        nl -= 1
        s, g = small[ns], large[nl]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = scaled[g] + scaled[s] - 1.0
        if scaled[g] < 1.0:
            small[ns] = g
            ns += 1
        else:
            large[nl] = g
            nl += 1
    for k in range(nl):
        prob[large[k]] = 1.0
    for k in range(ns):  # left over by rounding only: their mass is 1 up to rounding
        prob[small[k]] = 1.0
    top = np.argmax(weights)
    for i in range(n):  # a zero-weight item left over by rounding must not become drawable
        if weights[i] <= 0.0 and alias[i] == i:
            prob[i] = 0.0
            alias[i] = top
    return prob, alias


@numba.njit(cache=True, nogil=True)
def _collisions(rows: np.ndarray, items: np.ndarray, indptr: np.ndarray,
                indices: np.ndarray) -> np.ndarray:
    """``out[k, j]``: ``items[k, j]`` is in row ``rows[k]`` of a CSR matrix with sorted rows."""
    n, m = items.shape
    out = np.zeros((n, m), np.bool_)
    for k in range(n):
        lo0, hi0 = indptr[rows[k]], indptr[rows[k] + 1]
        for j in range(m):
            x = items[k, j]
            lo, hi = lo0, hi0
            while lo < hi:
                mid = (lo + hi) >> 1
                if indices[mid] < x:
                    lo = mid + 1
                else:
                    hi = mid
            out[k, j] = lo < hi0 and indices[lo] == x
    return out


def _draw(prob: np.ndarray, alias: np.ndarray, rng: np.random.Generator, size) -> np.ndarray:
    """Alias-method draws: a uniform column, kept with its probability, else its alias."""
    n = len(prob)
    col = np.minimum((rng.random(size) * n).astype(np.int64), n - 1)
    return np.where(rng.random(size) < prob[col], col, alias[col])


def _draw_exact(weights: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Inverse-CDF draws; an empty CDF step (weight 0) is never hit, and ``last`` (the last
    item with weight) bounds a draw that rounding pushed past the end."""
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    last = int(np.flatnonzero(weights > 0)[-1])
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), last)


def sample_negatives(
    users: np.ndarray, seen: sp.csr_matrix, *, n_neg: int, item_counts: np.ndarray,
    alpha: float, seed: int | np.random.Generator,
) -> np.ndarray:
    """Draw ``n_neg`` negative items for each entry of ``users``.

    Returns int32 ``(len(users), n_neg)`` item indices. Each is drawn independently (with
    replacement, so a row may repeat an item) with probability proportional to
    ``item_counts ** alpha`` among the items the user has *not* seen: ``seen`` is a users x
    items sparse matrix whose row ``u`` holds user ``u``'s items (any stored nonzero counts as
    seen). ``alpha = 0`` is uniform over all items (``0 ** 0 = 1``: never-counted items too);
    for ``alpha > 0`` an item with count 0 is never drawn. Deterministic for a given ``seed`` (an
    int, or a Generator, which is advanced).

    Vectorised: Walker alias draws for a block of users at once, then only the collisions with
    ``seen`` are redrawn, up to 16 rounds; positions still colliding after that (users who have
    seen most of the probability mass) are drawn exactly from the user's own unseen
    distribution. About 1 s per 10M draws on one core.

    Raises ValueError when a user has no unseen item with nonzero probability (the caller
    should leave such users out: nothing can be a negative for them), or on malformed input.
    """
    users = np.asarray(users)
    if users.ndim != 1 or (users.size and not np.issubdtype(users.dtype, np.integer)):
        raise ValueError(f"users must be a 1-D integer array, got {users.dtype} {users.shape}")
    if not sp.issparse(seen) or seen.ndim != 2:
        raise ValueError("seen must be a scipy.sparse users x items matrix")
    n_users, n_items = seen.shape
    counts = np.asarray(item_counts, dtype=np.float64)
    if counts.shape != (n_items,):
        raise ValueError(f"item_counts has shape {counts.shape}, seen has {n_items} items")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("item_counts must be finite and >= 0")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    if isinstance(n_neg, bool) or int(n_neg) != n_neg or n_neg < 0:
        raise ValueError(f"n_neg must be an integer >= 0, got {n_neg!r}")
    n_neg = int(n_neg)
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise ValueError(f"users must be row indices of seen, in 0..{n_users - 1}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.empty((len(users), n_neg), dtype=np.int32)
    if out.size == 0:
        return out

    weights = np.power(counts, float(alpha))
    has_weight = weights > 0
    if not has_weight.any():
        raise ValueError("no item has a nonzero sampling weight (item_counts all 0, alpha > 0)")
    seen = _binary(seen)
    open_items = int(has_weight.sum()) - seen @ has_weight.astype(np.int64)
    closed = open_items[users] < 1
    if closed.any():
        bad = np.unique(users[closed])
        raise ValueError(
            f"{len(bad)} user(s) have no unseen item with nonzero probability (e.g. user "
            f"{int(bad[0])}); leave them out of negative sampling")
    prob, alias = _alias_table(weights)
    indptr = seen.indptr.astype(np.int64)
    indices = seen.indices.astype(np.int64)

    for lo in range(0, len(users), _CHUNK_ROWS):
        rows = users[lo:lo + _CHUNK_ROWS].astype(np.int64)
        block = _draw(prob, alias, rng, (len(rows), n_neg))
        bad_r, bad_c = np.nonzero(_collisions(rows, block, indptr, indices))
        for _ in range(_REJECTION_ROUNDS):
            if not len(bad_r):
                break
            redrawn = _draw(prob, alias, rng, len(bad_r))
            block[bad_r, bad_c] = redrawn
            still = _collisions(rows[bad_r], redrawn[:, None], indptr, indices)[:, 0]
            bad_r, bad_c = bad_r[still], bad_c[still]
        if len(bad_r):  # exact: each remaining user's own distribution over unseen items
            owner = rows[bad_r]
            order = np.lexsort((bad_c, bad_r, owner))
            bad_r, bad_c, owner = bad_r[order], bad_c[order], owner[order]
            starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            for a, b in zip(starts, [*starts[1:], len(owner)]):
                w = weights.copy()
                w[indices[indptr[owner[a]]:indptr[owner[a] + 1]]] = 0.0
                block[bad_r[a:b], bad_c[a:b]] = _draw_exact(w, rng, b - a)
        out[lo:lo + len(rows)] = block
    return out


# --- the step -----------------------------------------------------------------------------------


def bucket_files(root: Path) -> list[Path]:
    """The ``bucket=NNN/*.parquet`` files of a local bucketed table, in bucket order."""
    return sorted(Path(root).glob("bucket=*/*.parquet"))


def run(validated: Validated, params: dict | None = None) -> Augmented:
    """Labels and weights bucket by bucket (memory: one bucket), the side-feature tables from
    the distinct (index, id) pairs the engine reads from every bucket."""
    ds = validated.ds
    params = params if params is not None else settings.load_params()
    p = settings.step_params(PARAMS, params)
    end_of_day = (pd.Timestamp(settings.check_ds(ds), tz="UTC") + pd.Timedelta(days=1)).timestamp()
    half_life = p["augment.recency_half_life_days"]
    out = {
        "interactions": layout.bucketed_prefix(ds, "augment", "interactions"),
        "item_features": layout.run_uri(ds, "augment", "item_features.parquet"),
        "user_features": layout.run_uri(ds, "augment", "user_features.parquet"),
        "feature_encoding": layout.run_uri(ds, "augment", "feature_encoding.json"),
    }
    encodings = {}
    with tempfile.TemporaryDirectory(prefix="nightrec-augment-",
                                     dir=engine.spill_root()) as tmp, \
            engine.connect("augment", params) as con:
        local = Path(tmp) / "clean"
        glob = storage.download_table(validated.interactions, local)
        storage.delete(storage.list_uris(out["interactions"]))  # a rerun's older buckets
        for path in bucket_files(local) or [Path(glob)]:
            labelled = label_interactions(
                storage.parquet_frame(path),
                positive_min_rating=p["augment.positive_min_rating"],
                weight_by_rating=p["augment.weight_by_rating"],
                max_rating=p["clean.max_rating"],
                recency_half_life_days=None if half_life is None else float(half_life),
                now=end_of_day,
            )
            name = path.parent.name if path.parent.name.startswith("bucket=") else "bucket=000"
            storage.write_parquet(labelled, out["interactions"] + f"{name}/{path.name}")
            del labelled
        for kind, id_col, idx_col in (
            ("item", schema.ITEM_ID, schema.ITEM_IDX),
            ("user", schema.USER_ID, schema.USER_IDX),
        ):
            ids = con.execute(f"SELECT DISTINCT {idx_col}, {id_col} FROM "
                              f"read_parquet({engine.quote(glob)}) ORDER BY {idx_col}").df()
            uri = getattr(validated, f"{kind}s")
            side = storage.read_parquet(uri) if uri else None
            feats = index_features(ids, side, id_col=id_col, idx_col=idx_col)
            spec = p[f"augment.{kind}_features"] or {}
            unknown = set(spec) - set(FEATURE_KINDS)
            if unknown:
                raise ValueError(f"augment.{kind}_features: unknown kinds {sorted(unknown)}; "
                                 f"use {FEATURE_KINDS}")
            feats, encodings[kind] = encode_features(
                feats, **{k: list(spec.get(k) or []) for k in FEATURE_KINDS})
            storage.write_parquet(feats, out[f"{kind}_features"])
    storage.write_json(out["feature_encoding"], {"ds": ds, **encodings})
    return Augmented(ds=ds, **out)
