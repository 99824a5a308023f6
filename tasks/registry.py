"""The model registry in the bucket: ``models/<version>/`` plus a champion pointer.

```
models/<version>/embeddings.npz   user, item, item_bias (float32), as scoring reads them
models/<version>/users.parquet    user_idx -> user_id, the model's user index
models/<version>/items.parquet    item_idx -> item_id
models/<version>/meta.json        model_version, data_version, ds, metrics, registered_at
models/_champion.json             {"model_version", "previous", "updated_at"}
```

A model version is one key segment (``layout.safe_token``) and matches ``MODEL_VERSION_RE``.
Only a blessed model becomes champion; the re-score DAG scores with the champion.
"""

from __future__ import annotations

import datetime as dt
import re

from tasks import layout, storage
from tasks.errors import PermanentError

MODEL_VERSION_RE = re.compile(r"^[a-z][a-z0-9]{0,15}-\d{8}-[0-9a-f]{8}$")
FILES = ("embeddings.npz", "users.parquet", "items.parquet", "meta.json")


class ModelNotFound(PermanentError, LookupError):
    """No such registered model (or no champion yet): retrying will not make one appear."""


def check_version(version: str) -> str:
    if not isinstance(version, str) or not MODEL_VERSION_RE.match(version):
        raise ValueError(f"model_version must match {MODEL_VERSION_RE.pattern}, got {version!r}")
    return layout.safe_token(version, "model_version")


def model_prefix(version: str) -> str:
    return storage.s3_uri(f"models/{check_version(version)}/")


def champion_uri() -> str:
    return storage.s3_uri("models/_champion.json")


def model_uris(version: str) -> dict[str, str]:
    """The model dict scoring takes: embeddings/users/items URIs plus the versions."""
    prefix = model_prefix(version)
    if not storage.exists(prefix + "meta.json"):
        raise ModelNotFound(f"no registered model {version} (looked for {prefix}meta.json)")
    meta = storage.read_json(prefix + "meta.json")
    return {
        "embeddings": prefix + "embeddings.npz",
        "users": prefix + "users.parquet",
        "items": prefix + "items.parquet",
        "model_version": version,
        "data_version": meta["data_version"],
    }


def resolve(version: str | None) -> dict:
    """``model_uris`` of ``version``, or of the champion when it is None."""
    version = version or champion()
    if not version:
        raise ModelNotFound("no model_version given and no champion registered yet")
    return model_uris(version)


def register(model: dict, *, ds: str, metrics_uri: str | None) -> dict:
    """Copy a trained model (the dict score takes) into ``models/<version>/``."""
    version = check_version(model["model_version"])
    prefix = model_prefix(version)
    storage.copy(model["embeddings"], prefix + "embeddings.npz")
    storage.copy(model["users"], prefix + "users.parquet")
    storage.copy(model["items"], prefix + "items.parquet")
    meta = {
        "model_version": version,
        "data_version": model["data_version"],
        "ds": ds,
        "metrics": storage.read_json(metrics_uri) if metrics_uri else None,
        "registered_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(prefix + "meta.json", meta)  # written last: its presence means complete
    return model_uris(version)


def champion() -> str | None:
    uri = champion_uri()
    return storage.read_json(uri)["model_version"] if storage.exists(uri) else None


def set_champion(version: str) -> dict:
    model_uris(version)  # refuses an unregistered version
    record = {
        "model_version": version,
        "previous": champion(),
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(champion_uri(), record)
    return record


def list_models() -> list[str]:
    prefix = storage.s3_uri("models/")
    names = {u[len(prefix):].split("/", 1)[0] for u in storage.list_uris(prefix)}
    return sorted(n for n in names if MODEL_VERSION_RE.match(n))
