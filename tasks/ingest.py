"""Step 1, ingest: read the day's raw snapshot, whatever its format, into one raw-string table.

Rules (nothing is dropped here; clean decides what is bad and says why):

- Inputs: every file under ``raw/interactions/ds=<ds>/``. Parquet (``.parquet``), or delimited
  text (``.csv``, ``.tsv``, ``.data``, ``.dat``, ``.txt``), each optionally gzipped (``.gz``).
- The delimiter is ``ingest.delimiter`` or sniffed from the first line: ``::`` (ML-1M), tab,
  comma, semicolon or pipe.
- A header is recognised when the first line names a user column. Without one the columns are
  positional ``user, item, rating, timestamp`` (MovieLens ``u.data``/``ratings.dat``); three
  columns mean ``user, item, timestamp`` (implicit feedback).
- Known header aliases (``userId``, ``movieId``, ``item``, ``ts``...) map to the schema names;
  ``rating`` is optional.
- Values stay strings, so an unparseable value reaches clean's quarantine with its original text.
  Each row keeps its ``source_file`` and ``raw_row``.
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import PurePosixPath

import pandas as pd

from tasks import layout, schema, settings, storage
from tasks.errors import PermanentError

PARAMS = ["ingest.delimiter"]

ALIASES = {
    schema.USER_ID: ["user_id", "userid", "user", "uid", "customer_id", "visitorid"],
    schema.ITEM_ID: ["item_id", "itemid", "item", "movie_id", "movieid", "product_id", "iid"],
    schema.RATING: ["rating", "score", "value"],
    schema.TIMESTAMP: ["timestamp", "ts", "time", "event_time", "unix_timestamp", "datetime"],
}
_TEXT_SUFFIXES = {".csv", ".tsv", ".data", ".dat", ".txt", ".base", ".test"}
_DELIMITERS = ["::", "\t", ",", ";", "|"]


class IngestError(PermanentError, ValueError):
    """The snapshot cannot be read at all (no files, unknown format, no user/item columns)."""


def sniff_delimiter(first_line: str) -> str:
    for d in _DELIMITERS:
        if d in first_line:
            return d
    raise IngestError(f"cannot tell the delimiter of line {first_line[:80]!r}")


def _canonical(name: str) -> str | None:
    n = name.strip().lower().replace(" ", "_")
    for target, names in ALIASES.items():
        if n in names:
            return target
    return None


def coerce_columns(df: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """Rename known aliases to the schema, keep only schema columns, values as strings."""
    out = df.rename(columns=lambda c: _canonical(str(c)) or str(c))
    out = out.loc[:, ~out.columns.duplicated()]
    missing = {schema.USER_ID, schema.ITEM_ID} - set(out.columns)
    if missing:
        raise IngestError(f"{source}: no column for {sorted(missing)}; columns were {list(df.columns)}")
    for col in schema.INTERACTION_COLUMNS:
        if col not in out.columns:
            out[col] = None
    out = out[schema.INTERACTION_COLUMNS].astype("string").astype(object)
    out = out.where(out.notna(), None)
    out[schema.SOURCE_FILE] = source
    out[schema.RAW_ROW] = range(len(out))
    return out


def parse_text(data: bytes, *, source: str, delimiter: str | None = None) -> pd.DataFrame:
    """Parse delimited text into raw-string schema columns (see the module rules)."""
    text = data.decode("utf-8", errors="replace")
    first = text.split("\n", 1)[0].rstrip("\r")
    if not first.strip():
        return coerce_columns(pd.DataFrame(columns=[schema.USER_ID, schema.ITEM_ID]), source=source)
    sep = delimiter or sniff_delimiter(first)
    fields = [f.strip().strip('"') for f in first.split(sep)]
    has_header = any(_canonical(f) == schema.USER_ID for f in fields)
    read_kwargs = {"sep": sep, "dtype": str, "keep_default_na": False, "na_values": [""]}
    if sep == "::":
        read_kwargs["engine"] = "python"
    if has_header:
        df = pd.read_csv(io.StringIO(text), header=0, **read_kwargs)
    else:
        n = len(fields)
        names = {
            3: [schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP],
            4: [schema.USER_ID, schema.ITEM_ID, schema.RATING, schema.TIMESTAMP],
        }.get(n)
        if names is None:
            raise IngestError(f"{source}: headerless file with {n} columns; expected 3 or 4")
        df = pd.read_csv(io.StringIO(text), header=None, names=names, **read_kwargs)
    return coerce_columns(df, source=source)


def read_snapshot_file(name: str, data: bytes, *, delimiter: str | None = None) -> pd.DataFrame:
    """One raw file (by its name's suffixes) -> raw-string schema frame."""
    path = PurePosixPath(name)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        data = gzip.decompress(data)
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        return coerce_columns(pd.read_parquet(io.BytesIO(data)), source=path.name)
    if kind in _TEXT_SUFFIXES or kind == "":
        return parse_text(data, source=path.name, delimiter=delimiter)
    raise IngestError(f"{path.name}: unknown format {kind!r}")


def ingest_files(files: dict[str, bytes], *, delimiter: str | None = None) -> pd.DataFrame:
    """Pure core: ``{file name: bytes}`` -> one raw-string frame, files in name order."""
    if not files:
        raise IngestError("the snapshot has no files")
    frames = [read_snapshot_file(n, files[n], delimiter=delimiter) for n in sorted(files)]
    return pd.concat(frames, ignore_index=True)


def read_side_table(data: bytes) -> pd.DataFrame:
    """Items or users CSV, kept as given (ids as strings so they join with interactions)."""
    df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""])
    df.columns = [_canonical(c) or c.strip() for c in df.columns]
    return df


def run(ds: str, params: dict | None = None) -> dict[str, str]:
    """Read ``raw/*/ds=<ds>/`` and write ``runs/ds=<ds>/ingest/``; return the output URIs."""
    p = settings.step_params(PARAMS, params)
    raw = storage.list_uris(layout.raw_prefix(ds))
    files = {PurePosixPath(u).name: storage.read_bytes(u) for u in raw}
    if not files:
        raise IngestError(f"no raw interactions under {layout.raw_prefix(ds)}")
    df = ingest_files(files, delimiter=p["ingest.delimiter"])
    out = {"interactions": layout.run_uri(ds, "ingest", "interactions.parquet")}
    storage.write_parquet(df, out["interactions"])
    for table in ("items", "users"):
        uris = storage.list_uris(layout.raw_prefix(ds, table))
        if uris:
            side = pd.concat([read_side_table(storage.read_bytes(u)) for u in uris])
            out[table] = layout.run_uri(ds, "ingest", f"{table}.parquet")
            storage.write_parquet(side, out[table])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ingest local raw files into one parquet")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    p = settings.step_params(PARAMS)
    files = {PurePosixPath(i).name: storage.read_bytes(i) for i in args.inputs}
    storage.write_parquet(ingest_files(files, delimiter=p["ingest.delimiter"]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
