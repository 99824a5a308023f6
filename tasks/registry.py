"""The model registry in the bucket: ``models/<version>/`` plus a champion pointer.

```
models/<version>/embeddings.npz          the shipped model (the refit on train + valid + test, or on
                                         train + valid: train.ship_fit)
models/<version>/holdout_embeddings.npz  the train-only selection fit (the gated fit with
                                         train.gate_fit: train; meta gated_fit)
models/<version>/gated_embeddings.npz    the train + valid refit, the gated fit, when the shipped
                                         one saw the test split (train.ship_fit: all, the default)
models/<version>/model.weights.h5        Keras weights of an mf_softmax refit (absent for ease)
models/<version>/history.json            training curves of the refit; holdout_history.json
models/<version>/selection.json          every candidate's valid metric, and the chosen one
models/<version>/users.parquet           user_idx -> user_id, the model's user index
models/<version>/items.parquet           item_idx -> item_id
models/<version>/meta.json               model_version, data_version, code_version, ds, params,
                                         metrics, gate (the blessing), train_cutoff (shipped fit),
                                         gated_fit and gated_cutoff (what the gate judged, and
                                         what a later run compares as champion), registered_at
models/<version>/_registered.json        create-if-absent marker: the version's content, once
models/_champion.json                    {"model_version", "ds", "previous", "history",
                                          "updated_at", "reason"}
models/_champion.lock                    held while the champion pointer moves
```

``meta.json`` is written last: its presence means the model is complete. A model version is one
key segment (``layout.safe_token``) and matches ``MODEL_VERSION_RE``.

**Versions are immutable.** ``register`` first creates ``models/<version>/_registered.json`` with
``If-None-Match: *`` (create only if absent), naming the content (sha256 of the scoring
weights, the data and code versions). A second register of the same version verifies that it is
the same content (a retried task: it completes the copy, or finds it complete) or is refused
with :class:`VersionConflict`; nothing of the registered model is overwritten.

**The champion pointer is ds-ordered.** Only a model whose table was *published* becomes
champion (the nightly DAG's ``promote`` task runs after ``publish``). The pointer records the ds
of the champion's table; ``set_champion`` moves it only forward in ds (a blessed backfill of last
week never demotes today's champion), under the short lock ``models/_champion.lock`` and with a
conditional write on the ETag read (create-if-absent for the first one), as publish moves
``recommendations/_latest.json``. ``promote`` and ``rollback`` (``nightrec models``) are the ops
levers: deliberate, so they may move it back in ds, and each is recorded in ``history``.
The re-score DAG scores with the champion.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

from nightrec.core.errors import PermanentError
from nightrec.core.records import Evaluated, ModelChoice
from nightrec.store import layout, storage

log = logging.getLogger(__name__)
CHAMPION_LOCK_TTL_S = 60.0  # held for two requests; a crashed holder's lock frees itself then

MODEL_VERSION_RE = re.compile(r"^[a-z][a-z0-9]{0,15}-[0-9]{8}-[0-9a-f]{8}$")


class ModelNotFound(PermanentError, LookupError):
    """No such registered model (or no champion yet): retrying will not make one appear."""


class VersionConflict(PermanentError):
    """A model version is already registered with other content: versions are immutable."""


class ChampionBusy(RuntimeError):
    """Another writer holds the champion pointer's lock (transient: retry)."""


def check_version(version: str) -> str:
    if not isinstance(version, str) or not MODEL_VERSION_RE.fullmatch(version):
        raise ValueError(f"model_version must match {MODEL_VERSION_RE.pattern}, got {version!r}")
    return layout.safe_token(version, "model_version")


def model_prefix(version: str) -> str:
    return layout.model_prefix(check_version(version))


def _file(version: str, name: str) -> str:
    return layout.model_file_uri(check_version(version), name)


champion_uri = layout.champion_uri
champion_lock_uri = layout.champion_lock_uri


def marker_uri(version: str) -> str:
    return _file(version, "_registered.json")


def model_uris(version: str) -> dict:
    """The model dict scoring takes: embeddings/users/items URIs plus the versions."""
    meta_uri = _file(version, "meta.json")
    if not storage.exists(meta_uri):
        raise ModelNotFound(f"no registered model {version} (looked for {meta_uri})")
    meta = storage.read_json(meta_uri)
    out = {
        "embeddings": _file(version, "embeddings.npz"),
        "users": _file(version, "users.parquet"),
        "items": _file(version, "items.parquet"),
        "model_version": version,
        "data_version": meta["data_version"],
    }
    if "holdout_embeddings.npz" in meta.get("files", []):
        out["holdout_embeddings"] = _file(version, "holdout_embeddings.npz")
    # the fit the gate judged (and later runs compare as champion): the train + valid refit
    # (gated, when the shipped refit saw the test split), or the selection fit (holdout); the
    # shipped one itself when it is the gated fit, or for a version registered before ship_fit
    fit = meta.get("gated_fit")
    out["gated_embeddings"] = (out["holdout_embeddings"] if fit == "holdout"
                               else _file(version, "gated_embeddings.npz") if fit == "gated"
                               else out["embeddings"])
    return out


