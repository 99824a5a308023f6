"""Step 6, train: fit each candidate model family, keep the best on the valid split, refit it.

Candidates (``train.candidates``, families in nightrec/ml/models.py): ``ease`` (closed-form item-item,
above ``train.ease.max_items`` items fitted on the most interacted ones), ``ials`` (implicit ALS,
nightrec/ml/ials.py) and ``mf_softmax`` (Keras embedding model, full softmax, or above
``train.mf_softmax.full_softmax_max_items`` items a logQ-corrected sampled softmax with negatives
from ``augment.sample_negatives``; without a GPU not a candidate above
``train.mf_softmax.cpu_max_events``). All share ``train.time_budget``. Per run:

1. **select**: every candidate is fitted on the train split, and its final weights are scored by
   one function (``evaluate.ranking_metric``, ``train.select_metric``, full ranking, train items
   excluded) on one seeded sample of at most ``train.valid_users`` valid users, the same sample
   for every candidate. ``mf_softmax`` early-stops on that same figure (per epoch, best weights
   kept, checkpointed, TensorBoard logs), so its figure is the best of its epochs on the sample
   it stopped on: slightly optimistic next to EASE's single fit. The first listed candidate
   wins unless a later one beats the choice so far by ``train.select_min_gain`` (relative) at
   ``train.select_confidence``: the lower end of the one-sided interval of its paired per-user
   gain on the sample must exceed it (:func:`choose`). This selection fit is kept as the
   ``holdout`` fit.
2. **ship and gate** (``train.ship_fit``, ``train.gate_fit``): the winner is refit from
   scratch with the same hyperparameters (and, for the iterative families, the best iteration
   or epoch count). The defaults make three fits: the shipped refit on train + valid + test
   (``ship_fit: all``: the model users get has seen every event before ds), and the gated
   refit on train + valid (``gate_fit: train_valid``), which evaluate scores on the test split
   it never saw. Both are the same family and point, fitted the same way on nested data; the
   gated one is stored beside the shipped one (``gated``). ``ship_fit: train_valid`` makes the
   gated refit the shipped one (two fits: what ships is what is gated, but it never sees the
   test period, 2-3% of NDCG on MovieLens-100K, benchmarks/RESULTS.md); ``gate_fit: train``
   gates the train-only selection fit instead (no third fit, but a fit two periods from the
   test split under ``split.method: global_time``).
   ``train_cutoff`` is the latest event timestamp the shipped fit saw, ``gated_cutoff`` the
   gated fit's (int unix seconds); a later run compares this model's gated fit, as champion,
   only on test events after ``gated_cutoff`` (tasks/evaluate.py): gated fit against gated fit.

Training uses every visible GPU (``MirroredStrategy`` when there are several, mixed precision on
GPU) and the CPU otherwise; ``train.strategy: mirrored`` forces the distributed path on CPU too.
On CPU it is seeded and deterministic (TensorFlow op determinism). With
``train.mf_softmax.warm_start`` an mf_softmax fit starts from the champion's embeddings (matched
by external id) instead of random ones.

Outputs under ``runs/ds=<ds>/train/{holdout,full,gated}/`` (``full``: the shipped refit;
``holdout``: the train-only selection fit; ``gated``: the train + valid refit, when it is a fit
of its own): ``embeddings.npz`` (what scoring reads, numpy only), ``model.weights.h5`` (mf_softmax), ``history.json`` (training curves, device
plan); ``selection.json`` (every candidate's valid metric); TensorBoard logs (mf_softmax) under
``reports/ds=<ds>/tensorboard/{holdout,full,gated}/``, one folder per fit.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.core import engine, schema, settings
from nightrec.core.records import Split, Trained
from nightrec.ml import models
from nightrec.store import layout, storage
from nightrec.tasks import split

PARAMS = [
    "seed",
    "train.candidates",
    "train.ship_fit",
    "train.gate_fit",
    "train.select_metric",
    "train.select_min_gain",
    "train.select_confidence",
    "train.valid_users",
    "train.strategy",
    "train.ease.l2",
    "train.ease.dropout",
    "train.ease.max_items",
    "train.ease.recency_half_life",
    "train.ease.window",
    "train.ease.window_weight",
    "train.ease.window_max_events",
    "train.rp3beta.recency_half_life",
    "train.blend.enabled",
    "train.blend.weights",
    "train.rp3beta.alpha",
    "train.rp3beta.beta",
    "train.rp3beta.max_items",
    "train.sasrec.max_len",
    "train.sasrec.dim",
    "train.sasrec.blocks",
    "train.sasrec.heads",
    "train.sasrec.dropout",
    "train.sasrec.epochs",
    "train.sasrec.batch_size",
    "train.sasrec.learning_rate",
    "train.sasrec.l2",
    "train.sasrec.patience",
    "train.sasrec.loss",
    "train.sasrec.full_softmax_max_items",
    "train.sasrec.n_negatives",
    "train.sasrec.cpu_max_events",
    "train.time_budget.s_per_million_events",
    "train.time_budget.min_s",
    "train.time_budget.max_s",
    "train.ials.factors",
    "train.ials.iterations",
    "train.ials.regularization",
    "train.ials.alpha",
    "train.ials.cg_steps",
    "train.ials.kernel",
    "train.ials.warm_start",
    "train.mf_softmax.embedding_dim",
    "train.mf_softmax.epochs",
    "train.mf_softmax.batch_size",
    "train.mf_softmax.learning_rate",
    "train.mf_softmax.l2",
    "train.mf_softmax.patience",
    "train.mf_softmax.warm_start",
    "train.mf_softmax.loss",
    "train.mf_softmax.full_softmax_max_items",
    "augment.negatives_per_positive",
    "augment.negative_alpha",
    "train.mf_softmax.side_features",
    "train.mf_softmax.max_side_categories",
    "train.mf_softmax.cpu_max_events",
    "augment.item_features",
    "augment.user_features",
    "split.method",
    "tune.max_age_days",
    "tune.max_size_ratio",
]
STRATEGIES = ("auto", "mirrored", "default")
SHIP_FITS = {"all": ["train", "valid", "test"], "train_valid": ["train", "valid"]}
GATE_FITS = {"train": ["train"], "train_valid": ["train", "valid"]}
log = logging.getLogger(__name__)


def device_plan(strategy: str = "auto") -> dict:
    """Devices training will use: ``{"backend", "gpus", "strategy", "mixed_precision"}``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {strategy!r}")
    keras = models.keras_module()
    backend = keras.backend.backend()
    gpus = 0
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
    elif backend == "jax":
        import jax

        gpus = len([d for d in jax.devices() if d.platform == "gpu"])
    elif backend == "torch":
        import torch

        gpus = torch.cuda.device_count()
    if strategy == "mirrored" and backend != "tensorflow":
        raise ValueError(f"train.strategy mirrored needs the tensorflow backend, not {backend}")
    mirrored = strategy == "mirrored" or (strategy == "auto" and backend == "tensorflow"
                                          and gpus > 1)
    return {"backend": backend, "gpus": gpus, "strategy": "mirrored" if mirrored else "default",
            "mixed_precision": gpus > 0}


