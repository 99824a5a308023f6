"""Row-wise training of mf_softmax (nightrec/ml/sparse_optim.py) and the Parquet example stream
(nightrec/ml/streams.py): tiny hand-built models and files with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightrec.core import schema
from nightrec.ml import models, streams

keras = models.keras_module()
from nightrec.ml import sparse_optim  # noqa: E402  (imports Keras: after the backend is set)

N_USERS, N_ITEMS, DIM, N_CAND = 12, 7, 4, 3


def _tiny_model(embedding_cls, *, n_users=N_USERS, n_items=N_ITEMS, seed=0):
    """users (b,), candidates (b, c) -> logits (b, c): a user row dot each candidate's row."""
    users = keras.Input((), dtype="int32")
    cands = keras.Input((N_CAND,), dtype="int32")
    init = keras.initializers.RandomNormal(stddev=0.5, seed=seed)
    u = embedding_cls(n_users, DIM, embeddings_initializer=init, name="user")(users)
    v = embedding_cls(n_items, DIM, embeddings_initializer=init, name="item")(cands)
    return keras.Model([users, cands], keras.ops.einsum("bd,bcd->bc", u, v))


def _compile(model, optimizer, *, jit=False):
    model.compile(optimizer=optimizer, jit_compile=jit,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _slots(optimizer, variable) -> tuple[np.ndarray, np.ndarray]:
    by_path = {v.path.split("/")[-1]: v for v in optimizer.variables}
    key = variable.path.replace("/", "_")
    return (np.asarray(by_path[f"{key}_momentum"].numpy()),
            np.asarray(by_path[f"{key}_velocity"].numpy()))


def _table(layer) -> np.ndarray:
    return np.asarray(layer.embeddings.numpy()).copy()


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("embedding", ["keras", "row"])
def test_one_step_moves_only_the_rows_the_batch_used(embedding, jit):
    cls = sparse_optim.RowEmbedding if embedding == "row" else keras.layers.Embedding
    model = _compile(_tiny_model(cls), sparse_optim.RowAdam(0.05), jit=jit)
    users = np.array([1, 4, 4, 9], np.int32)  # a user twice: its slices are summed
    cands = np.array([[0, 2, 5], [2, 0, 0], [5, 2, 0], [0, 5, 2]], np.int32)
    before = {name: _table(model.get_layer(name)) for name in ("user", "item")}
    model.train_on_batch((users, cands), np.zeros(len(users), np.int32))
    for name, used in (("user", {1, 4, 9}), ("item", {0, 2, 5})):
        layer = model.get_layer(name)
        after = _table(layer)
        m, v = _slots(model.optimizer, layer.embeddings)
        unused = np.array(sorted(set(range(len(after))) - used))
        rows = np.array(sorted(used))
        assert np.array_equal(after[unused], before[name][unused])  # bit-identical
        assert not m[unused].any() and not v[unused].any()
        assert (after[rows] != before[name][rows]).all(axis=1).all()
        assert m[rows].any(axis=1).all() and (v[rows] > 0).any(axis=1).all()


def _batches(n_users, n_items, *, steps, repeat_users, seed=3):
    """Batches in which every user and item appears (users also twice when ``repeat_users``)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        users = np.arange(n_users)
        if repeat_users:
            users = np.concatenate([users, rng.integers(0, n_users, 3)])
        cands = np.stack([rng.permutation(n_items) for _ in users]).astype(np.int32)
        yield users.astype(np.int32), cands, rng.integers(0, N_CAND, len(users)).astype(np.int32)


@pytest.mark.parametrize("embedding", ["keras", "row"])
def test_rowadam_is_adam_on_rows_every_step_uses(embedding):
    """Every user and item is in every batch, some several times: RowAdam's trajectory is Adam's
    on the gradient summed per row (Keras Adam given the dense gradient)."""
    import tensorflow as tf

    cls = sparse_optim.RowEmbedding if embedding == "row" else keras.layers.Embedding
    n_users, n_items = 5, N_CAND
    ref, row = (_tiny_model(cls, n_users=n_users, n_items=n_items) for _ in range(2))
    row.set_weights(ref.get_weights())
    opts = {"ref": keras.optimizers.Adam(0.05), "row": sparse_optim.RowAdam(0.05)}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for users, cands, y in _batches(n_users, n_items, steps=6, repeat_users=True):
        for name, model in (("ref", ref), ("row", row)):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model((users, cands), training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            assert all(isinstance(g, tf.IndexedSlices) for g in grads)
            if name == "ref":
                grads = [tf.convert_to_tensor(g) for g in grads]
            opts[name].apply_gradients(zip(grads, model.trainable_variables, strict=True))
    # float32 round-off: with TF op determinism on (an earlier test in the session may turn it
    # on) the segment sums take another kernel and differ in the last bits (1.5e-6 seen)
    for a, r in zip(ref.get_weights(), row.get_weights(), strict=True):
        np.testing.assert_allclose(r, a, rtol=1e-4, atol=1e-5)
    for name in ("user", "item"):
        for sa, sr in zip(_slots(opts["ref"], ref.get_layer(name).embeddings),
                          _slots(opts["row"], row.get_layer(name).embeddings), strict=True):
            np.testing.assert_allclose(sr, sa, rtol=1e-5, atol=1e-7)


def test_rowadam_fits_like_keras_adam_where_no_row_repeats_in_a_batch():
    """``model.fit``'s path: each batch has every user once, so the user table's gradient has
    no repeated row, and RowAdam's user table, m and v are Keras Adam's. The item table is
    frozen: its rows repeat in a batch, and Keras 3 Adam squares a sparse gradient's slices
    before summing a repeated row's, so its item v is not Adam's (RowAdam sums first)."""
    n_users, n_items = 6, N_CAND
    adam, row = (_tiny_model(keras.layers.Embedding, n_users=n_users, n_items=n_items)
                 for _ in range(2))
    row.set_weights(adam.get_weights())
    for model in (adam, row):
        model.get_layer("item").trainable = False
    _compile(adam, keras.optimizers.Adam(0.05))
    _compile(row, sparse_optim.RowAdam(0.05))
    for users, cands, y in _batches(n_users, n_items, steps=6, repeat_users=False):
        for model in (adam, row):
            model.train_on_batch((users, cands), y)
    user_a, user_r = adam.get_layer("user").embeddings, row.get_layer("user").embeddings
    # float32 round-off, amplified where Adam's step divides a tiny m by a tiny sqrt(v)
    np.testing.assert_allclose(_table(row.get_layer("user")), _table(adam.get_layer("user")),
                               rtol=1e-5, atol=1e-5)
    for sa, sr in zip(_slots(adam.optimizer, user_a), _slots(row.optimizer, user_r), strict=True):
        np.testing.assert_allclose(sr, sa, rtol=1e-5, atol=1e-7)


def test_row_embedding_looks_up_like_keras_and_its_gradient_stays_sparse():
    import tensorflow as tf

    init = keras.initializers.RandomNormal(seed=1)
    row, dense = (cls(N_USERS, DIM, embeddings_initializer=init)
                  for cls in (sparse_optim.RowEmbedding, keras.layers.Embedding))
    ids = np.array([[3, 0], [11, 3]], np.int32)
    np.testing.assert_array_equal(np.asarray(row(ids)), np.asarray(dense(ids)))
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(row(ids))
    grad = tape.gradient(out, row.embeddings.value)
    assert isinstance(grad, tf.IndexedSlices)
    assert sorted(np.asarray(grad.indices).tolist()) == [0, 3, 3, 11]


def test_build_mf_trains_with_rowadam_sampled_and_full():
    model = models.build_mf(n_users=N_USERS, n_items=N_ITEMS, embedding_dim=DIM, l2=1e-3, seed=0)
    _compile(model, sparse_optim.RowAdam(0.05))
    before = _table(model.user)
    users = np.array([2, 3], np.int32)
    cands = np.array([[1, 4, 6], [0, 4, 5]], np.int32)
    lq = np.zeros(cands.shape, np.float32)
    loss = model.train_on_batch((users, cands, lq), np.zeros(2, np.int32))
    assert np.isfinite(loss)
    moved = np.flatnonzero((_table(model.user) != before).any(axis=1))
    assert moved.tolist() == [2, 3]
    full = models.build_mf(n_users=N_USERS, n_items=N_ITEMS, embedding_dim=DIM, l2=1e-3, seed=0)
    _compile(full, sparse_optim.RowAdam(0.05))  # the item table's gradient is dense there
    assert np.isfinite(full.train_on_batch(users, np.array([1, 5], np.int32)))


def test_rowadam_serialises_and_refuses_weight_decay():
    opt = sparse_optim.RowAdam(0.01, beta_2=0.99, amsgrad=True)
    back = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(back) is sparse_optim.RowAdam
    assert back.get_config() == opt.get_config()
    with pytest.raises(ValueError, match="weight_decay"):
        sparse_optim.RowAdam(0.01, weight_decay=1e-4)


# --- the stream ------------------------------------------------------------------------------

def _write_bucket(path, users, items, labels, weights, *, row_group_size=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        schema.USER_IDX: pa.array(users, pa.int64()),
        schema.ITEM_IDX: pa.array(items, pa.int64()),
        schema.LABEL: pa.array(labels, pa.int8()),
        schema.WEIGHT: pa.array(weights, pa.float64()),
        schema.TIMESTAMP: pa.array(np.arange(len(users)), pa.int64()),
    })
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture()
def buckets(tmp_path):
    """Four bucket files: mixed labels over several row groups (a null label too), one all
    positive (its row groups' statistics say so), one with no positive, one small. Returns
    (paths, the positives as a sorted list of (user, item, weight))."""
    rng = np.random.default_rng(0)
    specs = {
        0: (np.arange(0, 10), rng.integers(0, 2, 10)),
        1: (np.arange(10, 19), np.ones(9, int)),
        2: (np.arange(19, 24), np.zeros(5, int)),
        3: (np.arange(24, 27), np.array([1, 0, 1])),
    }
    paths, positives = [], []
    for bucket, (users, labels) in specs.items():
        items = (users * 7) % 11
        weights = 1.0 + users / 100
        labels = [None if (bucket == 0 and u == 3) else int(x) for u, x in zip(users, labels)]
        path = tmp_path / f"bucket={bucket:03d}" / "part-0.parquet"
        _write_bucket(path, users, items, labels, weights)
        paths.append(path)
        positives += [(int(u), int(i), float(np.float32(w)))
                      for u, i, w, x in zip(users, items, weights, labels) if x == 1]
    return paths, sorted(positives)


def _epoch(stream) -> list[tuple]:
    rows = []
    for users, items, weights in stream:
        assert users.dtype == np.int32 and items.dtype == np.int32 and weights.dtype == np.float32
        rows += [(int(u), int(i), float(w)) for u, i, w in zip(users, items, weights)]
    return rows


def test_stream_yields_each_positive_once_per_epoch_in_a_seeded_order(buckets):
    paths, positives = buckets
    stream = streams.PositiveStream(paths, batch_size=4, seed=7)
    assert stream.n_rows == len(positives) and len(stream) == math.ceil(len(positives) / 4)
    sizes = [len(b[0]) for b in stream]
    assert sizes[:-1] == [4] * (len(sizes) - 1) and 0 < sizes[-1] <= 4
    first = _epoch(stream)
    assert sorted(first) == positives
    assert _epoch(streams.PositiveStream(paths, batch_size=4, seed=7)) == first  # seeded
    assert _epoch(streams.PositiveStream(paths, batch_size=3, seed=7)) == first  # batching
    stream.set_epoch(1)
    second = _epoch(stream)
    assert sorted(second) == positives and second != first
    other = _epoch(streams.PositiveStream(paths, batch_size=4, seed=8))
    assert sorted(other) == positives and other != first


def test_stream_reads_each_file_once_per_epoch(buckets, monkeypatch):
    """Memory and I/O: a file is read once per epoch, at most two are held."""
    paths, _ = buckets
    reads = []
    real = streams._read_positives
    monkeypatch.setattr(streams, "_read_positives", lambda p, g: reads.append(p) or real(p, g))
    stream = streams.PositiveStream(paths, batch_size=3, seed=1)
    for _ in stream:
        assert len(stream._cache) <= streams.CACHED_FILES
    with_positives = [str(p) for p in paths[:2] + paths[3:]]
    assert sorted(reads) == sorted(with_positives)  # the file with no positive is never read


def test_stream_iter_files_and_bad_input(buckets, tmp_path):
    paths, positives = buckets
    stream = streams.PositiveStream(paths, batch_size=5, seed=0)
    per_file = list(stream.iter_files())
    assert [len(u) for u, _, _ in per_file] == stream.file_rows.tolist()
    assert sorted((int(u), int(i), float(w)) for f in per_file for u, i, w in zip(*f)) == positives
    stream.batch_size = 2  # sized after counting, as mf_batch does from n_rows
    assert len(stream) == math.ceil(stream.n_rows / 2) and sorted(_epoch(stream)) == positives
    with pytest.raises(ValueError, match="no positive"):
        streams.PositiveStream([paths[2]], batch_size=5, seed=0)
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({schema.USER_IDX: [1], schema.LABEL: [1]}).to_parquet(bad)
    with pytest.raises(ValueError, match="missing column"):
        streams.PositiveStream([bad], batch_size=5, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        streams.PositiveStream(paths, batch_size=0, seed=0)


def test_keras_dataset_trains_mf_and_moves_to_the_next_epoch(buckets):
    paths, positives = buckets
    stream = streams.PositiveStream(paths, batch_size=4, seed=2)
    first = _epoch(stream)
    data = streams.keras_dataset(stream)
    assert len(data) == len(stream)
    x, y, w = data[0]
    assert (x.tolist(), y.tolist()) == ([r[0] for r in first[:4]], [r[1] for r in first[:4]])
    model = models.build_mf(n_users=27, n_items=11, embedding_dim=DIM, l2=1e-3, seed=0)
    _compile(model, sparse_optim.RowAdam(0.05))
    hist = model.fit(data, epochs=2, verbose=0)
    assert len(hist.history["loss"]) == 2 and np.isfinite(hist.history["loss"]).all()
    assert stream.epoch >= 2
    calls = []
    sampled = streams.keras_dataset(stream, to_inputs=lambda u, i, w, rng: calls.append(
        rng.integers(1 << 30)) or ((u,), i, w))
    sampled[1]
    sampled[1]
    assert calls[0] == calls[1]  # the batch's generator depends on (seed, epoch, batch) only