def meta(version: str) -> dict:
    model_uris(version)
    return storage.read_json(_file(version, "meta.json"))


def resolve(version: str | None) -> dict:
    """``model_uris`` of ``version``, or of the champion when it is None."""
    version = version or champion()
    if not version:
        raise ModelNotFound("no model_version given and no champion registered yet")
    return model_uris(version)


def run(evaluated: Evaluated, *, dry_run: bool = False, params: dict | None = None
        ) -> ModelChoice:
    """The ``register`` task: register a blessed (or force-published) model. An unblessed one
    (forced) or a dry run registers nothing and scores the evaluated model as it is."""
    if not evaluated.blessed or dry_run:
        return ModelChoice(ds=evaluated.ds, model=evaluated.model, registered=False)
    from nightrec.core import settings

    model = register(evaluated.model, ds=evaluated.ds, metrics_uri=evaluated.metrics,
                     gate=evaluated.gate,
                     params=params if params is not None else settings.load_params())
    return ModelChoice(ds=evaluated.ds, model={**model, "metrics": evaluated.metrics},
                       registered=True)


def load(ds: str, version: str | None) -> ModelChoice:
    """The ``load_model`` task: the pinned ``version``, or the champion, to re-score ``ds``."""
    model = resolve(version)
    return ModelChoice(ds=ds, model={
        **model, "source": "champion_rescore",
        "source_reason": f"retrain=false or model_version {version} given"})


def code_version() -> str:
    """``NIGHTREC_CODE_VERSION`` if set (a deploy stamps it), else the checkout's git commit
    (with ``-dirty`` for uncommitted changes), else the installed package version."""
    import os
    import subprocess
    from importlib import metadata

    from nightrec.core import settings

    if os.environ.get("NIGHTREC_CODE_VERSION"):
        return os.environ["NIGHTREC_CODE_VERSION"]
    try:
        root = settings.project_root()
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10,
                               check=False).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            return "nightrec " + metadata.version("nightrec")
        except metadata.PackageNotFoundError:
            return "unknown"


def weights_digest(npz: bytes) -> str:
    """sha256 of a model's weights by content: every array's name, dtype, shape and bytes.

    Not of the ``.npz`` file, whose bytes depend on how it was written (compressed or not, the
    numpy version's zip layout). Bytes that are not an npz archive hash as they are.
    """
    import io
    import zipfile

    import numpy as np

    try:
        arrays = np.load(io.BytesIO(npz), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile):
        return storage.sha256(npz)
    with arrays:
        return arrays_digest(arrays)


