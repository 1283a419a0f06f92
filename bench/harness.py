"""Servers and helpers that every benchmark shares.

Each benchmark starts its own `coldbrew serve` subprocess on a free 127.0.0.1 port with
a temporary state dir, so that benchmarks share no instances or zygotes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import httpx
import psutil

from coldbrew import servers
from coldbrew.servers import free_port
from coldbrew.sdk.client import Client

logger = logging.getLogger("bench")

HOST = "127.0.0.1"
FUNCTIONS_DIR = Path(__file__).resolve().parent / "functions"
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 120.0
# The gateway's ticker stops expired instances every 0.1 s; 0.1 s is the smallest
# keep-alive a spec accepts, so a cold-start trial waits about 0.2 s for its instance to go.
SHORT_KEEP_ALIVE_S = 0.1


class BenchmarkError(Exception):
    """A benchmark could not measure: a server failed or returned an unexpected response."""


@dataclass(frozen=True)
class Plan:
    """How many repeats each benchmark runs; `--quick` and `--trials` pick the numbers."""

    cold_trials: int  # zygote cold starts of the no-op handler
    fresh_trials: int  # fresh-interpreter cold starts of the no-op handler
    ray_trials: int  # Ray actors created and called once
    floor_trials: int  # bare fork() plus socket round trips
    heavy_trials: int  # zygote cold starts of the numpy/scikit-learn handler
    heavy_fresh_trials: int  # fresh cold starts of that handler, about 1.5 s each
    warm_rounds: int  # load rounds on each server
    warm_requests: int  # maximum requests in one load round
    warm_seconds: float  # maximum duration of one load round
    warm_concurrency: int  # connections, each with one request in flight
    burst_trials: int  # bursts per start mode
    burst_size: int  # concurrent requests in one burst
    memory_levels: tuple[int, ...]  # idle instance counts whose memory is measured
    model_trials: int  # zygote cold starts of the embedding model, weights preloaded
    model_fresh_trials: int  # fresh cold starts of it per weights source, several s each
    model_s3: bool  # also time pulls from an S3 store (moto on 127.0.0.1), about 20 s more
    weight_load_trials: int  # fresh subprocesses per weights loader
    limit_mode: str | None = None  # `coldbrew serve --limit-mode`; None picks the best


FULL_PLAN = Plan(cold_trials=50, fresh_trials=20, ray_trials=20, floor_trials=1000,
                 heavy_trials=20, heavy_fresh_trials=10, warm_rounds=5, warm_requests=20000,
                 warm_seconds=8.0, warm_concurrency=8, burst_trials=5, burst_size=100,
                 memory_levels=(1, 10, 50), model_trials=20, model_fresh_trials=5,
                 model_s3=True, weight_load_trials=5)
QUICK_PLAN = Plan(cold_trials=10, fresh_trials=5, ray_trials=5, floor_trials=100,
                  heavy_trials=5, heavy_fresh_trials=3, warm_rounds=2, warm_requests=3000,
                  warm_seconds=3.0, warm_concurrency=8, burst_trials=1, burst_size=100,
                  memory_levels=(1, 10), model_trials=5, model_fresh_trials=1,
                  model_s3=False, weight_load_trials=1)


def make_plan(quick: bool, trials: int | None, limit_mode: str | None) -> Plan:
    """Pick the full or the `--quick` plan; `trials` replaces every repeat count."""
    plan = replace(QUICK_PLAN if quick else FULL_PLAN, limit_mode=limit_mode)
    if trials is None:
        return plan
    return replace(plan, cold_trials=trials, fresh_trials=trials, ray_trials=trials,
                   floor_trials=trials, heavy_trials=trials, heavy_fresh_trials=trials,
                   warm_rounds=trials, burst_trials=trials, model_trials=trials,
                   model_fresh_trials=trials, weight_load_trials=trials)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path,
                 timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Poll `url` until it returns HTTP 200; raise BenchmarkError if the process exits first."""
    try:
        servers.wait_healthy(url, process, log_path, timeout_s)
    except servers.ServerStartError as error:
        raise BenchmarkError(str(error)) from None


