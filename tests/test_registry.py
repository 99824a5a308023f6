"""The model registry against the real local S3: register, champion, resolve, refusals."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from nightrec.core.errors import PermanentError
from nightrec.store import storage
from nightrec.tasks import registry


@pytest.fixture
def empty_bucket(s3, monkeypatch):
    name = "nightrec-registry-test"
    client = storage.s3_client()
    if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=name)
    monkeypatch.setenv("NIGHTREC_BUCKET", name)
    storage.delete(storage.list_uris(storage.s3_uri("models/")))
    return name


def _trained_model(version: str) -> dict:
    base = storage.s3_uri(f"runs/ds=2026-11-01/train/{version}/")
    storage.write_bytes(base + "embeddings.npz", b"npz bytes")
    storage.write_parquet(pd.DataFrame({"user_idx": [0], "user_id": ["u"]}), base + "users.parquet")
    storage.write_parquet(pd.DataFrame({"item_idx": [0], "item_id": ["i"]}), base + "items.parquet")
    return {"embeddings": base + "embeddings.npz", "users": base + "users.parquet",
            "items": base + "items.parquet", "model_version": version, "data_version": "abc"}


def test_no_champion_is_a_permanent_error(empty_bucket):
    assert issubclass(registry.ModelNotFound, PermanentError)
    with pytest.raises(registry.ModelNotFound, match="no champion"):
        registry.resolve(None)
    with pytest.raises(registry.ModelNotFound):
        registry.resolve("mf-20261101-0123abcd")


@pytest.mark.parametrize("bad", ["../mf-20261101-0123abcd", "mf-20261101-0123abcd/x", "MF-1", ""])
def test_versions_that_could_escape_their_prefix_are_refused(empty_bucket, bad):
    with pytest.raises(ValueError):
        registry.model_prefix(bad)


def test_register_promote_and_resolve(empty_bucket):
    a, b = "mf-20261101-0000000a", "mf-20261102-0000000b"
    registry.register(_trained_model(a), ds="2026-11-01", metrics_uri=None)
    registry.register(_trained_model(b), ds="2026-11-02", metrics_uri=None)
    assert registry.list_models() == [a, b]
    registry.set_champion(a)
    record = registry.set_champion(b)
    assert record["previous"] == a and registry.champion() == b
    resolved = registry.resolve(None)
    assert resolved["model_version"] == b and resolved["data_version"] == "abc"
    assert storage.read_bytes(resolved["embeddings"]) == b"npz bytes"
    with pytest.raises(registry.ModelNotFound):
        registry.set_champion("mf-20261103-0000000c")
    assert registry.champion() == b


def test_champion_history_and_rollback(empty_bucket):
    a, b, c = "ease-20261101-0000000a", "mf-20261102-0000000b", "ease-20261103-0000000c"
    for i, v in enumerate((a, b, c)):
        registry.register(_trained_model(v), ds=f"2026-11-0{i + 1}", metrics_uri=None,
                          gate={"metric": "ndcg_at_10", "model": 0.3, "blessed": True})
        registry.set_champion(v)
    assert registry.champion_record()["history"] == [a, b, c]
    assert registry.rollback()["model_version"] == b and registry.champion() == b
    assert registry.rollback()["model_version"] == a
    with pytest.raises(registry.ModelNotFound, match="no previous champion"):
        registry.rollback()
    meta = registry.meta(c)
    assert meta["gate"]["blessed"] is True and meta["code_version"]
    assert set(meta["files"]) >= {"embeddings.npz", "users.parquet", "items.parquet"}


def test_models_cli_list_show_promote_rollback(empty_bucket, capsys):
    from nightrec.ops import cli

    a, b = "ease-20261101-0000000a", "mf-20261102-0000000b"
    assert cli.main(["models", "list"]) == 0
    assert "no registered models" in capsys.readouterr().out
    for v in (a, b):
        registry.register(_trained_model(v), ds="2026-11-01", metrics_uri=None,
                          gate={"metric": "ndcg_at_10", "model": 0.25, "blessed": True})
    assert cli.main(["models", "promote", a]) == 0
    assert cli.main(["models", "promote", b]) == 0
    assert f"champion: {b} (was {a})" in capsys.readouterr().out
    assert cli.main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == [a, "*"] and b in lines[1]
    assert "ndcg_at_10=0.2500" in lines[0]
    assert cli.main(["models", "show", a]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model_version"] == a and shown["champion"] is False
    assert cli.main(["models", "rollback"]) == 0
    assert f"champion: {a} (rolled back from {b})" in capsys.readouterr().out
    assert registry.champion() == a
    assert cli.main(["models", "rollback"]) == 1
    assert "no previous champion" in capsys.readouterr().err
    assert cli.main(["models", "promote", "mf-20991231-0000000f"]) == 1
    assert "no registered model" in capsys.readouterr().err
    assert cli.main(["models", "show", "../../etc"]) == 2  # refused before any key is built
    with pytest.raises(SystemExit):
        cli.main(["models", "promote"])
    assert registry.champion() == a


def test_a_backfill_never_demotes_a_newer_champion_but_ops_can(empty_bucket):
    today, backfill = "mf-20261110-0000000a", "ease-20261103-0000000b"
    registry.register(_trained_model(today), ds="2026-11-10", metrics_uri=None)
    registry.register(_trained_model(backfill), ds="2026-11-03", metrics_uri=None)
    assert registry.set_champion(today)["moved"] is True
    kept = registry.set_champion(backfill)  # a blessed backfill of last week
    assert kept["moved"] is False and kept["model_version"] == today
    assert registry.champion() == today and registry.champion_record()["ds"] == "2026-11-10"
    forced = registry.set_champion(backfill, reason="promoted by hand", force=True)
    assert forced["moved"] is True and registry.champion() == backfill
    assert registry.champion_record()["history"] == [today, backfill]


def test_racing_promotions_end_at_the_latest_ds_and_keep_every_step(empty_bucket):
    from concurrent.futures import ThreadPoolExecutor

    versions = [f"mf-202611{d:02d}-000000{d:02x}" for d in range(1, 9)]
    for v in versions:
        registry.register(_trained_model(v), ds=f"2026-11-{v[9:11]}", metrics_uri=None)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(registry.set_champion, reversed(versions)))
    record = registry.champion_record()
    assert record["model_version"] == versions[-1] and record["ds"] == "2026-11-08"
    assert record["history"][-1] == versions[-1]
    assert not storage.exists(registry.champion_lock_uri())


def test_registered_versions_are_immutable(empty_bucket):
    v = "mf-20261101-0000000a"
    first = registry.register(_trained_model(v), ds="2026-11-01", metrics_uri=None)
    meta = registry.meta(v)
    again = registry.register(_trained_model(v), ds="2026-11-01", metrics_uri=None)  # a retry
    assert again == first and registry.meta(v)["registered_at"] == meta["registered_at"]
    other = _trained_model(v)
    storage.write_bytes(other["embeddings"], b"other weights, same version")
    with pytest.raises(registry.VersionConflict, match="already registered with other content"):
        registry.register(other, ds="2026-11-02", metrics_uri=None)
    assert issubclass(registry.VersionConflict, PermanentError)
    assert storage.read_bytes(first["embeddings"]) == b"npz bytes"
    assert registry.meta(v) == meta


def test_a_register_that_stopped_before_meta_is_completed_by_its_retry(empty_bucket):
    v = "mf-20261101-0000000a"
    model = _trained_model(v)
    storage.write_json(registry.marker_uri(v), {
        "model_version": v, "weights_sha256": registry.weights_digest(b"npz bytes")})
    assert registry.register(model, ds="2026-11-01", metrics_uri=None)["model_version"] == v
    assert registry.meta(v)["ds"] == "2026-11-01"


def test_the_weights_digest_is_of_the_arrays_not_of_the_file():
    import io

    import numpy as np

    def npz(scale: float, save=np.savez) -> bytes:
        buf = io.BytesIO()
        save(buf, user=np.ones((3, 2), np.float32) * scale, item=np.eye(2, dtype=np.float32))
        return buf.getvalue()

    plain, packed = npz(1.0), npz(1.0, np.savez_compressed)
    assert plain != packed  # two files ...
    assert registry.weights_digest(plain) == registry.weights_digest(packed)  # ... one model
    assert registry.weights_digest(npz(1.5)) != registry.weights_digest(plain)
    # train names a version by the arrays in memory: the same digest as the npz it writes
    arrays = {"user": np.ones((3, 2), np.float32), "item": np.eye(2, dtype=np.float32),
              "scale": np.float64(2.0), "empty": np.zeros((0, 4), np.float32)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    assert registry.arrays_digest(arrays) == registry.weights_digest(buf.getvalue())
    assert registry.arrays_digest(arrays) != registry.arrays_digest({**arrays, "scale": 2.5})
    # pinned: the registered markers of earlier versions verify against the same digest
    assert registry.arrays_digest({"item": np.eye(2, dtype=np.float32)}) == (
        "28d72e588240c06ef76e65b9a00e011df35b0f57f8469a42c5dba6b0e94ea888")
