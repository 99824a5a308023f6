"""deploy/production.env: Airflow reads it as intended, and its parts exist and connect here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _production_env() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / "deploy" / "production.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def _airflow_config(env: dict[str, str], section: str, key: str) -> str:
    out = subprocess.run([str(BIN / "airflow"), "config", "get-value", section, key],
                         env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_airflow_reads_the_production_settings():
    env = _production_env()
    assert _airflow_config(env, "core", "executor") == "CeleryExecutor"
    assert _airflow_config(env, "database", "sql_alchemy_conn").startswith("postgresql+psycopg2://")
    assert _airflow_config(env, "celery", "broker_url").startswith("redis://")
    assert _airflow_config(env, "logging", "remote_logging") == "True"
    assert _airflow_config(env, "logging", "remote_base_log_folder").startswith("s3://")
    assert not any(k.startswith("AWS_") for k in env), "credentials come from the role, not a file"


def test_the_executor_and_the_s3_log_handler_are_installed():
    code = ("from airflow.providers.celery.executors.celery_executor import CeleryExecutor\n"
            "from airflow.providers.amazon.aws.log.s3_task_handler import S3TaskHandler\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.service("postgres", available=_answers(5432),
                     reason="nothing answers on 127.0.0.1:5432")
def test_metadata_db_on_postgres_answers(tmp_path):
    env = {**_production_env(), "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"}
    subprocess.run([str(BIN / "airflow"), "db", "check"], env={**os.environ, **env}, check=True,
                   capture_output=True)


@pytest.mark.service("redis", available=_answers(6379),
                     reason="nothing answers on 127.0.0.1:6379")
def test_celery_broker_on_redis_answers():
    import redis

    assert redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping()
