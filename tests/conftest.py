"""Fixtures that run real coldbrew servers on 127.0.0.1 and deploy real code folders."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import psutil
import pytest

from coldbrew.sdk.client import Client
from coldbrew.servers import free_port
from coldbrew.weights.store import ObjectStore

REPO = Path(__file__).resolve().parent.parent


class Server:
    """A `coldbrew serve` subprocess with its own state dir and port."""

    def __init__(self, state_dir: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.extra_args = extra_args
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"server-{self.port}.log"

    def start(self) -> "Server":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coldbrew.cli.main", "serve", "--port", str(self.port),
             "--state-dir", str(self.state_dir), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def client(self) -> Client:
        return Client(self.url, timeout_s=60)


def write_code(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*args: str, state_dir: Path | None = None, env: dict[str, str] | None = None) -> Server:
        server = Server(state_dir or tmp_path / f"state-{len(servers)}", *args, env=env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        leftovers = server.descendants()
        server.stop()
        psutil.wait_procs(leftovers, timeout=5)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per test module, for tests that deploy uniquely named functions."""
    server = Server(tmp_path_factory.mktemp("shared") / "state").start()
    yield server
    server.stop()


@pytest.fixture
def deploy(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Write a code folder and deploy it: deploy(client, spec, files)."""
    counter = iter(range(1000))

    def run(client: Client, spec: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
        folder = write_code(tmp_path / f"code-{next(counter)}", files)
        return client.deploy(spec, folder)

    return run


def wait_until(condition: Callable[[], Any], timeout_s: float = 10, message: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {message or condition}")


def pid_alive(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- S3: a real S3 API server (moto) on 127.0.0.1 ---------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def aws_test_env(endpoint: str) -> dict[str, str]:
    """Dummy credentials, no config files and no metadata service: botocore talks to moto only."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "COLDBREW_S3_ENDPOINT_URL": endpoint,
    }


@pytest.fixture
def s3_env(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = aws_test_env(moto_url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    return env


def new_bucket(prefix: str = "models") -> str:
    """Create a fresh bucket on the moto server and return an s3:// URI inside it."""
    bucket = f"weights-{uuid.uuid4().hex[:12]}"
    ObjectStore(f"s3://{bucket}").fs.mkdir(bucket)
    return f"s3://{bucket}/{prefix}"
