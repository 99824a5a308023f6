"""Object access for the reader: the one boto3 client setup, and the few reads a reader makes.

The store comes from the environment, as everywhere in nightrec:

- ``S3_ENDPOINT_URL``: the S3 endpoint; unset means AWS itself, as boto3 does.
- ``NIGHTREC_BUCKET``: the bucket (default ``nightrec``).
- credentials and region: boto3's own chain (``AWS_*`` variables, profiles, instance roles).

``nightrec.store.storage`` (the pipeline's object plumbing) builds its client here too, so there
is one client setup; ``nightrec.core.settings.bucket()`` and ``s3_endpoint_url()`` are these.
boto3 is imported on first use only: importing this module (as settings does) costs nothing.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

DEFAULT_BUCKET = "nightrec"
LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class PreconditionFailed(RuntimeError):
    """A conditional request lost: the object is not (or no longer) the version the caller saw."""


def bucket() -> str:
    return os.environ.get("NIGHTREC_BUCKET", DEFAULT_BUCKET)


def endpoint_url() -> str | None:
    """The S3 endpoint, or None to let boto3 talk to AWS."""
    return os.environ.get("S3_ENDPOINT_URL") or None


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
    """A boto3 S3 client for ``S3_ENDPOINT_URL`` (or AWS when unset). One per endpoint and
    credential pair in the environment (a changed key gets a new client; the key itself is only
    hashed into the cache key)."""
    creds = f"{os.environ.get('AWS_ACCESS_KEY_ID')}:{os.environ.get('AWS_SECRET_ACCESS_KEY')}"
    return _client(endpoint_url(), hashlib.sha256(creds.encode()).hexdigest())


def error_code(e: BaseException) -> str:
    """The S3 error code of a botocore ClientError ("" for anything else)."""
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def is_missing(e: BaseException) -> bool:
    """Whether ``e`` says the object (or key) is not there."""
    return error_code(e) in MISSING_CODES


def is_lost_race(e: BaseException) -> bool:
    """Whether ``e`` says a conditional request's condition did not hold."""
    return error_code(e) in LOST_RACE_CODES


def get(bucket: str, key: str) -> bytes:
    """The whole object (botocore's ClientError when it is not there)."""
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def get_versioned(bucket: str, key: str) -> tuple[bytes, str] | None:
    """``(data, etag)`` of an object, or None when there is none (for a later ``if_match``)."""
    from botocore.exceptions import ClientError

    try:
        obj = s3_client().get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if is_missing(e):
            return None
        raise
    return obj["Body"].read(), obj["ETag"]


def get_range(bucket: str, key: str, start: int, length: int, *,
              if_match: str | None = None) -> bytes:
    """``length`` bytes of an object from ``start``; ``start < 0`` means the last ``length``.

    ``if_match``: fail with PreconditionFailed unless the object still has that ETag.
    """
    from botocore.exceptions import ClientError

    rng = f"bytes=-{length}" if start < 0 else f"bytes={start}-{start + length - 1}"
    kwargs = {"IfMatch": if_match} if if_match else {}
    try:
        return s3_client().get_object(Bucket=bucket, Key=key, Range=rng, **kwargs)["Body"].read()
    except ClientError as e:
        if is_lost_race(e):
            raise PreconditionFailed(f"s3://{bucket}/{key} is no longer version {if_match}") from e
        raise


def head(bucket: str, key: str) -> dict | None:
    """``{"etag", "bytes"}`` of an object, or None when there is none."""
    from botocore.exceptions import ClientError

    try:
        h = s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if is_missing(e):
            return None
        raise
    return {"etag": h["ETag"], "bytes": int(h["ContentLength"])}
