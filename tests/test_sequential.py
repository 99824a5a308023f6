"""The SASRec sequential model (nightrec/ml/sequential.py): the sequences it reads, its export,
that it learns order (which EASE cannot), seeding, early stopping and the deadline.

Small seeded synthetic data; no S3, no services.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import sparse

from nightrec.ml import models, sequential

N_ITEMS = 40
N_ACTIVE = 300  # users with events; users N_ACTIVE.. have none
N_USERS = N_ACTIVE + 5


def _chains(seed: int = 0):
    """Each user's events are consecutive items s, s+1, ..., s+L-1 with increasing timestamps,
    given in shuffled order; the last one is held out. Returns (user, item, ts, held)."""
    rng = np.random.default_rng(seed)
    users, items, stamps, held = [], [], [], np.zeros(N_ACTIVE, np.int64)
    for u in range(N_ACTIVE):
        length = int(rng.integers(4, 12))
        start = int(rng.integers(0, N_ITEMS - length + 1))
        chain = np.arange(start, start + length)
        users += [u] * (length - 1)
        items += chain[:-1].tolist()
        stamps += (1000 * u + 10 * np.arange(length - 1)).tolist()
        held[u] = chain[-1]
    order = rng.permutation(len(users))  # input order is not time order
    return (np.asarray(users)[order], np.asarray(items)[order], np.asarray(stamps)[order], held)


def _kwargs(**over):
    base = dict(n_users=N_USERS, n_items=N_ITEMS, max_len=12, dim=32, blocks=1, heads=2,
                dropout=0.1, epochs=25, batch_size=64, learning_rate=5e-3, l2=0.0, loss="full",
                n_negatives=0, seed=3)
    return {**base, **over}


def _top1(scores: np.ndarray, seen: sparse.csr_matrix) -> np.ndarray:
    scores = np.array(scores, dtype=np.float64)
    scores[seen.nonzero()] = -np.inf
    return scores.argmax(axis=1)


@pytest.fixture(scope="module")
def chains():
    user, item, ts, held = _chains()
    emb, hist = sequential.fit(user, item, ts, **_kwargs())
    seen = sparse.csr_matrix((np.ones(len(user), np.float32), (user, item)),
                             shape=(N_USERS, N_ITEMS))
    return {"user": user, "item": item, "ts": ts, "held": held, "emb": emb, "hist": hist,
            "seen": seen}


def test_sequences_order_by_time_and_left_pad():
    user = np.array([1, 1, 1, 0, 1, 1, 0])
    item = np.array([5, 2, 7, 3, 9, 4, 1])
    ts = np.array([30, 10, 20, 5, 40, 30, 5])  # user 1: ts 30 twice (items 4, 5: by item)
    seqs = sequential.sequences(user, item, ts, n_users=3, max_len=4)
    assert seqs.dtype == np.int32 and seqs.shape == (3, 4)
    # user 0: items 1, 3 at the same ts -> by item; stored +1, left-padded
    assert seqs[0].tolist() == [0, 0, 2, 4]
    # user 1 in time order: 2 (10), 7 (20), 4 (30), 5 (30), 9 (40): the last 4, +1
    assert seqs[1].tolist() == [8, 5, 6, 10]
    assert seqs[2].tolist() == [0, 0, 0, 0]  # no events


def test_training_windows_cover_long_histories():
    user = np.zeros(10, np.int64)
    item = np.arange(10)
    ts = np.arange(10)
    last = sequential.training_windows(user, item, ts, n_users=1, max_len=4)
    assert last.tolist() == [[6, 7, 8, 9, 10]]  # the last max_len + 1 items, +1
    slide = sequential.training_windows(user, item, ts, n_users=1, max_len=4,
                                        long_history="slide")
    # non-overlapping windows back from the end, each sharing its last item with the next
    assert slide.tolist() == [[6, 7, 8, 9, 10], [2, 3, 4, 5, 6], [0, 0, 0, 1, 2]]


def test_learns_next_item_that_ease_cannot(chains):
    held, seen, emb = chains["held"], chains["seen"], chains["emb"]
    active = seen[:N_ACTIVE]
    seq_hit = np.mean(_top1(emb["user"][:N_ACTIVE] @ emb["item"].T + emb["item_bias"],
                            active) == held)
    ease_hit = 0.0
    for l2 in (1.0, 10.0, 100.0):  # EASE's best l2, on the held-out items themselves
        b = models.fit_ease(active, l2=l2, dropout=0.0)["item_item"]
        ease_hit = max(ease_hit, np.mean(_top1(active @ b, active) == held))
    assert seq_hit >= 0.9, seq_hit
    assert ease_hit < 0.6, ease_hit  # it sees s-1 and s+L-1 alike: no direction
    assert seq_hit - ease_hit > 0.3
    assert chains["hist"]["loss"][-1] < chains["hist"]["loss"][0] / 5


def test_export_shapes_and_users_without_events(chains):
    emb, hist = chains["emb"], chains["hist"]
    assert emb["user"].shape == (N_USERS, 32) and emb["user"].dtype == np.float32
    assert emb["item"].shape == (N_ITEMS, 32) and emb["item"].dtype == np.float32
    assert emb["item_bias"].shape == (N_ITEMS,) and emb["item_bias"].dtype == np.float32
    assert not emb["user"][N_ACTIVE:].any()  # no events: zero vector
    assert np.all(np.linalg.norm(emb["user"][:N_ACTIVE], axis=1) > 0)
    assert hist["epochs"] == hist["best_epoch"] == 25 and hist["stopped"] is None
    assert len(hist["loss"]) == len(hist["epoch_s"]) == 25


def test_user_vector_is_the_last_hidden_state_and_padding_is_masked():
    """export's user vector is the encoder's last hidden state on the user's sequence, the same
    whatever the padding and the other users of the batch, and its dot product with the item
    table plus the bias is the model's next-item logit."""
    from keras import ops

    user, item, ts, _ = _chains(seed=4)
    seqs = sequential.sequences(user, item, ts, n_users=N_USERS, max_len=12)
    model = sequential.build(n_items=N_ITEMS, max_len=12, dim=16, blocks=2, heads=2,
                             dropout=0.0, l2=0.0, loss="full", n_negatives=0, seed=5)
    emb = sequential.export(model, seqs)
    assert not emb["user"][N_ACTIVE:].any()
    for u in (0, 7, 42):
        n = int(np.count_nonzero(seqs[u]))
        alone = ops.convert_to_numpy(model.encode(seqs[u:u + 1, -n:]))[0, -1]  # no padding
        np.testing.assert_allclose(emb["user"][u], alone, rtol=1e-5, atol=1e-5)
        h = model.encode(seqs[u:u + 1])
        logits = ops.convert_to_numpy(
            ops.matmul(h[:, -1], ops.transpose(model.item[1:])) + model.bias)[0]
        np.testing.assert_allclose(emb["user"][u] @ emb["item"].T + emb["item_bias"], logits,
                                   rtol=1e-5, atol=1e-5)


