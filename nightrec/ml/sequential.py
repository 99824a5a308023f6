"""SASRec: a sequential recommender (Kang & McAuley 2018) written with ``keras.ops`` only.

The model reads a user's items in time order and predicts the next one. Items are embedded
(table ``(n_items + 1, dim)``, row 0 the padding, item ``i`` stored as ``i + 1``), a learned
positional embedding is added (positions count from the *end* of the window: sequences are
left-padded, so the last position is always the most recent item), then ``blocks`` pre-norm
transformer blocks of causal multi-head self-attention and a point-wise feed-forward layer, with
dropout and a final layer norm. Padding is masked as a key and zeroed as a value. The output
layer is the item table itself (tied) plus a per-item bias, so the next-item logit of item ``i``
after hidden state ``h`` is ``h . E[i + 1] + b[i]``.

Training: each user's events sorted by time (ties by item) give windows of ``max_len + 1``
items; every position of the window's first ``max_len`` items predicts the item after it (inputs
``w[:-1]``, targets ``w[1:]``; a target whose input is padding does not count). The main window
is the user's last ``max_len + 1`` items; with ``long_history="slide"`` longer histories also
give non-overlapping earlier windows (each sharing its last item with the next one's first).
Losses (cross-entropy, which beats SASRec's original BCE: gSASRec, "Turning Dross Into Gold
Loss"):

- ``"full"``: softmax over every item. Cost per step ``batch * max_len * n_items * dim`` and a
  ``(batch, max_len, n_items)`` float32 logit tensor: right for catalogues up to ~10^4-10^5.
- ``"sampled"``: softmax over the positive and ``n_negatives`` negatives shared by the batch,
  drawn from ``popularity ** 0.75`` (``sampler="popularity"``) or uniformly, every logit
  logQ-corrected (minus the log of its draw probability); a negative equal to the target is
  masked. Cost ``batch * max_len * n_negatives * dim``: for large catalogues.

Cost of the encoder: ``blocks * batch * max_len * (max_len + 8 * dim) * dim`` per step. At
ML-100K size (943 users, 1682 items, ~72k fitted events) with :data:`DEFAULTS`: ~2.4 s an
epoch on 2 CPU cores (TensorFlow, another job sharing the cores), best valid epoch ~17, ~55 s
for a fit with early stopping. Training is one ``model.fit`` call with a callback (valid_fn,
patience, deadline), so it runs under any Keras backend.

Scoring: the export is a factor model, ``{"user", "item", "item_bias"}``. ``user[u]`` is the
final hidden state at the last position of the user's whole sequence (its last ``max_len``
fitted events), ``item`` the tied item table rows (padding row dropped), so
``user[u] @ item[i] + item_bias[i]`` is exactly the model's next-item logit, and the project's
dot-product ranking code scores it as it scores mf_softmax. A user without events gets a zero
vector (scores = item bias, a popularity-like prior). The user vectors are computed from the
events given to :func:`fit`; events after the fit need a re-fit (or a call to the encoder).
"""

from __future__ import annotations

import math
import time

import numpy as np

from nightrec.ml import models

LOSSES = ("full", "sampled")
SAMPLERS = ("popularity", "uniform")
LONG_HISTORY = ("last", "slide")
# Chosen on ML-100K, NDCG@10 on a temporal valid split (the latest 10% of each user's
# non-test events): 0.164 with these; blocks=2 0.167 at 2.5x the time; max_len=100 0.168 at
# 3.6x; long_history="slide" 0.182 at ~1.6x (past the ~60 s budget); dropout 0.5 0.148;
# learning_rate 1e-2 0.155; dim 32 0.156; loss="sampled" (256 negatives) 0.075. EASE 0.121.
# ``epochs`` is a cap: pass valid_fn (early stopping), then refit with history["best_epoch"].
DEFAULTS = dict(max_len=50, dim=64, blocks=1, heads=1, dropout=0.2, epochs=40, batch_size=128,
                learning_rate=5e-3, l2=0.0, loss="full", n_negatives=256, patience=3,
                long_history="last")
