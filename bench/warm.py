"""Benchmark 3: warm invocations of a no-op through the gateway vs an always-on Starlette app.

Both servers run at once, each in its own process on 127.0.0.1; load rounds alternate
between them so that drift on a shared machine hits both alike. The load generator
runs in this process and shares the machine's cores with the servers.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import (
    HOST,
    BenchmarkError,
    Plan,
    deploy,
    free_port,
    function_spec,
    python_env,
    running_server,
    stop_process,
    wait_healthy,
)
from bench.load import LoadResult, generate_load
from bench.report import BenchmarkResult, Comparison
from bench.stats import Summary

WARMUP_REQUESTS = 200
WARMUP_SECONDS = 20.0
FUNCTION = "noop-warm"


def _checked(result: LoadResult, target: str) -> LoadResult:
    if result.errors:
        raise BenchmarkError(f"{result.errors} requests to {target} failed; first: "
                             f"{result.first_error}")
    return result


def run_rounds(plan: Plan, coldbrew_port: int, plain_port: int) -> dict[str, list[LoadResult]]:
    """Warm both servers up, then run `plan.warm_rounds` alternating load rounds on each."""
    targets = {"coldbrew": (coldbrew_port, f"/v1/functions/{FUNCTION}/invoke"),
               "plain": (plain_port, "/invoke")}
    for name, (port, path) in targets.items():
        _checked(generate_load(port, path, plan.warm_concurrency, WARMUP_REQUESTS,
                               WARMUP_SECONDS), name)
    rounds: dict[str, list[LoadResult]] = {name: [] for name in targets}
    for _ in range(plan.warm_rounds):
        for name, (port, path) in targets.items():
            rounds[name].append(_checked(generate_load(port, path, plan.warm_concurrency,
                                                       plan.warm_requests, plan.warm_seconds),
                                         name))
    return rounds


def warm_invocation(plan: Plan) -> BenchmarkResult:
    """Compare latency and throughput of warm no-op invocations with the plain app's."""
    with running_server(plan.limit_mode) as (server, client), \
            tempfile.TemporaryDirectory(prefix="coldbrew-bench-plain-") as work_dir:
        # As many instances as concurrent requests, started by the warm-up, kept alive.
        deploy(client, function_spec(FUNCTION, "noop", max_instances=plan.warm_concurrency,
                                     memory_mb=64, keep_alive_s=600.0), "noop")
        port = free_port()
        log_path = Path(work_dir, "plain.log")
        with open(log_path, "ab") as log:
            plain = subprocess.Popen([sys.executable, "-m", "bench.comparators.plain_app",
                                      str(port)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=python_env())
        try:
            wait_healthy(f"http://{HOST}:{port}/healthz", plain, log_path)
            rounds = run_rounds(plan, server.port, port)
        finally:
            stop_process(plain)

    result = BenchmarkResult("warm", notes={"concurrency": plan.warm_concurrency,
                                            "rounds": plan.warm_rounds,
                                            "max_requests_per_round": plan.warm_requests,
                                            "max_seconds_per_round": plan.warm_seconds})
    for name, results in rounds.items():
        latencies = [latency for round_result in results for latency in round_result.latencies_ms]
        result.series[f"{name}_latency_ms"] = Summary.of("ms", latencies)
        result.series[f"{name}_throughput_rps"] = Summary.of(
            "req/s", [round_result.throughput_rps for round_result in results])
        result.notes[f"{name}_requests"] = len(latencies)
    result.remarks.append(
        f"warm invocation: {plan.warm_concurrency} connections, {plan.warm_rounds} rounds per "
        f"server of at most {plan.warm_requests} requests or {plan.warm_seconds:g} s; "
        f"throughput is the median of rounds")

    series = result.series
    benchmark = "warm invocation"
    result.comparisons += [
        Comparison(benchmark, "throughput", "gateway", series["coldbrew_throughput_rps"],
                   "plain app", series["plain_throughput_rps"], "coldbrew/comparator", ">=", 0.6,
                   show_p99=False),
        Comparison(benchmark, "latency", "gateway", series["coldbrew_latency_ms"],
                   "plain app", series["plain_latency_ms"], "coldbrew/comparator", "<=", 1.5),
        Comparison(benchmark, "latency p99", "gateway",
                   Summary.of("ms", [series["coldbrew_latency_ms"].p99]), "plain app",
                   Summary.of("ms", [series["plain_latency_ms"].p99]), "coldbrew/comparator",
                   show_p99=False),
    ]
    return result
