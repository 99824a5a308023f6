"""Security: no credentials in the repo or the logs, and hostile params never become keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nightrec.core import settings
from nightrec.store import layout, storage
from nightrec.tasks import registry

ROOT = Path(__file__).resolve().parents[1]

# What a leaked credential looks like (AWS keys, private keys, passwords in URLs, tokens).
SECRET_PATTERNS = {
    "aws access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "aws secret assignment": re.compile(
        r"(?i)aws_?secret_?access_?key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{30,}"),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    "password in url": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s:@'\"{}$<>]+@"),
    "github token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
}


def test_no_credentials_in_tracked_files():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
                           ).stdout.decode().split("\0")
    files = [f for f in files if f and (ROOT / f).is_file()]
    assert len(files) > 30
    hits = []
    for name in files:
        text = (ROOT / name).read_bytes().decode("utf-8", errors="ignore")
        for what, pattern in SECRET_PATTERNS.items():
            hits += [f"{name}: {what}: {m.group(0)[:40]}" for m in pattern.finditer(text)]
    assert hits == []


def test_the_secret_patterns_catch_what_they_are_for():
    # assembled at run time, so this file itself holds no string the scan would flag
    leaks = ["AKIA" + "ABCDEFGHIJKLMNOP",
             "aws_secret_access_key" + " = " + "abcdefghijklmnopqrstuvwxyz0123456789ABCD",
             "-----BEGIN RSA " + "PRIVATE KEY-----", "postgresql://airflow:" + "hunter2@db:5432/x",
             "ghp_" + "a" * 36]
    for leak in leaks:
        assert any(p.search(leak) for p in SECRET_PATTERNS.values()), leak
    assert not any(p.search("postgresql+psycopg2://postgres@127.0.0.1:5432/airflow")
                   for p in SECRET_PATTERNS.values())


HOSTILE_DS = [
    "../2026-11-28", "2026-11-28/../../models", "/etc/passwd", "2026-11-28/", "2026-02-30",
    "2026-11-28\n", " 2026-11-28", "２０２６-１１-２８", "٢٠٢٦-١١-٢٨", "2026-11-28%2F..",
    "2026-11-28\x00", "", "20261128", "2026-1-28",
]
HOSTILE_VERSIONS = [
    "../mf-20261101-0123abcd", "mf-20261101-0123abcd/../../x", "/mf-20261101-0123abcd",
    "mf-20261101-0123abcd\n", "mf-20261101-0123аbcd",  # Cyrillic 'а'
    "mf-２０２６1101-0123abcd", "MF-20261101-0123ABCD", "mf-20261101-0123abcd\x00",
    "mf-20261101-0123abcd ", "mf-20261101-..", "s3://x/mf-20261101-0123abcd",
]
HOSTILE_NAMES = ["..", ".hidden", "a/b", "a\\b", "a∕b", "é.csv", "ok.csv\n", "x" * 200, "",
                 "..a", "a/../b", "/abs"]


@pytest.mark.parametrize("value", HOSTILE_DS, ids=repr)
def test_hostile_ds_is_refused_by_the_param_schema_and_the_key_builders(value):
    from airflow.sdk.definitions.param import ParamValidationError

    from nightrec.orchestration.common import ds_param

    with pytest.raises(ValueError):
        settings.check_ds(value)
    with pytest.raises(ValueError):
        layout.recs_prefix(value)
    with pytest.raises(ParamValidationError):
        ds_param().resolve(value)


@pytest.mark.parametrize("value", HOSTILE_VERSIONS, ids=repr)
def test_hostile_model_versions_never_build_a_key(value):
    from airflow.sdk.definitions.param import ParamValidationError

    from nightrec.orchestration.common import model_version_param

    with pytest.raises(ValueError):
        registry.model_prefix(value)
    with pytest.raises(ParamValidationError):
        model_version_param("x").resolve(value)


@pytest.mark.parametrize("value", HOSTILE_NAMES, ids=repr)
def test_hostile_key_segments_are_refused(value):
    with pytest.raises(ValueError):
        layout.safe_token(value)


def test_sanitized_run_keys_stay_one_segment():
    for raw in ["manual__2026-11-28T02:00:00+00:00", "../../x", "a/b/../c", "é" * 300, "..", ""]:
        token = layout.sanitize_token(raw) if raw else layout.sanitize_token("x")
        assert layout.safe_token(token) == token


def _nightrec(args, env, cwd):
    return subprocess.run([str(Path(sys.executable).parent / "nightrec"), *args], env=env,
                          cwd=cwd, capture_output=True, text=True, check=False, timeout=600)


def test_credentials_never_reach_logs_alerts_or_output(s3, airflow_db, tmp_path):
    """A failing run (binary garbage as the snapshot) and a wrong credential: neither the real
    secret nor the wrong one appears in the run log, the CLI output or the alert records."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    assert len(secret) >= 16
    garbage = tmp_path / "ratings.csv"
    garbage.write_bytes(bytes(range(256)) * 64)
    env = dict(os.environ)
    ds = "2026-10-02"
    run = _nightrec(["run", "--interactions", str(garbage), "--ds", ds], env, tmp_path)
    assert run.returncode == 1 and "ingest" in run.stderr
    log = (settings.state_dir() / "logs" / f"run-ds={ds}.log").read_text(errors="replace")
    alerts = [storage.read_bytes(u).decode() for u in
              storage.list_uris(storage.s3_uri(f"alerts/ds={ds}/"))]
    assert alerts and "ingest" in alerts[0]
    for text in (log, run.stdout, run.stderr, *alerts):
        assert secret not in text and key_id not in text

    wrong = "W" * 40
    bad_env = {**env, "AWS_SECRET_ACCESS_KEY": wrong}
    status = _nightrec(["models", "list"], bad_env, tmp_path)
    assert status.returncode == 1 and "Traceback" not in status.stderr
    assert "the object store refused" in status.stderr and "403" in status.stderr
    assert wrong not in status.stderr + status.stdout and secret not in status.stderr
    missing = _nightrec(["models", "list"], {**env, "NIGHTREC_BUCKET": "no-such-bucket"}, tmp_path)
    assert missing.returncode == 1 and "no-such-bucket" in missing.stderr
    assert "Traceback" not in missing.stderr
