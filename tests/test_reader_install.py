"""The reader installs alone: ``nightrec-reader`` (reader/pyproject.toml) in a bare virtualenv.

The distribution is built from this checkout the way a release would be (``uv build reader/``:
an sdist, then the wheel from it) and holds exactly ``nightrec/__init__.py`` and
``nightrec/table/*.py``. Installed with only its dependencies (pyarrow, boto3, at the lock's
versions) into a fresh virtualenv of the same Python, it has no pandas, numpy, yaml nor any of
the pipeline's libraries; from there, against a table the real publish step wrote to the real
SeaweedFS, ``RecommendationReader`` (``for_user``, ``table``, ``iter_batches``) and the
standalone endpoint (``python -m nightrec.table.serve``, no params.yaml) return what the pipeline
wrote, and nothing of nightrec outside ``nightrec.table`` is imported.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from nightrec.core import settings
from nightrec.store import layout, storage
from nightrec.tasks import publish
from tests.test_publish import stage

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"
DS, VERSION, USER = "2026-05-01", "mf-20260501-aaaaaaaa", "u00007"
# distributions (and the import names) a reader-only install must not have
NOT_INSTALLED = {"pandas": "pandas", "numpy": "numpy", "tensorflow": "tensorflow",
                 "apache-airflow": "airflow", "dvc": "dvc",
                 "great-expectations": "great_expectations", "pyyaml": "yaml"}

# Run by the virtualenv's python, outside the checkout (so `nightrec` is the installed one).
IN_VENV = """
import json, os, sys
import pyarrow as pa
import pyarrow.parquet as pq
import nightrec
from nightrec.table import contract, serve  # noqa: F401 - serve's imports count too
from nightrec.table.reader import RecommendationReader

threads = lambda: len(os.listdir("/proc/self/task"))
reader = RecommendationReader()
before = threads()
whole = reader.table()
batches = list(reader.iter_batches())
user_rows = reader.for_user(sys.argv[1]).to_pylist()
started = threads() - before
pq.write_table(whole, sys.argv[2])
print(json.dumps({
    "threads_started": started,
    "file": nightrec.__file__,
    "user_rows": user_rows,
    "schema_ok": whole.schema.equals(contract.arrow_schema()),
    "batch_rows": [b.num_rows for b in batches],
    "batches_are_the_table": pa.Table.from_batches(batches).equals(whole),
    "nightrec_modules": sorted(m for m in sys.modules if m.split(".")[0] == "nightrec"),
    "heavy_modules": sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[3:]),
}))
"""


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-4000:])
    return out


@pytest.fixture(scope="module")
def reader_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the reader distribution and its dependencies only."""
    tmp = tmp_path_factory.mktemp("reader-install")
    _run(UV, "build", "--quiet", "--out-dir", tmp / "dist", ROOT / "reader")
    (wheel,) = (tmp / "dist").glob("nightrec_reader-*.whl")
    (sdist,) = (tmp / "dist").glob("nightrec_reader-*.tar.gz")
    shipped = {"nightrec/__init__.py"} | {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "nightrec" / "table").glob("*.py")}
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    assert in_wheel == shipped
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if n.endswith(".py")}
    assert in_sdist == shipped
    venv = tmp / "venv"
    _run(UV, "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    _run(UV, "pip", "install", "--quiet", "--python", python, wheel,
         "-c", ROOT / "requirements.lock")
    return venv


def _env() -> dict:
    """This process's environment (the S3 endpoint, credentials and NIGHTREC_BUCKET) without
    anything that could put the checkout or the project's params on the venv's path."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "NIGHTREC_HOME", "NIGHTREC_PARAMS", "VIRTUAL_ENV")}


def test_the_reader_installs_alone_and_reads_what_the_pipeline_published(reader_venv, bucket,
                                                                           tmp_path):
    python = reader_venv / "bin" / "python"
    installed = _run(UV, "pip", "list", "--format", "json", "--python", python).stdout
    names = {d["name"].lower() for d in json.loads(installed)}
    assert {"nightrec-reader", "pyarrow", "boto3"} <= names
    assert names.isdisjoint(NOT_INSTALLED), names & set(NOT_INSTALLED)

    # a table written by the real publish step (GE suite, claim, parts, manifest, pointer)
    scored = stage(DS, run_key="r-reader", model_version=VERSION, n_users=30, k=5, shards=2)
    written = pd.concat([storage.read_parquet(u) for u in scored.parts], ignore_index=True)
    publish.run(scored, params=settings.load_params())
    manifest = storage.read_json(layout.manifest_uri(DS))

    out = _run(python, "-c", IN_VENV, USER, tmp_path / "table.parquet", *NOT_INSTALLED.values(),
               cwd=tmp_path, env=_env())
    got = json.loads(out.stdout)
    assert Path(got["file"]).is_relative_to(reader_venv)  # the installed copy, not the checkout
    assert got["heavy_modules"] == []
    # no read started a thread: Arrow's pool threads are what can abort a short script at exit
    assert got["threads_started"] == 0
    assert all(m in ("nightrec", "nightrec.table") or m.startswith("nightrec.table.")
               for m in got["nightrec_modules"]), got["nightrec_modules"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "table.parquet"), written)
    assert got["schema_ok"] and got["batches_are_the_table"]
    assert got["batch_rows"] == [p["rows"] for p in manifest["parts"]]
    mine = written[written["user_id"] == USER].reset_index(drop=True)
    assert pd.DataFrame(got["user_rows"]).astype(mine.dtypes.to_dict()).equals(mine)

    # the standalone endpoint, configured by flags and environment alone
    server = subprocess.Popen([str(python), "-m", "nightrec.table.serve", "--port", "0"],
                              cwd=tmp_path, env={**_env(), "NIGHTREC_SERVE_MAX_K": "50"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, (line, server.stderr.read() if server.poll() is not None else "")
        conn = http.client.HTTPConnection("127.0.0.1", int(match[1]), timeout=10)
        conn.request("GET", f"/recommendations/{USER}?k=3")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        assert (body["ds"], body["model_version"], body["publish_id"]) == (
            DS, VERSION, manifest["publish_id"])
        assert [(i["rank"], i["item_id"], i["score"]) for i in body["items"]] == [
            (int(r), i, float(s)) for r, i, s in mine[["rank", "item_id", "score"]].head(3)
            .itertuples(index=False)]
        conn.request("GET", f"/recommendations/{USER}?k=51")  # NIGHTREC_SERVE_MAX_K
        assert conn.getresponse().status == 400
        conn.close()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
