"""The model registry in the bucket: ``models/<version>/`` plus a champion pointer.

```
models/<version>/embeddings.npz          the scoring model (full refit): tasks/models.py
models/<version>/holdout_embeddings.npz  the gated holdout fit (champion comparisons use it)
models/<version>/model.weights.h5        Keras weights of an mf_softmax refit (absent for ease)
models/<version>/history.json            training curves of the refit; holdout_history.json
models/<version>/selection.json          every candidate's valid metric, and the chosen one
models/<version>/users.parquet           user_idx -> user_id, the model's user index
models/<version>/items.parquet           item_idx -> item_id
models/<version>/meta.json               model_version, data_version, code_version, ds, params,
                                         metrics, gate (the blessing), registered_at
models/_champion.json                    {"model_version", "previous", "history", "updated_at",
                                          "reason"}
```

``meta.json`` is written last: its presence means the model is complete. A model version is one
key segment (``layout.safe_token``) and matches ``MODEL_VERSION_RE``. Only a blessed model
becomes champion automatically; ``promote`` and ``rollback`` (``nightrec models``) are the ops
levers, each recorded in the pointer's ``history``. The re-score DAG scores with the champion.
"""

from __future__ import annotations

import datetime as dt
import re

from tasks import layout, storage
from tasks.errors import PermanentError

MODEL_VERSION_RE = re.compile(r"^[a-z][a-z0-9]{0,15}-[0-9]{8}-[0-9a-f]{8}$")
FILES = ("embeddings.npz", "users.parquet", "items.parquet", "meta.json")


class ModelNotFound(PermanentError, LookupError):
    """No such registered model (or no champion yet): retrying will not make one appear."""


def check_version(version: str) -> str:
    if not isinstance(version, str) or not MODEL_VERSION_RE.fullmatch(version):
        raise ValueError(f"model_version must match {MODEL_VERSION_RE.pattern}, got {version!r}")
    return layout.safe_token(version, "model_version")


def model_prefix(version: str) -> str:
    return storage.s3_uri(f"models/{check_version(version)}/")


def champion_uri() -> str:
    return storage.s3_uri("models/_champion.json")


def model_uris(version: str) -> dict:
    """The model dict scoring takes: embeddings/users/items URIs plus the versions."""
    prefix = model_prefix(version)
    if not storage.exists(prefix + "meta.json"):
        raise ModelNotFound(f"no registered model {version} (looked for {prefix}meta.json)")
    meta = storage.read_json(prefix + "meta.json")
    out = {
        "embeddings": prefix + "embeddings.npz",
        "users": prefix + "users.parquet",
        "items": prefix + "items.parquet",
        "model_version": version,
        "data_version": meta["data_version"],
    }
    if "holdout_embeddings.npz" in meta.get("files", []):
        out["holdout_embeddings"] = prefix + "holdout_embeddings.npz"
    return out


def meta(version: str) -> dict:
    model_uris(version)
    return storage.read_json(model_prefix(version) + "meta.json")


def resolve(version: str | None) -> dict:
    """``model_uris`` of ``version``, or of the champion when it is None."""
    version = version or champion()
    if not version:
        raise ModelNotFound("no model_version given and no champion registered yet")
    return model_uris(version)


def code_version() -> str:
    """``NIGHTREC_CODE_VERSION`` if set (a deploy stamps it), else the checkout's git commit
    (with ``-dirty`` for uncommitted changes), else the installed package version."""
    import os
    import subprocess
    from importlib import metadata

    from tasks import settings

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


def register(model: dict, *, ds: str, metrics_uri: str | None, gate: dict | None = None,
             params: dict | None = None) -> dict:
    """Copy a trained model (the dict score takes, plus its ``artifacts``) into
    ``models/<version>/``; ``meta.json`` last."""
    version = check_version(model["model_version"])
    prefix = model_prefix(version)
    copies = {"embeddings.npz": model["embeddings"], "users.parquet": model["users"],
              "items.parquet": model["items"]}
    if model.get("holdout_embeddings"):
        copies["holdout_embeddings.npz"] = model["holdout_embeddings"]
    artifacts = model.get("artifacts") or {}
    for fit, name in (("full", ""), ("holdout", "holdout_")):
        for kind, file in (("history", "history.json"), ("model", "model.weights.h5")):
            src = (artifacts.get(fit) or {}).get(kind)
            if src:
                copies[name + file] = src
    if artifacts.get("selection"):
        copies["selection.json"] = artifacts["selection"]
    for name, src in copies.items():
        storage.copy(src, prefix + name)
    record = {
        "model_version": version,
        "data_version": model["data_version"],
        "code_version": code_version(),
        "ds": ds,
        "params": params,
        "metrics": storage.read_json(metrics_uri) if metrics_uri else None,
        "gate": gate,
        "files": sorted(copies),
        "registered_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(prefix + "meta.json", record)  # written last: its presence means complete
    return model_uris(version)


def champion_record() -> dict | None:
    uri = champion_uri()
    return storage.read_json(uri) if storage.exists(uri) else None


def champion() -> str | None:
    record = champion_record()
    return record["model_version"] if record else None


def set_champion(version: str, *, reason: str = "blessed") -> dict:
    """Make ``version`` (registered) the champion; the pointer keeps the history of champions,
    newest last, for rollback."""
    model_uris(version)  # refuses an unregistered version
    current = champion_record()
    history = list(current.get("history", [current["model_version"]])) if current else []
    if not history or history[-1] != version:
        history.append(version)
    record = {
        "model_version": version,
        "previous": current["model_version"] if current else None,
        "history": history,
        "reason": reason,
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(champion_uri(), record)
    return record


def rollback() -> dict:
    """Make the champion before the current one champion again (history pops one)."""
    current = champion_record()
    if current is None:
        raise ModelNotFound("no champion to roll back")
    history = list(current.get("history", [current["model_version"]]))
    if len(history) < 2:
        raise ModelNotFound(f"{current['model_version']} has no previous champion to roll back to")
    history.pop()
    target = history[-1]
    model_uris(target)
    record = {
        "model_version": target,
        "previous": current["model_version"],
        "history": history,
        "reason": f"rollback from {current['model_version']}",
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(champion_uri(), record)
    return record


def list_models() -> list[str]:
    prefix = storage.s3_uri("models/")
    names = {u[len(prefix):].split("/", 1)[0] for u in storage.list_uris(prefix)}
    return sorted(n for n in names if MODEL_VERSION_RE.fullmatch(n))
