"""Retention and erasure: ``nightrec gc`` prunes what no one needs any more, ``nightrec forget``
removes one user. Both list what they would do (the default) and act only with ``--apply``.

**gc** (:func:`plan`, then :func:`apply`), by the ``retention`` section of params.yaml:

- ``runs/ds=D/``, ``reports/ds=D/``, ``alerts/ds=D/`` for every D older than
  ``retention.runs_days`` days before the newest ds in the bucket; never the ds the latest pointer
  names, never a ds whose run lease (``runs/ds=D/_run_lock.json``) is live;
- ``models/<version>/`` for every registered version that is neither the champion, nor among the
  champion history's last ``retention.keep_models``, nor named by a published manifest that is
  still there, nor made by a run whose lease is live (a model registered before it is published);
- everything under ``state/id_map/``: the cross-run id map earlier versions kept; nothing reads
  it any more (README, "Retention and erasure"), and it holds user ids;
- local DVC workspaces ``$NIGHTREC_STATE/dvc/ds=D`` untouched for ``retention.dvc_workspaces_days``
  days (not while D's lease is live);
- objects of the DVC remote (``dvcstore/``) that no kept data_version references: the kept
  data_versions are those of the kept runs (``runs/ds=D/split/meta.json``), the kept models'
  ``meta.json`` and the published manifests. The plan lists them (each kept version's ``.dir``
  listing names its files); apply has DVC itself delete them: ``dvc gc --workspace --cloud`` in a
  throwaway no-SCM project holding one ``.dvc`` file per kept data_version, after its ``--dry``
  run listed exactly the planned objects (else nothing is deleted from the remote).

:func:`apply` deletes exactly what the plan lists, re-checking the latest pointer, the leases
and the champion right before each item, and writes an audit record ``audit/gc/...``.

**forget** (:func:`forget_user`): adds sha256(user id) to ``state/forgotten/users.parquet`` (the
suppression list clean reads: the user's rows are dropped before judging, tasks/clean.py), then
removes the user from retained derived data: the published tables (parts rewritten under the
ds's publish claim, a new manifest), every per-run Parquet table holding external user ids
(event tables lose the user's rows; the per-run index table ``augment/user_features.parquet``
keeps the row with a tombstone id and blank features, so indices stay valid), models'
``users.parquet`` (a tombstone, and the user's rows of ``embeddings.npz``,
``holdout_embeddings.npz`` and ``gated_embeddings.npz`` zeroed), and what earlier versions
kept (``clean/user_ids.parquet``, ``state/id_map/``: the id becomes its tombstone). The README's "Retention and erasure"
says what is not erased.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import io
import json
import logging
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.core import schema, settings
from nightrec.store import layout, locks, storage
from nightrec.table import contract
from nightrec.tasks import clean, publish, registry

PARAMS = [
    "retention.runs_days",
    "retention.keep_models",
    "retention.dvc_workspaces_days",
    "retention.dvc_remote",
    "publish.claim_ttl_s",
    "publish.row_group_size",
]
RUN_ROOTS = ("runs", "reports", "alerts")  # per-ds folders pruned together
# Per-run tables that map an index to an external id: the user's row stays (indices must stay
# valid), its id becomes a tombstone. Every other Parquet table with a user_id column is a table
# of events, which loses the user's rows.
# The run's user index (user_idx -> user_id): augment's feature table, which train's factors
# use; clean/user_ids.parquet is the same index as earlier versions wrote it.
RUN_INDEX = "augment/user_features.parquet"
INDEX_TABLES = (RUN_INDEX, "clean/user_ids.parquet")
_KEEP_COLUMNS = {schema.USER_ID, schema.USER_IDX}
_REMOVING = re.compile(r"^Removing (\S+)$", re.MULTILINE)  # what `dvc gc --dry` would delete
FORGET_LOCK_TTL_S = 60.0
TOMBSTONE_PREFIX = schema.FORGOTTEN_PREFIX
log = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def tombstone(user_id: str) -> str:
    """What replaces a forgotten user's id where a row must stay: ``~forgotten:<16 hex>`` (the
    first 64 bits of sha256, the id's hash in the suppression list)."""
    return TOMBSTONE_PREFIX + clean.user_hash(user_id)[:16]


# --- what is protected now ----------------------------------------------------------------------


def _latest_ds() -> str | None:
    found = storage.read_versioned(layout.latest_uri())
    return json.loads(found[0]).get("ds") if found else None


