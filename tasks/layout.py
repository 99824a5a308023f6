"""The object-store layout: every key nightrec reads or writes is built here, from a checked ds.

```
raw/interactions/ds=<ds>/<files>         input snapshot (CSV/TSV/u.data/Parquet, optionally .gz)
raw/items/ds=<ds>/<file>                 optional item catalogue
raw/users/ds=<ds>/<file>                 optional user attributes
runs/ds=<ds>/<step>/...                  each step's outputs for that ds (replaced on rerun)
dvcstore/                                the DVC remote (content-addressed)
staging/recommendations/ds=<ds>/<run>/   score parts before publish (never read downstream)
recommendations/ds=<ds>/part-*.parquet   the published table, described by _manifest.json
recommendations/_latest.json             pointer to the newest published manifest
```
"""

from __future__ import annotations

import re

from tasks import settings, storage

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_token(value: str, what: str = "value") -> str:
    """Return ``value`` if it can be one path segment of a key (no '/', '..', spaces, unicode)."""
    if not isinstance(value, str) or not _SAFE_TOKEN.match(value) or ".." in value:
        raise ValueError(f"{what} must match {_SAFE_TOKEN.pattern} without '..', got {value!r}")
    return value


def sanitize_token(value: str, max_len: int = 100) -> str:
    """Turn any id (an Airflow run id, a task id) into one safe key segment."""
    token = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._-]", "_", value))[:max_len]
    return token if token[:1].isalnum() else f"x{token}"[:max_len]


def raw_prefix(ds: str, table: str = "interactions") -> str:
    if table not in ("interactions", "items", "users"):
        raise ValueError(f"unknown raw table {table!r}")
    return storage.s3_uri(f"raw/{table}/ds={settings.check_ds(ds)}/")


def run_uri(ds: str, step: str, name: str = "") -> str:
    key = f"runs/ds={settings.check_ds(ds)}/{safe_token(step, 'step')}/"
    return storage.s3_uri(key + (safe_token(name, "name") if name else ""))


def dvc_remote_uri() -> str:
    return storage.s3_uri("dvcstore")


def staging_prefix(ds: str, run_key: str) -> str:
    key = f"staging/recommendations/ds={settings.check_ds(ds)}/{safe_token(run_key, 'run key')}/"
    return storage.s3_uri(key)


def recs_prefix(ds: str) -> str:
    return storage.s3_uri(f"recommendations/ds={settings.check_ds(ds)}/")


def manifest_uri(ds: str) -> str:
    return recs_prefix(ds) + "_manifest.json"


def latest_uri() -> str:
    return storage.s3_uri("recommendations/_latest.json")