_ENCODE_BATCH = 512  # users encoded at once when building the user vectors
_NEG = -1e9


def _order(user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_users: int):
    """Events sorted by (user, ts, item), and each event's rank from the end of its user's
    sequence (0 = the user's latest event)."""
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    ts = np.asarray(ts)
    if not (user.shape == item.shape == ts.shape):
        raise ValueError(f"user {user.shape}, item {item.shape}, ts {ts.shape} differ")
    if user.size and (user.min() < 0 or user.max() >= n_users):
        raise ValueError(f"user indices must be in [0, {n_users})")
    if item.size and item.min() < 0:
        raise ValueError("item indices must be >= 0")
    order = np.lexsort((item, ts, user))
    user, item = user[order], item[order]
    counts = np.bincount(user, minlength=n_users)
    end = np.cumsum(counts)  # one past each user's last sorted event
    rank = end[user] - 1 - np.arange(len(user))
    return user, item, rank, counts


def sequences(user: np.ndarray, item: np.ndarray, ts: np.ndarray, *, n_users: int,
              max_len: int) -> np.ndarray:
    """(n_users, max_len) int32: each user's last max_len items in time order (ties: by item),
    left-padded with 0; item i is stored as i+1 (0 = padding)."""
    return _windows(*_order(user, item, ts, n_users)[:3], n_users=n_users, width=max_len, k=0)


def _windows(user, item, rank, *, n_users: int, width: int, k: int, step: int | None = None):
    """(n_users, width) int32: the items of rank ``[k * step, k * step + width)`` from the end
    of each user's sequence (``step`` defaults to ``width``), right-aligned, left-padded."""
    step = width if step is None else step
    lo = k * step
    keep = (rank >= lo) & (rank < lo + width)
    out = np.zeros((n_users, width), dtype=np.int32)
    out[user[keep], width - 1 - (rank[keep] - lo)] = item[keep] + 1
    return out


def training_windows(user, item, ts, *, n_users: int, max_len: int,
                     long_history: str = "last") -> np.ndarray:
    """(n_windows, max_len + 1) int32 windows (see the module docstring), users with fewer than
    two events left out. ``long_history="slide"`` adds, for longer histories, the earlier
    non-overlapping windows (window ``k`` holds ranks ``[k * max_len, (k + 1) * max_len]``
    from the end) that hold at least two items."""
    if long_history not in LONG_HISTORY:
        raise ValueError(f"long_history must be one of {LONG_HISTORY}, got {long_history!r}")
    u, i, rank, counts = _order(user, item, ts, n_users)
    out = []
    k = 0
    while True:
        users = np.flatnonzero(counts >= k * max_len + 2)  # at least two items in window k
        if not users.size:
            break
        w = _windows(u, i, rank, n_users=n_users, width=max_len + 1, k=k, step=max_len)
        out.append(w[users])
        if long_history == "last":
            break
        k += 1
    if not out:
        return np.zeros((0, max_len + 1), dtype=np.int32)
    return np.concatenate(out)