def check_cold_then_warm(name: str, cold: Mapping[str, str], warm: Mapping[str, str]) -> None:
    """Raise BenchmarkError unless the gateway marked the two requests cold, then warm."""
    if cold.get("x-coldbrew-cold-start") != "true":
        raise BenchmarkError(f"{name}: the first request after the instances drained was not a "
                             "cold start; is another client using this server?")
    if warm.get("x-coldbrew-cold-start") != "false":
        raise BenchmarkError(f"{name}: the request right after a cold start was not warm; "
                             "did the instance expire in between?")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Send SIGTERM, wait for a graceful exit, then SIGKILL what is left."""
    servers.stop_process(process, SERVER_STOP_TIMEOUT_S)


class ColdbrewServer:
    """A `coldbrew serve` subprocess on a free port, with a temporary state dir."""

    def __init__(self, work_dir: Path, limit_mode: str | None,
                 memory_budget_mb: int | None = None, store_uri: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.state_dir = work_dir / f"state-{self.port}"
        self.log_path = work_dir / f"server-{self.port}.log"
        self.limit_mode = limit_mode
        self.memory_budget_mb = memory_budget_mb
        self.store_uri = store_uri
        self.env = env or {}  # added to this process's environment
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "coldbrew.cli.main", "serve", "--host", HOST,
                   "--port", str(self.port), "--state-dir", str(self.state_dir)]
        if self.limit_mode is not None:
            command += ["--limit-mode", self.limit_mode]
        if self.memory_budget_mb is not None:
            command += ["--memory-budget-mb", str(self.memory_budget_mb)]
        if self.store_uri is not None:
            command += ["--store", self.store_uri]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env})
        wait_healthy(f"{self.url}/healthz", self.process, self.log_path)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def zygotes(self) -> list[psutil.Process]:
        """Return this server's zygote processes."""
        assert self.process is not None, "server not started"
        found = []
        for child in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.Error):
                if "coldbrew.sandbox.zygote" in child.cmdline():
                    found.append(child)
        return found

    def zygote_pss_mb(self, instance_pids: set[int]) -> float:
        """Return the summed PSS in MB of this server's zygotes and their standby children.

        A zygote's children that are not in `instance_pids` are standbys it forked ahead
        of requests, so they count as the zygote's cost, not as instances.
        """
        total = 0.0
        for zygote in self.zygotes():
            with contextlib.suppress(psutil.Error):
                total += zygote.memory_full_info().pss / 2**20
                for standby in zygote.children():
                    if standby.pid not in instance_pids:
                        total += standby.memory_full_info().pss / 2**20
        return total


@contextlib.contextmanager
def running_server(limit_mode: str | None, memory_budget_mb: int | None = None,
                   store_uri: str | None = None, env: dict[str, str] | None = None
                   ) -> Iterator[tuple[ColdbrewServer, Client]]:
    """Start a coldbrew server in a temporary folder; stop it and remove the folder on exit."""
    with tempfile.TemporaryDirectory(prefix="coldbrew-bench-") as work_dir:
        server = ColdbrewServer(Path(work_dir), limit_mode, memory_budget_mb, store_uri, env)
        try:
            server.start()
            with Client(server.url, timeout_s=300.0) as client:
                yield server, client
        finally:
            server.stop()


def function_spec(name: str, code: str, **fields: Any) -> dict[str, Any]:
    """Return a spec for one of the functions under bench/functions/CODE."""
    handler = {"noop": "handler.noop", "heavy": "handler.predict"}[code]
    return {"name": name, "handler": handler, **fields}


def deploy(client: Client, spec: dict[str, Any], code: str) -> None:
    client.deploy(spec, FUNCTIONS_DIR / code)


def drain(client: Client, name: str, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Wait until function `name` has no instances left, so the next request starts one."""
    deadline = time.monotonic() + timeout_s
    while client.instances(name):
        if time.monotonic() > deadline:
            raise BenchmarkError(f"function {name!r} still has instances {timeout_s:.0f} s after "
                                 "its keep-alive; is the gateway's ticker running?")
        time.sleep(0.02)


def timed_invoke(http: httpx.Client, name: str, event: Any = None) -> tuple[float, httpx.Response]:
    """Invoke `name` and return the client-side latency in ms and the response."""
    started = time.perf_counter()
    response = http.post(f"/v1/functions/{name}/invoke", json={} if event is None else event)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise BenchmarkError(f"invoking {name!r} returned HTTP {response.status_code}: "
                             f"{response.text[:500]}")
    return elapsed_ms, response


def python_env() -> dict[str, str]:
    """Return the environment for comparator subprocesses, with Ray's usage reporting off.

    Ray's dashboard reports usage statistics to a remote host unless this variable is 0
    (ray/_common/usage/usage_lib.py in ray 2.60.0).
    """
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
