"""Read the published recommendations, the way downstream services should.

``RecommendationReader().table()`` gives the latest complete table; ``table(ds=...)`` a given
day's; ``for_user("196")`` one user's rows. Everything goes through ``_latest.json`` and the
manifest, so a reader never sees parts of a table that is still being written, and checks each
part's sha256 against the manifest.
"""

from __future__ import annotations

import io

import pandas as pd
import pyarrow.parquet as pq

from tasks import layout, schema, settings, storage


class TableNotFound(LookupError):
    pass


class RecommendationReader:
    def __init__(self, bucket: str | None = None):
        self.bucket = bucket or settings.bucket()

    def latest_ds(self) -> str:
        uri = layout.latest_uri()
        if not storage.exists(uri):
            raise TableNotFound("nothing has been published yet (no recommendations/_latest.json)")
        return storage.read_json(uri)["ds"]

    def manifest(self, ds: str | None = None) -> dict:
        ds = settings.check_ds(ds) if ds else self.latest_ds()
        uri = layout.manifest_uri(ds)
        if not storage.exists(uri):
            raise TableNotFound(f"no published table for ds={ds}")
        return storage.read_json(uri)

    def _part(self, part: dict, filters=None) -> pd.DataFrame:
        data = storage.read_bytes(storage.s3_uri(part["key"], self.bucket))
        if storage.sha256(data) != part["sha256"]:
            raise OSError(f"{part['key']}: checksum differs from the manifest")
        return pq.read_table(io.BytesIO(data), filters=filters).to_pandas()

    def table(self, ds: str | None = None) -> pd.DataFrame:
        m = self.manifest(ds)
        return pd.concat([self._part(p) for p in m["parts"]], ignore_index=True)

    def for_user(self, user_id: str, ds: str | None = None) -> pd.DataFrame:
        m = self.manifest(ds)
        frames = [self._part(p, filters=[(schema.USER_ID, "=", str(user_id))]) for p in m["parts"]]
        return pd.concat(frames, ignore_index=True).sort_values(schema.RANK, ignore_index=True)
