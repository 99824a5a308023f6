"""The object-store layout: every key nightrec reads or writes is built here, from a checked ds.

```
raw/interactions/ds=<ds>/<files>         input snapshot (CSV/TSV/u.data/Parquet, optionally .gz)
raw/items/ds=<ds>/<file>                 optional item catalogue
raw/users/ds=<ds>/<file>                 optional user attributes
runs/ds=<ds>/<step>/...                  each step's outputs for that ds (replaced on rerun)
reports/ds=<ds>/...                      run report, GE results and Data Docs, TensorBoard, tuning
alerts/ds=<ds>/<run>.<kind>.json         failure and stale-table alerts
models/<version>/...                     the registry (immutable); models/_champion.json + .lock
runs/ds=<ds>/_run_lock.json              the lease of the one run writing that ds (nightrec/store/locks.py)
dvcstore/                                the DVC remote (content-addressed)
staging/recommendations/ds=<ds>/<run>/shard-NNNNN/   one score shard's parts (not for readers)
recommendations/ds=<ds>/part-*.parquet   the published table, described by _manifest.json
recommendations/ds=<ds>/_publishing.json a publisher's claim on that ds while it writes
recommendations/_latest.json             pointer to the newest published manifest
recommendations/_latest.lock             held while a publisher moves that pointer
state/id_map/...                         legacy (earlier versions' id map): gc deletes it
state/forgotten/users.parquet            sha256 of user ids erased on request (`nightrec forget`)
state/forgotten/users.lock               held while a hash is added to that list
recommendations/ds=<ds>/_retired.json    parts a republish replaced, deleted after the grace period
audit/<kind>/<stamp>-<id>.json           operator actions (unlock, forget, gc) and who did them
```
"""

from __future__ import annotations

import re

from nightrec.core import settings
from nightrec.store import storage
from nightrec.table import contract

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_token(value: str, what: str = "value") -> str:
    """Return ``value`` if it can be one path segment of a key (no '/', '..', spaces, unicode)."""
    if not isinstance(value, str) or not _SAFE_TOKEN.fullmatch(value) or ".." in value:
        raise ValueError(f"{what} must match {_SAFE_TOKEN.pattern} without '..', got {value!r}")
    return value


def _name(value: str) -> str:
    """One file or folder name under a layout prefix: a safe token, or ``_`` + one (markers)."""
    safe_token(value[1:] if isinstance(value, str) and value.startswith("_") else value, "name")
    return value


def sanitize_token(value: str, max_len: int = 100) -> str:
    """Turn any id (an Airflow run id, a task id) into one safe key segment."""
    token = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._-]", "_", value))[:max_len]
    return token if token[:1].isalnum() else f"x{token}"[:max_len]


def raw_prefix(ds: str, table: str = "interactions") -> str:
    if table not in ("interactions", "items", "users"):
        raise ValueError(f"unknown raw table {table!r}")
    return storage.s3_uri(f"raw/{table}/ds={settings.check_ds(ds)}/")


def runs_root() -> str:
    """``runs/``: every ds's step outputs (listed by the report, status and retention)."""
    return storage.s3_uri("runs/")


def run_uri(ds: str, step: str, *names: str) -> str:
    """``runs/ds=<ds>/<step>/<name>/...``: a step's own output (a folder when no name)."""
    key = f"runs/ds={settings.check_ds(ds)}/{safe_token(step, 'step')}/"
    return storage.s3_uri(key + "/".join(_name(n) for n in names))


def bucket_name(bucket: int) -> str:
    """``bucket=NNN``: one user-hash bucket's folder name (Hive-style, zero-padded)."""
    if not isinstance(bucket, int) or not 0 <= bucket < 1000:
        raise ValueError(f"bucket must be an int in 0..999, got {bucket!r}")
    return f"bucket={bucket:03d}"


def bucket_uri(ds: str, step: str, table: str, bucket: int, name: str = "part-0.parquet") -> str:
    """``runs/ds=<ds>/<step>/<table>/bucket=NNN/<name>``: one user-hash bucket of a step's
    bucketed table (clean's interactions, the split's parts)."""
    return run_uri(ds, step, table) + f"/{bucket_name(bucket)}/{_name(name)}"


