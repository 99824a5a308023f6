"""Step 6, train: a Keras 3 embedding model, on all visible GPUs when there are any, else CPU.

The model (``mf_softmax``) is the embedding dot-product collaborative filter: a user vector, an
item vector and an item bias; the score of (u, i) is ``u . v_i + b_i``. It trains with a full
softmax over the catalogue (cross-entropy of the clicked item against all items), which needs no
negative sampling while the catalogue fits a (batch x items) matrix. Written with ``keras.ops``
only, so it runs under any Keras backend; TensorFlow is the default.

Two fits per run (the registry issue will add candidates and warm starts):

1. ``holdout``: on train, early-stopped on the valid loss; evaluate gates this one.
2. ``full``: refit from scratch on train + valid + test for the best epoch count, so the model
   that scores users has seen every interaction up to ds. Score publishes this one.

Exports, per fit: ``embeddings.npz`` (``user``, ``item``, ``item_bias``) that scoring reads
without importing a deep-learning framework, ``model.weights.h5``, and ``history.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import layout, schema, settings, storage

PARAMS = [
    "seed",
    "train.model",
    "train.embedding_dim",
    "train.epochs",
    "train.batch_size",
    "train.learning_rate",
    "train.l2",
    "train.patience",
]
log = logging.getLogger(__name__)


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def device_plan() -> dict:
    """Which devices training will use: ``{"backend", "gpus", "strategy", "mixed_precision"}``."""
    keras = _keras()
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
    strategy = "mirrored" if backend == "tensorflow" and gpus > 1 else "default"
    return {"backend": backend, "gpus": gpus, "strategy": strategy, "mixed_precision": gpus > 0}


@contextlib.contextmanager
def training_scope(plan: dict):
    """Enter the distribution strategy and precision policy of ``plan``; restore on exit."""
    keras = _keras()
    previous = keras.config.dtype_policy()
    if plan["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        if plan["strategy"] == "mirrored":
            import tensorflow as tf

            with tf.distribute.MirroredStrategy().scope():
                yield
        else:
            yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(*, n_users: int, n_items: int, embedding_dim: int, l2: float, seed: int):
    """The mf_softmax model: input user index (int), output logits over all items (float32)."""
    keras = _keras()
    from keras import layers, ops

    class DotProductSoftmax(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            init = keras.initializers.RandomNormal(stddev=0.05, seed=seed)
            reg = keras.regularizers.L2(l2) if l2 else None
            self.user = layers.Embedding(n_users, embedding_dim, embeddings_initializer=init,
                                         embeddings_regularizer=reg, name="user")
            self.item = layers.Embedding(n_items, embedding_dim, embeddings_initializer=
                                         keras.initializers.RandomNormal(stddev=0.05, seed=seed + 1),
                                         embeddings_regularizer=reg, name="item")
            self.bias = layers.Embedding(n_items, 1, embeddings_initializer="zeros", name="bias")

        def build(self, input_shape):
            self.user.build((None,))
            self.item.build((None,))
            self.bias.build((None,))
            self.built = True

        def call(self, user_idx):
            u = self.user(user_idx)
            logits = ops.matmul(u, ops.transpose(self.item.embeddings))
            logits = logits + ops.reshape(self.bias.embeddings, (1, -1))
            return ops.cast(logits, "float32")  # the loss stays float32 under mixed precision

    model = DotProductSoftmax(name="mf_softmax")
    model.build((None,))
    return model


def fit_model(
    train: pd.DataFrame,
    valid: pd.DataFrame | None,
    *,
    n_users: int,
    n_items: int,
    p: settings.StepParams,
    epochs: int | None = None,
    workdir: Path,
) -> tuple[object, dict]:
    """Fit on positive rows of ``train``; early-stop on ``valid`` loss when given.

    Returns ``(model, history)`` where history has per-epoch losses and ``best_epoch`` (1-based).
    """
    keras = _keras()
    if p["train.model"] != "mf_softmax":
        raise ValueError(f"unknown train.model {p['train.model']!r}")
    seed = int(p["seed"])
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    plan = device_plan()
    pos = train[train[schema.LABEL] == 1]
    x = pos[schema.USER_IDX].to_numpy(dtype="int32")
    y = pos[schema.ITEM_IDX].to_numpy(dtype="int32")
    w = pos[schema.WEIGHT].to_numpy(dtype="float32")
    with training_scope(plan):
        model = build_model(
            n_users=n_users, n_items=n_items, embedding_dim=int(p["train.embedding_dim"]),
            l2=float(p["train.l2"]), seed=seed,
        )
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=float(p["train.learning_rate"])),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    callbacks = []
    validation_data = None
    if valid is not None and len(valid):
        vpos = valid[valid[schema.LABEL] == 1]
        validation_data = (
            vpos[schema.USER_IDX].to_numpy(dtype="int32"),
            vpos[schema.ITEM_IDX].to_numpy(dtype="int32"),
        )
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=int(p["train.patience"]), restore_best_weights=True
            )
        )
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                str(workdir / "checkpoint.weights.h5"), monitor="val_loss",
                save_best_only=True, save_weights_only=True,
            )
        )
    hist = model.fit(
        x, y, sample_weight=w, batch_size=int(p["train.batch_size"]),
        epochs=int(epochs or p["train.epochs"]), shuffle=True, verbose=0,
        validation_data=validation_data, callbacks=callbacks,
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    if "val_loss" in history:
        best = int(np.argmin(history["val_loss"])) + 1
    else:
        best = len(history["loss"])
    history["best_epoch"] = best
    history["device_plan"] = plan
    return model, history


def export_embeddings(model) -> dict[str, np.ndarray]:
    return {
        "user": np.asarray(model.user.embeddings, dtype=np.float32),
        "item": np.asarray(model.item.embeddings, dtype=np.float32),
        "item_bias": np.asarray(model.bias.embeddings, dtype=np.float32).reshape(-1),
    }


def _save(model, history: dict, out_prefix: str, workdir: Path) -> dict[str, str]:
    import io

    buf = io.BytesIO()
    np.savez(buf, **export_embeddings(model))
    out = {
        "embeddings": storage.join(out_prefix, "embeddings.npz"),
        "model": storage.join(out_prefix, "model.weights.h5"),
        "history": storage.join(out_prefix, "history.json"),
    }
    storage.write_bytes(out["embeddings"], buf.getvalue())
    local = workdir / "model.weights.h5"
    model.save_weights(local)
    storage.upload_from(local, out["model"])
    storage.write_json(out["history"], history)
    return out


def model_version(ds: str, data_version: str, p: settings.StepParams) -> str:
    """``mf-YYYYMMDD-<8 hex>``: the hash covers the data version and the training params."""
    h = hashlib.sha256(json.dumps([data_version, dict(p)], sort_keys=True).encode()).hexdigest()
    return f"{p['train.model'].split('_')[0]}-{ds.replace('-', '')}-{h[:8]}"


def train_both(
    parts: dict[str, pd.DataFrame], *, n_users: int, n_items: int, p: settings.StepParams,
    workdir: Path,
):
    """Fit the holdout model, then refit on everything for its best epoch count."""
    holdout, h_hist = fit_model(
        parts["train"], parts["valid"], n_users=n_users, n_items=n_items, p=p,
        workdir=workdir,
    )
    everything = pd.concat([parts["train"], parts["valid"], parts["test"]], ignore_index=True)
    full, f_hist = fit_model(
        everything, None, n_users=n_users, n_items=n_items, p=p,
        epochs=h_hist["best_epoch"], workdir=workdir,
    )
    return (holdout, h_hist), (full, f_hist)


def _sizes(split_out: dict[str, str]) -> tuple[int, int]:
    users = storage.read_parquet(split_out["user_features"], columns=[schema.USER_IDX])
    items = storage.read_parquet(split_out["item_features"], columns=[schema.ITEM_IDX])
    return len(users), len(items)


def run(ds: str, split_out: dict[str, str], params: dict | None = None) -> dict[str, str]:
    p = settings.step_params(PARAMS, params)
    parts = {name: storage.read_parquet(split_out[name]) for name in ("train", "valid", "test")}
    n_users, n_items = _sizes(split_out)
    version = model_version(ds, split_out["data_version"], p)
    out = {**split_out, "model_version": version}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (holdout, h_hist), (full, f_hist) = train_both(
            parts, n_users=n_users, n_items=n_items, p=p, workdir=work
        )
        for name, model, hist in (("holdout", holdout, h_hist), ("full", full, f_hist)):
            saved = _save(model, hist, layout.run_uri(ds, "train", name), work)
            out[f"{name}_embeddings"] = saved["embeddings"]
            out[f"{name}_model"] = saved["model"]
    log.info("trained %s on %s: best epoch %d", version, h_hist["device_plan"], h_hist["best_epoch"])
    return out


def main(argv: list[str] | None = None) -> int:
    """``dvc repro train``: fit from a local split folder into a local model folder."""
    parser = argparse.ArgumentParser(description="train on data/split (dvc stage)")
    parser.add_argument("--split-dir", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    p = settings.step_params(PARAMS)
    parts = {n: pd.read_parquet(args.split_dir / f"{n}.parquet") for n in ("train", "valid", "test")}
    every = pd.concat(parts.values())
    n_users, n_items = int(every[schema.USER_IDX].max()) + 1, int(every[schema.ITEM_IDX].max()) + 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (holdout, h_hist), (full, f_hist) = train_both(
        parts, n_users=n_users, n_items=n_items, p=p, workdir=args.out_dir
    )
    _save(holdout, h_hist, str(args.out_dir / "holdout"), args.out_dir)
    _save(full, f_hist, str(args.out_dir / "full"), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
