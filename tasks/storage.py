"""Object-store plumbing: one boto3 client, URIs, and reads/writes of bytes, JSON and Parquet.

A URI is either ``s3://bucket/key`` or a local path, so every step's ``run()`` works the same
under Airflow (S3) and under ``dvc repro`` (local files). A single S3 PUT is atomic: readers see
the whole object or none of it; multi-object atomicity is the publisher's job (tasks/publish.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks import settings


@lru_cache(maxsize=4)
def _client(endpoint: str | None, credential_fingerprint: str):
    import boto3
    from botocore.config import Config

    cfg = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
    )
    # Credentials are not passed: boto3's own chain reads AWS_* / profiles / instance roles. A
    # fresh Session, because the default one caches the credentials it resolved first.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def s3_client():
    """A boto3 S3 client for ``S3_ENDPOINT_URL`` (or AWS when unset)."""
    creds = f"{os.environ.get('AWS_ACCESS_KEY_ID')}:{os.environ.get('AWS_SECRET_ACCESS_KEY')}"
    return _client(settings.s3_endpoint_url(), sha256(creds.encode()))


def s3_uri(key: str, bucket: str | None = None) -> str:
    return f"s3://{bucket or settings.bucket()}/{key.lstrip('/')}"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/k`` -> (b, k). Raises ValueError for anything else."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise ValueError(f"s3 URI needs a bucket and a key: {uri!r}")
    return bucket, key


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        b, k = split_uri(uri)
        return s3_client().get_object(Bucket=b, Key=k)["Body"].read()
    return Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
    """Write ``data`` whole. Local writes go through a temp file and a rename, like S3's PUT."""
    if is_s3(uri):
        b, k = split_uri(uri)
        s3_client().put_object(Bucket=b, Key=k, Body=data, ContentType=content_type)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        b, k = split_uri(uri)
        try:
            s3_client().head_object(Bucket=b, Key=k)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def list_uris(prefix_uri: str) -> list[str]:
    """Every object under a prefix (S3) or every file under a folder (local), sorted."""
    if is_s3(prefix_uri):
        b, k = split_uri(prefix_uri.rstrip("/") + "/")
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=k)
        return sorted(f"s3://{b}/{o['Key']}" for p in pages for o in p.get("Contents", []))
    root = Path(prefix_uri)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def delete(uris: list[str]) -> None:
    s3 = [u for u in uris if is_s3(u)]
    for u in uris:
        if not is_s3(u):
            Path(u).unlink(missing_ok=True)
    by_bucket: dict[str, list[str]] = {}
    for u in s3:
        b, k = split_uri(u)
        by_bucket.setdefault(b, []).append(k)
    for b, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            objs = [{"Key": k} for k in keys[i : i + 1000]]
            s3_client().delete_objects(Bucket=b, Delete={"Objects": objs, "Quiet": True})


def copy(src: str, dst: str) -> None:
    """Server-side copy within S3, or a plain copy for local paths."""
    if is_s3(src) and is_s3(dst):
        sb, sk = split_uri(src)
        db, dk = split_uri(dst)
        s3_client().copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk})
    else:
        write_bytes(dst, read_bytes(src))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    write_bytes(uri, data, content_type="application/json")


def read_parquet(uri: str, columns: list[str] | None = None):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(uri)), columns=columns)


def parquet_bytes(df, *, row_group_size: int | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    return buf.getvalue()


def write_parquet(df, uri: str, *, row_group_size: int | None = None) -> None:
    write_bytes(uri, parquet_bytes(df, row_group_size=row_group_size))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_to(uri: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        b, k = split_uri(uri)
        s3_client().download_file(b, k, str(path))
    else:
        path.write_bytes(Path(uri).read_bytes())
    return path


def upload_from(path: Path, uri: str) -> None:
    if is_s3(uri):
        b, k = split_uri(uri)
        s3_client().upload_file(str(path), b, k)
    else:
        write_bytes(uri, path.read_bytes())
