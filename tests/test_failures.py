"""Each failure gives its status and error type, and the next request still succeeds.

Every test runs twice: with the best memory-limit mode the machine offers (a cgroup where
writable) and with the RLIMIT_AS fallback that servers without cgroup access use.
"""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from conftest import Server, pid_alive, wait_until

FAULTY = {"app.py": """
    import ctypes
    import os
    import signal
    import time

    def handler(event, context):
        action = event.get("action")
        if action == "raise":
            raise ValueError(f"bad input {event.get('value')!r}")
        if action == "allocate_mb":
            block = bytearray(event["mb"] * 2**20)
            block[::4096] = b"x" * len(block[::4096])
            return len(block)
        if action == "sleep":
            time.sleep(event["seconds"])
        if action == "c_sleep":
            ctypes.CDLL(None).sleep(int(event["seconds"]))
        if action == "exit":
            os._exit(event["code"])
        if action == "signal":
            os.kill(os.getpid(), event["signal"])
        if action == "not_json":
            return {1, 2}
        if action == "nan":
            return float("nan")
        return {"ok": True, "pid": os.getpid()}
"""}

SPEC = {"name": "faulty", "handler": "app.handler", "memory_mb": 64, "timeout_s": 1.5}


@pytest.fixture(scope="module", params=["auto", "rlimit"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = () if request.param == "auto" else ("--limit-mode", "rlimit")
    server = Server(tmp_path_factory.mktemp(request.param) / "state", *args).start()
    yield server
    server.stop()


@pytest.fixture
def client(server: Server, deploy):
    client = server.client()
    deploy(client, SPEC, FAULTY)
    return client


def invoke(server: Server, event: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/functions/faulty/invoke", json=event, timeout=30)


def assert_next_succeeds(server: Server) -> None:
    response = invoke(server, {})
    assert response.status_code == 200, response.text
    assert response.json()["ok"] is True


def test_handler_exception_is_500(server: Server, client) -> None:
    response = invoke(server, {"action": "raise", "value": 42})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "HandlerError"
    assert error["exception_type"] == "ValueError"
    assert "bad input 42" in error["message"]
    assert 'raise ValueError(f"bad input' in error["traceback"]
    assert_next_succeeds(server)


@pytest.mark.parametrize("action", ["not_json", "nan"])
def test_result_not_json_is_500(server: Server, client, action: str) -> None:
    response = invoke(server, {"action": action})
    assert response.status_code == 500
    assert "not JSON serializable" in response.json()["error"]["message"]
    assert_next_succeeds(server)


def test_memory_cap_enforced(server: Server, client) -> None:
    response = invoke(server, {"action": "allocate_mb", "mb": 2 * SPEC["memory_mb"]})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["type"] == "OutOfMemory"
    assert error["memory_mb"] == 64
    assert "64 MB" in error["message"]
    assert_next_succeeds(server)


def test_allocation_under_cap_succeeds(server: Server, client) -> None:
    response = invoke(server, {"action": "allocate_mb", "mb": SPEC["memory_mb"] // 4})
    assert response.status_code == 200
    assert response.json() == 16 * 2**20


@pytest.mark.parametrize("action", ["sleep", "c_sleep"])
def test_timeout_kills_instance(server: Server, client, action: str) -> None:
    before = invoke(server, {}).json()["pid"]
    response = invoke(server, {"action": action, "seconds": 30})
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["type"] == "Timeout"
    assert error["timeout_s"] == 1.5
    assert float(response.headers["X-Coldbrew-Duration-Ms"]) < 10_000
    wait_until(lambda: not pid_alive(before), message=f"timed-out instance {before} to die")
    assert_next_succeeds(server)


def test_os_exit_is_instance_crashed(server: Server, client) -> None:
    response = invoke(server, {"action": "exit", "code": 3})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "InstanceCrashed"
    assert error["exit_code"] == 3
    assert_next_succeeds(server)


@pytest.mark.parametrize("signum, name", [(11, "SIGSEGV"), (9, "SIGKILL"), (15, "SIGTERM")])
def test_signal_is_instance_crashed(server: Server, client, signum: int, name: str) -> None:
    response = invoke(server, {"action": "signal", "signal": signum})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "InstanceCrashed"
    assert error["signal"] == signum
    assert name in error["message"]
    assert_next_succeeds(server)


def test_failures_recorded_in_log(server: Server, client) -> None:
    invoke(server, {"action": "raise"})
    rows = client.invocations("faulty", 1)
    assert rows[0]["status"] == 500
    assert rows[0]["error_type"] == "HandlerError"
