"""Shared fixtures. Airflow reads its settings at import, so they are set here, first.

- ``s3``: a real SeaweedFS server (nightrec/store/s3server.py) on free ports in a temp folder, for the
  session; the environment points boto3, DVC and nightrec at it.
- ``test_params``: params.yaml with a smaller sample, fewer epochs, no SASRec and shorter
  search grids (the DAG runs test the lifecycle), via NIGHTREC_PARAMS.
- Services (PostgreSQL, Redis, Chromium): a test that needs one says so with
  ``@pytest.mark.service(name, available=..., reason=...)`` or calls :func:`require_service`;
  without it the test skips, or fails under NIGHTREC_REQUIRE_SERVICES=1 (what CI sets).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("NIGHTREC_ML100K", ROOT.parent / "shared" / "data" / "ml-100k"))
_TMP = Path(tempfile.mkdtemp(prefix="nightrec-tests-"))

os.environ["NIGHTREC_STATE"] = str(_TMP / "state")
os.environ["AIRFLOW_HOME"] = str(_TMP / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_TMP}/airflow/airflow.db"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["NIGHTREC_RETRY_DELAY_S"] = "1"  # real retries, short waits
os.environ["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "tensorflow")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
for var in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
    os.environ.pop(var, None)

TEST_PARAMS = _TMP / "params.yaml"
_params = yaml.safe_load((ROOT / "params.yaml").read_text())
_params["sample"].update(n_users=600, n_items=300, n_interactions=15000)
_params["train"]["mf_softmax"].update(epochs=8)
_params["train"]["sasrec"].update(epochs=4, dim=16, max_len=20)  # the DAG runs: seconds
# The DAG runs test the lifecycle; each family and the search are tested on their own
# (test_models, test_tuning, test_sequential, test_ials). With params.yaml's candidates and grids
# a DAG run's train took ~40 s on the sample under the suite's load: SASRec 28 s of it, the
# other families (75 EASE points among them) and the blend about 10 s. So here: every family but SASRec (which test_tuning
# runs through train_both, and test_sequential on its own), two values per searched
# hyperparameter. Where the suite's time goes: benchmarks/RESULTS.md, "Test suite".
_params["train"]["candidates"] = [c for c in _params["train"]["candidates"] if c != "sasrec"]
_params["train"]["ease"].update(l2=[300.0, 1000.0], dropout=[0.0, 0.5],
                                recency_half_life=[None, 3.0])
_params["train"]["rp3beta"].update(alpha=[0.5], beta=[0.0, 0.5], recency_half_life=[None])
_params["train"]["ials"].update(regularization=[100.0, 1000.0])
_params["train"]["blend"].update(weights=[0.3, 0.5, 0.7])
# A budget no DAG run here comes near (train takes ~15 s on the sample): with the shipped 120 s
# floor, a loaded CI machine could cut a search at another point than an idle one, and a rerun
# of the same night (test_e2e) would fit other weights, hence another model version.
_params["train"]["time_budget"].update(min_s=900, max_s=1200)
TEST_PARAMS.write_text(yaml.safe_dump(_params))
os.environ["NIGHTREC_PARAMS"] = str(TEST_PARAMS)


REQUIRE_SERVICES_VAR = "NIGHTREC_REQUIRE_SERVICES"


def require_service(name: str, *, available: bool, reason: str) -> None:
    """Skip the running test (or fixture) when the service ``name`` is not available; under
    NIGHTREC_REQUIRE_SERVICES=1 fail it instead. CI sets the variable because its machine runs
    every service: there a missing one is a broken CI, and a skip would hide the tests behind it.
    The one place a service skip is written; the ``service`` mark calls it too."""
    if available:
        return
    if os.environ.get(REQUIRE_SERVICES_VAR) == "1":
        pytest.fail(f"{name} required ({REQUIRE_SERVICES_VAR}=1) but not available: {reason}",
                    pytrace=False)
    # Reported at the test's own line, as a skipif mark's skip is, not at this one.
    raise pytest.skip.Exception(f"{name} not available: {reason}", _use_item_location=True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "service(name, *, available, reason): needs an outside service; skips "
        "without it, fails under NIGHTREC_REQUIRE_SERVICES=1 (tests/conftest.py)")


# tryfirst: before the runner sets up the test's fixtures, so that a missing service stops the
# test before an S3 server, an Airflow stack or a DAG run starts for it.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("service"):
        require_service(*mark.args, **mark.kwargs)


def labelled_events(**sample_kwargs):
    """A seeded generated log as augment's output would be (dense indices, every event a
    positive of weight 1): the input the split, train and evaluate cores take."""
    import numpy as np
    import pandas as pd

    from nightrec.core import schema
    from nightrec.dev import sample_data

    inter, _, _ = sample_data.generate_sample(**sample_kwargs)
    return pd.DataFrame({
        schema.USER_IDX: inter["user_id"].to_numpy() - 1,
        schema.ITEM_IDX: inter["item_id"].to_numpy() - 1,
        schema.TIMESTAMP: inter["timestamp"].to_numpy(),
        schema.LABEL: np.int8(1),
        schema.WEIGHT: np.float32(1),
    })


def reference_ease(frame, point: dict, *, n_users: int, n_items: int, window_weight: float):
    """EASE at ``point`` (``l2``, ``dropout``, ``window``) on ``frame``'s pairs, built from
    nightrec.ml.models' pieces directly (not through tasks/train.py), for a test to compare a
    refit with: the plain Gram, plus ``window_weight`` x the windowed one when ``window`` is
    set (each user's order from the frame's timestamps)."""
    from nightrec.core import schema
    from nightrec.ml import models

    x = models.interaction_matrix(frame, n_users=n_users, n_items=n_items,
                                  user_col=schema.USER_IDX, item_col=schema.ITEM_IDX)
    gram, head = models.item_gram(x)
    if point.get("window") is not None:
        user, item, ts = (frame[c].to_numpy() for c in (schema.USER_IDX, schema.ITEM_IDX,
                                                         schema.TIMESTAMP))
        gram += window_weight * models.window_gram(user, item, ts, n_items=n_items, head=head,
                                                   window=int(point["window"]))
    return models.ease_from_gram(gram, head, n_items, l2=point["l2"], dropout=point["dropout"])


def params_with(path: Path, change) -> Path:
    """The suite's params with ``change(params)`` applied, written to ``path`` (for a test to
    point NIGHTREC_PARAMS at; subprocesses it starts inherit it)."""
    params = yaml.safe_load(TEST_PARAMS.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params))
    return path


def pin_ease(params: dict) -> None:
    """EASE alone, at one point (the first listed value of each searched key): a test of two
    or more nights whose gate then compares fits that differ by their data only. With the in-run
    search two nights can choose different points (the co-occurrence window on one night, not
    on the next) whose test figures differ by more than ``max_regression_vs_champion`` on a
    small log, and the night rightly publishes a fallback: the lifecycle is under test there,
    not the search (test_tuning, test_models)."""
    params["train"]["candidates"] = ["ease"]
    ease = params["train"]["ease"]
    for key in ("window", "l2", "dropout", "recency_half_life"):
        if isinstance(ease[key], list):
            ease[key] = ease[key][0]


@pytest.fixture
def ease_pinned(tmp_path, monkeypatch):
    """NIGHTREC_PARAMS with :func:`pin_ease` applied."""
    path = params_with(tmp_path / "ease-pinned.yaml", pin_ease)
    monkeypatch.setenv("NIGHTREC_PARAMS", str(path))
    return path


@pytest.fixture
def ease_only(tmp_path, monkeypatch):
    """NIGHTREC_PARAMS with the EASE candidate alone (closed form: seconds, not mf epochs), for
    tests of the run's lifecycle rather than of model choice."""
    path = params_with(tmp_path / "ease-only.yaml",
                       lambda p: p["train"].update(candidates=["ease"]))
    monkeypatch.setenv("NIGHTREC_PARAMS", str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_below(limit: int) -> int:
    """A free port p with p + 10000 free too (weed's gRPC port)."""
    for _ in range(200):
        p = free_port()
        if p + 10000 < 65536 and p < limit:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def s3():
    from nightrec.store import s3server, storage

    # Ports are probed free, then bound by weed a moment later: another process (the suite's
    # other sessions start their own weed at the same time, and any client connection takes
    # an ephemeral port) can take one in between, and weed exits "address already in use".
    # Fresh ports, up to three times.
    for attempt in range(3):
        cfg = s3server.ServerConfig(
            data_dir=_TMP / "s3",
            s3_port=free_port(),
            master_port=_free_port_below(55000),
            volume_port=_free_port_below(55000),
            filer_port=_free_port_below(55000),
            admin_port=_free_port_below(55000),
        )
        try:
            s3server.up(cfg)
            break
        except RuntimeError:
            s3server.down(cfg)
            if attempt == 2:
                raise
    os.environ.update(s3server.client_env(cfg))
    storage._client.cache_clear()
    yield cfg
    s3server.down(cfg)


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (SQLite) for dag.test()."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL)
    return home


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    from nightrec.core import settings
    from nightrec.dev import sample_data

    out = tmp_path_factory.mktemp("sample")
    return sample_data.write_sample(out, **sample_data.sample_kwargs(settings.load_params()))


@pytest.fixture
def ml100k():
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100K not present at {ML100K}")
    return ML100K


@pytest.fixture
def bucket(s3, monkeypatch):
    """A new empty bucket, made NIGHTREC_BUCKET for the test."""
    import uuid

    from nightrec.store import storage

    name = f"t-{uuid.uuid4().hex[:12]}"
    client = storage.s3_client()
    client.create_bucket(Bucket=name)
    monkeypatch.setenv("NIGHTREC_BUCKET", name)
    yield name
    # Each bucket is a SeaweedFS collection with volumes of its own: ~400 tests' buckets left in
    # one server exhausted them (PutObject InternalError for every later test, CI 2026-12-04).
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                client.delete_objects(Bucket=name, Delete={"Objects": keys[i:i + 1000]})
        client.delete_bucket(Bucket=name)
    except Exception:  # noqa: BLE001 - best effort: a test may have stopped the server
        pass
