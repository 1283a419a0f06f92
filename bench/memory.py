"""Benchmark 5: resident and proportional memory of idle warm instances of the heavy function.

For each instance count N the function is deployed with min_instances=N, so the gateway
starts N provisioned instances that import numpy and scikit-learn and then sit idle.
RSS counts every page an instance maps, shared or not; PSS divides each shared page
among the processes that map it, so a sum of PSS is what the instances really cost.
The zygote total adds the PSS of the zygote and of its pre-forked standby child,
because they hold their share of the pages the instances inherited.
"""

from __future__ import annotations

import time

from bench.cold_start import heavy_preload
from bench.harness import (
    BenchmarkError,
    ColdbrewServer,
    Plan,
    deploy,
    function_spec,
    running_server,
)
from bench.report import BenchmarkResult, Comparison
from bench.stats import Summary
from coldbrew.sdk.client import Client

# With torch installed an instance of the heavy function is about 300 MB resident.
MEMORY_MB = 512
READY_TIMEOUT_S = 300.0
# Lets instances finish what their init phase left running (allocator trims, page faults).
SETTLE_S = 1.0


def wait_idle(client: Client, name: str, count: int) -> None:
    """Wait until `name` has `count` idle instances."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        rows = client.instances(name)
        if sum(1 for row in rows if row["state"] == "idle") >= count:
            return
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{name!r} has {len(rows)} instances, not {count} idle ones, "
                                 f"after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def measure_level(server: ColdbrewServer, client: Client, mode: str, count: int,
                  preload: list[str]) -> dict[str, float]:
    """Start `count` idle instances in `mode`; return summed RSS and PSS in MB."""
    name = f"memory-{mode}"
    deploy(client, function_spec(name, "heavy", start_mode=mode, preload=preload,
                                 min_instances=count, max_instances=count, memory_mb=MEMORY_MB,
                                 keep_alive_s=600.0), "heavy")
    wait_idle(client, name, count)
    time.sleep(SETTLE_S)
    rows = client.instances(name)
    missing = [row["id"] for row in rows if row["pss_mb"] is None]
    if missing:
        raise BenchmarkError(f"the gateway could not read the memory of instances {missing}")
    measured = {
        "rss_mb": sum(float(row["rss_mb"]) for row in rows),
        "pss_mb": sum(float(row["pss_mb"]) for row in rows),
        "zygote_pss_mb": (server.zygote_pss_mb({int(row["pid"]) for row in rows})
                          if mode == "zygote" else 0.0),
    }
    client.delete(name)
    return measured


def memory(plan: Plan) -> BenchmarkResult:
    """Measure 1, 10 and 50 (`plan.memory_levels`) idle instances in each start mode."""
    preload = heavy_preload()
    result = BenchmarkResult("memory", notes={"levels": list(plan.memory_levels),
                                              "preload": preload})
    result.remarks.append(f"memory: idle instances of a handler importing {', '.join(preload)}")
    # The budget counts memory_mb per instance, not what instances use. The default,
    # 80% of RAM, admits only about 37 instances of 512 MB on a 24 GB machine.
    budget_mb = max(plan.memory_levels) * MEMORY_MB
    with running_server(plan.limit_mode, memory_budget_mb=budget_mb) as (server, client):
        for count in plan.memory_levels:
            for mode in ("zygote", "fresh"):
                measured = measure_level(server, client, mode, count, preload)
                total_pss = measured["pss_mb"] + measured["zygote_pss_mb"]
                result.series[f"{mode}_{count}_pss_mb"] = Summary.of("MB", [total_pss])
                result.series[f"{mode}_{count}_rss_mb"] = Summary.of("MB", [measured["rss_mb"]])
                if mode == "zygote":
                    result.series[f"zygote_{count}_zygote_pss_mb"] = Summary.of(
                        "MB", [measured["zygote_pss_mb"]])

    for count in plan.memory_levels:
        benchmark = f"memory, {count} idle"
        # The target is set on 50 instances; smaller counts are shown for the trend.
        largest = count == 50
        result.comparisons += [
            Comparison(benchmark, "PSS, instances + zygote", "zygote", result.series[f"zygote_{count}_pss_mb"],
                       "fresh", result.series[f"fresh_{count}_pss_mb"], "comparator/coldbrew",
                       ">=" if largest else None, 3.0 if largest else None, show_p99=False),
            Comparison(benchmark, "RSS, instances only", "zygote", result.series[f"zygote_{count}_rss_mb"],
                       "fresh", result.series[f"fresh_{count}_rss_mb"], "comparator/coldbrew",
                       show_p99=False),
        ]
    return result
