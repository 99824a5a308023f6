"""The model families nightrec trains, and how a trained model turns into scores.

Both are written with ``keras.ops`` only, so they run under any Keras backend (TensorFlow by
default; a GPU check can run them under JAX or PyTorch).

- ``ease``: the closed-form item-item model EASE (Steck 2019) with the *emphasized denoising*
  regulariser of EDLAE (Steck 2020): ``B = I - P diag(1/diag(P))`` with zero diagonal, where
  ``P = (X^T X + diag(Lambda))^-1`` and ``Lambda = l2 + dropout/(1-dropout) * diag(X^T X)``.
  ``dropout = 0`` is plain EASE. The score of (u, i) is ``x_u . B[:, i]``, ``x_u`` being the
  user's 0/1 interaction row. Cost: an ``n_items^2`` matrix and an ``n_items^3`` inverse, so it
  is fitted only while the catalogue is at most ``train.ease.max_items``.
- ``mf_softmax``: an embedding dot product (user vector, item vector, item bias), trained with
  a full softmax over the catalogue (tasks/train.py).

A trained model is exported as ``embeddings.npz`` that scoring reads with numpy only:

- a factor model: ``user`` (n_users, d), ``item`` (n_items, d), ``item_bias`` (n_items,);
- an item-item model: ``item_item`` (n_items, n_items), ``item_bias`` (n_items,); its user
  vectors are the users' interaction rows, built at scoring time from the seen matrix, so an
  item-item model also uses interactions newer than itself when it re-scores a later ds.

:func:`scoring_inputs` gives, for either kind, the ``(user_vecs, item_vecs, item_bias)`` that
``nightrec.ml.ranking.iter_top_k`` ranks with.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
from scipy import sparse

KINDS = ("ease", "rp3beta", "ials", "sasrec", "mf_softmax")
UNKNOWN_ITEM_BIAS = -1e30  # an item a model never saw ranks below every item it knows


_KERAS_COPY_WARNING = "__array__ implementation doesn't accept a copy keyword"


def keras_module():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    # Keras' TensorFlow backend converts tensors with np.array(x), and TensorFlow's __array__
    # predates NumPy 2's copy keyword: one DeprecationWarning per conversion, dozens per fit
    # in a task's log (Airflow records warnings), none of them about nightrec's code. Put
    # first once, and again only if another filter has gone in front of it since (each
    # filterwarnings call resets the registry of warnings already shown once).
    first = warnings.filters[0] if warnings.filters else None
    if not (first and first[0] == "ignore"
            and getattr(first[1], "pattern", None) == _KERAS_COPY_WARNING):
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=_KERAS_COPY_WARNING)

    return keras


def is_item_item(emb: dict) -> bool:
    return "item_item" in emb


def n_items(emb: dict) -> int:
    return int(emb["item_bias"].shape[0])


def interaction_matrix(df: pd.DataFrame, *, n_users: int, n_items: int, user_col: str,
                       item_col: str) -> sparse.csr_matrix:
    """0/1 CSR (n_users x n_items) of the (user, item) pairs in ``df`` (duplicates count once)."""
    m = sparse.csr_matrix(
        (np.ones(len(df), np.float32), (df[user_col].to_numpy(), df[item_col].to_numpy())),
        shape=(n_users, n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def fit_ease(x: sparse.csr_matrix, *, l2: float, dropout: float,
             max_items: int | None = None) -> dict[str, np.ndarray]:
    """EASE/EDLAE weights for the 0/1 matrix ``x``, computed in float64.

    The Gram matrix is a sparse product (scipy); the regularised inverse, the only O(n^3) part,
    runs on the Keras backend when a GPU is present, in LAPACK otherwise.

    ``max_items``: with more items than this, EASE is fitted on the ``max_items`` items with the
    most interactions (the *head*; ties to the lower index) and the export carries
    ``item_index`` (the head's item indices, ascending): B is head x head, the other items are
    never recommended by it (bias ``UNKNOWN_ITEM_BIAS``) and do not enter users' scores. An
    approximation whose memory (3 head^2 float64) and time (head^3) are bounded whatever the
    catalogue; benchmarks/RESULTS.md measures it against EASE over every item.
    """
    gram, head = item_gram(x, max_items=max_items)
    return ease_from_gram(gram, head, x.shape[1], l2=l2, dropout=dropout)


def item_gram(x, *, max_items: int | None = None, user_weight: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(X^T W X as dense float64, head)`` of the user x item 0/1 matrix ``x``: over the
    ``max_items`` most interacted items (``head``, ascending indices) when there are more, else
    every item (``head`` None). ``user_weight``: a weight per user (W's diagonal; 1 if None)."""
    n_items = x.shape[1]
    head = None
    # items x users, an item's row its users: no copy when x is the transpose of such a CSR
    # (tasks/train.py builds it that way), one otherwise
    xt = (x if sparse.issparse(x) else sparse.csr_matrix(x)).T.tocsr()
    if max_items is not None and n_items > max_items:
        counts = np.diff(xt.indptr)
        head = np.sort(np.argsort(-counts, kind="stable")[:max_items]).astype(np.int64)
        xt = xt[head]
    if user_weight is None:
        return gram_matrix(xt), head
    weighted = xt.multiply(np.asarray(user_weight, np.float64)[None, :]).tocsr()
    return gram_matrix(weighted, right=xt), head


WINDOW_CHUNK = 20_000_000  # nonzeros of the sliding-window matrix per block of users


def window_gram(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, *, n_items: int,
                head: np.ndarray | None, window: int) -> np.ndarray:
    """The order-local co-occurrence of each user's items, dense float64 over ``head`` (None:
    every item): entry (i, j) sums ``max(0, 1 - d / (window + 1))`` over the users who have
    both items, ``d`` the distance of their positions in the user's order. A position is a
    distinct timestamp of the user: items met at the same second share one (``d`` = 0, weight
    1), so the order of tied events, which the log does not give, plays no part. A pair met
    several times counts once, at its latest event; the diagonal is each item's user count, as
    in the plain Gram.

    Built as ``Z'Z / (window + 1)``, ``Z`` holding a row per user and window start ``r`` with the
    items at positions ``r - window .. r``: two items ``d`` positions apart share ``window + 1 -
    d`` of those rows, which is the triangular (Bartlett) kernel. Being a Gram matrix it is
    positive semi-definite, so EASE's Cholesky solve of the plain Gram plus any non-negative
    multiple of it needs no more ``l2`` than before. ``Z`` has ``window + 1`` nonzeros per event;
    it is built for a block of users at a time (``WINDOW_CHUNK``), and the train step bounds
    the events by ``window_max_events``."""
    window = int(window)
    if window < 1:
        raise ValueError(f"train.ease.window must be >= 1 or null, got {window}")
    user = np.asarray(user, np.int64)
    item = np.asarray(item, np.int64)
    ts = np.asarray(timestamp, np.int64)
    n = n_items if head is None else len(head)
    out = np.zeros((n, n))
    if len(user) == 0:
        return out
    # one event per (user, item), at its latest timestamp
    order = np.lexsort((ts, item, user))
    u, i, t = user[order], item[order], ts[order]
    last = np.ones(len(u), bool)
    last[:-1] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i, t = u[last], i[last], t[last]
    # each user's events in time order; a position per distinct timestamp
    by_time = np.lexsort((t, u))
    u, i, t = u[by_time], i[by_time], t[by_time]
    first = np.r_[True, u[1:] != u[:-1]]
    step = first | np.r_[True, t[1:] != t[:-1]]
    # rows of Z: users kept apart by `window` empty starts between them
    row0 = np.cumsum(step) - 1 + (np.cumsum(first) - 1) * window
    if head is not None:
        lookup = np.full(n_items, -1, np.int64)
        lookup[head] = np.arange(len(head))
        i = lookup[i]
        keep = i >= 0
        row0, i, first = row0[keep], i[keep], first[keep]
    starts = np.flatnonzero(first) if len(first) else np.zeros(0, np.int64)
    bounds = [0]  # blocks of whole users, about WINDOW_CHUNK nonzeros each
    per_block = max(1, WINDOW_CHUNK // (window + 1))
    for s in starts[1:]:
        if s - bounds[-1] >= per_block:
            bounds.append(int(s))
    bounds.append(len(i))
    span = np.arange(window + 1)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi <= lo:
            continue
        rows = (row0[lo:hi, None] - row0[lo] + span[None, :]).ravel()
        cols = np.repeat(i[lo:hi], window + 1)
        zt = sparse.csr_matrix((np.ones(len(rows), np.float32), (cols, rows)),
                               shape=(n, int(rows.max()) + 1))
        out += gram_matrix(zt)
    out /= window + 1
    return out


def _head_export(b: np.ndarray, head: np.ndarray | None, n_items: int) -> dict[str, np.ndarray]:
    """An item-item export (module docstring) of ``b`` over ``head`` (None: every item)."""
    if head is None:
        return {"item_item": b, "item_bias": np.zeros(b.shape[0], np.float32)}
    bias = np.full(n_items, UNKNOWN_ITEM_BIAS, np.float32)
    bias[head] = 0.0
    return {"item_item": b, "item_bias": bias, "item_index": head}


def ease_from_gram(gram: np.ndarray, head: np.ndarray | None, n_items: int, *, l2: float,
                   dropout: float) -> dict[str, np.ndarray]:
    """:func:`fit_ease` from :func:`item_gram`'s output; ``gram`` is overwritten on the CPU
    (pass a copy to solve it again with other values: the in-loop search does)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"train.ease.dropout must be in [0, 1), got {dropout}")
    if l2 <= 0:
        raise ValueError(f"train.ease.l2 must be > 0, got {l2}")
    from nightrec.ml import ials

    b = _ease_solve_keras(gram, l2, dropout) if ials.gpu_count() else _ease_solve_lapack(
        gram, l2, dropout)
    np.fill_diagonal(b, 0.0)  # zero diagonal: no self-loops
    return _head_export(b, head, n_items)


def fit_rp3beta(x, *, alpha: float, beta: float, max_items: int | None = None,
                gram: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """RP3beta (Paudel et al. 2016; the form of Ferrari Dacrema et al. 2019), an item-item
    random walk item -> user -> item re-weighted by popularity, for the 0/1 matrix ``x``:

    ``W[i, j] = deg(i)^-alpha * sum_u x_ui x_uj deg(u)^-alpha * deg(j)^-beta``, zero diagonal:
    the transition probabilities of the walk raised to ``alpha``, and the arrival item's
    popularity to the power ``-beta`` (beta > 0 lifts the long tail). Dense, as EASE's B, and
    over the same head above ``max_items`` items. ``gram``: :func:`item_gram` of ``x`` with
    ``user_weight = deg(u)^-alpha`` when a search already has it (it depends on alpha only)."""
    if alpha <= 0 or beta < 0:
        raise ValueError(f"train.rp3beta needs alpha > 0 and beta >= 0, got {alpha}, {beta}")
    n_items = x.shape[1]
    if gram is None:
        gram = item_gram(x, max_items=max_items, user_weight=rp3_user_weight(x, alpha))
    g, head = gram
    xt = (x if sparse.issparse(x) else sparse.csr_matrix(x)).T.tocsr()
    deg = np.diff(xt.indptr).astype(np.float64)
    if head is not None:
        deg = deg[head]
    safe = np.maximum(deg, 1.0)
    w = (g * (safe ** -alpha)[:, None] * (safe ** -beta)[None, :]).astype(np.float32)
    np.fill_diagonal(w, 0.0)
    return _head_export(w, head, n_items)


def rp3_user_weight(x, alpha: float) -> np.ndarray:
    """``deg(u)^-alpha`` per user of ``x`` (users without interactions: 0)."""
    deg = np.asarray((x if sparse.issparse(x) else sparse.csr_matrix(x)).sum(axis=1)).ravel()
    return np.where(deg > 0, np.maximum(deg, 1.0) ** -alpha, 0.0)


def gram_matrix(xt: sparse.csr_matrix, block: int = 1024, right=None) -> np.ndarray:
    """``X^T X`` as a dense float64 array, from ``xt`` = X^T (items x users, CSR), a block of
    ``block`` columns at a time: the sparse product of the whole would hold up to n^2 nonzeros
    (12 bytes each) and a float32 copy beside the result (~1.3 GB more at 8,000 items); a block
    holds n x block. Entries are co-occurrence counts: exact in float32 below 2^24. ``right``:
    the other factor's X^T when it differs from ``xt`` (a user-weighted product)."""
    n = xt.shape[0]
    right = xt if right is None else right
    gram = np.empty((n, n), np.float64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        gram[:, lo:hi] = (xt @ right[lo:hi].T).toarray()
    return gram


def _ease_solve_keras(gram: np.ndarray, l2: float, dropout: float) -> np.ndarray:
    """B = -P / diag(P) with P = (G + diag(lam))^-1, on the Keras backend (a GPU when present)."""
    keras = keras_module()
    from keras import ops

    g = ops.convert_to_tensor(gram, dtype="float64")
    lam = l2 + dropout / (1.0 - dropout) * ops.diagonal(g)
    g = g + ops.diag(lam)
    p = ops.inv(g)
    del g
    b = np.asarray(ops.convert_to_numpy(-p / ops.expand_dims(ops.diagonal(p), 0)),
                   dtype=np.float32)  # column j divided by -P_jj
    del p, keras
    return b


def _ease_solve_lapack(gram: np.ndarray, l2: float, dropout: float) -> np.ndarray:
    """The same B on the CPU, in ``gram``'s own memory (overwritten): a Cholesky factor and its
    inverse in place (LAPACK potrf/potri), where the Keras path holds four n x n float64
    copies (~2 GB at 8,000 items, against 0.5 GB here). Same figure to float64 rounding."""
    from scipy.linalg import lapack

    n = gram.shape[0]
    diag = np.arange(n)
    gram[diag, diag] += l2 + dropout / (1.0 - dropout) * gram[diag, diag]
    # Fortran order without a copy: the transpose of a C-ordered symmetric matrix is itself
    c, info = lapack.dpotrf(gram.T, lower=True, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: the regularised Gram matrix is not positive "
                                    f"definite (potrf info {info}); raise train.ease.l2")
    c, info = lapack.dpotri(c, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: inverting the Cholesky factor failed (potri {info})")
    p = c.T  # C-ordered view: its upper triangle holds P (P is symmetric)
    step = 1024
    for lo in range(0, n, step):  # mirror the upper triangle into the lower, a block at a time
        hi = min(n, lo + step)
        p[lo:hi, :lo] = p[:lo, lo:hi].T
        d = p[lo:hi, lo:hi]
        d[...] = np.triu(d) + np.triu(d, 1).T
    p /= -np.diagonal(p).copy()[None, :]  # column j divided by -P_jj
    return p.astype(np.float32)


def item_index(emb: dict) -> np.ndarray | None:
    """An item-item model fitted on a head of the catalogue (:func:`fit_ease`): the item index
    of each row/column of its ``item_item``; None when it covers every item."""
    index = emb.get("item_index")
    return None if index is None else np.asarray(index, np.int64)


def ranked_seen(emb: dict, seen: sparse.csr_matrix) -> sparse.csr_matrix:
    """``seen`` as ``ranking.iter_top_k`` must get it for ``emb``: restricted to the head's
    columns for a head model (the ranking runs over the head; map its items back with
    :func:`to_items`), else as it is."""
    index = item_index(emb)
    return seen if index is None else sparse.csr_matrix(seen)[:, index]


def to_items(emb: dict, items: np.ndarray) -> np.ndarray:
    """Ranked positions (``iter_top_k``'s items, -1 for none) back to item indices."""
    index = item_index(emb)
    if index is None:
        return items
    return np.where(items >= 0, index[np.maximum(items, 0)], -1).astype(items.dtype)


def interaction_rows(seen: sparse.csr_matrix) -> sparse.csr_matrix:
    """The user vectors of an item-item model: ``seen`` as a 0/1 float32 CSR, column indices
    sorted, duplicates merged (a copy; ``seen`` is left as it is).

    Sparse on purpose: ``nightrec.ml.ranking.iter_top_k`` scores sparse rows by adding the rows
    of ``B`` of each user's seen items (``nnz_u * n_items`` per user) instead of multiplying a
    dense 0/1 row by all of ``B`` (``n_items^2``), with the same results.
    """
    rows = sparse.csr_matrix(seen, dtype=np.float32, copy=True)
    rows.sum_duplicates()
    rows.data[:] = 1.0
    return rows


class InteractionRows:
    """The same user vectors as :func:`interaction_rows`, densified lazily: row ``u`` is user
    u's 0/1 seen row.

    Indexed with an array of user indices (as ``iter_top_k`` reads dense user vectors), it
    densifies only those rows, so memory stays flat in the number of users. Scoring no longer
    uses it (it costs ``n_items^2`` a user); it is the dense reference the sparse path is
    checked against.
    """

    def __init__(self, seen: sparse.csr_matrix):
        self.seen = interaction_rows(seen)
        self.shape = self.seen.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.seen[rows].toarray()


def scoring_inputs(emb: dict, seen: sparse.csr_matrix, ranks: sparse.csr_matrix | None = None,
                   users: np.ndarray | None = None):
    """``(user_vecs, item_vecs, item_bias)`` for ``ranking.iter_top_k``; ``seen`` is the CSR of
    what each user interacted with (rows = the model's users, columns = its items); ``ranks``
    (:func:`pair_ranks`, same shape) weights an item-item model's rows by recency when the
    model has a ``recency_half_life`` (:func:`recency_rows`; 0/1 rows without ``ranks``).

    An item-item model's user vectors are :func:`interaction_rows` (sparse) and its item vectors
    ``item_item.T``, a view whose transpose is ``B`` itself, so the sparse path adds rows of
    ``B`` without copying it.
    """
    if is_hybrid(emb):  # factor rows of ``users`` only (all when None), the others empty
        factor = emb["user"][: seen.shape[0]]
        if users is not None:
            factor = _rows_only(factor, np.asarray(users, np.int64))
        return hybrid_inputs(emb, seen, factor, ranks)
    if is_item_item(emb):
        index = item_index(emb)
        bias = emb["item_bias"] if index is None else emb["item_bias"][index]
        rows = recency_rows(ranked_seen(emb, seen),
                            None if ranks is None else ranked_seen(emb, ranks),
                            recency_half_life(emb))
        return rows, emb["item_item"].T, bias
    return emb["user"], emb["item"], emb["item_bias"]


def recency_half_life(emb: dict) -> float | None:
    """An item-item model's recency half-life in events (``recency_half_life`` in its export),
    or None: its user rows are then 0/1."""
    h = emb.get("recency_half_life")
    if h is None:
        return None
    h = float(np.asarray(h).reshape(-1)[0])
    return h if np.isfinite(h) and h > 0 else None


def pair_ranks(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, *, n_users: int,
               n_items: int) -> sparse.csr_matrix:
    """Each (user, item) pair's recency rank among the user's pairs, as a float32 CSR (n_users
    x n_items, column indices sorted): 1 for the user's latest pair, 2 for the one before...
    A pair met several times counts at its latest timestamp; ties go to the higher item index
    first (any fixed order would do: this one is deterministic). A pair with no timestamp
    (``timestamp`` < 0, e.g. a seen pair known only from the quarantine) ranks after every
    timed one. The recency weights of :func:`recency_rows` are a function of these ranks."""
    user = np.asarray(user, np.int64)
    item = np.asarray(item, np.int64)
    ts = np.asarray(timestamp, np.int64)
    if len(user) == 0:
        return sparse.csr_matrix((n_users, n_items), dtype=np.float32)
    # the latest timestamp per pair: sort by (user, item, ts), keep each pair's last row
    order = np.lexsort((ts, item, user))
    u, i, t = user[order], item[order], ts[order]
    last = np.ones(len(u), bool)
    last[:-1] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i, t = u[last], i[last], t[last]
    # rank within the user, latest first: sort by (user, -ts, -item)
    by_recency = np.lexsort((-i, -t, u))
    starts = np.r_[0, np.flatnonzero(np.diff(u[by_recency])) + 1]
    counts = np.diff(np.r_[starts, len(by_recency)])
    rank = np.arange(len(by_recency)) - np.repeat(starts, counts) + 1
    ranks = np.empty(len(u), np.float32)
    ranks[by_recency] = rank
    m = sparse.csr_matrix((ranks, (u, i)), shape=(n_users, n_items))
    m.sort_indices()
    return m


def recency_rows(seen: sparse.csr_matrix, ranks: sparse.csr_matrix | None,
                 half_life: float | None) -> sparse.csr_matrix:
    """An item-item model's user rows: :func:`interaction_rows` of ``seen`` (0/1), or, with a
    ``half_life`` and ``ranks`` (:func:`pair_ranks` of the same users and items), each seen
    item weighted ``0.5 ** ((rank - 1) / half_life)``: the latest item 1, the one
    ``half_life`` events earlier 0.5. A seen pair ``ranks`` lacks counts as the oldest."""
    rows = interaction_rows(seen)
    if half_life is None or ranks is None:
        return rows
    r = sparse.csr_matrix(ranks, dtype=np.float32)
    if r.shape != rows.shape:
        raise ValueError(f"ranks {r.shape} do not match the seen rows {rows.shape}")
    r.sort_indices()
    if np.array_equal(r.indptr, rows.indptr) and np.array_equal(r.indices, rows.indices):
        # the common case: ranks of exactly the seen pairs, in the same order
        rows.data = (0.5 ** ((r.data - 1.0) / float(half_life))).astype(np.float32)
        return rows
    # ranks at the seen pairs (a seen pair without one gets the user's count + 1: the oldest)
    looked = np.asarray(r[rows.nonzero()]).reshape(-1) if rows.nnz else np.zeros(0, np.float32)
    per_user = np.diff(r.indptr)
    oldest = np.repeat(per_user + 1, np.diff(rows.indptr)).astype(np.float32)
    rank = np.where(looked > 0, looked, oldest)
    rows.data = (0.5 ** ((rank - 1.0) / float(half_life))).astype(np.float32)
    return rows


def is_hybrid(emb: dict) -> bool:
    """A blend of an item-item model and a factor model (:func:`blend`): both ``item_item`` and
    ``user``/``item``."""
    return "item_item" in emb and "user" in emb


def _rows_only(vecs: np.ndarray, rows: np.ndarray) -> sparse.csr_matrix:
    """``vecs`` as a CSR that holds only ``rows`` (the rest empty): a hybrid's factor part for
    the users a metric ranks, not every user's (128M stored values at 2M users x 64)."""
    n, d = vecs.shape
    counts = np.zeros(n + 1, np.int64)
    rows = np.unique(rows)
    counts[rows + 1] = d
    data = np.asarray(vecs[rows], np.float32).reshape(-1)
    indices = np.tile(np.arange(d, dtype=np.int32), len(rows))
    return sparse.csr_matrix((data, indices, np.cumsum(counts)), shape=(n, d))


def hybrid_inputs(emb: dict, seen: sparse.csr_matrix, user_vecs,
                  ranks: sparse.csr_matrix | None = None):
    """``(user_vecs, item_vecs, item_bias)`` of a hybrid for the users of ``seen``'s rows, whose
    factor vectors are ``user_vecs``: each user's row is its 0/1 seen row followed by its factor
    vector (sparse, so ``ranking.iter_top_k`` takes its sparse path: the rows of ``B`` of the
    seen items plus the ``d`` factor rows of ``V^T``), the items' ``[B; V^T]`` transposed."""
    factor = (user_vecs if sparse.issparse(user_vecs)
              else sparse.csr_matrix(np.asarray(user_vecs, np.float32)))
    rows = sparse.hstack([recency_rows(seen, ranks, recency_half_life(emb)), factor],
                         format="csr")
    weights = np.vstack([np.asarray(emb["item_item"], np.float32),
                         np.asarray(emb["item"], np.float32).T])
    return rows, weights.T, emb["item_bias"]


def blend(a: dict, b: dict, *, wa: float, wb: float) -> dict | None:
    """The score blend ``wa * score_a + wb * score_b`` as one export that the scoring kernel
    ranks as it is, or None when the two cannot be combined exactly:

    - two factor models: the vectors side by side (user ``[wa u_a, wb u_b]``, item ``[v_a,
      v_b]``), biases summed;
    - two item-item models over the same items: ``wa B_a + wb B_b``;
    - an item-item model over every item and a factor model: a *hybrid* (:func:`is_hybrid`,
      :func:`hybrid_inputs`). A head item-item model (``item_index``) does not blend with a
      factor model (None)."""
    bias = (wa * np.asarray(a["item_bias"], np.float32) + wb * np.asarray(b["item_bias"], np.float32))
    if not is_item_item(a) and not is_item_item(b):
        return {"user": np.hstack([wa * a["user"], wb * b["user"]]).astype(np.float32),
                "item": np.hstack([a["item"], b["item"]]).astype(np.float32),
                "item_bias": bias.astype(np.float32)}
    if is_item_item(a) and is_item_item(b):
        ia, ib = item_index(a), item_index(b)
        if (ia is None) != (ib is None) or (ia is not None and not np.array_equal(ia, ib)):
            return None
        if recency_half_life(a) != recency_half_life(b):  # differently weighted user rows
            return None
        out = {"item_item": (wa * a["item_item"] + wb * b["item_item"]).astype(np.float32),
               "item_bias": np.where(np.asarray(a["item_bias"]) <= UNKNOWN_ITEM_BIAS,
                                     UNKNOWN_ITEM_BIAS, bias).astype(np.float32)}
        if ia is not None:
            out["item_index"] = ia
        return _with_recency(out, a)
    ii, fac, wi, wf = (a, b, wa, wb) if is_item_item(a) else (b, a, wb, wa)
    if item_index(ii) is not None:
        return None
    return _with_recency({
        "item_item": (wi * ii["item_item"]).astype(np.float32),
        "user": (wf * fac["user"]).astype(np.float32), "item": fac["item"].astype(np.float32),
        "item_bias": (wi * ii["item_bias"] + wf * fac["item_bias"]).astype(np.float32),
        "factor_weight": np.array([wf], np.float32)}, ii)  # scoring folds new users in with it


def _with_recency(out: dict, item_item: dict) -> dict:
    """``out`` with ``item_item``'s recency half-life (its user rows' weighting), if any."""
    h = recency_half_life(item_item)
    if h is not None:
        out["recency_half_life"] = np.array([h], np.float32)
    return out


def score_scale(emb: dict, seen: sparse.csr_matrix, users: np.ndarray,
                ranks: sparse.csr_matrix | None = None) -> float:
    """The standard deviation of ``emb``'s scores over every item for ``users`` (rows of
    ``seen``): what a blend divides each model's scores by so that its weights compare like
    with like (an EASE score and a softmax logit differ in scale by orders of magnitude)."""
    users = np.asarray(users, np.int64)
    if is_item_item(emb) and not is_hybrid(emb):
        x = recency_rows(ranked_seen(emb, seen[users]),
                         None if ranks is None else ranked_seen(emb, ranks[users]),
                         recency_half_life(emb))
        scores = np.asarray(x @ emb["item_item"], np.float64)
    else:
        user_vecs, item_vecs, bias = scoring_inputs(emb, seen, ranks)
        scores = np.asarray(user_vecs[users] @ np.asarray(item_vecs).T, np.float64) + bias
    scores = scores[:, np.asarray(emb["item_bias"]) > UNKNOWN_ITEM_BIAS] if (
        item_index(emb) is None) else scores
    std = float(np.std(scores))
    return std if std > 0 and np.isfinite(std) else 1.0


def fold_in(item_vecs: np.ndarray, item_bias: np.ndarray, seen: sparse.csr_matrix, *,
            l2: float) -> np.ndarray:
    """User vectors (n, d) float32 for users a factor model never saw, from their seen items.

    Row u of ``seen`` (n x n_items, the model's items) is user u's seen set S, n_u = |S|. The
    vector is one Newton step, from u = 0, on the objective the model was trained for, a softmax
    over the catalogue with an L2 penalty:

        max_u  sum_{i in S} log softmax(V u + b)_i  -  l2 |u|^2

    At u = 0 the softmax is p0 = softmax(b) (the model's popularity prior), the gradient is
    ``g_u = sum_{i in S} v_i - n_u vbar`` with ``vbar = p0 . V``, and the Hessian is
    ``-(n_u C + 2 l2 I)`` with ``C = Cov_p0(v)``, so

        u = (n_u C + 2 l2 I)^-1 (sum_{i in S} v_i - n_u vbar).

    Closed form and cheap: ``C`` is one (d x d) matrix for every user; with ``C = Q diag(lam)
    Q^T`` (eigendecomposition, once) each user's solve is a diagonal scaling, and all users are
    one sparse product ``seen @ V``. ``l2`` (> 0, ``score.fold_in_l2``) keeps it well posed for
    users with few items. A user with no seen item gets the zero vector (their ranking is the
    item bias).

    Why not a ridge regression of ``u.v_i + b_i`` onto 1 over the seen items: it has no negatives
    and fights the bias (a popular seen item's large ``b_i`` pushes ``u`` away from it). Measured
    on ML-100K (mf_softmax, d=64, 10 epochs on 90% of the users; the other 94 users folded in
    from the first 80% of their events, ranked on the rest, seen excluded), Recall@10 /
    NDCG@10: this step .176 / .179 at l2 = 1 (.169 / .171 at 0.1, .156 / .156 at 10); that ridge
    .128 / .126 at l2 = 1 (.139 / .130 at its best, l2 = 10); popularity .091 / .085. The
    default ``score.fold_in_l2: 1.0`` was in params.yaml before this measurement; the other
    values are reported, not used to choose it (no validation slice was carved for that).
    """
    if l2 <= 0:
        raise ValueError(f"score.fold_in_l2 must be > 0, got {l2}")
    v = np.asarray(item_vecs, np.float64)
    b = np.asarray(item_bias, np.float64).reshape(-1)
    seen = sparse.csr_matrix(seen, dtype=np.float64)
    seen.data[:] = 1.0
    if seen.shape[0] == 0 or v.shape[0] == 0:
        return np.zeros((seen.shape[0], v.shape[1]), np.float32)
    p0 = np.exp(b - b.max())
    p0 /= p0.sum()
    vbar = p0 @ v
    centred = v - vbar
    lam, q = np.linalg.eigh((centred * p0[:, None]).T @ centred)
    lam = np.maximum(lam, 0.0)  # a covariance: round-off may leave tiny negatives
    n = np.asarray(seen.sum(axis=1)).reshape(-1, 1)
    g = np.asarray(seen @ v) - n * vbar
    u = ((g @ q) / (n * lam[None, :] + 2.0 * l2)) @ q.T
    return u.astype(np.float32)


def align(emb: dict, *, model_users: np.ndarray, model_items: np.ndarray, user_ids: np.ndarray,
          item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Re-index another model's weights onto this run's users and items (by external id).

    Users it never saw get a zero vector (a factor model then ranks them by item bias alone);
    items it never saw get a bias of ``UNKNOWN_ITEM_BIAS``, so they rank below every item it
    knows. An item-item model needs no users: its user vectors come from the seen matrix (its
    recency half-life comes along); a hybrid aligns both halves.
    """
    if is_hybrid(emb):  # both halves, each aligned as its kind; the bias is the blend's
        ii = align({k: emb[k] for k in ("item_item", "item_bias", "recency_half_life")
                    if k in emb}, model_users=model_users, model_items=model_items,
                   user_ids=user_ids, item_ids=item_ids)
        fac = align({k: emb[k] for k in ("user", "item", "item_bias")}, model_users=model_users,
                    model_items=model_items, user_ids=user_ids, item_ids=item_ids)
        return {**ii, "user": fac["user"], "item": fac["item"],
                **({"factor_weight": emb["factor_weight"]} if "factor_weight" in emb else {})}
    i = pd.Index(model_items).get_indexer(item_ids)
    known = i >= 0
    bias = np.full(len(item_ids), UNKNOWN_ITEM_BIAS, np.float32)
    bias[known] = emb["item_bias"][i[known]]
    if is_item_item(emb):
        return _with_recency(_align_item_item(emb, i, known, bias, len(item_ids)), emb)
    u = pd.Index(model_users).get_indexer(user_ids)
    d = emb["user"].shape[1]
    user = np.zeros((len(user_ids), d), np.float32)
    user[u >= 0] = emb["user"][u[u >= 0]]
    item = np.zeros((len(item_ids), d), np.float32)
    item[known] = emb["item"][i[known]]
    return {"user": user, "item": item, "item_bias": bias}


def _align_item_item(emb: dict, i: np.ndarray, known: np.ndarray, bias: np.ndarray,
                     n: int) -> dict:
    """:func:`align` of an item-item model onto ``n`` items (``i``: each one's index in the
    model, -1 for an item it does not know; ``bias``: aligned already)."""
    index = item_index(emb)
    if index is None:
        b = np.zeros((n, n), np.float32)
        b[np.ix_(known, known)] = emb["item_item"][np.ix_(i[known], i[known])]
        return {"item_item": b, "item_bias": bias}
    # a head model stays a head model: this run's items that are in its head, in order
    row = np.full(int(emb["item_bias"].shape[0]), -1, np.int64)
    row[index] = np.arange(len(index))
    in_head = known.copy()
    in_head[known] = row[i[known]] >= 0
    new_index = np.flatnonzero(in_head)
    rows = row[i[new_index]]
    bias = np.full(n, UNKNOWN_ITEM_BIAS, np.float32)
    bias[new_index] = 0.0
    return {"item_item": emb["item_item"][np.ix_(rows, rows)], "item_bias": bias,
            "item_index": new_index}


def side_matrix(table: pd.DataFrame, spec: dict, *, max_categories: int = 64) -> np.ndarray | None:
    """Dense float32 side features (n, f) from augment's encoded feature table, in index order.

    ``spec`` is augment's ``{numeric: [...], categorical: [...], multi_hot: [...]}``: numeric
    columns are standardised (missing -> 0), categorical codes one-hot (code 0 = missing gets
    its own column), multi-hot columns used as they are. A categorical column keeps its
    ``max_categories - 1`` most frequent codes (ties: the lower code) and puts the rest in one
    last "other" column: a zip code with 86k values would be a 200k x 86k dense matrix (64 GB)
    and, near one value per user, no better than the user's own id embedding. None when the
    spec names nothing the table has.
    """
    if max_categories < 2:
        raise ValueError(f"train.mf_softmax.max_side_categories must be >= 2, got {max_categories}")
    blocks = []
    for col in spec.get("numeric") or []:
        if col in table.columns:
            x = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
            mu, sd = np.nanmean(x) if np.isfinite(x).any() else 0.0, np.nanstd(x)
            z = np.where(np.isfinite(x), (x - mu) / (sd if sd > 0 else 1.0), 0.0)
            blocks.append(z.astype(np.float32)[:, None])
    for col in spec.get("categorical") or []:
        if col in table.columns:
            codes = table[col].to_numpy(dtype=np.int64)
            counts = np.bincount(codes, minlength=1)
            if len(counts) > max_categories:
                kept = np.argsort(-counts, kind="stable")[: max_categories - 1]
                column = np.full(len(counts), max_categories - 1)  # the "other" column
                column[kept] = np.arange(len(kept))
                codes = column[codes]
                width = max_categories
            else:
                width = len(counts)
            hot = np.zeros((len(codes), width), np.float32)
            hot[np.arange(len(codes)), codes] = 1.0
            blocks.append(hot)
    for col in spec.get("multi_hot") or []:
        name = col + "_multi_hot"
        if name in table.columns and len(table):
            rows = [np.asarray(r, np.float32) for r in table[name]]
            if rows and rows[0].size:
                blocks.append(np.stack(rows))
    return np.concatenate(blocks, axis=1) if blocks else None


def build_mf(*, n_users: int, n_items: int, embedding_dim: int, l2: float, seed: int,
             user_side: np.ndarray | None = None, item_side: np.ndarray | None = None):
    """The mf_softmax model. Full softmax: input user indices, output logits over all items.
    Sampled softmax: input ``(users, candidates (b, 1 + n_neg), log_q (b, 1 + n_neg))``, output
    logQ-corrected logits over the candidates, the positive first. Both float32."""
    keras = keras_module()
    from keras import layers, ops

    # row-wise lookups: Keras's Embedding reads the whole table per lookup, which TF copies
    # whole once an optimizer updated rows in place (360 ms a step at 2M users; sparse_optim)
    from nightrec.ml.sparse_optim import RowEmbedding

    class DotProductSoftmax(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            # No embeddings_regularizer: Keras applies it to the whole table every step, and
            # under Adam a row whose only gradient is that penalty moves by ~learning_rate
            # towards zero per step (Adam normalises the gradient's scale away). At 200k users
            # x 20k items that erased every user vector and left item bias only (the model tied
            # popularity, benchmarks/RESULTS.md). The penalty is on the rows a batch uses.
            self.l2 = float(l2)
            self.user = RowEmbedding(
                n_users, embedding_dim, name="user",
                embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed))
            self.item = RowEmbedding(
                n_items, embedding_dim, name="item",
                embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed + 1))
            self.bias = RowEmbedding(n_items, 1, embeddings_initializer="zeros", name="bias")
            # Side features: a user's (item's) vector is its id embedding plus a linear map of
            # its side features. The maps start at zero, so a warm start is exact at epoch 0.
            self.user_side = self.item_side = None
            if user_side is not None:
                self.user_side = ops.convert_to_tensor(user_side, dtype="float32")
                self.user_map = layers.Dense(embedding_dim, use_bias=False, name="user_side",
                                             kernel_initializer="zeros")
            if item_side is not None:
                self.item_side = ops.convert_to_tensor(item_side, dtype="float32")
                self.item_map = layers.Dense(embedding_dim, use_bias=False, name="item_side",
                                             kernel_initializer="zeros")

        def build(self, input_shape):
            self.user.build((None,))
            self.item.build((None,))
            self.bias.build((None,))
            if self.user_side is not None:
                self.user_map.build((None, int(self.user_side.shape[1])))
            if self.item_side is not None:
                self.item_map.build((None, int(self.item_side.shape[1])))
            self.built = True

        def user_vectors(self, user_idx):
            u = self.user(user_idx)
            if self.user_side is not None:
                side = self.user_map(ops.take(self.user_side, user_idx, axis=0))
                u = u + ops.cast(side, u.dtype)
            return u

        def item_vectors(self, item_idx=None):
            if item_idx is None:
                v = ops.convert_to_tensor(self.item.embeddings)
                side_rows = self.item_side
            else:
                v = self.item(item_idx)
                side_rows = None if self.item_side is None else ops.take(
                    self.item_side, item_idx, axis=0)
            if side_rows is not None:
                v = v + ops.cast(self.item_map(side_rows), v.dtype)
            return v

        def _penalise(self, u, v):
            """``l2 * (|u|^2 + |v|^2)`` per example, averaged over the batch: ``u`` the batch's
            user vectors, ``v`` (b or 1, c, d) the item vectors each example's logits use (its
            candidates; for the full softmax the whole catalogue, counted once per batch and
            averaged over items)."""
            if not self.l2:
                return
            b = ops.cast(ops.shape(u)[0], "float32")
            uu = ops.sum(ops.square(ops.cast(u, "float32"))) / b
            vv = ops.cast(ops.square(v), "float32")
            vv = ops.sum(vv) / b if v.shape[0] != 1 else ops.mean(ops.sum(vv, axis=-1))
            self.add_loss(self.l2 * (uu + vv))

        def call(self, inputs):
            if isinstance(inputs, (tuple, list)):  # sampled: (users, candidates, log_q)
                user_idx, candidates, log_q = inputs
                u = ops.expand_dims(self.user_vectors(user_idx), 1)  # (b, 1, d)
                v = self.item_vectors(candidates)  # (b, c, d): the positive first, negatives
                self._penalise(u, v)
                logits = ops.sum(u * v, axis=-1) + ops.squeeze(self.bias(candidates), -1)
                # logQ correction: candidates drawn in proportion to q score as if uniform
                return ops.cast(logits, "float32") - ops.cast(log_q, "float32")
            u = self.user_vectors(inputs)
            v = self.item_vectors()
            self._penalise(u, ops.expand_dims(v, 0))
            logits = ops.matmul(u, ops.transpose(ops.cast(v, u.dtype)))
            logits = logits + ops.reshape(self.bias.embeddings, (1, -1))
            return ops.cast(logits, "float32")  # the loss stays float32 under mixed precision

    model = DotProductSoftmax(name="mf_softmax")
    model.build((None,))
    return model


def mf_weights(model) -> dict[str, np.ndarray]:
    """A built mf_softmax model's weights as the factor-model export: the final user and item
    vectors (id embedding plus the side-feature part), so scoring needs no features."""
    from keras import ops

    n_users = int(model.user.embeddings.shape[0])
    return {
        "user": np.asarray(ops.convert_to_numpy(model.user_vectors(np.arange(n_users))),
                           dtype=np.float32),
        "item": np.asarray(ops.convert_to_numpy(model.item_vectors()), dtype=np.float32),
        "item_bias": np.asarray(model.bias.embeddings, dtype=np.float32).reshape(-1),
    }


def warm_start(model, init: dict[str, np.ndarray]) -> int:
    """Copy ``init`` (a factor export aligned to this model's indices by :func:`align`) into
    ``model``'s id embeddings where it knows the user or item; the rest keeps its seeded random
    init. The side-feature maps start at zero, so the vectors equal the champion's at first.
    Returns the number of rows copied."""
    copied = 0
    for layer, key, known in (
        (model.user, "user", np.any(init["user"] != 0, axis=1)),
        (model.item, "item", init["item_bias"] > UNKNOWN_ITEM_BIAS),
    ):
        w = np.asarray(layer.embeddings).copy()
        if w.shape[1] != init[key].shape[1]:
            raise ValueError(f"warm start: champion {key} dim {init[key].shape[1]} != {w.shape[1]}")
        w[known] = init[key][known]
        layer.embeddings.assign(w)
        copied += int(known.sum())
    b = np.asarray(model.bias.embeddings).copy()
    known = init["item_bias"] > UNKNOWN_ITEM_BIAS
    b[known, 0] = init["item_bias"][known]
    model.bias.embeddings.assign(b)
    return copied
