"""``storage.parquet_frame`` / ``parquet_table``: every pipeline read of a Parquet object goes
through ``pq.ParquetFile(...).read()`` instead of the dataset scanner (a short process could abort
at exit after a scan: benchmarks/RESULTS.md, "Parquet reads and the exit abort"). What they
return must be what ``pd.read_parquet`` / ``pq.read_table`` returned, dtypes and index included.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from nightrec.store import storage

ROOT = Path(__file__).resolve().parents[1]


def _frame() -> pd.DataFrame:
    n = 40
    rng = np.random.default_rng(5)
    return pd.DataFrame({
        "user_id": [f"u{i % 7}" for i in range(n)],
        "maybe": [None if i % 3 == 0 else f"s{i}" for i in range(n)],
        "kind": pd.Categorical([("a", "b", "c")[i % 3] for i in range(n)]),
        "count": np.arange(n, dtype=np.int64),
        "nullable": pd.array([None if i % 4 == 0 else i for i in range(n)], dtype="Int32"),
        "score": rng.random(n, dtype=np.float32),
        "ok": np.arange(n) % 2 == 0,
        "at": pd.date_range("2026-05-01", periods=n, freq="h", tz="UTC"),
    }, index=pd.Index([f"r{i}" for i in range(n)], name="row"))


@pytest.mark.parametrize("columns", [None, ["maybe", "count", "at"]])
@pytest.mark.parametrize("with_index", [True, False])
def test_parquet_frame_returns_what_pd_read_parquet_returns(tmp_path, columns, with_index):
    frame = _frame() if with_index else _frame().reset_index(drop=True)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=with_index)
    data = buf.getvalue()
    want = pd.read_parquet(io.BytesIO(data), columns=columns)
    got = storage.parquet_frame(data, columns)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert list(got.dtypes) == list(want.dtypes)
    path = tmp_path / "f.parquet"
    path.write_bytes(data)
    pd.testing.assert_frame_equal(storage.parquet_frame(path, columns), want, check_exact=True)
    if with_index and columns is None:
        pd.testing.assert_frame_equal(got, frame, check_exact=True)  # round trip, index too


def test_parquet_table_returns_what_pq_read_table_returns():
    buf = io.BytesIO()
    _frame().to_parquet(buf, row_group_size=7)
    data = buf.getvalue()
    for columns in (None, ["user_id", "score"]):
        want = pq.read_table(io.BytesIO(data), columns=columns)
        got = storage.parquet_table(data, columns)
        assert got.equals(want) and got.schema.equals(want.schema, check_metadata=True)


SCANNER_CALLS = (("pd", "read_parquet"), ("pq", "read_table"))


def scanner_calls(source: str) -> list[int]:
    """The lines of ``source`` that call ``pd.read_parquet`` or ``pq.read_table``."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and (node.func.value.id, node.func.attr) in SCANNER_CALLS]


def test_no_pipeline_module_reads_parquet_through_the_dataset_scanner():
    """pd.read_parquet and pq.read_table (the scanner) appear nowhere in the pipeline's code:
    it reads Parquet through storage.parquet_frame / parquet_table, or in DuckDB."""
    assert scanner_calls("import io\nx = pd.read_parquet(io.BytesIO(b''))\n"
                         "t = pq.read_table('f', columns=['a'])\n") == [2, 3]
    assert scanner_calls("x = storage.parquet_frame(b'')\nc.sql('FROM read_parquet(g)')\n") == []
    found = [f"{path.relative_to(ROOT)}:{line}"
             for folder in ("nightrec", "tasks", "dags")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for line in scanner_calls(path.read_text())]
    assert found == [], found