@contextlib.contextmanager
def training_scope(plan: dict):
    """Enter the distribution strategy and precision policy of ``plan``; restore on exit.

    Mirrored replicates over every GPU, or, without one, over every logical CPU device (one
    unless the process configured more: the CPU test of the distributed path does).
    """
    keras = models.keras_module()
    previous = keras.config.dtype_policy()
    if plan["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        if plan["strategy"] == "mirrored":
            import tensorflow as tf

            devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
                d.name for d in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(devices=devices)
            plan["replicas"] = strategy.num_replicas_in_sync
            with strategy.scope():
                yield
        else:
            plan["replicas"] = 1
            yield
    finally:
        keras.config.set_dtype_policy(previous)


def _seed_everything(seed: int) -> None:
    keras = models.keras_module()
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _ranking_callback(valid_fn, metric: str, patience: int):
    """Per epoch: ``logs["val_<metric>"] = valid_fn(model)``; stop after ``patience`` epochs
    without a better value; keep and, at the end, restore the best weights."""
    keras = models.keras_module()

    class ValidRanking(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.best_weights, self.wait = -np.inf, 0, None, 0

        def on_epoch_end(self, epoch, logs=None):
            value = float(valid_fn(self.model))
            if logs is not None:
                logs[f"val_{metric}"] = value
            if value > self.best:
                self.best, self.best_epoch, self.wait = value, epoch + 1, 0
                self.best_weights = self.model.get_weights()
            else:
                self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return ValidRanking()


def _budget_callback(deadline: float, steps: int, probe: int = 20):
    """Stops mf_softmax's fit at the epoch that would end after ``deadline`` (``time.monotonic``
    seconds; every epoch must have ended by then, except the first). Within the first epoch, after
    ``probe`` steps, it projects the epoch's end from their pace: past the deadline, it stops and
    sets ``over_budget`` (the candidate is then skipped: a fraction of an epoch is not a model).
    The first step (where Keras traces and compiles the train function, seconds on a busy CPU)
    counts once, the other ``steps - 1`` at the pace of steps 2 to ``probe``: averaged over the
    probe, the trace was projected onto every step of the epoch."""
    keras = models.keras_module()

    class Budget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.over_budget, self.stopped, self.epoch_s = None, None, []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch_s:
                return
            if batch == 0:
                self.t1 = time.monotonic()  # the first step's end: tracing done
            if batch + 1 != min(probe, steps):
                return
            now = time.monotonic()
            if batch:  # the first step once, the rest at the pace of the steps after it
                pace = (now - self.t1) / batch
                projected = (self.t1 - self.t0) + pace * (steps - 1)
            else:
                pace = now - self.t0
                projected = pace * steps
            if self.t0 + projected > deadline and steps > batch + 1:
                self.over_budget = (f"first epoch projected at {projected:.0f} s ({steps} steps "
                                    f"at {pace * 1000:.0f} ms after a first of "
                                    f"{self.t1 - self.t0:.1f} s), past its "
                                    f"time budget share of {deadline - self.t0:.0f} s")
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            now = time.monotonic()
            self.epoch_s.append(round(now - self.t0, 2))
            if now + float(np.mean(self.epoch_s)) > deadline and not self.model.stop_training:
                self.stopped = f"time budget: stopped after epoch {epoch + 1}"
                self.model.stop_training = True

    return Budget()


def mf_batch(p: settings.StepParams, n_examples: int) -> tuple[int, float]:
    """``(batch size, learning rate)`` of mf_softmax. ``train.mf_softmax.batch_size: auto``: the
    smallest of 512 x 2^k (at most 65536) that makes at most ``MAX_STEPS_PER_EPOCH`` steps an
    epoch; per-step overhead dominates on CPU, so steps, not examples, set an epoch's time. The
    learning rate is ``train.mf_softmax.learning_rate`` at batch 512, scaled by sqrt(batch / 512)
    (the gradient's noise falls as 1/sqrt(batch)). An integer batch size is used as given, with
    the learning rate as given."""
    size = p["train.mf_softmax.batch_size"]
    lr = float(p["train.mf_softmax.learning_rate"])
    if size != "auto":
        return int(size), lr
    batch = 512
    while batch < 65536 and -(-n_examples // batch) > MAX_STEPS_PER_EPOCH:
        batch *= 2
    return batch, lr * float(np.sqrt(batch / 512))


MAX_STEPS_PER_EPOCH = 1000


def softmax_kind(p: settings.StepParams, n_items: int) -> str:
    """``full`` or ``sampled``: ``train.mf_softmax.loss``, where ``auto`` means full softmax up
    to ``train.mf_softmax.full_softmax_max_items`` items (a batch x items logit matrix per step)
    and sampled softmax above (1 positive + ``augment.negatives_per_positive`` negatives)."""
    kind = p["train.mf_softmax.loss"]
    if kind not in ("auto", "full", "sampled"):
        raise ValueError(f"train.mf_softmax.loss must be auto, full or sampled, got {kind!r}")
    if kind == "auto":
        return "full" if n_items <= int(p["train.mf_softmax.full_softmax_max_items"]) else "sampled"
    return kind


def _negatives_dataset(x, y, w, *, seen, counts, n_neg: int, alpha: float, seed: int,
                       batch_size: int):
    """Batches of ``((users, [positive, negatives...], log_q), 0, weight)`` for the sampled
    softmax. Negatives come from ``augment.sample_negatives`` (popularity**alpha, never an item
    the user has in train), drawn again every epoch from a seeded generator; ``log_q`` is the
    log sampling probability used for the logQ correction."""
    import math

    from nightrec.tasks import augment

    keras = models.keras_module()
    q = np.power(counts, alpha)
    log_q = np.log(np.maximum(q / q.sum(), 1e-30)).astype(np.float32)
    log_q_pos = np.zeros(len(y), np.float32)  # the positive is given, not sampled

    class Negatives(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self._draw()

        def _draw(self):
            rng = np.random.default_rng([seed, self.epoch])
            self.order = rng.permutation(len(x))
            self.neg = augment.sample_negatives(x, seen, n_neg=n_neg, item_counts=counts,
                                                alpha=alpha, seed=rng)

        def __len__(self):
            return math.ceil(len(x) / batch_size)

        def __getitem__(self, i):
            idx = self.order[i * batch_size:(i + 1) * batch_size]
            cand = np.concatenate([y[idx, None], self.neg[idx]], axis=1).astype(np.int32)
            lq = np.concatenate([log_q_pos[idx, None], log_q[self.neg[idx]]], axis=1)
            return (x[idx], cand, lq), np.zeros(len(idx), np.int32), w[idx]

        def on_epoch_end(self):
            self.epoch += 1
            self._draw()

    return Negatives()


def valid_sample(valid: pd.DataFrame, *, max_users: int, seed: int) -> pd.DataFrame:
    """The rows of at most ``max_users`` valid users (seeded): the one sample every candidate
    is scored on, and mf_softmax's per-epoch metric.

    Ranking every valid user against the whole catalogue each epoch cost about as much as the
    epoch itself at 200k users x 20k items (~45 s). The gate is not sampled (evaluate ranks
    every test user). Idempotent: a sample of at most ``max_users`` users comes back as is.
    """
    if max_users < 1:
        raise ValueError(f"train.valid_users must be >= 1, got {max_users}")
    users = valid[schema.USER_IDX].unique()
    if len(users) <= max_users:
        return valid
    keep = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
    return valid[valid[schema.USER_IDX].isin(keep)]


def _sample_rows(train: pd.DataFrame, sample: pd.DataFrame) -> np.ndarray:
    """The mask of ``train``'s rows that :func:`sample_known` keeps."""
    return train[schema.USER_IDX].isin(sample[schema.USER_IDX].unique()).to_numpy()


def sample_known(train: pd.DataFrame, sample: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``train`` whose user is in ``sample``: all a valid metric on the sample
    excludes (the same figure as with every train row, without a seen matrix of every user
    built per call: 72M rows at 100M events)."""
    return train[_sample_rows(train, sample)]


def fit_mf(
    train: pd.DataFrame, valid: pd.DataFrame | None, *, n_users: int, n_items: int,
    p: settings.StepParams, workdir: Path, epochs: int | None = None,
    init: dict[str, np.ndarray] | None = None, tensorboard_dir: Path | None = None,
    side: dict[str, np.ndarray | None] | None = None, deadline: float | None = None,
    known: pd.DataFrame | None = None,
) -> tuple[dict[str, np.ndarray], dict, object]:
    """Fit mf_softmax on the positive rows of ``train``; with ``valid``, early-stop on
    ``train.select_metric`` measured on (a ``train.valid_users`` sample of) it; the best epoch's
    weights are returned. ``deadline``: see :func:`_budget_callback`; a fit it stopped within
    its first epoch has ``history["over_budget"]`` (why). ``known``: see :func:`search_ials`.
    Returns ``(weights, history, keras model)``."""
    from nightrec.ml import sparse_optim
    from nightrec.tasks import evaluate

    keras = models.keras_module()
    seed = int(p["seed"])
    _seed_everything(seed)
    plan = device_plan(p["train.strategy"])
    x, y, w = schema.positive_columns(train, [schema.USER_IDX, schema.ITEM_IDX, schema.WEIGHT])
    x, y, w = (x.astype("int32", copy=False), y.astype("int32", copy=False),
               w.astype("float32", copy=False))
    batch_size, learning_rate = mf_batch(p, len(x))
    with training_scope(plan):
        model = models.build_mf(
            n_users=n_users, n_items=n_items, embedding_dim=int(p["train.mf_softmax.embedding_dim"]),
            l2=float(p["train.mf_softmax.l2"]), seed=seed,
            user_side=(side or {}).get("user"), item_side=(side or {}).get("item"),
        )
        warm_rows = models.warm_start(model, init) if init is not None else 0
        model.compile(
            # Adam on the rows each batch uses (sparse_optim.RowAdam): Keras's Adam rewrites
            # every row of both tables each step, a cost growing with users (benchmarks/RESULTS.md)
            optimizer=sparse_optim.RowAdam(learning_rate=learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    metric = p["train.select_metric"]
    callbacks = []
    ranker = None
    if valid is not None and len(valid):
        valid = valid_sample(valid, max_users=int(p["train.valid_users"]), seed=seed)
        seen_by = sample_known(train, valid) if known is None else known
        ranker = _ranking_callback(
            lambda m: evaluate.ranking_metric(models.mf_weights(m), seen_by, valid, metric=metric,
                                              n_users=n_users),
            metric, int(p["train.mf_softmax.patience"]),
        )
        callbacks.append(ranker)
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(workdir / "checkpoint.weights.h5"), monitor=f"val_{metric}", mode="max",
            save_best_only=True, save_weights_only=True,
        ))
    if tensorboard_dir is not None:
        callbacks.append(keras.callbacks.TensorBoard(str(tensorboard_dir), write_graph=False))
    loss = softmax_kind(p, n_items)
    budget = None
    if deadline is not None:
        budget = _budget_callback(deadline, -(-len(x) // batch_size))
        callbacks.append(budget)
    if loss == "full":
        data = {"x": x, "y": y, "sample_weight": w, "batch_size": batch_size, "shuffle": True}
    else:
        seen = models.interaction_matrix(pd.DataFrame({"u": x, "i": y}, copy=False),
                                         n_users=n_users, n_items=n_items, user_col="u",
                                         item_col="i")
        data = {"x": _negatives_dataset(
            x, y, w, seen=seen, counts=np.bincount(y, minlength=n_items).astype(np.float64),
            n_neg=int(p["augment.negatives_per_positive"]), alpha=float(p["augment.negative_alpha"]),
            seed=seed, batch_size=batch_size)}
    hist = model.fit(**data, epochs=int(epochs or p["train.mf_softmax.epochs"]), verbose=0,
                     callbacks=callbacks)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    history["best_epoch"] = ranker.best_epoch if ranker else len(history["loss"])
    if ranker:
        history[f"best_val_{metric}"] = ranker.best
    history["device_plan"] = plan
    history["warm_start_rows"] = warm_rows
    history["loss_kind"] = loss
    history["batch_size"], history["learning_rate"] = batch_size, learning_rate
    if budget is not None:
        history["epoch_s"] = budget.epoch_s
        if budget.over_budget:
            history["over_budget"] = budget.over_budget
        if budget.stopped:
            history["stopped"] = budget.stopped
    return models.mf_weights(model), history, model


def _pairs_matrix(train: pd.DataFrame, *, n_users: int, n_items: int):
    """The 0/1 user x item matrix of ``train``'s positive rows, as the transpose of an items x
    users CSR (a CSC view): the item-item fits need that orientation, and a user x item CSR
    would be copied into it (8 bytes a pair more at the peak). Two columns are read (views
    when every row is positive), not the frame."""
    cols = (schema.USER_IDX, schema.ITEM_IDX)
    pairs = pd.DataFrame(dict(zip(cols, schema.positive_columns(train, list(cols)), strict=True)),
                         copy=False)
    return models.interaction_matrix(pairs, n_users=n_items, n_items=n_users,
                                     user_col=schema.ITEM_IDX, item_col=schema.USER_IDX).T


# The hyperparameters each family searches on the valid sample: a list in params.yaml is
# searched (every combination), a single value is used as is.
# The item-item families' ``recency_half_life`` changes only how user rows are weighted at
# scoring, not the fit: listed last, its values reuse one fit each. EASE's ``window`` changes
# the Gram matrix: listed first, so that every point of the plain Gram (null, listed first in
# params.yaml) is fitted before a time budget cuts the search short.
SEARCHED = {"ease": ("window", "l2", "dropout", "recency_half_life"),
            "rp3beta": ("alpha", "beta", "recency_half_life"), "ials": ("regularization",)}


def search_values(p: settings.StepParams, family: str, key: str) -> list[float | None]:
    """``train.<family>.<key>`` as a list of floats: one value, or the values searched (a
    ``recency_half_life`` may be null: 0/1 user rows)."""
    value = p[f"train.{family}.{key}"]
    values = [None if v is None and key in NULLABLE else float(v)
              for v in (value if isinstance(value, list | tuple) else [value])]
    if not values:
        raise ValueError(f"train.{family}.{key} must be a number or a non-empty list")
    if key == "window" and any(v is not None and (v < 1 or v != int(v)) for v in values):
        raise ValueError(f"train.{family}.window must be a whole number >= 1 or null, "
                         f"got {value}")
    if key in NULLABLE and any(v is not None and v <= 0 for v in values):
        raise ValueError(f"train.{family}.{key} must be > 0 or null, got {value}")
    return values


NULLABLE = ("recency_half_life", "window")  # null: 0/1 user rows; the plain Gram matrix


def ease_windows(p: settings.StepParams, events: int) -> list[float | None]:
    """The ``train.ease.window`` values searched on ``events`` train events: all of them up to
    ``train.ease.window_max_events``, above it only null (the windowed Gram's cost grows with
    events x window: a bound on run time, logged, not a quality choice)."""
    values = search_values(p, "ease", "window")
    if events > int(p["train.ease.window_max_events"]) and any(v is not None for v in values):
        log.info("ease: %d train events > train.ease.window_max_events %d: the window is not "
                 "searched (plain Gram only)", events, int(p["train.ease.window_max_events"]))
        return [None]
    return values


def needs_timestamps(p: settings.StepParams, names: list[str], events: int = 0) -> bool:
    """Whether a fit or search of ``names`` on ``events`` train events reads event timestamps:
    the sequential candidate, EASE with a window to search, or an item-item family with a
    recency half-life to search."""
    return "sasrec" in names or windowed(p, names, events) or any(
        name in names and any(h is not None for h in search_values(p, name,
                                                                   "recency_half_life"))
        for name in ("ease", "rp3beta"))


def windowed(p: settings.StepParams, names: list[str], events: int) -> bool:
    """Whether an EASE fit of ``names`` on ``events`` train events may use a windowed Gram
    (:func:`ease_windows`): the fits then order every user's events, so the frames keep their
    timestamps."""
    return "ease" in names and any(w is not None for w in ease_windows(p, events))


def search_points(p: settings.StepParams, family: str) -> list[dict[str, float]]:
    """Every combination of :data:`SEARCHED` values of ``family``, in params.yaml's order.

    With an adopted tune result for ``family`` (``p["tune.adopted"]``, :func:`adopt`), its
    point joins the search: its values of the keys it tuned, every listed value of the others,
    each such point ahead of the grid's points that share its first key's value (so the tuned
    point is the first fitted, where :func:`search`'s coordinate search starts, and comes
    first among each window's points)."""
    keys = SEARCHED[family]
    lists = [search_values(p, family, k) for k in keys]
    grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]
    adopted = p.get("tune.adopted") or {}
    tuned = {k: float(v) for k, v in (adopted.get("params") or {}).items() if k in keys}
    if adopted.get("family") != family or not tuned:
        return grid
    extra = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(
        *([tuned[k]] if k in tuned else values for k, values in zip(keys, lists, strict=True)))]
    extra = [point for point in extra if point not in grid]
    # grouped by the first key's value (a tuned value of it outside the list: first of all),
    # the tuned points ahead of the grid's in each group
    groups = [v for v in {pt[keys[0]]: None for pt in extra} if v not in lists[0]] + lists[0]
    return [pt for v in groups for pt in (*extra, *grid) if pt[keys[0]] == v]


TUNE_FAMILIES = ("ease", "mf_softmax")  # what tasks/tune.py searches (tune.model)


def tune_adoption(best: dict | None, *, ds: str, tune_ds: str | None,
                  p: settings.StepParams, n_items: int, events: int,
                  seen_until: int | None) -> dict:
    """Whether the nightly train of ``ds`` adopts the tune DAG's result ``best`` (tasks/tune.py's
    ``best_params.json`` of ``tune_ds``, the latest within ``tune.max_age_days``; None: none).

    Adopted only when it comes from the same data family and cannot carry this run's test
    events: both runs split by ``global_time`` and the latest train or valid event the study
    read is no later than this run's train + valid (``seen_until``), so none of its events is
    in this run's test split; its best point beat the params of its day on its valid split;
    the catalogue and the train events are within ``tune.max_size_ratio`` of this run's
    (``n_items``, ``events``); and it tuned a candidate of this run. Pure: returns the verdict
    (``adopted``, ``why``, the result's ``ds``, ``model``, ``params``, ``value``,
    ``baseline_value``), which train records in selection.json."""
    max_age = p["tune.max_age_days"]
    if best is None:
        return {"adopted": False, "why": f"no tune result for ds {ds} or the {max_age} days "
                                         "before it"}
    out = {"ds": tune_ds, "model": best.get("model"), "params": best.get("params") or {},
           "value": best.get("value"), "baseline_value": best.get("baseline_value")}
    data = best.get("data") or {}
    ratio = float(p["tune.max_size_ratio"])

    def far(a, b) -> bool:
        return not (a and b) or max(a / b, b / a) > ratio

    why = None
    if out["model"] not in TUNE_FAMILIES or out["model"] not in p["train.candidates"]:
        why = f"tune.model {out['model']!r} is not a candidate of this run"
    elif not (out["value"] is not None and out["baseline_value"] is not None
              and out["value"] > out["baseline_value"]):
        why = (f"its best point ({out['value']}) did not beat the params of its day "
               f"({out['baseline_value']}) on its valid split")
    elif data.get("split_method") != "global_time" or p["split.method"] != "global_time":
        why = (f"split methods {data.get('split_method')!r} and {p['split.method']!r}: only "
               "under global_time do a study's events all precede a later run's test split")
    elif data.get("valid_until") is None or seen_until is None or data["valid_until"] > seen_until:
        why = (f"the study read events up to {data.get('valid_until')}, after this run's "
               f"train + valid ({seen_until}): they may be in this run's test split")
    elif far(data.get("n_items"), n_items) or far(data.get("train_events"), events):
        why = (f"another data family: {data.get('n_items')} items and "
               f"{data.get('train_events')} train events against {n_items} and {events} "
               f"(tune.max_size_ratio {ratio:g})")
    return {**out, "adopted": why is None, "why": why or "same data family"}


def adopt(p: settings.StepParams, adoption: dict | None) -> settings.StepParams:
    """``p`` with an adopted tune result applied (else ``p`` itself): ``tune.adopted`` names it
    (so the model version's hash covers it) and, for ease, :func:`search_points` adds its point
    to the search; mf_softmax, which searches nothing in the run, takes its values."""
    if not (adoption and adoption.get("adopted")):
        return p
    family = adoption["model"]
    short = {k.removeprefix(f"train.{family}."): v for k, v in adoption["params"].items()
             if k.startswith(f"train.{family}.")}
    out = settings.StepParams({}, [])
    out.update(p)
    out["tune.adopted"] = {"family": family, "ds": adoption["ds"], "params": short}
    if family == "mf_softmax":
        for k, v in short.items():
            if f"train.mf_softmax.{k}" in out:
                out[f"train.mf_softmax.{k}"] = v
    return out


def latest_tune(ds: str, max_age_days: int) -> tuple[dict | None, str | None]:
    """``(best_params.json, its ds)`` of the latest tune run of ``ds`` or the ``max_age_days``
    days before it (never a later ds: a backfill does not adopt what a later night learned);
    ``(None, None)`` when there is none."""
    import datetime as dt

    day = dt.date.fromisoformat(ds)
    for back in range(int(max_age_days) + 1):
        tune_ds = (day - dt.timedelta(days=back)).isoformat()
        uri = layout.report_uri(tune_ds, "tune", "best_params.json")
        if storage.exists(uri):
            return storage.read_json(uri), tune_ds
    return None, None


def point_key(point: dict[str, float]) -> str:
    """How a searched point is named in selection.json: ``"300.0"`` for one searched key,
    ``"l2=200.0,dropout=0.5"`` for several."""
    if len(point) == 1:
        return str(next(iter(point.values())))
    return ",".join(f"{k}={v}" for k, v in point.items())


def next_point(points: list[dict], done: set[int], best: dict | None,
               cursor: int = 0) -> tuple[int, int]:
    """``(index, cursor)``: the next point to fit in a cyclic coordinate search, and the
    cursor (an index into :func:`cycle_keys`: the key being moved). From ``best`` (the best
    point so far), the first point not yet fitted, in ``points``' order, that differs from it
    in the cursor's key only; when the best has none left along that key, the next key's,
    cyclically; when it has none along any key, the point not yet fitted nearest to it (fewest
    keys changed, then ``points``' order; the cursor stays); with no best yet, the first.

    So every key is moved once from the best before any key is moved twice: a search the time
    budget cuts after ``1 + sum(len(values) - 1)`` fits has tried every value of every key
    (EASE's window among them) next to the best, where restarting from the first key on each
    new best could spend the whole share on one key. (A best off the lists, a tune DAG's
    adopted point, has neighbours only along the keys it shares with the grid; then the nearest
    points follow.) With the whole grid fitted it is the grid again, in another order. One
    searched key: ``points``' order."""
    left = [i for i in range(len(points)) if i not in done]
    if best is None or not left:
        return left[0], cursor
    keys = cycle_keys(points)
    for step in range(len(keys)):
        at = (cursor + step) % len(keys)
        key = keys[at]
        for i in left:
            if points[i].get(key) != best.get(key) and all(
                    points[i].get(k) == v for k, v in best.items() if k != key):
                return i, at
    return min(left, key=lambda i: (sum(points[i].get(k) != v for k, v in best.items()),
                                    i)), cursor


def cycle_keys(points: list[dict]) -> list[str]:
    """The keys a coordinate search moves, in turn: the grid's keys from the one that varies
    fastest in ``points`` (its last) to the slowest. A grid lists its costly keys first (EASE's
    window: each value a Gram matrix to build; RP3beta's alpha, the same), so a turn takes the
    cheap moves (a recency half-life reuses the last solve) before the ones that rebuild."""
    return list(reversed(list(points[0]))) if points else []


def search(family: str, points: list[dict[str, float]], fit_one, sample: pd.DataFrame, *,
           known: pd.DataFrame, n_users: int, metric: str, deadline: float,
           interruptible: bool = False, projected_s=None) -> tuple[dict, dict]:
    """The selection fit of a family with searched hyperparameters (tuning in the loop).

    ``fit_one(point, deadline) -> (weights, history)`` fits one point; each gets an equal share
    of the time to ``deadline`` (an ``interruptible`` fit stops at its share; a closed-form one
    is not started when its fit and its scoring are projected to overrun ``deadline``, and is
    recorded as not fitted: ``projected_s(point)`` says what its fit will take (None, or no
    function: the slowest fit so far), the slowest scoring so far is added; a point that would
    rebuild is skipped, a cheaper one after it may still fit). The points are taken in
    :func:`next_point`'s order (a cyclic coordinate search from the first: each key in turn
    moved from the best so far), so that a search the budget cuts short has moved every key
    from its best, not exhausted the grid's first keys (the record lists them in ``points``'
    order). Each fit is scored on the valid ``sample`` by
    ``evaluate.ranking_metric``, the same figure every candidate is compared by; the best is
    the family's selection fit, and the shipped refit repeats its point. Its history
    records every point's figure (``search``) and the choice (``params``).

    Nothing here can read the test split: the fits get train rows and the score ``sample`` (valid
    rows) and ``known`` (train rows), and this function is all the tuning there is."""
    from nightrec.tasks import evaluate

    best, record, slowest, scoring = None, {}, 0.0, 0.0
    ranks: dict = {}  # the sample users' recency ranks, built once for every point that asks
    done: set[int] = set()
    cursor = 0  # the key the coordinate search moves now (next_point)
    for n in range(len(points)):
        i, cursor = next_point(points, done, None if best is None or best[0] is None
                               else best[1], cursor)
        point = points[i]
        done.add(i)
        now = time.monotonic()
        need = None if projected_s is None else projected_s(point)
        if best is not None and not interruptible and now + scoring + (
                slowest if need is None else need) > deadline:
            record[point_key(point)] = {"skipped": "time budget"}
            continue
        own = now + max(0.0, deadline - now) / (len(points) - n)
        started = time.perf_counter()
        emb, hist = fit_one(point, own)
        last_s = time.perf_counter() - started
        slowest = max(slowest, last_s)  # a point reusing a fit is quick: the next may not be
        value = None
        started = time.perf_counter()
        if len(points) > 1:
            if models.recency_half_life(emb) is not None and "r" not in ranks:
                ranks["r"] = evaluate.known_ranks(known, n_users=n_users,
                                                  n_items=models.n_items(emb), models_=(emb,))
            value = evaluate.ranking_metric(emb, known, sample, metric=metric, n_users=n_users,
                                            ranks=ranks.get("r") if models.recency_half_life(
                                                emb) is not None else None)
        scoring = max(scoring, time.perf_counter() - started)
        record[point_key(point)] = {f"valid_{metric}": value, "fit_s": round(last_s, 2),
                                    **({"iterations": hist["iterations"]}
                                       if "iterations" in hist else {})}
        log.info("%s %s: valid %s = %s (%.1f s)", family, point, metric, value, last_s)
        if best is None or (value is not None and (
                value > best[0] or (value == best[0] and i < best[4]))):
            # the best so far waits on disk while the next point's fit runs; a tie goes to
            # the point listed first, as in the listed order
            best = (value, point, _parked(emb) if n + 1 < len(points) else emb, hist, i)
        emb = None
    unfitted = sum("skipped" in r for r in record.values())
    if unfitted:
        log.info("%s search: %d of %d points left unfitted (time budget)", family, unfitted,
                 len(points))
    value, point, emb, hist, _ = best
    hist["params"] = dict(point)
    hist["search"] = {point_key(pt): record[point_key(pt)] for pt in points}
    if value is not None:  # already scored on the sample: train_both need not rank it again
        hist[f"valid_{metric}"] = value
    return emb, hist


def fit_ease(train: pd.DataFrame, *, n_users: int, n_items: int, p: settings.StepParams,
             point: dict[str, float] | None = None):
    """Fit EASE/EDLAE on the positive rows of ``train`` with ``point`` (``l2``, ``dropout``,
    ``window``; default: the first of each searched list); returns ``(weights, history)``."""
    point = point or search_points(p, "ease")[0]
    x = _pairs_matrix(train, n_users=n_users, n_items=n_items)
    max_items = int(p["train.ease.max_items"])
    gram, head = ease_gram(x, train, p=p, window=point.get("window"))
    emb = _recency(models.ease_from_gram(gram, head, n_items, l2=point["l2"],
                                         dropout=point["dropout"]), point)
    gram = None
    hist = dict(point)
    if models.item_index(emb) is not None:
        hist["head_items"] = max_items
        log.info("ease: %d items > train.ease.max_items %d: fitted on the %d most interacted "
                 "(the rest are never recommended by it)", n_items, max_items, max_items)
    return emb, hist


def ease_gram(x, train: pd.DataFrame, *, p: settings.StepParams,
              window: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(gram, head)`` that EASE solves: ``models.item_gram`` of ``x`` (the 0/1 pairs of
    ``train``'s positive rows) over the ``train.ease.max_items`` head, plus, with a
    ``window``, ``train.ease.window_weight`` x ``models.window_gram`` of each user's event
    order in ``train`` (its timestamps)."""
    gram, head = models.item_gram(x, max_items=int(p["train.ease.max_items"]))
    if window is not None:
        if schema.TIMESTAMP not in train:
            raise ValueError("train.ease.window needs the events' timestamps")
        cols = [schema.USER_IDX, schema.ITEM_IDX, schema.TIMESTAMP]
        user, item, ts = schema.positive_columns(train, cols)
        gram += float(p["train.ease.window_weight"]) * models.window_gram(
            user, item, ts, n_items=x.shape[1], head=head, window=int(window))
    return gram, head


def search_item_item(family: str, train: pd.DataFrame, sample: pd.DataFrame, *, n_users: int,
                     n_items: int, p: settings.StepParams, deadline: float,
                     known: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """The selection fit of ``ease`` or ``rp3beta``: :func:`search` over its points. One
    co-occurrence (Gram) matrix is held at a time, for one EASE window (RP3beta: alpha), and
    copied per point (EASE's solve overwrites it); a point of another window builds its own
    (the cyclic search can come back to a window). A point differing from the last fit only in
    its recency half-life reuses that fit. Each point's projected cost (for :func:`search`'s
    deadline) follows from this."""
    x = _pairs_matrix(train, n_users=n_users, n_items=n_items)
    max_items = int(p[f"train.{family}.max_items"])
    by = "window" if family == "ease" else "alpha"  # the key a Gram matrix depends on
    grams: dict = {}
    last: dict = {}  # the last fit, reused by the points that differ only in recency
    cost: dict = {"gram": {}, "solve": 0.0}  # seconds: each Gram's build, the slowest solve

    def fit_one(point, deadline):
        base = {k: v for k, v in point.items() if k != "recency_half_life"}
        if last.get("base") != base:
            last.clear()
            last["base"], last["emb"] = base, fit_base(base)
        return _recency(dict(last["emb"]), point), dict(point, **(
            {"head_items": max_items} if models.item_index(last["emb"]) is not None else {}))

    def fit_base(point):
        if "g" not in grams or grams[by] != point[by]:
            grams.clear()
            started = time.perf_counter()
            grams[by] = point[by]
            grams["g"] = (ease_gram(x, train, p=p, window=point["window"]) if family == "ease"
                          else models.item_gram(x, max_items=max_items, user_weight=(
                              models.rp3_user_weight(x, point["alpha"]))))
            cost["gram"][point[by]] = time.perf_counter() - started
        started = time.perf_counter()
        if family == "ease":
            g, head = grams["g"]
            emb = models.ease_from_gram(g.copy(), head, n_items, l2=point["l2"],
                                        dropout=point["dropout"])
        else:
            emb = models.fit_rp3beta(x, alpha=point["alpha"], beta=point["beta"], gram=grams["g"])
        cost["solve"] = max(cost["solve"], time.perf_counter() - started)
        return emb

    def projected_s(point) -> float | None:
        """What fitting ``point`` will take: nothing for a recency value of the last fit, the
        slowest solve on the Gram matrix held, that and a Gram matrix's build for another (as
        timed for that window or alpha; one not yet built: the slowest build timed, which for
        a first window is the plain Gram's, low by the window's pairs); None before the first
        fit."""
        if last.get("base") == {k: v for k, v in point.items() if k != "recency_half_life"}:
            return 0.0
        if not cost["gram"]:
            return None
        build = 0.0 if grams.get(by) == point[by] else cost["gram"].get(
            point[by], max(cost["gram"].values()))
        return build + cost["solve"]

    points = search_points(p, family)
    if family == "ease":  # above window_max_events, the plain Gram only
        allowed = ease_windows(p, len(train))
        points = [point for point in points if point["window"] in allowed]
    try:
        return search(family, points, fit_one, sample,
                      known=train if known is None else known, n_users=n_users,
                      metric=p["train.select_metric"], deadline=deadline,
                      projected_s=projected_s)
    finally:
        grams.clear()
        last.clear()


def _recency(emb: dict, point: dict) -> dict:
    """An item-item export with the point's ``recency_half_life`` (none: 0/1 user rows)."""
    emb.pop("recency_half_life", None)
    h = point.get("recency_half_life")
    if h is not None:
        emb["recency_half_life"] = np.array([h], np.float32)
    return emb


def fit_rp3beta(train: pd.DataFrame, *, n_users: int, n_items: int, p: settings.StepParams,
                point: dict[str, float] | None = None):
    """Fit RP3beta (``models.fit_rp3beta``) on the positive rows of ``train`` with ``point``
    (``alpha``, ``beta``; default: the first of each list); returns ``(weights, history)``."""
    point = point or search_points(p, "rp3beta")[0]
    x = _pairs_matrix(train, n_users=n_users, n_items=n_items)
    max_items = int(p["train.rp3beta.max_items"])
    emb = _recency(models.fit_rp3beta(x, alpha=point["alpha"], beta=point["beta"],
                                      max_items=max_items), point)
    hist = dict(point)
    if models.item_index(emb) is not None:
        hist["head_items"] = max_items
    return emb, hist


def ials_regularizations(p: settings.StepParams) -> list[float]:
    """``train.ials.regularization`` as a list: one value, or the values searched on valid."""
    values = search_values(p, "ials", "regularization")
    if any(v <= 0 for v in values):
        raise ValueError(f"train.ials.regularization must be > 0 (or a list of such), got "
                         f"{p['train.ials.regularization']}")
    return values


def search_ials(train: pd.DataFrame, sample: pd.DataFrame, *, n_users: int, n_items: int,
                p: settings.StepParams, init: dict[str, np.ndarray] | None,
                deadline: float, known: pd.DataFrame | None = None) -> tuple[dict, dict]:
    """The iALS selection fit: :func:`search` over ``train.ials.regularization`` (an equal
    share of the time to ``deadline`` each), the pairs built once. Its history also names the
    choice as ``regularization``. ``known``: the train rows of the sample's users
    (:func:`sample_known`; default ``train``), what the metric excludes."""
    ials_regularizations(p)
    data = ials_pairs(train, n_users=n_users, n_items=n_items, p=p)  # once for every value

    def fit_one(point, own):
        return fit_ials(None, n_users=n_users, n_items=n_items, p=p, init=init, deadline=own,
                        regularization=point["regularization"], data=data)

    emb, hist = search("ials", search_points(p, "ials"), fit_one, sample,
                       known=train if known is None else known, n_users=n_users,
                       metric=p["train.select_metric"], deadline=deadline, interruptible=True)
    hist["regularization"] = hist["params"]["regularization"]
    return emb, hist


def _parked(emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``emb``'s arrays written to unlinked temporary files and memory-mapped back
    (copy-on-write): what a search holds of its best fit so far while the next one runs, its
    user table (0.5 GB at 2M users x 64 factors) in the page cache, not in the process."""
    out = {}
    for key, a in emb.items():
        if not isinstance(a, np.ndarray) or isinstance(a, np.memmap) or a.nbytes < 1 << 20:
            out[key] = a  # parked already, or small (and an empty file cannot be mapped)
            continue
        try:
            with tempfile.TemporaryFile() as f:  # the map keeps its own handle
                np.ascontiguousarray(a).tofile(f)
                f.flush()
                out[key] = np.memmap(f, dtype=a.dtype, shape=a.shape, mode="c")
        except OSError as e:  # a full or small TMPDIR: kept in memory, as before parking
            log.warning("could not park %s (%d MB) in %s: %s; kept in memory", key,
                        a.nbytes >> 20, tempfile.gettempdir(), e)
            out[key] = a
    return out


def ials_pairs(train: pd.DataFrame, *, n_users: int, n_items: int, p: settings.StepParams):
    """The positive rows of ``train`` as iALS's pairs (``ials.pairs``), their ``weight`` the
    confidence scale. Only the columns' positive entries are copied (views when every row is
    positive), not the frame."""
    from nightrec.ml import ials

    cols = [schema.USER_IDX, schema.ITEM_IDX] + ([schema.WEIGHT] if schema.WEIGHT in train else [])
    user, item, *weight = schema.positive_columns(train, cols)
    return ials.pairs(user, item, weight[0].astype(np.float32, copy=False) if weight else None,
                      n_users=n_users, n_items=n_items, alpha=float(p["train.ials.alpha"]))


def fit_ials(train: pd.DataFrame | None, *, n_users: int, n_items: int, p: settings.StepParams,
             init: dict[str, np.ndarray] | None = None, deadline: float | None = None,
             iterations: int | None = None, regularization: float | None = None,
             data=None) -> tuple[dict, dict]:
    """Fit iALS (nightrec/ml/ials.py) on the positive rows of ``train`` (or on ``data``,
    :func:`ials_pairs` of it, built once for several fits); returns ``(weights, history)``.
    ``deadline``: ``time.monotonic()`` seconds no iteration may start to overrun;
    ``iterations`` overrides ``train.ials.iterations`` (the refit repeats the selection fit's
    count)."""
    from nightrec.ml import ials

    if data is None:
        data = ials_pairs(train, n_users=n_users, n_items=n_items, p=p)
    emb, hist = ials.fit(
        None, None, None, data=data,
        n_users=n_users, n_items=n_items, factors=int(p["train.ials.factors"]),
        iterations=int(iterations or p["train.ials.iterations"]),
        regularization=float(regularization or ials_regularizations(p)[0]),
        alpha=float(p["train.ials.alpha"]),
        cg_steps=int(p["train.ials.cg_steps"]), seed=int(p["seed"]), init=init,
        deadline=deadline, kernel=p["train.ials.kernel"])
    hist["best_epoch"] = hist["iterations"]  # the refit repeats this count
    return emb, hist


def fit_sasrec(train: pd.DataFrame, sample: pd.DataFrame | None, *, n_users: int, n_items: int,
               p: settings.StepParams, deadline: float | None = None,
               known: pd.DataFrame | None = None, epochs: int | None = None
               ) -> tuple[dict, dict]:
    """Fit the sequential candidate (nightrec/ml/sequential.py) on the positive rows of
    ``train`` in time order; with ``sample`` (valid rows), early-stop on ``train.select_metric``
    measured on it by ``evaluate.ranking_metric`` after each epoch (the best epoch's weights
    come back); ``epochs`` fixes the count (the refit). Its user vectors are the sequence's
    last state, so it scores like any factor model. ``deadline``: no epoch starts that is
    projected to end after it (the first always runs)."""
    from nightrec.ml import sequential
    from nightrec.tasks import evaluate

    metric = p["train.select_metric"]
    user, item, ts = schema.positive_columns(train, [schema.USER_IDX, schema.ITEM_IDX,
                                                     schema.TIMESTAMP])
    valid_fn = None
    if sample is not None and len(sample):
        seen_by = sample_known(train, sample) if known is None else known

        def valid_fn(emb):
            return evaluate.ranking_metric(emb, seen_by, sample, metric=metric, n_users=n_users)

    q = "train.sasrec."
    loss = p[q + "loss"]
    if loss == "auto":
        loss = "full" if n_items <= int(p[q + "full_softmax_max_items"]) else "sampled"
    emb, hist = sequential.fit(
        np.asarray(user), np.asarray(item), np.asarray(ts), n_users=n_users, n_items=n_items,
        max_len=int(p[q + "max_len"]), dim=int(p[q + "dim"]), blocks=int(p[q + "blocks"]),
        heads=int(p[q + "heads"]), dropout=float(p[q + "dropout"]),
        epochs=int(epochs or p[q + "epochs"]), batch_size=int(p[q + "batch_size"]),
        learning_rate=float(p[q + "learning_rate"]), l2=float(p[q + "l2"]), loss=loss,
        n_negatives=int(p[q + "n_negatives"]), seed=int(p["seed"]), deadline=deadline,
        valid_fn=valid_fn, patience=int(p[q + "patience"]))
    hist["loss_kind"] = loss
    if valid_fn is not None:  # the best epoch's figure, the weights returned
        hist[f"valid_{metric}"] = float(hist["valid"][hist["best_epoch"] - 1])
    return emb, hist


def budget_s(p: settings.StepParams, events: int) -> float:
    """The step's fitting budget in seconds: ``train.time_budget.s_per_million_events`` x
    ``events`` / 1e6, clamped to ``[min_s, max_s]``. Linear in events because every candidate's
    epoch or iteration is (ials: O(events d); mf_softmax: O(events) steps x a per-step cost that
    does not grow with users); the clamp keeps small logs fully trained and big ones bounded."""
    lo, hi = float(p["train.time_budget.min_s"]), float(p["train.time_budget.max_s"])
    if not 0 < lo <= hi:
        raise ValueError(f"train.time_budget needs 0 < min_s <= max_s, got {lo}, {hi}")
    return min(hi, max(lo, float(p["train.time_budget.s_per_million_events"]) * events / 1e6))


KERAS_FAMILIES = ("mf_softmax", "sasrec")  # the candidates fitted by Keras


def candidates(p: settings.StepParams, n_items: int, *, events: int = 0,
               gpus: int | None = None) -> tuple[list[str], dict[str, str]]:
    """``(names to fit, {skipped name: why})`` from ``train.candidates``. Nothing is skipped
    for the catalogue's size: above ``train.ease.max_items`` EASE is fitted on the head of the
    catalogue (:func:`nightrec.ml.models.fit_ease`). Without a GPU, ``mf_softmax`` is skipped
    above ``train.mf_softmax.cpu_max_events`` train events: on CPU its epoch costs more than its
    share of the time budget at every size above that (README, "Train at scale"), and building
    it first to find out would load TensorFlow and its user and item tables. A candidate can
    still be skipped by the time budget (:func:`train_both`)."""
    names = list(p["train.candidates"])
    unknown = [n for n in names if n not in models.KINDS]
    if not names or unknown:
        raise ValueError(f"train.candidates must be a non-empty subset of {models.KINDS}, "
                         f"got {names}")
    for family in ("ease", "rp3beta"):
        if int(p[f"train.{family}.max_items"]) < 1:
            raise ValueError(f"train.{family}.max_items must be >= 1")
    skipped = {}
    for name in KERAS_FAMILIES:
        limit = int(p[f"train.{name}.cpu_max_events"])
        if name in names and events > limit and len(names) > 1:
            from nightrec.ml import ials

            if not (ials.gpu_count() if gpus is None else gpus):
                skipped[name] = (f"no GPU and {events:,} train events > "
                                 f"train.{name}.cpu_max_events {limit:,}")
                names.remove(name)
    return names, skipped


def choose(names: list[str], valid: dict[str, float], *, min_gain: float,
           per_user: dict[str, np.ndarray] | None = None, confidence: float = 0.0,
           record: dict | None = None) -> str:
    """The first of ``names`` unless a later one beats the current choice's valid metric by
    more than ``min_gain`` (relative). Listing order is preference order.

    With ``per_user`` (each candidate's metric per valid user: the same users, in the same
    order) and ``confidence`` in (0, 1), the gain that must exceed ``min_gain`` is the lower
    end of the one-sided ``confidence`` interval of the paired mean gain (normal approximation
    over the users), not the point estimate: a challenger wins on evidence, and how much
    evidence a valid split holds follows its size. (Before, a flat 10% stood in for the noise:
    on MovieLens-100K's ~900 valid users close candidates swap places with the split's seed; on
    20,000 users the same 10% threw away real gains.) ``min_gain`` is then what a change of
    family must be worth beyond the noise. ``record`` (a dict) gets, per challenger, the
    choice it was compared with, the paired gain, its lower bound and the gain it needed.
    """
    from statistics import NormalDist

    z = NormalDist().inv_cdf(confidence) if per_user is not None and confidence > 0 else None
    chosen = names[0]
    for name in names[1:]:
        needed = valid[chosen] * min_gain
        if z is None:
            gain = lower = valid[name] - valid[chosen]
        else:
            diff = np.asarray(per_user[name], np.float64) - np.asarray(per_user[chosen],
                                                                         np.float64)
            gain = float(diff.mean())
            spread = float(diff.std(ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
            lower = gain - z * spread
        if record is not None:
            record[name] = {"against": chosen, "gain": round(float(gain), 6),
                            "lower": round(float(lower), 6), "needed": round(float(needed), 6)}
        if lower > needed:
            chosen = name
    return chosen


def ship_parts(p: settings.StepParams) -> list[str]:
    """The split parts the shipped refit is fitted on (``train.ship_fit``)."""
    value = p["train.ship_fit"]
    if value not in SHIP_FITS:
        raise ValueError(f"train.ship_fit must be one of {sorted(SHIP_FITS)}, got {value!r}")
    return SHIP_FITS[value]


def gate_parts(p: settings.StepParams) -> list[str]:
    """The split parts the gated fit is fitted on (``train.gate_fit``): never the test split."""
    value = p["train.gate_fit"]
    if value not in GATE_FITS:
        raise ValueError(f"train.gate_fit must be one of {sorted(GATE_FITS)}, got {value!r}")
    return GATE_FITS[value]


def gated_fit(p: settings.StepParams) -> str:
    """Which fit evaluate gates: ``full`` when the shipped refit is fitted on the gate's parts
    (``ship_fit`` and ``gate_fit`` both ``train_valid``), ``holdout`` (the train-only selection
    fit) when ``gate_fit`` is ``train``, else ``gated``: a refit of its own on train + valid
    (``ship_fit: all``, ``gate_fit: train_valid``, the defaults: three fits)."""
    shipped, gate = ship_parts(p), gate_parts(p)
    if gate == shipped:
        return "full"
    return "holdout" if gate == ["train"] else "gated"


def _share(deadline: float, remaining: int, reserve: float) -> float:
    """The deadline of the next of ``remaining`` fits, ``reserve`` more shares kept for the
    refits (:func:`refit_reserve`)."""
    now = time.monotonic()
    return now + max(0.0, deadline - now) / (remaining + reserve)


def refit_rows(parts: dict, p: settings.StepParams) -> list[int]:
    """The row counts of the refits that follow the choice, in order: the gated refit when it is
    a fit of its own (:func:`gated_fit`), then the shipped one. Sizes only: ``parts["shipped"]``
    and ``parts["gated"]`` when given (run(): one frame), else the sum of their parts' lengths
    (the test split's too, when ``ship_fit: all`` and no ``shipped`` frame is given)."""
    def rows(key: str, names: list[str]) -> int:
        frame = parts.get(key)
        return len(frame) if frame is not None else sum(len(parts[n]) for n in names)

    out = [rows("gated", gate_parts(p))] if gated_fit(p) == "gated" else []
    return out + [rows("shipped", ship_parts(p))]


def refit_reserve(parts: dict, p: settings.StepParams) -> float:
    """How many selection shares the refits take: each refit repeats the chosen fit (its point,
    its iteration or epoch count) on more rows, at a cost linear in them, so the reserve is
    the refits' rows over train's (with the defaults about 2.3: train + valid, then every
    part)."""
    return sum(refit_rows(parts, p)) / max(1, len(parts["train"]))


def one_fit_s(hist: dict, fit_s: float) -> float:
    """The seconds one refit of a selection fit is projected to take on the train split's rows:
    the epochs it repeats (mf_softmax, sasrec: ``epoch_s`` up to ``best_epoch``, validation
    included), else a search's slowest point (a refit builds its own Gram, or runs the chosen
    point's iterations), else the whole selection fit (``fit_s``)."""
    epochs = hist.get("epoch_s")
    if epochs and hist.get("best_epoch"):
        return float(sum(epochs[:int(hist["best_epoch"])]))
    points = [r["fit_s"] for r in (hist.get("search") or {}).values() if "fit_s" in r]
    return float(max(points)) if points else float(fit_s)


def refits_over_budget(names: list[str], refit_s: dict[str, float],
                       left: float) -> dict[str, str]:
    """Which of ``names`` cannot be chosen because their refits (``refit_s``: projected seconds,
    all refits together) do not fit in the ``left`` seconds of the time budget, with why. The
    cheapest is always allowed: a run ships a model."""
    cheapest = min(names, key=lambda n: refit_s[n])
    return {n: (f"its refits projected at {refit_s[n]:.0f} s, {max(0.0, left):.0f} s left in "
                f"the time budget") for n in names if n != cheapest and refit_s[n] > left}


def train_both(
    parts: dict[str, pd.DataFrame], *, n_users: int, n_items: int, p: settings.StepParams,
    workdir: Path, init: dict[str, dict[str, np.ndarray]] | None = None,
    side: dict[str, np.ndarray | None] | None = None, cutoff: int | None = None,
    timestamps: np.ndarray | None = None, gated_cutoff: int | None = None,
) -> dict:
    """Select the best candidate on the valid split, then refit it on the parts of
    :func:`ship_parts` (what ships).

    ``init``: per family (``ials``, ``mf_softmax``), the champion's factors aligned to this run
    (warm start), when it is of that family. ``timestamps``: when the frames have none (run()),
    those of the valid sample's train rows (:func:`sample_known`'s), for its recency ranks. The fits share :func:`budget_s`: each candidate's
    selection fit gets an equal share of what is left, :func:`refit_reserve` shares kept for
    the refits, and stops at the iteration or epoch that would overrun it; an mf_softmax whose
    first epoch is projected to overrun is skipped (``selection["skipped"]``, logged). A
    candidate (a blend: its components together) whose refits are projected
    (:func:`one_fit_s` x the reserve) past what is left of the budget once the fits and the
    blend search are done is not a choice (``selection["not_chosen"]``, logged); the cheapest
    always is.

    Returns ``{"chosen", "selection", "holdout": (weights, history), "full": (weights,
    history), ["gated_refit": (weights, history),] "train_cutoff", "gated", "gated_cutoff",
    "keras": {fit: model}, "tensorboard": dir}``; ``full`` is the shipped model,
    ``train_cutoff`` the latest timestamp (unix seconds) it was fitted on: ``cutoff`` when given
    (run(): from the parts' statistics, the frames then have no timestamp column), else the
    frames' latest timestamp. ``gated`` names the fit evaluate gates (:func:`gated_fit`:
    ``full``, ``holdout``, or ``gated``, the ``gated_refit`` on train + valid, parked on disk;
    ``parts["gated"]``, when given, is that frame), and ``gated_cutoff`` its latest timestamp
    (the argument when given, else from the frames).

    Nothing before the choice reads ``parts["test"]``: the selection fits, the searches and the
    blend see train and the valid sample only (tests/test_tuning.py checks it). Its row count
    alone sizes the refits' reserve (:func:`refit_rows`) when ``ship_fit`` is ``all`` and no
    ``shipped`` frame is given; run() gives one.
    """
    from nightrec.tasks import evaluate

    init = init or {}
    t_start = time.monotonic()
    metric = p["train.select_metric"]
    names, skipped = candidates(p, n_items, events=len(parts["train"]))
    for name, why in skipped.items():
        log.warning("candidate %s skipped: %s", name, why)
    from nightrec.ml import ials, ranking

    # numba's first compile (scoring: ~16 s cold; iALS: ~20 s cold, ~3 s from its cache) and
    # TensorFlow's import (6-7 s on 2 busy cores, measured) are not any candidate's fitting:
    # done before the budget's clock starts. A CPU run with no Keras fit never imports it
    # (ials.gpu_count answers from /dev without importing a backend).
    started = time.perf_counter()
    ranking.warm_up()
    if "ials" in names:
        ials.warm_up(p["train.ials.kernel"])
    uses_keras = (any(n in KERAS_FAMILIES for n in names) or ials.gpu_count() > 0
                  or ("ials" in names and p["train.ials.kernel"] == "keras"))
    if uses_keras:  # with a GPU, EASE's solve and iALS run on Keras too
        models.keras_module()
    log.info("numba kernels%s ready in %.1f s (before the time budget starts)",
             " and Keras" if uses_keras else "", time.perf_counter() - started)
    budget = budget_s(p, len(parts["train"]) + len(parts["valid"]))
    deadline = time.monotonic() + budget
    reserve = refit_reserve(parts, p)
    tb = workdir / "tensorboard"
    # One seeded valid-user sample, scored by one function, for every candidate.
    sample = valid_sample(parts["valid"], max_users=int(p["train.valid_users"]), seed=int(p["seed"]))
    known = sample_known(parts["train"], sample)
    if timestamps is not None and schema.TIMESTAMP not in known:
        # run(): the timestamps of these rows (the sample's train rows) apart from the frame
        known = known.assign(**{schema.TIMESTAMP: timestamps})
    timestamps = None
    fits, selection = {}, {"metric": metric, "candidates": {}, "skipped": skipped,
                           "valid_users": int(sample[schema.USER_IDX].nunique()),
                           "valid_rows": len(sample), "time_budget_s": round(budget, 1),
                           "refit_reserve_shares": round(reserve, 2)}
    keras_models = {}
    refit_s = {}  # each candidate's refits, projected (seconds, all of them)
    for n, name in enumerate(names):
        started = time.perf_counter()
        share = _share(deadline, len(names) - n, reserve)
        if name in ("ease", "rp3beta"):
            emb, hist = search_item_item(name, parts["train"], sample, n_users=n_users,
                                         n_items=n_items, p=p, deadline=share, known=known)
        elif name == "ials":
            emb, hist = search_ials(parts["train"], sample, n_users=n_users, n_items=n_items,
                                    p=p, init=init.get("ials"), deadline=share, known=known)
        elif name == "sasrec":
            emb, hist = fit_sasrec(parts["train"], sample, n_users=n_users, n_items=n_items,
                                   p=p, deadline=share, known=known)
        else:
            emb, hist, keras_models[name] = fit_mf(
                parts["train"], sample, n_users=n_users, n_items=n_items, p=p,
                workdir=workdir, init=init.get("mf_softmax"), tensorboard_dir=tb / "holdout",
                side=side, deadline=share, known=known,
            )
            if hist.get("over_budget"):
                skipped[name] = hist["over_budget"]
                log.warning("candidate %s skipped: %s", name, hist["over_budget"])
                keras_models.pop(name)
                continue
        # the final weights (mf: its best epoch's, restored), by the same function on the sample
        value = hist.get(f"valid_{metric}")
        if value is None:
            value = evaluate.ranking_metric(emb, known, sample, metric=metric, n_users=n_users)
        hist[f"valid_{metric}"] = value
        fits[name] = (emb, hist)
        fit_s = time.perf_counter() - started
        refit_s[name] = reserve * one_fit_s(hist, fit_s)
        selection["candidates"][name] = {f"valid_{metric}": value, "fit_s": round(fit_s, 2),
                                         "refits_projected_s": round(refit_s[name], 1)}
        if "best_epoch" in hist:  # the iterative families
            selection["candidates"][name]["best_epoch"] = hist["best_epoch"]
        if "head_items" in hist:  # ease above max_items: fitted on the catalogue's head
            selection["candidates"][name]["head_items"] = hist["head_items"]
        if "search" in hist:  # tuning in the loop: every point's valid figure and the choice
            selection["candidates"][name]["params"] = hist["params"]
            selection["candidates"][name]["search"] = hist["search"]
        if "regularization" in hist:
            selection["candidates"][name]["regularization"] = hist["regularization"]
        log.info("candidate %s: valid %s = %.4f", name, metric, value)
    if not fits:
        raise ValueError(f"no candidate could be fitted within the budget: {skipped}")
    fitted = [n for n in names if n in fits]
    if p["train.blend.enabled"] and len(fitted) >= 2:
        started = time.perf_counter()
        emb, hist = search_blend(fits, sample, known=known, n_users=n_users, n_items=n_items,
                                 p=p)
        if emb is None:
            skipped["blend"] = hist["skipped"]
        else:
            fits["blend"] = (emb, hist)
            fitted.append("blend")
            refit_s["blend"] = sum(refit_s[c] for c in hist["components"])
            selection["candidates"]["blend"] = {
                f"valid_{metric}": hist[f"valid_{metric}"],
                "fit_s": round(time.perf_counter() - started, 2),
                "refits_projected_s": round(refit_s["blend"], 1),
                "components": hist["components"], "params": hist["params"],
                "search": hist["search"]}
            log.info("candidate blend of %s: valid %s = %.4f", hist["components"], metric,
                     hist[f"valid_{metric}"])
        emb = hist = None
    # the time budget bounds the refits too: a candidate whose refits would not end in time
    # (a blend refits each component, the defaults refit twice) is not a choice
    left = deadline - time.monotonic()
    too_slow = refits_over_budget(fitted, refit_s, left)
    for name, why in too_slow.items():
        log.warning("candidate %s not chosen: %s", name, why)
    fitted = [n for n in fitted if n not in too_slow]
    selection["not_chosen"] = too_slow
    selection["refits_left_s"] = round(left, 1)
    # the paired comparison: each candidate's metric per valid user of the one sample
    confidence = float(p["train.select_confidence"])
    per_user = None
    if confidence > 0 and len(fitted) > 1:
        # the known pairs' recency ranks once for every candidate (None when none is weighted)
        ranks = evaluate.known_ranks(known, n_users=n_users, n_items=n_items,
                                     models_=tuple(fits[n][0] for n in fitted))
        per_user = {n: evaluate.ranking_metric_per_user(fits[n][0], known, sample,
                                                        metric=metric, n_users=n_users,
                                                        ranks=ranks)
                    for n in fitted}
        ranks = None
    selection["choice"] = {"min_gain": float(p["train.select_min_gain"]),
                           "confidence": confidence, "challengers": {}}
    chosen = choose(fitted, {n: c[f"valid_{metric}"] for n, c in selection["candidates"].items()},
                    min_gain=float(p["train.select_min_gain"]), per_user=per_user,
                    confidence=confidence, record=selection["choice"]["challengers"])
    per_user = None
    selection["chosen"] = chosen
    keras_models = {"holdout": keras_models.get(chosen)}
    # the others' weights and Keras models go before the refit; the chosen one's selection fit
    # (the holdout artifacts, saved after the refit) waits on disk while the refit runs
    fits = {chosen: (_parked(fits[chosen][0]), fits[chosen][1])}
    emb = hist = None
    if keras_models["holdout"] is None and "mf_softmax" in names:  # Keras's graphs and caches
        models.keras_module().backend.clear_session()
    gc.collect()
    engine.release_memory()
    # The choice is made: from here on the shipped refit may read the test split
    # (train.ship_fit: all), and the gate then scores the selection fit, which never saw it.
    # parts["shipped"] (run(): one frame, the parts one after another) saves a copy.
    fitted_on = ship_parts(p)
    shipped_on = parts.get("shipped")
    if shipped_on is None:
        shipped_on = pd.concat([parts[n] for n in fitted_on], ignore_index=True)
    gated = gated_fit(p)
    refit = {"chosen": chosen, "hist": fits[chosen][1], "n_users": n_users, "n_items": n_items,
             "p": p, "init": init, "workdir": workdir, "tb": tb, "side": side}
    out = {"chosen": chosen, "selection": selection, "holdout": fits[chosen],
           "keras": keras_models, "tensorboard": tb}
    if gated == "gated":
        # the gated refit first (on train + valid, a view in run()), parked while the shipped
        # one runs: the same family and point, fitted the way the default's shipped fit is
        gate_on = parts.get("gated")
        if gate_on is None:
            gate_on = pd.concat([parts[n] for n in gate_parts(p)], ignore_index=True)
        emb, hist = _refit_chosen(gate_on, **refit, fit="gated")[0]
        hist["fitted_on"] = gate_parts(p)
        hist["train_cutoff"] = train_cutoff(gate_on) if gated_cutoff is None else gated_cutoff
        out["gated_refit"] = (_parked(emb), hist)
        gated_cutoff = hist["train_cutoff"]
        gate_on = emb = hist = None
        gc.collect()
    full, keras_models["full"] = _refit_chosen(shipped_on, **refit, fit="full")
    if cutoff is None:
        cutoff = train_cutoff(shipped_on)
    if gated == "full":
        gated_cutoff = cutoff
    elif gated == "holdout":
        gated_cutoff = train_cutoff(parts["train"]) if gated_cutoff is None else gated_cutoff
        fits[chosen][1]["train_cutoff"] = gated_cutoff
    full[1]["fitted_on"] = fitted_on
    full[1]["train_cutoff"] = cutoff
    selection.update(train_cutoff=cutoff, shipped_on=fitted_on, gated=gated,
                     gated_on=gate_parts(p), gated_cutoff=gated_cutoff,
                     train_s=round(time.monotonic() - t_start, 1))
    return {**out, "full": full, "train_cutoff": cutoff, "gated": gated,
            "gated_cutoff": gated_cutoff}


def _refit_chosen(frame: pd.DataFrame, *, chosen: str, hist: dict, **kw) -> tuple:
    """``((weights, history), keras model or None)``: the chosen candidate refit from scratch on
    ``frame`` (a blend: each component refit, then blended with the weight chosen on valid).
    ``fit`` (``full`` or ``gated``) names the TensorBoard folder an mf_softmax refit logs to."""
    if chosen != "blend":
        return _refit(chosen, hist, frame, **kw)
    components = {name: _refit(name, hist["component_fits"][name], frame, **kw)[0]
                  for name in hist["components"]}
    return blend_refit(components, hist), None


def _refit(name: str, hist: dict, shipped_on: pd.DataFrame, *, n_users: int, n_items: int,
           p: settings.StepParams, init: dict, workdir: Path, tb: Path, side,
           fit: str) -> tuple:
    """``((weights, history), keras model or None)``: family ``name`` refit from scratch on
    ``shipped_on`` with what its selection fit chose (``hist``: the searched point, the
    iteration or epoch count)."""
    point = hist.get("params")
    keras_model = None
    if name == "ease":
        full = fit_ease(shipped_on, n_users=n_users, n_items=n_items, p=p, point=point)
    elif name == "rp3beta":
        full = fit_rp3beta(shipped_on, n_users=n_users, n_items=n_items, p=p, point=point)
    elif name == "ials":
        full = fit_ials(shipped_on, n_users=n_users, n_items=n_items, p=p,
                        init=init.get("ials"), iterations=hist["best_epoch"],
                        regularization=hist["regularization"])
        full[1]["regularization"] = hist["regularization"]
    elif name == "sasrec":
        full = fit_sasrec(shipped_on, None, n_users=n_users, n_items=n_items, p=p,
                          epochs=hist["best_epoch"])
    else:
        emb, h, keras_model = fit_mf(
            shipped_on, None, n_users=n_users, n_items=n_items, p=p, workdir=workdir,
            epochs=hist["best_epoch"], init=init.get("mf_softmax"),
            tensorboard_dir=tb / fit, side=side,
        )
        full = (emb, h)
    if point is not None:
        full[1]["params"] = point
    return full, keras_model


def blend_weights(p: settings.StepParams) -> list[float]:
    """``train.blend.weights``: the second component's shares searched, each in (0, 1)."""
    values = [float(w) for w in p["train.blend.weights"]]
    if not values or any(not 0.0 < w < 1.0 for w in values):
        raise ValueError(f"train.blend.weights must be values in (0, 1), got {values}")
    return values


def _scale_users(known: pd.DataFrame, sample: pd.DataFrame, *, n_users: int, n_items: int,
                 seed: int, max_users: int = 500):
    """``(seen CSR, users)``: up to ``max_users`` seeded users of the valid ``sample`` and what
    they are known to have seen, on which a blend measures each model's score scale."""
    from nightrec.tasks import evaluate

    seen, users, _ = evaluate.targets(known, sample, n_users=n_users, n_items=n_items)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return seen, users


def search_blend(fits: dict, sample: pd.DataFrame, *, known: pd.DataFrame, n_users: int,
                 n_items: int, p: settings.StepParams) -> tuple[dict | None, dict]:
    """A blend of the two best candidates on the valid sample (:func:`nightrec.ml.models.blend`):
    ``(1 - w) * score_a / s_a + w * score_b / s_b``, ``s`` each model's score scale on sampled
    valid users (``models.score_scale``), ``w`` searched over ``train.blend.weights`` on the
    same sample and figure as every candidate (tuning in the loop; never the test split).
    ``(None, {"skipped": why})`` when the two cannot be blended exactly."""
    from nightrec.tasks import evaluate

    metric = p["train.select_metric"]
    ranked = sorted(fits, key=lambda n: -fits[n][1][f"valid_{metric}"])
    a = ranked[0]
    # the best with the next best it blends with exactly
    pair = [b for b in ranked[1:] if models.blend(*(_probe(fits[n][0]) for n in (a, b)),
                                                  wa=1.0, wb=1.0) is not None]
    if not pair:
        return None, {"skipped": f"{a} blends exactly with none of {ranked[1:]} (a head "
                                 "item-item model and a factor model, two different heads, or "
                                 "differently weighted user rows)"}
    b = pair[0]
    seen, users = _scale_users(known, sample, n_users=n_users, n_items=n_items,
                               seed=int(p["seed"]))
    ranks = evaluate.known_ranks(known, n_users=n_users, n_items=n_items,
                                 models_=(fits[a][0], fits[b][0]))
    scales = [models.score_scale(fits[n][0], seen, users, ranks) for n in (a, b)]
    best, record = None, {}
    for w in blend_weights(p):
        emb = models.blend(fits[a][0], fits[b][0], wa=(1 - w) / scales[0], wb=w / scales[1])
        value = evaluate.ranking_metric(emb, known, sample, metric=metric, n_users=n_users,
                                        ranks=ranks)
        record[str(w)] = {f"valid_{metric}": value}
        if best is None or value > best[0]:
            best = (value, w, emb)
        emb = None
    value, w, emb = best
    keep = ("params", "best_epoch", "regularization")
    return emb, {"components": [a, b], "params": {"weight": w}, "scales": scales,
                 "search": record, f"valid_{metric}": value,
                 "component_fits": {n: {k: fits[n][1][k] for k in keep if k in fits[n][1]}
                                    for n in (a, b)}}


def _probe(emb: dict) -> dict:
    """A stand-in of ``emb`` with what ``models.blend`` decides blendability on and tiny arrays
    (so asking costs nothing)."""
    out = {k: emb[k] for k in ("item_index", "recency_half_life") if k in emb}
    n = 1
    if models.is_item_item(emb):
        out["item_item"] = np.zeros((n, n), np.float32)
    if "user" in emb:
        out["user"], out["item"] = np.zeros((n, 1), np.float32), np.zeros((n, 1), np.float32)
    out["item_bias"] = np.zeros(n, np.float32)
    return out


def blend_refit(full: dict, hist: dict) -> tuple[dict, dict]:
    """The shipped blend: the components refit on the shipped parts (``full``: name -> (weights,
    history)), blended with the weight and the score scales the selection chose and measured
    (a refit's scores keep their scale: same hyperparameters, a few more events)."""
    a, b = hist["components"]
    w = hist["params"]["weight"]
    scales = hist["scales"]
    emb = models.blend(full[a][0], full[b][0], wa=(1 - w) / scales[0], wb=w / scales[1])
    out = {"components": [a, b], "params": {"weight": w}, "scales": scales,
           "component_histories": {n: full[n][1] for n in (a, b)}}
    return emb, out


def train_cutoff(fitted_on: pd.DataFrame) -> int:
    """The latest event timestamp (int unix seconds) of the rows a model was fitted on."""
    if not len(fitted_on):
        raise ValueError("the shipped model has no rows to fit on")
    return int(fitted_on[schema.TIMESTAMP].max())


def _save(emb: dict, history: dict, keras_model, *, ds: str, fit: str, workdir: Path) -> dict:
    """Upload one fit (``holdout`` or ``full``) to ``runs/ds=<ds>/train/<fit>/``."""
    buf = io.BytesIO()
    np.savez(buf, **emb)
    out = {
        "embeddings": layout.run_uri(ds, "train", fit, "embeddings.npz"),
        "history": layout.run_uri(ds, "train", fit, "history.json"),
    }
    storage.write_bytes(out["embeddings"], buf.getvalue())
    storage.write_json(out["history"], history)
    if keras_model is not None:
        local = workdir / "model.weights.h5"
        keras_model.save_weights(local)
        out["model"] = layout.run_uri(ds, "train", fit, "model.weights.h5")
        storage.upload_from(local, out["model"])
    return out


def model_version(ds: str, data_version: str, chosen: str, p: settings.StepParams,
                  code_version: str | None = None, weights: str | None = None) -> str:
    """``<family>-YYYYMMDD-<8 hex>``: the hash covers the data version, the training params,
    the code version (``registry.code_version()`` unless given), so two code versions never
    share a model version, and ``weights``, the shipped fit's :func:`registry.arrays_digest`
    (run() always passes it). A version names its content: a rerun that fits the same weights
    gets the same version (registered once), one whose fits came out otherwise (the time
    budget cut a search at another point on a busier machine) a new one, never a
    ``VersionConflict`` with the first."""
    if code_version is None:
        from nightrec.tasks import registry

        code_version = registry.code_version()
    key = [data_version, dict(p), code_version] + ([weights] if weights is not None else [])
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"{chosen.split('_')[0]}-{ds.replace('-', '')}-{h[:8]}"


def _sizes(split_out: Split) -> tuple[int, int]:
    users = storage.read_parquet(split_out.user_features, columns=[schema.USER_IDX])
    items = storage.read_parquet(split_out.item_features, columns=[schema.ITEM_IDX])
    return len(users), len(items)


def side_features(split_out: Split, p: settings.StepParams) -> dict | None:
    """mf_softmax's side-feature matrices from augment's feature tables (index order), typed
    by ``augment.user_features`` / ``augment.item_features``; None when switched off."""
    if not p["train.mf_softmax.side_features"]:
        return None
    out = {}
    for kind in ("user", "item"):
        table = storage.read_parquet(getattr(split_out, f"{kind}_features"))
        idx = schema.USER_IDX if kind == "user" else schema.ITEM_IDX
        out[kind] = models.side_matrix(
            table.sort_values(idx), p[f"augment.{kind}_features"],
            max_categories=int(p["train.mf_softmax.max_side_categories"]))
    log.info("side features: user %s, item %s", *(None if m is None else m.shape
                                                  for m in out.values()))
    return out


WARM_FAMILIES = {"ials": "ials", "mf": "mf_softmax"}  # model version prefix -> family


def _warm_start_init(split_out: Split, p: settings.StepParams) -> dict:
    """``{family: the champion's full-refit factors aligned to this run}`` for the champion's
    family (a model version starts with it: ``ials-...``, ``mf-...``) when that family's
    ``warm_start`` is on; else ``{}`` (logged). The other families start from random."""
    wanted = {f for f in WARM_FAMILIES.values() if p[f"train.{f}.warm_start"]}
    if not wanted:
        return {}
    from nightrec.tasks import registry, score

    version = registry.champion()
    if version is None:
        log.info("warm start asked for (%s), but there is no champion yet: random init",
                 sorted(wanted))
        return {}
    family = WARM_FAMILIES.get(version.split("-")[0])
    if family not in wanted:
        log.info("warm start: champion %s is not of a warm-started family %s: random init",
                 version, sorted(wanted))
        return {}
    model = registry.model_uris(version)
    emb = dict(np.load(io.BytesIO(storage.read_bytes(model["embeddings"]))))
    if models.is_item_item(emb):
        return {}
    log.info("warm start of %s from champion %s", family, version)
    return {family: models.align(
        emb,
        model_users=score.ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID),
        model_items=score.ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID),
        user_ids=score.ids_by_index(split_out.user_features, schema.USER_IDX, schema.USER_ID),
        item_ids=score.ids_by_index(split_out.item_features, schema.ITEM_IDX, schema.ITEM_ID),
    )}


COLUMNS = [schema.USER_IDX, schema.ITEM_IDX, schema.LABEL, schema.WEIGHT, schema.TIMESTAMP]
CONSTANT = {schema.LABEL: 1, schema.WEIGHT: 1.0}  # a column holding only this is not read


def columns_to_read(ranges: dict[str, tuple | None]) -> tuple[list[str], int | None]:
    """``(columns, train_cutoff)`` from the train and valid parts' column statistics
    (:func:`nightrec.tasks.split.column_ranges`): of :data:`COLUMNS`, a label or weight
    column whose every value is its :data:`CONSTANT` is left out (positives and weights read
    as all 1), and the timestamps are not read when the statistics give their maximum (the
    cutoff; None: read them). With the shipped params (every event positive, weight 1) that is
    8 bytes an event where all five columns were 21: 1.2 GB less at 90M events."""
    cutoff = ranges.get(schema.TIMESTAMP)
    columns = [c for c in COLUMNS if not (
        (c in CONSTANT and ranges.get(c) == (CONSTANT[c], CONSTANT[c]))
        or (c == schema.TIMESTAMP and cutoff is not None))]
    return columns, None if cutoff is None else int(cutoff[1])


def run(split_out: Split, params: dict | None = None) -> Trained:
    ds = split_out.ds
    p = settings.step_params(PARAMS, params)
    # the columns the fits and the valid metric read: the split's other columns (ids, rating,
    # side features) would double the frames at 100M events; of these, the ones the parts'
    # statistics make constant (columns_to_read)
    shipped_on = ship_parts(p)
    uris = [getattr(split_out, n) for n in shipped_on]
    columns, cutoff = columns_to_read(split.column_ranges(uris, COLUMNS[2:]))
    gated = gated_fit(p)
    latest: dict[int, int | None] = {}

    def latest_event(n_parts: int) -> int | None:
        """The latest timestamp of the first ``n_parts`` parts, from their footers (read once
        per count: the gated cutoff and the tune adoption both ask for train + valid's)."""
        if n_parts not in latest:
            found = split.column_ranges(uris[:n_parts], [schema.TIMESTAMP])[schema.TIMESTAMP]
            latest[n_parts] = None if found is None else int(found[1])
        return latest[n_parts]

    # the gated fit saw the first parts only (gate_parts): their latest event
    gated_cutoff = None if gated == "full" else latest_event(len(gate_parts(p)))
    # the parts as one frame (train's rows first, then valid's, then test's when it ships):
    # the refit on all of them needs no copy, train and valid are views
    shipped, lengths = split.read_parts(uris, columns=columns)
    n_train, n_valid = lengths[0], lengths[1]
    log.info("train: %s rows, columns %s%s; ships a refit on %s",
             " + ".join(f"{n} {name}" for n, name in zip(lengths, shipped_on, strict=True)),
             columns, "" if cutoff is None else f", cutoff {cutoff} from the parts' statistics",
             " + ".join(shipped_on))

    def views(frame):
        out = {"train": frame.iloc[:n_train], "valid": frame.iloc[n_train:n_train + n_valid],
               "shipped": frame}
        if gated == "gated":  # train + valid, the first rows
            out["gated"] = frame.iloc[:n_train + n_valid]
        return out

    parts = views(shipped)
    n_users, n_items = _sizes(split_out)
    adoption = None
    if p["tune.max_age_days"] is not None:  # the tune DAG's latest result, if it applies here
        best, tune_ds = latest_tune(ds, int(p["tune.max_age_days"]))
        adoption = tune_adoption(best, ds=ds, tune_ds=tune_ds, p=p, n_items=n_items,
                                 events=n_train, seen_until=latest_event(2))  # train + valid
        log.info("tune result %s: %s (%s)", tune_ds, "adopted" if adoption["adopted"]
                 else "not adopted", adoption["why"])
        p = adopt(p, adoption)
    fitted = candidates(p, n_items, events=n_train)[0]
    timestamps = None
    if needs_timestamps(p, fitted, n_train) and schema.TIMESTAMP not in columns:
        # the sequential candidate orders each user's events, a recency search ranks the
        # valid sample's: their timestamps, read alone (the same objects in the same order, so
        # the rows line up); kept in the frame for sasrec (a small log: cpu_max_events) and EASE's window
        # (window_max_events), else
        # only for the sample's rows (train_both), 8 bytes an event for a moment
        ts, _ = split.read_parts(uris, columns=[schema.TIMESTAMP])
        if "sasrec" in fitted or windowed(p, fitted, n_train):
            shipped[schema.TIMESTAMP] = ts[schema.TIMESTAMP].to_numpy()
            parts = views(shipped)
        else:  # the train rows of train_both's valid sample (the same seeded sample)
            sample = valid_sample(parts["valid"], max_users=int(p["train.valid_users"]),
                                  seed=int(p["seed"]))
            timestamps = ts[schema.TIMESTAMP].to_numpy()[:n_train][_sample_rows(
                parts["train"], sample)]
            sample = None
        del ts
    init = _warm_start_init(split_out, p)
    # side features feed only mf_softmax: not read when it is no candidate (a 2M-user feature
    # table is ~1 GB as a frame)
    side = side_features(split_out, p) if "mf_softmax" in fitted else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = train_both(parts, n_users=n_users, n_items=n_items, p=p, workdir=work, init=init,
                            side=side, cutoff=cutoff, timestamps=timestamps,
                            gated_cutoff=gated_cutoff)
        timestamps = None
        if adoption is not None:
            result["selection"]["tune"] = adoption
        from nightrec.tasks import registry

        version = model_version(ds, split_out.data_version, result["chosen"], p,
                                weights=registry.arrays_digest(result["full"][0]))
        artifacts = {}
        fits = {"holdout": result["holdout"], "full": result["full"]}
        if "gated_refit" in result:
            fits["gated"] = result["gated_refit"]
        for name, (emb, hist) in fits.items():
            artifacts[name] = _save(emb, hist, result["keras"].get(name), ds=ds, fit=name,
                                    workdir=work)
        fits = emb = hist = None
        artifacts["selection"] = layout.run_uri(ds, "train", "selection.json")
        storage.write_json(artifacts["selection"], result["selection"])
        if result["tensorboard"].exists():
            prefix = layout.report_folder(ds, "tensorboard")
            for f in sorted(result["tensorboard"].rglob("*")):
                if f.is_file():
                    storage.upload_from(f, prefix + f.relative_to(result["tensorboard"]).as_posix())
            artifacts["tensorboard"] = prefix
    log.info("trained %s (%s) on %s; selection %s", version, result["chosen"],
             result["holdout"][1].get("device_plan")
             or f"the {result['holdout'][1].get('kernel', 'closed-form')} kernel",
             result["selection"])
    return Trained(ds=ds, model_version=version, data_version=split_out.data_version,
                   chosen=result["chosen"], selection=result["selection"],
                   train_cutoff=result["train_cutoff"],
                   full_embeddings=artifacts["full"]["embeddings"],
                   holdout_embeddings=artifacts["holdout"]["embeddings"],
                   gated_embeddings=artifacts[result["gated"]]["embeddings"],
                   gated_fit=result["gated"], gated_cutoff=result["gated_cutoff"],
                   artifacts=artifacts, split=split_out)
