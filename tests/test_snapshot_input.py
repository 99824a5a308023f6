"""``nightrec run --interactions`` takes a table as data lakes write one: a file, a folder of
parts (Spark's ``part-*.parquet`` beside ``_SUCCESS`` and ``.crc`` files, maybe in ``key=value/``
folders) or a glob; all of it is uploaded as the ds's snapshot and ingest reads every part."""

import pandas as pd
import pytest

from nightrec.ops import cli
from nightrec.store import layout, storage
from nightrec.tasks import ingest

DS = "2026-11-20"


def _part(path, users, rows=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": [str(u) for u in users for _ in range(rows)],
                  "item_id": [str(i) for _ in users for i in range(rows)],
                  "rating": 4.0, "timestamp": 1_790_000_000}).to_parquet(path)


@pytest.fixture()
def lake(tmp_path):
    """A Spark-style output folder: two parts (one in a partition folder) and markers."""
    root = tmp_path / "events"
    _part(root / "part-00000-abc.snappy.parquet", [1, 2])
    _part(root / "country=NZ" / "part-00001-abc.snappy.parquet", [3])
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".part-00000-abc.snappy.parquet.crc").write_bytes(b"crc")
    (root / "_temporary").mkdir()
    (root / "_temporary" / "part-99999.parquet").write_bytes(b"half-written")
    return root


def test_a_folder_of_parts_is_every_data_file_under_it(lake):
    found = cli.snapshot_files(lake)
    assert [name for _, name in found] == ["country_NZ__part-00001-abc.snappy.parquet",
                                          "part-00000-abc.snappy.parquet"]


def test_a_glob_and_a_single_file(lake):
    found = cli.snapshot_files(str(lake / "**" / "part-*.parquet"))
    assert [name for _, name in found] == ["country_NZ__part-00001-abc.snappy.parquet",
                                          "part-00000-abc.snappy.parquet"]
    one = lake / "part-00000-abc.snappy.parquet"
    assert cli.snapshot_files(one) == [(one, "part-00000-abc.snappy.parquet")]


def test_nothing_to_read_is_a_clear_error(tmp_path):
    (tmp_path / "_SUCCESS").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="marker files do not count"):
        cli.snapshot_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="a file, a folder or a glob"):
        cli.snapshot_files(tmp_path / "missing.csv")


def test_ingest_reads_every_uploaded_part(bucket, lake):
    storage.write_bytes(layout.raw_prefix(DS) + "stale.csv", b"user_id,item_id\n9,9\n")
    cli.upload_snapshot(DS, lake, None, None)
    out = ingest.run(DS)
    files = storage.read_json(out.files)
    assert sorted(f["name"] for f in files["files"]) == [
        "country_NZ__part-00001-abc.snappy.parquet", "part-00000-abc.snappy.parquet"]
    assert files["rows"] == 9  # 3 users x 3 rows; the stale file of an earlier upload is gone
    raw = storage.read_parquet(out.interactions)
    assert sorted(set(raw["user_id"])) == ["1", "2", "3"]
