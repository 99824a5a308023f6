"""DVC around the split: a per-ds workspace, ``dvc repro split``, ``dvc push``, data_version.

DVC takes a repository lock and has no wait option, so every ds gets its own workspace
(``$NIGHTREC_STATE/dvc/ds=<ds>``, ``core.no_scm``): two runs for different dates never share a
lock, and the checkout's own ``.dvc`` is never touched by the DAG. The workspace gets the repo's
``dvc.yaml``, the run's effective params as ``params.yaml``, and the augmented input; then
``dvc repro --single-item split`` and ``dvc push`` to the remote ``s3://<bucket>/dvcstore``.

``data_version`` is DVC's md5 of the ``data/split`` directory from ``dvc.lock``: the same bytes
give the same version on any machine, and ``dvc pull`` with that lock fetches exactly them.
Before the push, the split is checked (tasks/validate.py ``check_split``): a broken split stops
the run and reaches neither the remote nor the run's outputs. ``python -m nightrec.tasks.versioning fetch
<data_version> --out DIR`` (:func:`fetch`) brings any pushed version back from the remote.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from nightrec.core import engine, settings
from nightrec.core.records import Augmented, Split
from nightrec.store import layout, storage
from nightrec.tasks import split, validate

SPLIT_DIR = "data/split"
INPUT = "data/augment/interactions"  # a bucketed table: bucket=NNN/part-0.parquet
log = logging.getLogger(__name__)


class DvcError(RuntimeError):
    pass


def _dvc(ws: Path, *args: str) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # A stage reads the workspace's params.yaml, the file DVC hashes into dvc.lock, not the
    # process's NIGHTREC_PARAMS: what DVC records is what the stage used.
    env["NIGHTREC_PARAMS"] = str((ws / "params.yaml").resolve())
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(settings.project_root()), env.get("PYTHONPATH")])
    )
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def workspace(ds: str) -> Path:
    return settings.state_dir() / "dvc" / f"ds={settings.check_ds(ds)}"


def prepare_remote(ws: Path) -> None:
    """Create (if need be) a no-SCM DVC repository in ``ws`` whose remote is the dvcstore."""
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".dvc").exists():
        _dvc(ws, "init", "--no-scm", "-q")
        _dvc(ws, "config", "core.analytics", "false")
    _dvc(ws, "remote", "add", "-d", "-f", "store", layout.dvc_remote_uri())
    endpoint = settings.s3_endpoint_url()
    if endpoint:
        _dvc(ws, "remote", "modify", "store", "endpointurl", endpoint)


CODE_FOLDERS = ("tasks", "nightrec")  # what dvc.yaml's code deps live in


def prepare_workspace(ws: Path, params: dict) -> None:
    """Create or refresh a no-SCM DVC workspace whose remote is the bucket's dvcstore.

    It gets ``dvc.yaml``, the run's ``params.yaml`` and a copy of the code folders (``tasks/``
    and ``nightrec/``): ``dvc.yaml`` lists each stage's code as deps, by those paths, so a code
    change reruns the stage and an unchanged one is skipped. The stage itself runs the installed
    package, which is this same checkout.
    """
    prepare_remote(ws)
    shutil.copyfile(settings.project_root() / "dvc.yaml", ws / "dvc.yaml")
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=True))
    for folder in CODE_FOLDERS:
        shutil.rmtree(ws / folder, ignore_errors=True)  # a module removed upstream goes too
        shutil.copytree(settings.project_root() / folder, ws / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def data_version(ws: Path) -> str:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    for out in lock["stages"]["split"]["outs"]:
        if out["path"] == SPLIT_DIR:
            return out["md5"].removesuffix(".dir")
    raise DvcError(f"{ws}/dvc.lock has no output {SPLIT_DIR}")


def plan(augmented: Augmented, params: dict | None = None) -> list[dict]:
    """The split's map step, planned: one spec per bucket of the augmented table. For
    ``global_time`` the cutoffs are a global fact, computed here in the engine over every
    bucket's timestamps (a reduce) and handed to each bucket. Clears a rerun's older parts."""
    ds = augmented.ds
    params = params if params is not None else settings.load_params()
    p = settings.step_params(split.PARAMS, params)
    inputs = [u for u in storage.list_uris(augmented.interactions) if u.endswith(".parquet")]
    if not inputs:
        raise FileNotFoundError(f"no buckets under {augmented.interactions}")
    cutoffs = None
    if p["split.method"] == "global_time":
        with tempfile.TemporaryDirectory(prefix="nightrec-split-plan-",
                                         dir=engine.spill_root()) as tmp, \
                engine.connect("split", params) as con:
            glob = storage.download_table(augmented.interactions, Path(tmp))
            cutoffs = split.global_cutoffs(con, glob, test_fraction=p["split.test_fraction"],
                                           valid_fraction=p["split.valid_fraction"])
    for part in split.PARTS:
        storage.delete(storage.list_uris(layout.bucketed_prefix(ds, "split", part)))
    return [{"ds": ds, "bucket": split.bucket_of_path(Path(u)), "input": u,
             "cutoffs": list(cutoffs) if cutoffs else None} for u in inputs]


def run_bucket(spec: dict, params: dict | None = None) -> dict:
    """One bucket's split (a mapped task): its augmented file in, its three parts out to
    ``runs/ds=<ds>/split/<part>/bucket=NNN/part-0.parquet``. Memory: one bucket."""
    params = params if params is not None else settings.load_params()
    p = settings.step_params(split.PARAMS, params)
    ds, bucket = spec["ds"], int(spec["bucket"])
    with tempfile.TemporaryDirectory(prefix="nightrec-split-", dir=engine.spill_root()) as tmp:
        local = storage.download_to(spec["input"], Path(tmp) / "in.parquet")
        rows = split.split_bucket(local, Path(tmp) / "out", bucket=bucket,
                                  kwargs=split.split_kwargs(p),
                                  cutoffs=tuple(spec["cutoffs"]) if spec["cutoffs"] else None)
        for part in split.PARTS:
            storage.upload_from(Path(tmp) / "out" / f"{part}.parquet",
                                layout.bucket_uri(ds, "split", part, bucket))
    return {"ds": ds, "bucket": bucket, "rows": rows}


def finish(augmented: Augmented, done: list[dict], params: dict | None = None) -> Split:
    """The split's reduce: gather every bucket's parts into the ds's DVC workspace, record the
    stage with ``dvc commit`` (deps, params and outs hashed into dvc.lock exactly as ``dvc
    repro`` would; the stage's command, ``python -m nightrec.tasks.split``, computes the same
    files, bucket by bucket, so ``dvc repro`` anywhere reproduces this data_version), check the
    split (the split suite and the leakage checks: a broken split raises ContractError and is
    neither pushed nor published), push it; publish ``data_version``."""
    ds = augmented.ds
    params = params if params is not None else settings.load_params()
    ws = workspace(ds)
    clock, timings = time.perf_counter(), {}

    def lap(what: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[what] = round(now - clock, 2)
        clock = now

    buckets = sorted(int(d["bucket"]) for d in done)
    prepare_workspace(ws, params)
    shutil.rmtree(ws / INPUT, ignore_errors=True)
    shutil.rmtree(ws / SPLIT_DIR, ignore_errors=True)
    storage.download_prefix(augmented.interactions, ws / INPUT)
    for b in buckets:
        for part in split.PARTS:
            storage.download_to(layout.bucket_uri(ds, "split", part, b),
                                ws / SPLIT_DIR / layout.bucket_name(b) / f"{part}.parquet")
    lap("gather")
    _dvc(ws, "commit", "--force", "split")
    version = data_version(ws)
    lap("commit")
    globs = {part: str(ws / SPLIT_DIR / "bucket=*" / f"{part}.parquet") for part in split.PARTS}
    report = validate.check_split_files(globs, ds=ds, method=params["split"]["method"],
                                        p=settings.step_params(validate.PARAMS, params),
                                        params=params)
    report["data_version"] = version
    report["data_docs"] = validate.record_results(ds, [report["expectations"]])
    out = {"validation": layout.run_uri(ds, "split", "validation.json")}
    storage.write_json(out["validation"], report)
    lap("check")
    if not report["success"]:
        raise validate.ContractError(validate.describe_failure(report))
    _dvc(ws, "push", "split")
    lap("push")
    for part in split.PARTS:
        out[part] = layout.bucketed_prefix(ds, "split", part)
    with engine.connect("split", params) as con:
        stats = split.split_stats_sql(con, globs)
    meta = {"ds": ds, "data_version": version, "dvc_remote": layout.dvc_remote_uri(),
            "buckets": len(buckets), "stats": stats}
    lap("stats")
    meta["dvc_lock"] = (ws / "dvc.lock").read_text()
    meta["timings_s"] = timings
    out["meta"] = layout.run_uri(ds, "split", "meta.json")
    storage.write_json(out["meta"], meta)
    log.info("split %s: %s", version, timings)
    return Split(ds=ds, data_version=version, item_features=augmented.item_features,
                 user_features=augmented.user_features,
                 feature_encoding=augmented.feature_encoding, **out)


def run(augmented: Augmented, params: dict | None = None) -> Split:
    """The whole split in one process: plan, every bucket, finish (the DAG maps the buckets)."""
    params = params if params is not None else settings.load_params()
    return finish(augmented, [run_bucket(s, params) for s in plan(augmented, params)], params)


def fetch(version: str, dest: Path) -> Path:
    """Fetch the split of a past ``data_version`` from the DVC remote into ``dest`` (its
    ``train/valid/test.parquet``, byte for byte what was pushed; DVC checks each md5).

    The version alone is enough: a throwaway no-SCM workspace gets a ``.dvc`` file naming the
    directory hash, and ``dvc pull`` does the rest. Returns ``dest``.
    """
    if not re.fullmatch(r"[0-9a-f]{32}", version):
        raise ValueError(f"a data_version is 32 hex digits (DVC's md5), got {version!r}")
    with tempfile.TemporaryDirectory(prefix="nightrec-fetch-") as tmp:
        ws = Path(tmp)
        prepare_remote(ws)
        (ws / "split.dvc").write_text(yaml.safe_dump(
            {"outs": [{"md5": f"{version}.dir", "hash": "md5", "path": "split"}]}))
        _dvc(ws, "pull", "split.dvc")
        shutil.copytree(ws / "split", dest, dirs_exist_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DVC lineage of the split")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="fetch a past data_version's split from the DVC remote")
    get.add_argument("data_version")
    get.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    for f in sorted(p for p in fetch(args.data_version, args.out).rglob("*") if p.is_file()):
        print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
