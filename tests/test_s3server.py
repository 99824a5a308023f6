"""The embedded S3 script: idempotent up/down, stops only what it started, real S3 semantics."""

from __future__ import annotations

import subprocess

import pytest

from nightrec.store import s3server, storage


def test_up_is_idempotent_and_serves_the_bucket(s3):
    pid = s3server._our_pid(s3)
    assert pid is not None
    assert s3server.up(s3) == s3 and s3server._our_pid(s3) == pid  # no second server
    uri = storage.s3_uri("tmp/hello.txt")
    storage.write_bytes(uri, b"hi")
    assert storage.read_bytes(uri) == b"hi"
    storage.delete([uri])
    assert not storage.exists(uri)


def test_down_never_stops_a_process_it_did_not_start(tmp_path):
    other = subprocess.Popen(["sleep", "30"])
    try:
        cfg = s3server.ServerConfig(data_dir=tmp_path, s3_port=1)
        cfg.pid_file.write_text(str(other.pid))
        assert s3server.down(cfg) is False
        assert other.poll() is None
        assert s3server.down(cfg) is False  # and again: still a no-op
    finally:
        other.kill()
        other.wait()


def test_credentials_are_generated_once_and_kept_private(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    cfg = s3server.ServerConfig(data_dir=tmp_path)
    first = s3server.credentials(cfg)
    assert s3server.credentials(cfg) == first
    assert cfg.credentials_file.stat().st_mode & 0o077 == 0


def test_wrong_credentials_are_refused(s3, monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    storage._client.cache_clear()
    try:
        with pytest.raises(ClientError):
            storage.s3_client().list_objects_v2(Bucket=s3.bucket)
    finally:
        monkeypatch.undo()
        storage._client.cache_clear()