def arrays_digest(arrays) -> str:
    """:func:`weights_digest` of named arrays (a mapping, or an open npz): what the npz
    ``np.savez(**arrays)`` writes digests to, without writing it (train names its model
    version by it)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    names = sorted(arrays.files if hasattr(arrays, "files") else arrays)
    for name in names:
        a = np.ascontiguousarray(np.asanyarray(arrays[name]))
        if a.dtype.hasobject:  # its bytes would be addresses
            raise TypeError(f"weights {name!r} hold Python objects: no content digest")
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes, without a copy
    return h.hexdigest()


def register(model: dict, *, ds: str, metrics_uri: str | None, gate: dict | None = None,
             params: dict | None = None) -> dict:
    """Copy a trained model (the dict score takes, plus its ``artifacts``) into
    ``models/<version>/``; ``meta.json`` last."""
    version = check_version(model["model_version"])
    content = {"model_version": version, "data_version": model["data_version"],
               "code_version": code_version(),
               "weights_sha256": weights_digest(storage.read_bytes(model["embeddings"]))}
    try:
        storage.write_json(marker_uri(version), content, if_none_match=True)
    except storage.PreconditionFailed:
        held = storage.read_json(marker_uri(version))
        if held.get("weights_sha256") != content["weights_sha256"]:
            raise VersionConflict(
                f"model_version {version} is already registered with other content (scoring "
                f"weights sha256 {str(held.get('weights_sha256'))[:12]}, code "
                f"{held.get('code_version')}); registered versions are immutable") from None
        if storage.exists(_file(version, "meta.json")):
            log.info("model %s is already registered with the same content", version)
            return model_uris(version)
        log.warning("model %s: completing a register that stopped before meta.json", version)
    copies = {"embeddings.npz": model["embeddings"], "users.parquet": model["users"],
              "items.parquet": model["items"]}
    if model.get("holdout_embeddings"):
        copies["holdout_embeddings.npz"] = model["holdout_embeddings"]
    if model.get("gated_fit") == "gated":  # the train + valid refit of its own (train.gate_fit)
        copies["gated_embeddings.npz"] = model["gated_embeddings"]
    artifacts = model.get("artifacts") or {}
    for fit, name in (("full", ""), ("holdout", "holdout_"), ("gated", "gated_")):
        for kind, file in (("history", "history.json"), ("model", "model.weights.h5")):
            src = (artifacts.get(fit) or {}).get(kind)
            if src:
                copies[name + file] = src
    if artifacts.get("selection"):
        copies["selection.json"] = artifacts["selection"]
    for name, src in copies.items():
        storage.copy(src, _file(version, name))
    record = {
        "model_version": version,
        "data_version": model["data_version"],
        "code_version": content["code_version"],
        "ds": ds,
        "train_cutoff": model.get("train_cutoff"),
        "gated_fit": model.get("gated_fit", "full"),  # evaluate's record of what it gated
        "gated_cutoff": model.get("gated_cutoff", model.get("train_cutoff")),
        "params": params,
        "metrics": storage.read_json(metrics_uri) if metrics_uri else None,
        "gate": gate,
        "files": sorted(copies),
        "selection": selection_summary(artifacts.get("selection")),
        "registered_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(_file(version, "meta.json"), record)  # written last: its presence means complete
    return model_uris(version)


def selection_summary(uri: str | None) -> dict | None:
    """What meta.json keeps of train's selection.json: the metric, the chosen family, per
    candidate its valid figure and the hyperparameters tuned in the run (``params``: the point
    chosen on the valid split; the whole search stays in selection.json), and ``choice`` (each
    challenger's paired gain against the choice so far), and ``tune`` (whether the tune DAG's
    latest result was adopted, and why: ``train.tune_adoption``)."""
    if not uri:
        return None
    sel = storage.read_json(uri)
    key = f"valid_{sel.get('metric')}"
    return {"metric": sel.get("metric"), "chosen": sel.get("chosen"),
            "candidates": {n: {k: c[k] for k in (key, "params", "components") if k in c}
                           for n, c in (sel.get("candidates") or {}).items()},
            "skipped": sel.get("skipped") or {}, "choice": sel.get("choice"),
            "tune": sel.get("tune")}


def champion_record() -> dict | None:
    uri = champion_uri()
    return storage.read_json(uri) if storage.exists(uri) else None


def champion() -> str | None:
    record = champion_record()
    return record["model_version"] if record else None


def _lock_busy(held: dict) -> ChampionBusy:
    return ChampionBusy(f"the champion pointer is locked by {held.get('owner')} until "
                        f"{held.get('expires_at')} ({champion_lock_uri()})")


def _move_champion(build) -> dict:
    """Under ``models/_champion.lock``: read the pointer and its ETag, ``build(current)`` the
    new record (or None to leave it), write it conditionally on that ETag (create-if-absent
    when there is none). Returns ``{"moved": bool, **record}``."""
    import uuid

    from nightrec.store import locks

    with locks.short_lock(champion_lock_uri(), owner=f"champion-{uuid.uuid4().hex[:8]}",
                          ttl_s=CHAMPION_LOCK_TTL_S, busy=_lock_busy):
        found = storage.read_versioned(champion_uri())
        current, etag = (json.loads(found[0]), found[1]) if found else (None, None)
        record = build(current)
        if record is None:
            return {"moved": False, **(current or {})}
        if etag is None:
            storage.write_json(champion_uri(), record, if_none_match=True)
        else:
            storage.write_json(champion_uri(), record, if_match=etag)
        return {"moved": True, **record}


def _record(version: str, current: dict | None, *, history: list[str], reason: str) -> dict:
    return {
        "model_version": version,
        "ds": meta(version).get("ds"),
        "previous": current["model_version"] if current else None,
        "history": history,
        "reason": reason,
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def set_champion(version: str, *, reason: str = "blessed", force: bool = False) -> dict:
    """Make ``version`` (registered) the champion; returns the pointer with ``moved``.

    The pointer moves only forward in ds: when the current champion's table is of a later ds
    than ``version``'s (a backfill), it stays, and ``moved`` is False. ``force`` (an operator's
    promote) moves it whatever the ds. The pointer keeps the history of champions, newest last,
    for rollback.
    """
    model_uris(version)  # refuses an unregistered version
    new_ds = meta(version).get("ds") or ""

    def build(current: dict | None) -> dict | None:
        if current and not force and (current.get("ds") or "") > new_ds:
            log.warning("champion stays %s (ds=%s): %s is of the earlier ds=%s",
                        current["model_version"], current.get("ds"), version, new_ds)
            return None
        if current and current["model_version"] == version:
            return None
        history = list(current.get("history", [current["model_version"]])) if current else []
        if not history or history[-1] != version:
            history.append(version)
        return _record(version, current, history=history, reason=reason)

    return _move_champion(build)


def rollback() -> dict:
    """Make the champion before the current one champion again (history pops one)."""

    def build(current: dict | None) -> dict:
        if current is None:
            raise ModelNotFound("no champion to roll back")
        history = list(current.get("history", [current["model_version"]]))
        if len(history) < 2:
            raise ModelNotFound(
                f"{current['model_version']} has no previous champion to roll back to")
        history.pop()
        model_uris(history[-1])
        return _record(history[-1], current, history=history,
                       reason=f"rollback from {current['model_version']}")

    return _move_champion(build)


def list_models() -> list[str]:
    prefix = layout.models_root()
    names = {u[len(prefix):].split("/", 1)[0] for u in storage.list_uris(prefix)}
    return sorted(n for n in names if MODEL_VERSION_RE.fullmatch(n))
