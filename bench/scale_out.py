"""Benchmark 4: a burst of concurrent requests to a function with no instances.

Every trial deploys the function anew (outside the timing), opens one connection per
request ahead of the burst, then sends all requests at once and times until the last
response. The instance count is read from the gateway right after the burst. The
keep-alive of 60 s is long enough that no instance has expired by then.
"""

from __future__ import annotations

import asyncio
import time

from bench.harness import BenchmarkError, Plan, deploy, function_spec, running_server
from bench.load import HttpConnection
from bench.report import BenchmarkResult, Comparison
from bench.stats import Summary
from coldbrew.sdk.client import Client

MAX_INSTANCES = 100
KEEP_ALIVE_S = 60.0
BURST_TIMEOUT_S = 300.0


async def _burst(port: int, name: str, size: int) -> tuple[float, set[str]]:
    # One open connection per request, so the burst does not time TCP handshakes.
    connections = [await HttpConnection(port).open() for _ in range(size)]
    path = f"/v1/functions/{name}/invoke"
    try:
        started = time.perf_counter()
        responses = await asyncio.wait_for(
            asyncio.gather(*(connection.request("POST", path, b"{}")
                             for connection in connections)), BURST_TIMEOUT_S)
        elapsed_s = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
    failed = [r for r in responses if r.status != 200]
    if failed:
        raise BenchmarkError(f"{len(failed)} of {size} burst requests to {name!r} failed; "
                             f"first: HTTP {failed[0].status} {failed[0].body[:300]!r}")
    return elapsed_s, {r.headers["x-coldbrew-instance-id"] for r in responses}


def burst_trial(client: Client, port: int, mode: str, size: int) -> tuple[float, int]:
    """Deploy the function anew and burst it; return seconds to the last response and instances."""
    name = f"burst-{mode}"
    deploy(client, function_spec(name, "noop", start_mode=mode, max_instances=MAX_INSTANCES,
                                 max_queue=size, memory_mb=64, keep_alive_s=KEEP_ALIVE_S), "noop")
    if client.instances(name):
        raise BenchmarkError(f"{name!r} has instances before the burst")
    elapsed_s, serving = asyncio.run(_burst(port, name, size))
    started = len(client.instances(name))
    client.delete(name)  # stops every instance, so the next trial starts from zero
    return elapsed_s, max(started, len(serving))


def scale_out(plan: Plan) -> BenchmarkResult:
    """Time a burst of `plan.burst_size` requests at zero instances, zygote vs fresh."""
    seconds: dict[str, list[float]] = {"zygote": [], "fresh": []}
    instances: dict[str, list[float]] = {"zygote": [], "fresh": []}
    with running_server(plan.limit_mode) as (server, client):
        for _ in range(plan.burst_trials):
            for mode in seconds:
                elapsed_s, started = burst_trial(client, server.port, mode, plan.burst_size)
                seconds[mode].append(elapsed_s)
                instances[mode].append(started)

    result = BenchmarkResult("scale_out", notes={"burst_size": plan.burst_size,
                                                 "max_instances": MAX_INSTANCES})
    for mode in seconds:
        result.series[f"{mode}_burst_s"] = Summary.of("s", seconds[mode])
        result.series[f"{mode}_instances"] = Summary.of("instances", instances[mode])
    result.notes["max_instances_started"] = max(max(v) for v in instances.values())
    result.remarks.append(f"scale-out: {plan.burst_trials} bursts per start mode, each at zero "
                          f"instances with max_instances={MAX_INSTANCES}")

    series = result.series
    benchmark = f"scale-out, {plan.burst_size} requests"
    result.comparisons += [
        Comparison(benchmark, "until all answered", "zygote", series["zygote_burst_s"], "fresh",
                   series["fresh_burst_s"], "comparator/coldbrew", ">=", 10.0),
        Comparison(benchmark, "instances started", "zygote", series["zygote_instances"], "fresh",
                   series["fresh_instances"], "comparator/coldbrew"),
        # The maximum number of instances any trial started, in either mode, against the limit.
        Comparison(benchmark, "most instances", "any mode",
                   Summary.of("instances", [result.notes["max_instances_started"]]),
                   "max_instances", Summary.of("instances", [MAX_INSTANCES]),
                   "coldbrew/comparator", "<=", 1.0, show_p99=False),
    ]
    return result
