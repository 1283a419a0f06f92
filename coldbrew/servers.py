"""Wait for and stop server subprocesses: the gateway in the demo, comparators in benchmarks."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

logger = logging.getLogger("coldbrew.servers")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerStartError(Exception):
    """A server subprocess exited, or did not respond, before it became healthy."""


def wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path,
                 timeout_s: float) -> None:
    """Poll `url` until it returns HTTP 200; raise ServerStartError if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"server {process.args!r} exited with code "
                                   f"{process.returncode} before it became healthy; its log: "
                                   f"{log_path}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise ServerStartError(f"{url} did not return HTTP 200 within {timeout_s:.0f} s; "
                           f"server log: {log_path}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Send SIGTERM, wait for a graceful exit, then SIGKILL what is left; return the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d did not stop within %.0f s of SIGTERM; killing it",
                           process.pid, timeout_s)
            process.kill()
            process.wait()
    return process.returncode