def build(*, n_items: int, max_len: int, dim: int, blocks: int, heads: int, dropout: float,
          l2: float, loss: str, n_negatives: int, seed: int,
          log_q: np.ndarray | None = None):
    """The SASRec keras.Model. ``model({"seq": (b, L) int32})`` returns the hidden states
    (b, L, dim); with ``"target"`` (b, L) int32 too it also adds the training loss
    (``add_loss``), so ``model.fit`` needs no compiled loss. ``log_q``: the sampler's log
    probabilities over items (the ``"sampled"`` loss)."""
    keras = models.keras_module()
    from keras import layers, ops

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if dim % heads:
        raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
    if loss == "sampled" and (log_q is None or n_negatives < 1):
        raise ValueError("the sampled loss needs log_q and n_negatives >= 1")
    head_dim = dim // heads
    seeds = iter(range(seed * 1000 + 1, seed * 1000 + 1000))

    def dense(units, name, activation=None):
        return layers.Dense(units, activation=activation, name=name,
                            kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)))

    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.ln1 = layers.LayerNormalization(epsilon=1e-6, name="ln1")
            self.ln2 = layers.LayerNormalization(epsilon=1e-6, name="ln2")
            self.q, self.k, self.v = dense(dim, "q"), dense(dim, "k"), dense(dim, "v")
            self.o = dense(dim, "o")
            self.ff1, self.ff2 = dense(dim, "ff1", "relu"), dense(dim, "ff2")
            self.drop_att = layers.Dropout(dropout, seed=next(seeds))
            self.drop1 = layers.Dropout(dropout, seed=next(seeds))
            self.drop2 = layers.Dropout(dropout, seed=next(seeds))

        def build(self, input_shape):
            for layer in (self.ln1, self.ln2):
                layer.build(input_shape)
            for layer in (self.q, self.k, self.v, self.o, self.ff1, self.ff2):
                layer.build(input_shape)
            self.built = True

        def _heads(self, t):
            b, n = ops.shape(t)[0], ops.shape(t)[1]
            return ops.transpose(ops.reshape(t, (b, n, heads, head_dim)), (0, 2, 1, 3))

        def call(self, x, att_bias, mask, training=False):
            y = self.ln1(x)
            q, k, v = self._heads(self.q(y)), self._heads(self.k(y)), self._heads(self.v(y))
            s = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(head_dim) + att_bias
            a = self.drop_att(ops.softmax(s, axis=-1), training=training)
            z = ops.transpose(ops.matmul(a, v), (0, 2, 1, 3))
            z = ops.reshape(z, (ops.shape(x)[0], ops.shape(x)[1], dim))
            x = x + self.drop1(self.o(z), training=training)
            x = x + self.drop2(self.ff2(self.ff1(self.ln2(x))), training=training)
            return x * mask

    class SASRec(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.blocks_ = [Block(name=f"block{j}") for j in range(blocks)]
            self.drop_in = layers.Dropout(dropout, seed=next(seeds))
            self.ln_out = layers.LayerNormalization(epsilon=1e-6, name="ln_out")
            self.l2 = float(l2)
            self.seed_gen = keras.random.SeedGenerator(seed + 7)
            self.log_q = None if log_q is None else ops.convert_to_tensor(
                np.asarray(log_q, np.float32))

        def build(self, input_shape=None):
            self.item = self.add_weight(
                shape=(n_items + 1, dim), name="item",
                initializer=keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(dim),
                                                            seed=next(seeds)))
            self.pos = self.add_weight(
                shape=(max_len, dim), name="pos",
                initializer=keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(dim),
                                                            seed=next(seeds)))
            self.bias = self.add_weight(shape=(n_items,), name="item_bias", initializer="zeros")
            for blk in self.blocks_:
                blk.build((None, max_len, dim))
            self.ln_out.build((None, max_len, dim))
            self.built = True

        def encode(self, seq, training=False):
            """(b, L) int item+1 ids -> (b, L, dim) hidden states; L <= max_len, the last
            position aligned with the last positional embedding."""
            seq = ops.cast(seq, "int32")
            n = ops.shape(seq)[1]
            valid = ops.cast(ops.not_equal(seq, 0), "float32")  # (b, L)
            mask = ops.expand_dims(valid, -1)
            x = ops.take(self.item, seq, axis=0) + self.pos[max_len - n:]
            x = self.drop_in(x, training=training) * mask
            causal = ops.tril(ops.ones((n, n), "float32"))  # query t sees keys <= t
            keep = causal[None, None] * valid[:, None, None, :]
            att_bias = (1.0 - keep) * _NEG
            for blk in self.blocks_:
                x = blk(x, att_bias, mask, training=training)
            return self.ln_out(x) * mask

        def call(self, inputs, training=False):
            h = self.encode(inputs["seq"], training=training)
            if "target" in inputs:
                self.add_loss(self._loss(inputs["seq"], inputs["target"], h))
            return h

        def _loss(self, seq, target, h):
            target = ops.cast(target, "int32")
            w = ops.cast(ops.not_equal(target, 0) & ops.not_equal(ops.cast(seq, "int32"), 0),
                         "float32")
            label = ops.maximum(target - 1, 0)  # item index; padding targets carry weight 0
            table = self.item[1:]
            if loss == "full":
                logits = ops.einsum("bld,nd->bln", h, table) + self.bias
                ce = ops.sparse_categorical_crossentropy(label, logits, from_logits=True)
            else:
                neg = keras.random.categorical(ops.expand_dims(self.log_q, 0), n_negatives,
                                               seed=self.seed_gen)[0]  # (n_neg,)
                pos_v = ops.take(table, label, axis=0)  # (b, L, d)
                pos = (ops.sum(h * pos_v, axis=-1) + ops.take(self.bias, label)
                       - ops.take(self.log_q, label))
                neg_l = (ops.einsum("bld,nd->bln", h, ops.take(table, neg, axis=0))
                         + ops.take(self.bias, neg) - ops.take(self.log_q, neg))
                hit = ops.equal(ops.expand_dims(label, -1), neg)  # accidental hits
                neg_l = ops.where(hit, _NEG, neg_l)
                logits = ops.concatenate([ops.expand_dims(pos, -1), neg_l], axis=-1)
                ce = -ops.log_softmax(logits, axis=-1)[..., 0]
            total = ops.sum(ce * w) / ops.maximum(ops.sum(w), 1.0)
            if self.l2:
                total = total + self.l2 * ops.mean(ops.sum(ops.square(self.item), axis=-1))
            return total

    model = SASRec(name="sasrec")
    model.build()
    return model