def test_same_seed_same_weights_and_early_stopping():
    user, item, ts, _ = _chains(seed=1)
    calls = []

    def valid_fn(emb):  # best at epoch 2, then worse: stops after patience epochs
        calls.append(emb["user"].copy())
        return [0.1, 0.5, 0.4, 0.3, 0.2, 0.1][len(calls) - 1]

    kw = _kwargs(epochs=6, dim=16, loss="sampled", n_negatives=8)
    a, ha = sequential.fit(user, item, ts, **kw, valid_fn=valid_fn, patience=2)
    assert ha["best_epoch"] == 2 and ha["epochs"] == 4 and ha["stopped"] == "patience"
    assert ha["valid"] == [0.1, 0.5, 0.4, 0.3]
    np.testing.assert_array_equal(a["user"], calls[1])  # the best epoch's weights
    calls.clear()
    b, hb = sequential.fit(user, item, ts, **kw, valid_fn=valid_fn, patience=2)
    for key in ("user", "item", "item_bias"):
        np.testing.assert_array_equal(a[key], b[key])
    assert ha["loss"] == hb["loss"]


def test_deadline_stops_before_an_overrunning_epoch():
    user, item, ts, _ = _chains(seed=2)
    emb, hist = sequential.fit(user, item, ts, **_kwargs(epochs=50, dim=8, seed=4),
                               deadline=time.monotonic())
    assert hist["epochs"] == 1 and hist["stopped"].startswith("deadline")
    assert emb["user"].shape == (N_USERS, 8)