def bucketed_prefix(ds: str, step: str, table: str) -> str:
    """The folder of a bucketed table, ``/`` included: what a reader lists."""
    return run_uri(ds, step, table) + "/"


def ds_of_run_key(uri: str) -> str | None:
    """``s3://b/runs/ds=2026-11-28/evaluate/x`` -> ``2026-11-28``; None outside ``runs/``."""
    root = runs_root()
    if not uri.startswith(root):
        return None
    return ds_of_prefix(root + uri[len(root):].split("/", 1)[0])


def run_lock_uri(ds: str) -> str:
    """The per-ds run lease (nightrec/store/locks.py): which run may write that ds's partitions now."""
    return storage.s3_uri(f"runs/ds={settings.check_ds(ds)}/_run_lock.json")


def dvc_remote_uri() -> str:
    return storage.s3_uri("dvcstore")


def dvc_files_root() -> str:
    """Where DVC 3 keeps content-addressed objects in the remote: ``files/md5/``."""
    return dvc_remote_uri() + "/files/md5/"


def dvc_dir_object_uri(md5: str) -> str:
    """The DVC object listing a directory's files, for the directory hash ``md5``."""
    return dvc_object_uri(f"{md5}.dir")


def dvc_object_uri(md5: str) -> str:
    """One DVC object (``<md5>`` of a file, or ``<md5>.dir`` of a directory listing)."""
    if not re.fullmatch(r"[0-9a-f]{32}(\.dir)?", md5 or ""):
        raise ValueError(f"not a DVC md5: {md5!r}")
    return dvc_files_root() + f"{md5[:2]}/{md5[2:]}"


def reports_prefix(ds: str) -> str:
    """``reports/ds=<ds>/``: what a person reads about a run (HTML, Data Docs, TensorBoard)."""
    return storage.s3_uri(f"reports/ds={settings.check_ds(ds)}/")


def report_uri(ds: str, *names: str) -> str:
    """A file or folder under the run's reports: ``report.html``, ``validations/<suite>.json``,
    ``data_docs/``, ``tensorboard/``, ``tune/best_params.json``."""
    return reports_prefix(ds) + "/".join(_name(n) for n in names)


def report_folder(ds: str, name: str) -> str:
    """A folder of files under the run's reports (``data_docs/``, ``validations/``,
    ``tensorboard/``): its prefix, ``/`` included, for uploading a tree under it."""
    return report_uri(ds, name) + "/"


def alert_uri(ds: str, run_id: str, kind: str) -> str:
    """One alert record: ``alerts/ds=<ds>/<run>.<kind>.json`` (any run id, sanitised)."""
    return storage.s3_uri(f"alerts/ds={settings.check_ds(ds)}/{sanitize_token(run_id)}."
                          f"{sanitize_token(kind)}.json")


# Top-level folders partitioned by ds that retention ages out (name -> its root URI).
def ds_partitioned_roots() -> dict[str, str]:
    return {"runs": runs_root(), "reports": storage.s3_uri("reports/"),
            "alerts": storage.s3_uri("alerts/"), "staging/recommendations": staging_root(),
            "recommendations": recs_root()}


def models_root() -> str:
    """``models/``: the registry (one immutable folder per version, and the champion pointer)."""
    return storage.s3_uri("models/")


def model_prefix(version: str) -> str:
    return models_root() + f"{safe_token(version, 'model_version')}/"


def model_file_uri(version: str, name: str) -> str:
    """A registered model's file: ``meta.json``, ``embeddings.npz``, ``_registered.json``..."""
    return model_prefix(version) + _name(name)


def champion_uri() -> str:
    return models_root() + "_champion.json"


def champion_lock_uri() -> str:
    return models_root() + "_champion.lock"


def staging_prefix(ds: str, run_key: str) -> str:
    key = f"staging/recommendations/ds={settings.check_ds(ds)}/{safe_token(run_key, 'run key')}/"
    return storage.s3_uri(key)


