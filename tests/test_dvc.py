"""DVC lineage of the split (tasks/versioning.py), with the real SeaweedFS as the DVC remote.

- reproducibility: two fresh copies of the project (dvc.yaml, params.yaml and the code
  folders: what a clone has; a ``git clone`` would miss uncommitted work), each with its own
  workspace prepared as the DAG prepares one, ``dvc repro`` the same input into identical files;
- cache: changing only training params leaves the split stage up to date (DVC's own status,
  its dry run, and dvc.lock), while changing a split param reruns it;
- code: the stages list the code they run as deps, and the workspace gets that code, so a change
  to the split code reruns the split stage in a kept workspace (and a change to train code does
  not);
- fetch-back: a pushed data_version comes back byte for byte after the local cache and outputs
  are gone: by the version alone (``nightrec.tasks.versioning fetch``), through ``dvc.api``'s
  DVCFileSystem, and with ``dvc pull``.

(tests/test_e2e.py checks that the DAG's push put exactly the published split files in the
remote; tests/test_contracts.py that dvc.yaml lists each module's params.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nightrec.core import engine, settings
from nightrec.dev import sample_data
from nightrec.store import storage
from nightrec.tasks import augment, split, versioning

ROOT = Path(__file__).resolve().parents[1]


BUCKETS = 3


def _augmented(path: Path) -> None:
    """A small augmented table as the DAG leaves it: user-hash buckets under ``path``."""
    inter, _, _ = sample_data.generate_sample(n_users=150, n_items=80, n_interactions=3000,
                                              seed=3)
    df = inter.assign(user_idx=inter["user_id"] - 1, item_idx=inter["item_id"] - 1,
                      user_id=inter["user_id"].astype(str), item_id=inter["item_id"].astype(str),
                      rating=inter["rating"].astype("float64"))
    df = augment.label_interactions(df, positive_min_rating=0.0, weight_by_rating=False,
                                    max_rating=5.0)
    bucket = df["user_id"].map(lambda u: engine.bucket_of(u, BUCKETS))
    for b in range(BUCKETS):
        out = path / f"bucket={b:03d}" / "part-0.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        storage.write_parquet(df[bucket == b], str(out))


def _fresh_copy(root: Path) -> Path:
    for folder in versioning.CODE_FOLDERS:
        shutil.copytree(ROOT / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(ROOT / name, root / name)
    return root


def _lock(ws: Path) -> dict:
    return yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["split"]


def _rows(ws: Path, part: str) -> int:
    return sum(len(pd.read_parquet(f))
               for f in (ws / versioning.SPLIT_DIR).glob(f"bucket=*/{part}.parquet"))


def _files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def workspaces(s3, tmp_path_factory):
    base = tmp_path_factory.mktemp("dvc")
    data = base / "augmented"
    _augmented(data)
    params = settings.load_params()
    out = []
    for name in ("clone-a", "clone-b"):
        clone = _fresh_copy(base / name)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NIGHTREC_HOME", str(clone))  # dvc.yaml and the stage's code from the copy
            ws = clone / "ws"
            versioning.prepare_workspace(ws, params)
            shutil.copytree(data, ws / versioning.INPUT)
            versioning._dvc(ws, "repro", "--single-item", "split")
        out.append(ws)
    return out


def test_repro_in_two_fresh_copies_gives_identical_split_files(workspaces):
    a, b = workspaces
    assert a.parent != b.parent
    assert versioning.data_version(a) == versioning.data_version(b)
    assert _lock(a) == _lock(b)  # same input, params, and output hashes
    files = _files(a / versioning.SPLIT_DIR)
    assert sorted(files) == [f"bucket={b:03d}/{p}.parquet"
                             for b in range(BUCKETS) for p in sorted(split.PARTS)]
    assert files == _files(b / versioning.SPLIT_DIR)
    assert all(len(pd.read_parquet(a / versioning.SPLIT_DIR / n)) for n in files)


def test_changing_only_training_params_reruns_no_data_stage(workspaces):
    ws = workspaces[1]
    before = _lock(ws)
    test_rows = _rows(ws, "test")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["mf_softmax"]["epochs"] += 7
    params["train"]["ease"]["l2"] = [123.0]
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    assert "Data and pipelines are up to date" in versioning._dvc(ws, "status", "split")
    assert "Running stage 'split'" not in versioning._dvc(ws, "repro", "--single-item", "split")
    assert _lock(ws) == before

    params["split"]["test_fraction"] = 0.3  # the control: a split knob does rerun it
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    status = versioning._dvc(ws, "status", "split")
    assert re.search(r"params.yaml:\s+modified:\s+split.test_fraction\s*$", status), status
    assert "Running stage 'split'" in versioning._dvc(ws, "repro", "--single-item", "split")
    after = _lock(ws)
    assert after["params"]["params.yaml"]["split.test_fraction"] == 0.3
    assert after["outs"] != before["outs"]
    # and the stage itself read the workspace's params.yaml, the values DVC recorded
    assert _rows(ws, "test") > 2.5 * test_rows


def test_changing_the_split_code_reruns_the_split_stage_in_a_kept_workspace(workspaces,
                                                                           monkeypatch):
    ws = workspaces[1]
    clone = ws.parent
    monkeypatch.setenv("NIGHTREC_HOME", str(clone))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    versioning.prepare_workspace(ws, params)  # the next night, same ds: the workspace is kept
    assert "Data and pipelines are up to date" in versioning._dvc(ws, "status", "split")
    before = _lock(ws)
    assert {d["path"] for d in before["deps"]} >= {"tasks/split.py", "nightrec/core/schema.py",
                                                   "nightrec/core/settings.py"}

    # train code changes: the split stage stays as it was
    with (clone / "tasks" / "train.py").open("a") as f:
        f.write("\n# a change to the training code\n")
    versioning.prepare_workspace(ws, params)
    assert "Data and pipelines are up to date" in versioning._dvc(ws, "status", "split")

    # split code changes: DVC sees it and reruns the stage
    with (clone / "tasks" / "split.py").open("a") as f:
        f.write("\n# a change to the split code\n")
    versioning.prepare_workspace(ws, params)
    status = versioning._dvc(ws, "status", "split")
    assert re.search(r"modified:\s+tasks/split.py", status), status
    assert "Running stage 'split'" in versioning._dvc(ws, "repro", "--single-item", "split")
    after = _lock(ws)
    md5 = {d["path"]: d["md5"] for d in after["deps"]}
    assert md5["tasks/split.py"] != {d["path"]: d["md5"] for d in before["deps"]}[
        "tasks/split.py"]
    assert after["outs"] == before["outs"]  # a comment: the same split, the same data_version
    assert "Data and pipelines are up to date" in versioning._dvc(ws, "status", "split")


def test_a_pushed_data_version_comes_back_from_the_remote(workspaces, tmp_path, capsys):
    from dvc.api import DVCFileSystem

    ws = workspaces[0]
    version = versioning.data_version(ws)
    originals = _files(ws / versioning.SPLIT_DIR)
    versioning._dvc(ws, "push", "split")
    shutil.rmtree(ws / ".dvc" / "cache")
    shutil.rmtree(ws / versioning.SPLIT_DIR)

    # by the version alone, anywhere (the README's recipe)
    assert versioning.main(["fetch", version, "--out", str(tmp_path / "fetched")]) == 0
    assert _files(tmp_path / "fetched") == originals
    assert str(tmp_path / "fetched" / "bucket=000" / "train.parquet") in capsys.readouterr().out
    # dvc.api: the workspace's dvc.lock names the version; the bytes come from the remote
    fs = DVCFileSystem(str(ws))
    assert (fs.read_bytes(f"{versioning.SPLIT_DIR}/bucket=001/test.parquet")
            == originals["bucket=001/test.parquet"])
    # dvc pull restores the workspace
    versioning._dvc(ws, "pull", "split")
    assert _files(ws / versioning.SPLIT_DIR) == originals
    with pytest.raises(ValueError, match="32 hex digits"):
        versioning.fetch("../etc", tmp_path / "x")


def test_the_mapped_buckets_committed_are_what_dvc_repro_computes(workspaces, tmp_path,
                                                                   monkeypatch):
    """The DAG splits each bucket in its own task and records the stage with ``dvc commit``;
    ``dvc repro`` of that stage (its command splits every bucket in one process) must give the
    same files, so the committed data_version is reproducible."""
    repro = workspaces[0]
    clone = repro.parent
    monkeypatch.setenv("NIGHTREC_HOME", str(clone))
    ws = tmp_path / "mapped"
    params = yaml.safe_load((repro / "params.yaml").read_text())
    versioning.prepare_workspace(ws, params)
    shutil.copytree(repro / versioning.INPUT, ws / versioning.INPUT)
    p = settings.step_params(split.PARAMS, params)
    files = sorted((ws / versioning.INPUT).glob("bucket=*/*.parquet"))
    with engine.connect("split", params) as con:
        cutoffs = split.global_cutoffs(con, str(ws / versioning.INPUT / "bucket=*" / "*.parquet"),
                                       test_fraction=p["split.test_fraction"],
                                       valid_fraction=p["split.valid_fraction"])
    for f in reversed(files):  # any order, as mapped tasks finish
        b = split.bucket_of_path(f)
        split.split_bucket(f, ws / versioning.SPLIT_DIR / f.parent.name, bucket=b,
                           kwargs=split.split_kwargs(p), cutoffs=cutoffs)
    versioning._dvc(ws, "commit", "--force", "split")
    assert versioning.data_version(ws) == versioning.data_version(repro)
    assert _lock(ws)["deps"] == _lock(repro)["deps"]
    assert "Data and pipelines are up to date" in versioning._dvc(ws, "status", "split")
    assert _files(ws / versioning.SPLIT_DIR) == _files(repro / versioning.SPLIT_DIR)
