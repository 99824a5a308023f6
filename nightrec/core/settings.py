"""Where things are: the project root, params.yaml, the local state folder and the object store.

Tunables come from ``params.yaml`` only. Locations and endpoints come from the environment:

- ``NIGHTREC_HOME``: project root (default: the checkout this package lives in).
- ``NIGHTREC_PARAMS``: path of params.yaml (default ``$NIGHTREC_HOME/params.yaml``).
- ``NIGHTREC_STATE``: git-ignored local state (default ``$NIGHTREC_HOME/.nightrec``).
- ``NIGHTREC_SPILL``: the data steps' local scratch and DuckDB's spill (default
  ``$NIGHTREC_STATE/spill``; nightrec/core/engine.py).
- ``NIGHTREC_BUCKET``: bucket (default ``nightrec``).
- ``S3_ENDPOINT_URL``: S3 endpoint; unset means AWS itself, as boto3 does.
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION``: the usual AWS chain.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from nightrec.table import contract, objects

DEFAULT_BUCKET = objects.DEFAULT_BUCKET


def project_root() -> Path:
    """The project checkout (holds params.yaml, dvc.yaml, dags/ and expectations/)."""
    env = os.environ.get("NIGHTREC_HOME")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Git-ignored folder for local state: Airflow home, S3 data, DVC workspaces."""
    env = os.environ.get("NIGHTREC_STATE")
    path = Path(env) if env else project_root() / ".nightrec"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def params_path() -> Path:
    env = os.environ.get("NIGHTREC_PARAMS")
    return Path(env).resolve() if env else project_root() / "params.yaml"


@lru_cache(maxsize=8)
def _load_params(path: str, mtime: float) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """params.yaml as a dict (cached per file modification time). Callers must not mutate it."""
    p = Path(path) if path else params_path()
    return _load_params(str(p), p.stat().st_mtime)


# The store's location is the table package's rule (a reader-only install reads the same
# variables); the ds rule is the table contract's. One definition each.
bucket = objects.bucket  # NIGHTREC_BUCKET, default "nightrec"
s3_endpoint_url = objects.endpoint_url  # S3_ENDPOINT_URL, or None for AWS itself
check_ds = contract.check_ds  # a real YYYY-MM-DD date, else ValueError; every key's ds


class StepParams(dict):
    """The slice of params.yaml a step declared it reads; reading anything else is a bug.

    ``dvc.yaml`` lists the same keys per stage (``tests/test_dvc.py``), so DVC reruns a stage
    exactly when one of its own knobs changes.
    """

    def __init__(self, params: dict[str, Any], keys: list[str]):
        super().__init__()
        for dotted in keys:
            node: Any = params
            for part in dotted.split("."):
                node = node[part]
            self[dotted] = node


def core_kwargs(p: StepParams) -> dict[str, Any]:
    """``{"clean.min_rating": x}`` -> ``{"min_rating": x}``: a step's params as core kwargs."""
    return {k.split(".", 1)[1]: v for k, v in p.items()}


def step_params(keys: list[str], params: dict[str, Any] | None = None) -> StepParams:
    return StepParams(params if params is not None else load_params(), keys)


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``params`` with each dotted key (``"train.ease.l2"``) set to its value."""
    import copy

    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = out
        for part in path:
            node = node[part]
        node[last] = value
    return out