def _live_lease(ds: str) -> dict | None:
    """The live run lease of ``ds`` (any owner), or None."""
    held = locks.holder(layout.run_lock_uri(ds))
    if held and dt.datetime.fromisoformat(held["expires_at"]) > _now():
        return held
    return None


def _lease_reason(ds: str) -> str | None:
    held = _live_lease(ds)
    return (f"run {held.get('owner')} holds its lease until {held.get('expires_at')}"
            if held else None)


def _ds_folders(root: str) -> dict[str, str]:
    return {d: u for u in storage.list_prefixes(layout.ds_partitioned_roots()[root])
            if (d := layout.ds_of_prefix(u))}


def _manifests() -> dict[str, dict]:
    """Every published manifest still in the bucket, by ds."""
    out = {}
    for ds in _ds_folders("recommendations"):
        found = storage.read_versioned(layout.manifest_uri(ds))
        if found:
            out[ds] = json.loads(found[0])
    return out


def _version_ds(version: str) -> str | None:
    """``ease-20261128-abcd1234`` -> ``2026-11-28`` (the ds of the run that made it)."""
    m = re.search(r"-(\d{4})(\d{2})(\d{2})-", version)
    if not m:
        return None
    try:
        return settings.check_ds("-".join(m.groups()))
    except ValueError:
        return None


def _kept_models(keep_models: int, manifests: dict[str, dict]) -> dict[str, str]:
    """Model versions kept whatever their age, with why."""
    keep: dict[str, str] = {}
    record = registry.champion_record()
    if record:
        keep[record["model_version"]] = "the champion"
        history = list(record.get("history") or [record["model_version"]])
        for v in history[-keep_models:]:
            keep.setdefault(v, f"in the champion history's last {keep_models}")
    for ds, m in sorted(manifests.items()):
        if m.get("model_version"):
            keep.setdefault(m["model_version"], f"the published table of ds={ds} names it")
    return keep


# --- gc: the plan -------------------------------------------------------------------------------