def user_vectors(model, seqs: np.ndarray, batch: int = _ENCODE_BATCH) -> np.ndarray:
    """(n_users, dim) float32: the hidden state at the last position of each row of ``seqs``
    ((n_users, max_len) from :func:`sequences`), zero for an all-padding row; ``batch`` rows
    at a time (memory flat in the number of users)."""
    from keras import ops

    dim = int(model.item.shape[1])
    out = np.zeros((len(seqs), dim), dtype=np.float32)
    rows = np.flatnonzero(seqs[:, -1] != 0)
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        h = model.encode(seqs[r], training=False)
        out[r] = ops.convert_to_numpy(h[:, -1, :])
    return out


def export(model, seqs: np.ndarray) -> dict[str, np.ndarray]:
    """The factor-model export (module docstring) for the users' ``seqs``."""
    from keras import ops

    return {
        "user": user_vectors(model, seqs),
        "item": np.asarray(ops.convert_to_numpy(model.item[1:]), dtype=np.float32),
        "item_bias": np.asarray(ops.convert_to_numpy(model.bias), dtype=np.float32),
    }


def _seed_everything(seed: int) -> None:
    keras = models.keras_module()
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def sampler_log_q(item: np.ndarray, n_items: int, sampler: str) -> np.ndarray:
    """log probabilities over items of the negative sampler: ``count ** 0.75`` normalised
    (every item counted at least once, so each can be drawn) or uniform."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "uniform":
        return np.full(n_items, -math.log(n_items), np.float32)
    p = np.maximum(np.bincount(np.asarray(item, np.int64), minlength=n_items), 1) ** 0.75
    return np.log(p / p.sum()).astype(np.float32)


def fit(user, item, ts, *, n_users: int, n_items: int, max_len: int, dim: int, blocks: int,
        heads: int, dropout: float, epochs: int, batch_size: int, learning_rate: float,
        l2: float, loss: str, n_negatives: int, seed: int, deadline: float | None = None,
        valid_fn=None, patience: int = 3, sampler: str = "popularity",
        long_history: str = "last") -> tuple[dict[str, np.ndarray], dict]:
    """Returns (emb, history). emb = {"user": (n_users, dim) float32, "item": (n_items, dim)
    float32, "item_bias": (n_items,) float32}: user vector = the model's final hidden state at
    the last position of the user's whole sequence (all its events, up to max_len), item
    vectors = the (tied) item embedding table rows used by the output layer, so
    score(u, i) = user[u] @ item[i] + item_bias[i] is exactly the model's next-item logit.
    Users with no events: zero vector. With valid_fn (callable(emb) -> float, higher better,
    called after each epoch): early stopping after ``patience`` epochs without a better value;
    the best epoch's weights are returned and history["best_epoch"] says which; without it,
    exactly ``epochs`` epochs (the refit repeats the selection's count).

    ``deadline``: a ``time.monotonic()`` value; no epoch starts that is projected (from the
    mean epoch so far, valid_fn included) to end after it. The first epoch always runs.
    history: "loss" and "valid" per epoch, "epoch_s" (seconds per epoch, training plus
    valid_fn), "epochs" (run), "best_epoch", "stopped" (None, "patience" or "deadline ..."),
    "n_windows". ``sampler`` ("popularity" | "uniform") draws the sampled loss's negatives;
    ``long_history`` ("last" | "slide"): see :func:`training_windows`."""
    keras = models.keras_module()
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    _seed_everything(seed)
    log_q = sampler_log_q(item, n_items, sampler) if loss == "sampled" else None
    win = training_windows(user, item, ts, n_users=n_users, max_len=max_len,
                           long_history=long_history)
    seqs = sequences(user, item, ts, n_users=n_users, max_len=max_len)
    model = build(n_items=n_items, max_len=max_len, dim=dim, blocks=blocks, heads=heads,
                  dropout=dropout, l2=l2, loss=loss, n_negatives=n_negatives, seed=seed,
                  log_q=log_q)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate, beta_2=0.98))
    hist: dict = {"loss": [], "valid": [], "epoch_s": [], "epochs": 0, "best_epoch": None,
                  "stopped": None, "n_windows": int(len(win))}
    state = {"best": -np.inf, "weights": None, "wait": 0, "t0": 0.0}

    class Epochs(keras.callbacks.Callback):
        """Per epoch: valid_fn and early stopping, timing, the deadline's projection."""

        def on_epoch_begin(self, epoch, logs=None):
            state["t0"] = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            hist["loss"].append(float((logs or {}).get("loss", np.nan)))
            hist["epochs"] = epoch + 1
            if valid_fn is not None:
                value = float(valid_fn(export(model, seqs)))
                hist["valid"].append(value)
                if value > state["best"]:
                    state.update(best=value, wait=0, weights=model.get_weights())
                    hist["best_epoch"] = epoch + 1
                else:
                    state["wait"] += 1
            now = time.monotonic()
            hist["epoch_s"].append(now - state["t0"])
            if valid_fn is not None and state["wait"] >= patience:
                hist["stopped"] = "patience"
                self.model.stop_training = True
            elif deadline is not None and epoch + 1 < epochs:
                late = now + float(np.mean(hist["epoch_s"])) - deadline
                if late > 0:
                    hist["stopped"] = f"deadline: epoch {epoch + 2} projected {late:.1f} s late"
                    self.model.stop_training = True

    if len(win):
        model.fit({"seq": win[:, :-1], "target": win[:, 1:]}, batch_size=batch_size,
                  epochs=epochs, shuffle=True, verbose=0, callbacks=[Epochs()])
    best_weights = state["weights"]
    if best_weights is not None:
        model.set_weights(best_weights)
    elif valid_fn is None:
        hist["best_epoch"] = hist["epochs"]
    return export(model, seqs), hist