def staging_ds_prefix(ds: str) -> str:
    """Every run's staging for one ds (retention removes it with the partition)."""
    return storage.s3_uri(f"staging/recommendations/ds={settings.check_ds(ds)}/")


def shard_part_uri(ds: str, run_key: str, shard: int, n: int) -> str:
    """The ``n``-th Parquet part a score shard stages."""
    return shard_prefix(ds, run_key, shard) + f"part-{n:05d}.parquet"


def shard_prefix(ds: str, run_key: str, shard: int) -> str:
    """One score shard's own staging folder: a retried shard replaces only this."""
    if not isinstance(shard, int) or not 0 <= shard < 100_000:
        raise ValueError(f"shard must be an int in 0..99999, got {shard!r}")
    return staging_prefix(ds, run_key) + f"shard-{shard:05d}/"


def listed_part_uri(key: str) -> str:
    """The URI of a part a manifest lists (its ``key``, relative to the bucket), checked to be a
    Parquet part of a published table: a manifest cannot point a reader or gc elsewhere."""
    folder, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", "")
    ds = contract.ds_of_key(folder)
    if not (ds and folder + "/" == contract.ds_prefix_key(ds)
            and re.fullmatch(r"[\w-][\w.-]*\.parquet", name)):
        raise ValueError(f"not a published part's key: {key!r}")
    return storage.s3_uri(key)


def staging_root() -> str:
    """``staging/recommendations/``: every ds's staged score shards (retention ages them)."""
    return storage.s3_uri("staging/recommendations/")


# The published table's keys are the table contract's (nightrec/table/contract.py, which readers
# use without this module); these put them in the bucket.


def recs_root() -> str:
    return storage.s3_uri(contract.TABLE_ROOT)


def ds_of_prefix(uri: str) -> str | None:
    """``.../ds=2026-11-28/`` -> ``2026-11-28``; None for anything that is not a ds folder."""
    return contract.ds_of_key(uri)


def recs_prefix(ds: str) -> str:
    return storage.s3_uri(contract.ds_prefix_key(ds))


def manifest_uri(ds: str) -> str:
    return storage.s3_uri(contract.manifest_key(ds))


def claim_uri(ds: str) -> str:
    return storage.s3_uri(contract.claim_key(ds))


def part_uri(ds: str, publish_id: str, n: int) -> str:
    """Part ``n`` of the table ``publish_id`` of ``ds`` (content-addressed, never rewritten)."""
    return storage.s3_uri(contract.part_key(ds, publish_id, n))


def latest_uri() -> str:
    return storage.s3_uri(contract.latest_key())


def latest_lock_uri() -> str:
    """Held by a publisher while it reads and replaces the latest pointer (tasks/publish.py)."""
    return storage.s3_uri(contract.latest_lock_key())


def legacy_id_map_prefix(kind: str | None = None) -> str:
    """``state/id_map/[<kind>/]``: the cross-run id map of earlier versions. Nothing writes or
    reads it now; ``nightrec gc`` deletes it and ``nightrec forget`` still scrubs a user from it."""
    if kind not in (None, "users", "items"):
        raise ValueError(f"unknown id map {kind!r}")
    return storage.s3_uri("state/id_map/" + (f"{kind}/" if kind else ""))


def forgotten_users_uri() -> str:
    """The suppression list of ``nightrec forget``: sha256 of each erased user id (never the id)."""
    return storage.s3_uri("state/forgotten/users.parquet")


def forgotten_users_lock_uri() -> str:
    """Held while ``nightrec forget`` adds a hash to the suppression list."""
    return storage.s3_uri("state/forgotten/users.lock")


def retired_parts_uri(ds: str) -> str:
    """Parts of ``ds`` that a republish replaced, with the time after which they may go."""
    return storage.s3_uri(contract.retired_key(ds))


def audit_uri(kind: str, stamp: str, token: str) -> str:
    """One operator action's record (``kind``: unlock, forget, gc)."""
    if kind not in ("unlock", "forget", "gc"):
        raise ValueError(f"unknown audit kind {kind!r}")
    return storage.s3_uri(f"audit/{kind}/{safe_token(stamp, 'stamp')}-{safe_token(token, 'token')}.json")