def _check(p: settings.StepParams) -> dict:
    out = {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith("retention.")}
    for key in ("runs_days", "keep_models", "dvc_workspaces_days"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise ValueError(f"retention.{key} must be an int >= 1, got {out[key]!r}")
    return out


def plan(params: dict | None = None) -> dict:
    """What ``nightrec gc`` would delete, by kind; deletes nothing. JSON-serialisable.

    Keys: ``runs`` (``[{ds, objects}]``), ``models`` (``[{model_version, objects}]``),
    ``id_maps`` (``[{kind, generation, uri}]``), ``dvc_workspaces`` (``[{ds, path, age_days}]``),
    ``dvc_remote`` (``{objects, kept_data_versions, missing}``), plus ``kept`` (what was spared
    and why), ``newest_ds``, ``cutoff_ds``, ``latest_ds`` and the ``retention`` params used.
    """
    p = settings.step_params(PARAMS, params)
    r = _check(p)
    now = _now()
    latest = _latest_ds()
    folders = {root: _ds_folders(root) for root in RUN_ROOTS}
    all_ds = set().union(*folders.values())
    newest = max(all_ds | ({latest} if latest else set()), default=None)
    cutoff = ((dt.date.fromisoformat(newest) - dt.timedelta(days=r["runs_days"])).isoformat()
              if newest else None)
    kept_ds: dict[str, str] = {}
    runs = []
    for ds in sorted(all_ds):
        if ds >= cutoff:
            kept_ds[ds] = f"within {r['runs_days']} days of the newest ds {newest}"
            continue
        why = "the latest pointer names it" if ds == latest else _lease_reason(ds)
        if why:
            kept_ds[ds] = why
            continue
        objects = [u for root in RUN_ROOTS if ds in folders[root]
                   for u in storage.list_uris(folders[root][ds])]
        if objects:  # SeaweedFS lists emptied folders too
            runs.append({"ds": ds, "objects": objects})

    manifests = _manifests()
    kept_models = _kept_models(r["keep_models"], manifests)
    models_root = layout.models_root()
    by_version: dict[str, list[str]] = {}
    for u in storage.list_uris(models_root):
        name = u[len(models_root):].split("/", 1)[0]
        if registry.MODEL_VERSION_RE.fullmatch(name):
            by_version.setdefault(name, []).append(u)
    models = []
    for version, objects in sorted(by_version.items()):
        if version in kept_models:
            continue
        vds = _version_ds(version)
        why = _lease_reason(vds) if vds else None
        if why:
            kept_models[version] = f"its run is in flight: {why}"
            continue
        models.append({"model_version": version, "objects": objects})

    id_maps = [{"uri": u} for u in storage.list_uris(layout.legacy_id_map_prefix())]

    workspaces = []
    root = settings.state_dir() / "dvc"
    for ws in sorted(root.glob("ds=*")) if root.is_dir() else []:
        ds = layout.ds_of_prefix(ws.name)
        if ds is None or not ws.is_dir():
            continue
        touched = max([ws.stat().st_mtime] + [c.stat().st_mtime for c in ws.iterdir()])
        age_days = (now.timestamp() - touched) / 86400.0
        if age_days > r["dvc_workspaces_days"] and not _lease_reason(ds):
            workspaces.append({"ds": ds, "path": str(ws), "age_days": round(age_days, 2)})

    pruned_ds = {e["ds"] for e in runs}
    pruned_models = {e["model_version"] for e in models}
    remote = _remote_plan(
        [ds for ds in all_ds if ds not in pruned_ds],
        [v for v in by_version if v not in pruned_models],
        manifests,
    ) if r["dvc_remote"] else {"objects": [], "kept_data_versions": {}, "missing": []}
    return {
        "generated_at": _iso(now), "retention": r, "newest_ds": newest, "cutoff_ds": cutoff,
        "latest_ds": latest, "runs": runs, "models": models, "id_maps": id_maps,
        "dvc_workspaces": workspaces, "dvc_remote": remote,
        "kept": {"ds": kept_ds, "models": kept_models},
    }


def _dir_uri(version: str) -> str:
    """The DVC 3 remote's object for a directory hash: ``files/md5/<2>/<30>.dir``."""
    return layout.dvc_dir_object_uri(version)


def _kept_data_versions(kept_ds: list[str], kept_models: list[str],
                        manifests: dict[str, dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}

    def add(version: str | None, why: str) -> None:
        if isinstance(version, str) and re.fullmatch(r"[0-9a-f]{32}", version):
            out.setdefault(version, []).append(why)

    for ds in sorted(kept_ds):
        uri = layout.run_uri(ds, "split", "meta.json")
        if storage.exists(uri):
            add(storage.read_json(uri).get("data_version"), f"run ds={ds}")
    for version in sorted(kept_models):
        uri = layout.model_file_uri(registry.check_version(version), "meta.json")
        if storage.exists(uri):
            add(storage.read_json(uri).get("data_version"), f"model {version}")
    for ds, m in sorted(manifests.items()):
        add(m.get("data_version"), f"published ds={ds}")
    return out


def _remote_plan(kept_ds: list[str], kept_models: list[str], manifests: dict[str, dict]) -> dict:
    """The DVC-remote objects that no kept data_version references (from each kept version's
    ``.dir`` listing: the files of its split)."""
    kept = _kept_data_versions(kept_ds, kept_models, manifests)
    remote = storage.list_uris(layout.dvc_remote_uri())
    present = set(remote)
    referenced, missing = set(), []
    for version in sorted(kept):
        uri = _dir_uri(version)
        if uri not in present:
            missing.append(version)  # not fetchable anyway: nothing of it to keep
            continue
        referenced.add(uri)
        for entry in json.loads(storage.read_bytes(uri)):
            md5 = entry["md5"]
            referenced.add(layout.dvc_object_uri(md5))
    files_root = layout.dvc_files_root()
    objects = [u for u in remote if u.startswith(files_root) and u not in referenced]
    return {"objects": objects, "kept_data_versions": kept, "missing": missing}


# --- gc: apply ----------------------------------------------------------------------------------


def _audit(kind: str, record: dict, operator: str | None) -> str:
    now = _now()
    record = {"kind": kind, "at": _iso(now), "operator": operator or _operator(),
              "host": socket.gethostname(), **record}
    uri = layout.audit_uri(kind, now.strftime("%Y%m%dT%H%M%SZ"), uuid.uuid4().hex[:8])
    storage.write_json(uri, record, if_none_match=True)
    return uri


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _any_live_lease() -> str | None:
    for ds in sorted(_ds_folders("runs")):
        why = _lease_reason(ds)
        if why:
            return f"ds={ds}: {why}"
    return None


def apply(plan: dict, *, operator: str | None = None) -> dict:
    """Delete exactly what ``plan`` lists; returns what was deleted and what was skipped (and
    why), with the audit record's URI. Each item is re-checked right before it goes: a ds the
    latest pointer now names or whose lease is live, a model that became champion (or entered the
    kept history) or whose run is in flight, a workspace whose run is in flight, stay."""
    deleted: dict[str, list] = {"runs": [], "models": [], "id_maps": [], "dvc_workspaces": [],
                                "dvc_remote": []}
    skipped: list[dict] = []
    for entry in plan.get("runs", []):
        ds = entry["ds"]
        why = "the latest pointer names it" if ds == _latest_ds() else _lease_reason(ds)
        if why:
            skipped.append({"kind": "runs", "item": ds, "why": why})
            continue
        storage.delete(entry["objects"])
        deleted["runs"].append(ds)

    keep_models = int((plan.get("retention") or {}).get("keep_models", 1))
    kept = _kept_models(keep_models, _manifests()) if plan.get("models") else {}
    for entry in plan.get("models", []):
        version = entry["model_version"]
        vds = _version_ds(version)
        why = kept.get(version) or (_lease_reason(vds) if vds else None)
        if why:
            skipped.append({"kind": "models", "item": version, "why": why})
            continue
        meta = [u for u in entry["objects"] if u.endswith("/meta.json")]
        storage.delete(meta)  # unregistered first (meta.json means complete), then the rest
        storage.delete([u for u in entry["objects"] if u not in meta])
        deleted["models"].append(version)

    for entry in plan.get("id_maps", []):
        storage.delete([entry["uri"]])
        deleted["id_maps"].append(entry["uri"])

    for entry in plan.get("dvc_workspaces", []):
        why = _lease_reason(entry["ds"])
        if why:
            skipped.append({"kind": "dvc_workspaces", "item": entry["path"], "why": why})
            continue
        shutil.rmtree(entry["path"], ignore_errors=True)
        deleted["dvc_workspaces"].append(entry["path"])

    remote = plan.get("dvc_remote") or {}
    if remote.get("objects"):
        try:
            deleted["dvc_remote"] = _dvc_gc(sorted(remote["kept_data_versions"]),
                                            set(remote["objects"]))
        except RuntimeError as e:
            skipped.append({"kind": "dvc_remote", "item": layout.dvc_remote_uri(), "why": str(e)})
    counts = {k: len(v) for k, v in deleted.items()}
    audit = _audit("gc", {"deleted": deleted, "counts": counts, "skipped": skipped,
                          "plan_generated_at": plan.get("generated_at"),
                          "retention": plan.get("retention")}, operator)
    log.info("gc deleted %s; skipped %d; audit %s", counts, len(skipped), audit)
    return {"deleted": deleted, "counts": counts, "skipped": skipped, "audit": audit}


def dvc_project(ws: Path) -> Path:
    """A no-SCM DVC project in ``ws`` whose default remote is the bucket's dvcstore: what
    ``versioning.prepare_remote`` makes, with the config written at once (one ``dvc`` process
    instead of four, each about a second or more)."""
    from nightrec.tasks import versioning

    ws.mkdir(parents=True, exist_ok=True)
    versioning._dvc(ws, "init", "--no-scm", "-q")
    lines = ["[core]", "    no_scm = True", "    analytics = false", "    remote = store",
             "['remote \"store\"']", f"    url = {layout.dvc_remote_uri()}"]
    if settings.s3_endpoint_url():
        lines.append(f"    endpointurl = {settings.s3_endpoint_url()}")
    (ws / ".dvc" / "config").write_text("\n".join(lines) + "\n")
    return ws


def _dvc_gc(kept_versions: list[str], planned: set[str]) -> list[str]:
    """``dvc gc --workspace --cloud`` keeping exactly ``kept_versions`` (a throwaway no-SCM
    project with one ``.dvc`` file per version; DVC fetches each ``.dir`` listing itself). Runs
    only when no run is in flight (a run pushes its split before its meta names it) and when
    DVC's own ``--dry`` run removes exactly ``planned``. Returns the deleted URIs."""
    from nightrec.tasks import versioning

    busy = _any_live_lease()
    if busy:
        raise RuntimeError(f"not pruned while a run is in flight ({busy}); run gc again later")
    bucket = storage.split_uri(layout.dvc_remote_uri())[0]
    with tempfile.TemporaryDirectory(prefix="nightrec-gc-") as tmp:
        ws = Path(tmp)
        dvc_project(ws)
        for v in kept_versions:
            (ws / f"v{v}.dvc").write_text(json.dumps(
                {"outs": [{"md5": f"{v}.dir", "hash": "md5", "path": f"v{v}"}]}))
        args = ("gc", "--workspace", "--cloud", "--force")
        would = {f"s3://{k}" for k in _REMOVING.findall(versioning._dvc(ws, *args, "--dry"))}
        would = {u for u in would if u.startswith(f"s3://{bucket}/")}
        if would != planned:
            raise RuntimeError(
                f"the remote changed since the plan (DVC would remove {len(would)} objects, the "
                f"plan lists {len(planned)}); nothing was removed from it; plan again")
        versioning._dvc(ws, *args)
    return sorted(planned)


# --- forget -------------------------------------------------------------------------------------


def add_forgotten(user_hash: str, *, owner: str) -> bool:
    """Add ``user_hash`` to the suppression list; False when it was there already.

    Under a short create-if-absent lock, and the write itself conditional on the version read
    (If-Match, or create-if-absent for the first), so two writers never lose one's hash.
    """
    def busy(held: dict) -> RuntimeError:
        return RuntimeError(f"the forgotten-users list is locked by {held.get('owner')}")

    with locks.short_lock(layout.forgotten_users_lock_uri(), owner=owner, ttl_s=FORGET_LOCK_TTL_S, busy=busy):
        target = layout.forgotten_users_uri()
        found = storage.read_versioned(target)
        table = (storage.parquet_frame(found[0]) if found else
                 pd.DataFrame({"user_sha256": pd.Series([], dtype=object),
                               "added_at": pd.Series([], dtype=object)}))
        if user_hash in set(table["user_sha256"].astype(str)):
            return False
        table = pd.concat([table, pd.DataFrame({"user_sha256": [user_hash],
                                                "added_at": [_iso(_now())]})],
                          ignore_index=True)
        data = storage.parquet_bytes(table)
        if found:
            storage.write_bytes(target, data, if_match=found[1])
        else:
            storage.write_bytes(target, data, if_none_match=True)
        return True


def _matches(values: pd.Series, user_id: str) -> np.ndarray:
    return (values.astype("string").str.strip() == user_id).fillna(False).to_numpy(bool)


def _blank(df: pd.DataFrame, mask: np.ndarray, user_id: str) -> pd.DataFrame:
    """The index-table rows of ``mask``: a tombstone id, every feature blank (NaN, 0, None)."""
    df = df.copy()
    df.loc[mask, schema.USER_ID] = tombstone(user_id)
    for col in df.columns:
        if col in _KEEP_COLUMNS:
            continue
        kind = df[col].dtype.kind
        if kind == "f":
            df.loc[mask, col] = np.nan
        elif kind in "iu":
            df.loc[mask, col] = 0
        elif kind == "b":
            df.loc[mask, col] = False
        else:
            df[col] = df[col].astype(object)
            df.loc[mask, col] = None
    return df


def _parquet_with_user(uri: str, user_id: str):
    """``(frame, mask of the user's rows, etag)`` of a Parquet object with a user_id column that
    holds ``user_id``; None otherwise."""
    import pyarrow.parquet as pq

    found = storage.read_versioned(uri)
    if found is None:
        return None
    data, etag = found
    try:
        names = pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
    except Exception:  # noqa: BLE001 - not a Parquet file after all: nothing of ours
        return None
    if schema.USER_ID not in names:
        return None
    ids = storage.parquet_table(data, [schema.USER_ID]).column(0).to_pandas()
    mask = _matches(ids, user_id)
    if not mask.any():
        return None
    return storage.parquet_frame(data), mask, etag


def _run_tables(user_id: str) -> list[dict]:
    """Every per-run Parquet table (``runs/ds=*/``) holding the user, with the action."""
    out = []
    for ds, prefix in sorted(_ds_folders("runs").items()):
        for uri in storage.list_uris(prefix):
            if not uri.endswith(".parquet"):
                continue
            hit = _parquet_with_user(uri, user_id)
            if hit is None:
                continue
            rel = uri[len(prefix):]
            action = "tombstone" if rel in INDEX_TABLES else "drop_rows"
            entry = {"ds": ds, "uri": uri, "rows": int(hit[1].sum()), "action": action}
            if rel == RUN_INDEX:
                entry["user_idx"] = hit[0].loc[hit[1], schema.USER_IDX].astype(int).tolist()
            out.append(entry)
    return out


def _zero_user_rows(uri: str, user_idx: list[int]) -> bool:
    """Zero rows ``user_idx`` of a factor model's ``user`` matrix in an ``embeddings.npz``
    (an item-item model has no user rows: its user vectors are built from the seen set)."""
    found = storage.read_versioned(uri)
    if found is None:
        return False
    emb = dict(np.load(io.BytesIO(found[0])))
    idx = [i for i in user_idx if "user" in emb and i < len(emb["user"])]
    if not idx or not np.any(emb["user"][idx]):
        return False
    emb["user"] = emb["user"].copy()
    emb["user"][idx] = 0.0
    buf = io.BytesIO()
    np.savez(buf, **emb)
    storage.write_bytes(uri, buf.getvalue(), if_match=found[1])
    return True


def _run_embeddings(run_tables: list[dict]) -> list[dict]:
    """The per-run training outputs (``runs/ds=D/train/*/embeddings.npz``) of each run whose
    index held the user, with the user's index in that run."""
    out = []
    for entry in run_tables:
        if entry.get("user_idx"):
            prefix = layout.run_uri(entry["ds"], "train")
            out += [{"uri": u, "user_idx": entry["user_idx"]} for u in storage.list_uris(prefix)
                    if u.endswith("/embeddings.npz")]
    return out


def _model_tables(user_id: str) -> list[dict]:
    out = []
    for version in registry.list_models():
        uri = layout.model_file_uri(registry.check_version(version), "users.parquet")
        hit = _parquet_with_user(uri, user_id)
        if hit is not None:
            idx = hit[0].loc[hit[1], schema.USER_IDX].astype(int).tolist()
            out.append({"model_version": version, "uri": uri, "user_idx": idx})
    return out


def _id_maps(user_id: str) -> list[dict]:
    out = []
    for uri in storage.list_uris(layout.legacy_id_map_prefix("users")):
        if uri.endswith(".parquet") and _parquet_with_user(uri, user_id) is not None:
            out.append({"uri": uri})
    return out


def _published(user_id: str) -> list[dict]:
    """Published tables holding the user: ``[{ds, parts: [key...]}]``, from each manifest's
    per-part user range, confirmed by reading the part."""
    out = []
    for ds, m in sorted(_manifests().items()):
        keys = []
        for part in m["parts"]:
            lo, hi = part.get("min_user_id"), part.get("max_user_id")
            if part.get("rows") and lo is not None and not lo <= user_id <= hi:
                continue
            if _parquet_with_user(layout.listed_part_uri(part["key"]), user_id) is not None:
                keys.append(part["key"])
        if keys:
            out.append({"ds": ds, "parts": keys})
    return out


def _rewrite_published(ds: str, user_id: str, *, owner: str, ttl_s: float,
                       row_group_size: int) -> dict:
    """Rewrite the parts of ds's table that hold the user, under the ds's publish claim: new part
    keys, a new manifest (conditional on the one read), the latest pointer's publish_id when it
    names ds; the replaced parts are deleted at once (erasure does not wait for readers: a reader
    holding the old manifest gets TableChanged and reopens). No other part moves."""
    from nightrec.tasks import score

    claim = publish.claim_ds(ds, owner=owner, ttl_s=ttl_s)
    written: list[str] = []
    try:
        found = storage.read_versioned(layout.manifest_uri(ds))
        if found is None:
            return {"ds": ds, "rewritten": []}
        manifest, etag = json.loads(found[0]), found[1]
        new_parts, replaced, fresh = [], [], {}
        for part in manifest["parts"]:
            uri = layout.listed_part_uri(part["key"])
            hit = _parquet_with_user(uri, user_id) if (
                not part.get("rows") or part.get("min_user_id") is None
                or part["min_user_id"] <= user_id <= part["max_user_id"]) else None
            if hit is None:
                new_parts.append(part)
                continue
            frame = hit[0].loc[~hit[1]].reset_index(drop=True)
            replaced.append(uri)
            if frame.empty:
                continue  # the part held only this user: the table simply loses it
            fresh[len(new_parts)] = score.part_bytes(frame, row_group_size=row_group_size)
            new_parts.append(None)
        if not replaced:
            return {"ds": ds, "rewritten": []}
        pid = publish.publish_id([p["sha256"] if p else storage.sha256(fresh[i])
                                  for i, p in enumerate(new_parts)])
        for i, data in fresh.items():
            uri = layout.part_uri(ds, pid, i)
            part_etag = storage.write_bytes(uri, data)
            written.append(uri)
            desc = publish.describe_part(data, storage.parquet_table(data))
            new_parts[i] = {"key": storage.split_uri(uri)[1], "etag": part_etag, **desc}
        new_manifest = {
            **manifest, "parts": new_parts, "publish_id": pid,
            "rows": sum(p["rows"] for p in new_parts),
            "users": sum(p["users"] for p in new_parts),
            "rewritten": {"by": "forget", "at": _iso(_now()),
                          "previous_publish_id": manifest.get("publish_id")},
        }
        new_etag = publish.commit_manifest(ds, new_manifest, expected={"etag": etag})
        written = []
        if _latest_ds() == ds:
            publish.move_latest(
                ds, contract.pointer_record(ds=ds, manifest_uri=layout.manifest_uri(ds),
                                            publish_id=pid,
                                            model_version=new_manifest["model_version"],
                                            updated_at=_iso(_now())),
                manifest_etag=new_etag, owner=owner)
        publish.delete_under_claim(claim, sorted(replaced), what="parts holding a forgotten user")
        return {"ds": ds, "rewritten": sorted(replaced), "publish_id": pid}
    finally:
        if written:  # a failed rewrite: its unlisted parts are nobody's
            publish.delete_under_claim(claim, written, what="parts of a failed rewrite")
        publish.release_claim(claim)


def _rewrite_table(entry: dict, user_id: str) -> bool:
    hit = _parquet_with_user(entry["uri"], user_id)
    if hit is None:
        return False
    frame, mask, etag = hit
    if entry["action"] == "tombstone":
        frame = _blank(frame, mask, user_id)
    else:
        frame = frame.loc[~mask].reset_index(drop=True)
    storage.write_bytes(entry["uri"], storage.parquet_bytes(frame), if_match=etag)
    return True


def _scrub_model(entry: dict, user_id: str) -> None:
    """A tombstone (and blank side features) at the user's row of the model's users.parquet, and
    zeros in its rows of the factor embeddings (the shipped, selection and gated fits)."""
    prefix = entry["uri"].rsplit("/", 1)[0] + "/"
    hit = _parquet_with_user(entry["uri"], user_id)
    if hit is not None:
        frame, mask, etag = hit
        storage.write_bytes(entry["uri"], storage.parquet_bytes(_blank(frame, mask, user_id)),
                            if_match=etag)
    for name in ("embeddings.npz", "holdout_embeddings.npz", "gated_embeddings.npz"):
        _zero_user_rows(prefix + name, entry["user_idx"])


def _scrub_id_map(uri: str, user_id: str) -> None:
    hit = _parquet_with_user(uri, user_id)
    if hit is None:
        return
    frame, mask, etag = hit
    frame = frame.copy()
    frame.loc[mask, schema.USER_ID] = tombstone(user_id)
    storage.write_bytes(uri, storage.parquet_bytes(frame), if_match=etag)


def _find(uid: str) -> dict:
    run_tables = _run_tables(uid)
    return {
        "published": _published(uid),
        "run_tables": run_tables,
        "run_embeddings": _run_embeddings(run_tables),
        "models": _model_tables(uid),
        "id_maps": _id_maps(uid),
    }


def forget_user(user_id: str, *, apply: bool, params: dict | None = None,
                operator: str | None = None) -> dict:
    """Erase one user (``nightrec forget --user ID``): what it finds, and with ``apply`` what it
    did. The id never leaves this process: the result and the audit record name its sha256.

    With ``apply``: the hash joins the suppression list first (every later run drops the user),
    then, unless a run is in flight (it may be writing the user's data: RuntimeError, run forget
    again after it), every retained table holding the user is found and rewritten.
    """
    uid = str(user_id).strip()
    if not uid:
        raise ValueError("forget needs a non-empty user id")
    p = settings.step_params(PARAMS, params)
    h = clean.user_hash(uid)
    out = {"user_sha256": h, "tombstone": tombstone(uid), "applied": False,
           "in_suppression_list": h in clean.forgotten_users()}
    if not apply:
        return {**out, "found": _find(uid)}
    owner = f"forget-{uuid.uuid4().hex[:12]}"
    out["added_to_suppression_list"] = add_forgotten(h, owner=owner)
    busy = _any_live_lease()
    if busy:
        raise RuntimeError(f"a run is in flight ({busy}): it may write this user's data now. The "
                           "user is on the suppression list; run forget again after that run")
    found = out["found"] = _find(uid)
    done: dict[str, list] = {k: [] for k in found}
    for entry in found["published"]:
        done["published"].append(_rewrite_published(
            entry["ds"], uid, owner=owner, ttl_s=float(p["publish.claim_ttl_s"]),
            row_group_size=int(p["publish.row_group_size"])))
    for entry in found["run_tables"]:
        if _rewrite_table(entry, uid):
            done["run_tables"].append({k: entry[k] for k in ("uri", "action", "rows")})
    for entry in found["run_embeddings"]:
        if _zero_user_rows(entry["uri"], entry["user_idx"]):
            done["run_embeddings"].append(entry["uri"])
    for entry in found["models"]:
        _scrub_model(entry, uid)
        done["models"].append(entry["model_version"])
    for entry in found["id_maps"]:
        _scrub_id_map(entry["uri"], uid)
        done["id_maps"].append(entry["uri"])
    out.update(applied=True, done=done)
    out["audit"] = _audit("forget", {"user_sha256": h, "done": done}, operator)
    return out


# --- the CLI ------------------------------------------------------------------------------------


def _print_plan(pl: dict) -> None:
    print(f"retention {pl['retention']}")
    print(f"newest ds {pl['newest_ds']}, runs before {pl['cutoff_ds']} pruned; latest pointer "
          f"ds {pl['latest_ds']}")
    print(f"runs ({len(pl['runs'])} ds):")
    for e in pl["runs"]:
        print(f"  ds={e['ds']}  {len(e['objects'])} objects")
    print(f"models ({len(pl['models'])}):")
    for e in pl["models"]:
        print(f"  {e['model_version']}  {len(e['objects'])} objects")
    print(f"legacy id-map objects ({len(pl['id_maps'])}):")
    for e in pl["id_maps"]:
        print(f"  {e['uri']}")
    print(f"local DVC workspaces ({len(pl['dvc_workspaces'])}):")
    for e in pl["dvc_workspaces"]:
        print(f"  {e['path']}  {e['age_days']} days old")
    rem = pl["dvc_remote"]
    print(f"DVC-remote objects ({len(rem['objects'])}; kept data_versions "
          f"{len(rem['kept_data_versions'])}, missing on the remote {len(rem['missing'])})")
    for u in rem["objects"]:
        print(f"  {u}")
    for label, kind in (("ds", "ds"), ("model", "models")):
        for item, why in sorted(pl["kept"][kind].items()):
            print(f"kept {label} {item}: {why}")


def cli_main(argv: list[str]) -> int:
    """``nightrec gc [--apply]`` and ``nightrec forget --user ID [--apply]``; 0 done, 1 refused
    or failed, 2 bad usage (argparse)."""
    parser = argparse.ArgumentParser(prog="nightrec", description="retention and erasure")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gc", help="prune old runs, models, id-map generations, DVC data")
    g.add_argument("--apply", action="store_true", help="delete (default: list only)")
    f = sub.add_parser("forget", help="erase one user from future runs and retained data")
    f.add_argument("--user", required=True, help="the external user id")
    f.add_argument("--apply", action="store_true", help="erase (default: list only)")
    args = parser.parse_args(argv)
    if args.command == "gc":
        pl = plan()
        _print_plan(pl)
        if not args.apply:
            print("dry run: nothing deleted; `nightrec gc --apply` deletes the above")
            return 0
        res = apply(pl)
        print(f"deleted {res['counts']}; audit {res['audit']}")
        for s in res["skipped"]:
            print(f"skipped {s['kind']} {s['item']}: {s['why']}")
        return 0
    try:
        res = forget_user(args.user, apply=args.apply)
    except RuntimeError as e:
        print(f"forget refused: {e}")
        return 1
    found = res["found"]
    print(f"user sha256 {res['user_sha256']} (tombstone {res['tombstone']}); on the "
          f"suppression list: {res['in_suppression_list']}")
    for e in found["published"]:
        print(f"  published ds={e['ds']}: {len(e['parts'])} part(s) to rewrite")
    for e in found["run_tables"]:
        print(f"  {e['uri']}: {e['rows']} row(s), {e['action'].replace('_', ' ')}")
    for e in found["run_embeddings"]:
        print(f"  {e['uri']}: zero the user's factor row")
    for e in found["models"]:
        print(f"  model {e['model_version']}: tombstone, zero its embedding rows")
    for e in found["id_maps"]:
        print(f"  {e['uri']}: id -> tombstone (stable index kept)")
    if not args.apply:
        print("dry run: nothing changed; `nightrec forget --user ID --apply` erases the above")
    else:
        print(f"erased; audit {res['audit']}")
    return 0
