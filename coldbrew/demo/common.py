"""Shared parts of the demo: the gateway subprocess, example specs and small helpers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from coldbrew import servers
from coldbrew.servers import free_port
from coldbrew.sdk.client import Client, InvokeResponse


EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
HELLO_APP = EXAMPLES_DIR / "hello" / "app.py"
DIGITS_APP = EXAMPLES_DIR / "digits" / "app.py"
DIGITS_MODEL = EXAMPLES_DIR / "digits" / "model.npz"
EMBED_APP = EXAMPLES_DIR / "embed" / "app.py"
FRESH_SUFFIX = "-fresh"

HEALTH_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# Short, so that an idle instance is stopped soon after a request and the next request
# to the function is a cold start. The gateway checks keep-alive every 0.1 s.
DEMO_KEEP_ALIVE_S = 1.0
# Longer for the embed functions, because the memory report after a burst must find
# every instance still running. The burst's responses arrived up to 0.2 s apart on an
# idle 2-core VM, and further apart when other processes competed for the cores.
EMBED_KEEP_ALIVE_S = 2.0
SCALE_TO_ZERO_TIMEOUT_S = EMBED_KEEP_ALIVE_S + 15.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# The weights come from the object store only. These variables stop transformers and
# huggingface_hub from contacting a model hub in the gateway and its instances.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class DemoError(Exception):
    """A demo step failed; the message names the step and the value involved."""


@dataclass(frozen=True)
class Gateway:
    """A running `coldbrew serve` subprocess."""

    url: str
    pid: int
    log_path: Path


# Gateway process


def _stop_with_parent() -> None:
    # Runs in the gateway child before exec: if the demo is killed (a test timeout sends
    # SIGKILL), the kernel sends the gateway SIGTERM, so it still stops its instances.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def running_gateway(work_dir: Path, port: int | None = None, store_uri: str | None = None,
                    env: Mapping[str, str] | None = None) -> Iterator[Gateway]:
    """Start `coldbrew serve` with its state under work_dir; stop it with SIGTERM on exit.

    `env` is added to this process's environment for the gateway; `store_uri` sets its
    object store (default: $COLDBREW_STORE or the state dir's `objects` folder).
    """
    port = port or free_port()
    log_path = work_dir / "gateway.log"
    command = [sys.executable, "-m", "coldbrew.cli.main", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--state-dir", str(work_dir / "state")]
    if store_uri is not None:
        command += ["--store", store_uri]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=_stop_with_parent,
                                   env={**os.environ, **(env or {})})
    gateway = Gateway(f"http://127.0.0.1:{port}", process.pid, log_path)
    try:
        _wait_healthy(gateway, process)
        yield gateway
    finally:
        stop_gateway(process)


def _wait_healthy(gateway: Gateway, process: subprocess.Popen[bytes]) -> None:
    try:
        servers.wait_healthy(f"{gateway.url}/healthz", process, gateway.log_path,
                             HEALTH_TIMEOUT_S)
    except servers.ServerStartError as error:
        raise DemoError(f"the gateway did not become healthy: {error}; last log line: "
                        f"{_last_error_line(gateway.log_path)}") from None


def stop_gateway(process: subprocess.Popen[bytes]) -> int:
    """Send SIGTERM and wait for the gateway's graceful shutdown; SIGKILL it if that hangs."""
    return servers.stop_process(process, STOP_TIMEOUT_S)


def _last_error_line(path: Path) -> str:
    """Return the log's last line that mentions an error, or its last line if none does."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "(the log is empty)"


# Examples


def example_specs(app_path: Path) -> dict[str, dict[str, Any]]:
    """Import an example file as `coldbrew deploy` does and return its specs by function name."""
    from coldbrew.sdk.app import load_apps

    if not app_path.is_file():
        raise DemoError(f"example {app_path} not found; run the demo from a clone of the "
                        "coldbrew repository")
    try:
        apps = load_apps(app_path)
    except ImportError as error:
        raise DemoError(f"importing {app_path} failed ({error}); install the examples' "
                        "dependencies with pip install -e '.[examples]'") from None
    except Exception as error:  # noqa: BLE001 - example code may raise anything on import
        raise DemoError(f"importing {app_path} failed: {type(error).__name__}: {error}") from None
    specs = {name: definition.spec.to_json()
             for app in apps for name, definition in app.functions.items()}
    if not specs:
        raise DemoError(f"{app_path} defines no coldbrew.App functions")
    return specs


# Measurements


def invoke_expecting(client: Client, name: str, event: Any, cold: bool) -> InvokeResponse:
    """Invoke the function; raise DemoError unless the start was cold (cold=True) or warm."""
    response = client.invoke(name, event)
    check_start(name, f"request {response.request_id}", response.cold_start, cold,
                DEMO_KEEP_ALIVE_S)
    return response


def check_start(name: str, request: str, cold_start: bool, expected_cold: bool,
                keep_alive_s: float) -> None:
    """Raise DemoError if a request started cold where the demo expected warm, or the reverse."""
    if cold_start == expected_cold:
        return
    expected, got = ("cold", "warm") if expected_cold else ("warm", "cold")
    raise DemoError(f"{request} to {name!r} was a {got} start where the demo expected a "
                    f"{expected} one; the machine may be too busy for keep_alive_s={keep_alive_s}")


def wait_for_zero_instances(client: Client, name: str) -> None:
    """Wait until keep-alive has stopped every instance of the function."""
    deadline = time.monotonic() + SCALE_TO_ZERO_TIMEOUT_S
    while client.instances(name):
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {SCALE_TO_ZERO_TIMEOUT_S:.0f} s waiting for "
                            f"keep-alive to stop the instances of function {name!r}")
        time.sleep(0.1)


# Output


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _mb(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"
