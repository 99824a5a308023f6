"""DVC around the split: a per-ds workspace, ``dvc repro split``, ``dvc push``, data_version.

DVC takes a repository lock and has no wait option, so every ds gets its own workspace
(``$NIGHTREC_STATE/dvc/ds=<ds>``, ``core.no_scm``): two runs for different dates never share a
lock, and the checkout's own ``.dvc`` is never touched by the DAG. The workspace gets the repo's
``dvc.yaml``, the run's effective params as ``params.yaml``, and the augmented input; then
``dvc repro --single-item split`` and ``dvc push`` to the remote ``s3://<bucket>/dvcstore``.

``data_version`` is DVC's md5 of the ``data/split`` directory from ``dvc.lock``: the same bytes
give the same version on any machine, and ``dvc pull`` with that lock fetches exactly them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tasks import layout, settings, split, storage

SPLIT_DIR = "data/split"
INPUT = "data/augment/interactions.parquet"


class DvcError(RuntimeError):
    pass


def _dvc(ws: Path, *args: str) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
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


def prepare_workspace(ws: Path, params: dict) -> None:
    """Create or refresh a no-SCM DVC workspace whose remote is the bucket's dvcstore."""
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".dvc").exists():
        _dvc(ws, "init", "--no-scm", "-q")
        _dvc(ws, "config", "core.analytics", "false")
    _dvc(ws, "remote", "add", "-d", "-f", "store", layout.dvc_remote_uri())
    endpoint = settings.s3_endpoint_url()
    if endpoint:
        _dvc(ws, "remote", "modify", "store", "endpointurl", endpoint)
    shutil.copyfile(settings.project_root() / "dvc.yaml", ws / "dvc.yaml")
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=True))


def data_version(ws: Path) -> str:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    for out in lock["stages"]["split"]["outs"]:
        if out["path"] == SPLIT_DIR:
            return out["md5"].removesuffix(".dir")
    raise DvcError(f"{ws}/dvc.lock has no output {SPLIT_DIR}")


def run(ds: str, augmented: dict[str, str], params: dict | None = None) -> dict[str, str]:
    """Reproduce and push the split for ``ds``; publish its files and ``data_version``."""
    params = params if params is not None else settings.load_params()
    ws = workspace(ds)
    prepare_workspace(ws, params)
    storage.download_to(augmented["interactions"], ws / INPUT)
    _dvc(ws, "repro", "--single-item", "split")
    _dvc(ws, "push", "split")
    version = data_version(ws)
    out = {k: v for k, v in augmented.items() if k != "interactions"}
    for part in split.PARTS:
        out[part] = layout.run_uri(ds, "split", f"{part}.parquet")
        storage.upload_from(ws / SPLIT_DIR / f"{part}.parquet", out[part])
    meta = {"ds": ds, "data_version": version, "dvc_remote": layout.dvc_remote_uri()}
    meta["dvc_lock"] = (ws / "dvc.lock").read_text()
    out["split_meta"] = layout.run_uri(ds, "split", "meta.json")
    storage.write_json(out["split_meta"], meta)
    out["data_version"] = version
    return out
