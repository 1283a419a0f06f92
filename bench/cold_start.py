"""Benchmarks 1 and 2: the first request to a new instance, with trivial and heavy imports.

Each trial waits until the function has no instances (its keep-alive is the minimum,
0.1 s), then times one request on an open HTTP connection. That request must start an
instance, so its latency is a cold start from request in to response out, with no deploy
in it. A second request right after it gives the warm latency of the same trial.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from coldbrew.sdk.client import Client

from bench.harness import (
    SHORT_KEEP_ALIVE_S,
    BenchmarkError,
    check_cold_then_warm,
    Plan,
    deploy,
    drain,
    function_spec,
    python_env,
    running_server,
    timed_invoke,
)
from bench.report import BenchmarkResult, Comparison
from bench.stats import Summary

logger = logging.getLogger("bench")

# Lets the stopped instance's exit and reaping finish before the next trial starts.
SETTLE_S = 0.05
COMPARATOR_TIMEOUT_S = 300.0
HEAVY_MODULES = ("numpy", "sklearn.linear_model")


@dataclass
class ColdWarm:
    """Latencies in ms of the cold request and the warm request after it, per trial."""

    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)

    def overhead(self) -> list[float]:
        return [cold - warm for cold, warm in zip(self.cold, self.warm)]


def heavy_preload() -> list[str]:
    """Return the modules the heavy handler imports: numpy, scikit-learn, and torch if installed."""
    modules = list(HEAVY_MODULES)
    if importlib.util.find_spec("torch") is not None:
        modules.append("torch")
    return modules


def measure_trial(http: httpx.Client, client: Client, name: str, into: ColdWarm) -> None:
    """Run one cold request and one warm request on `name`; check the gateway agrees."""
    drain(client, name)
    time.sleep(SETTLE_S)
    cold_ms, cold = timed_invoke(http, name)
    warm_ms, warm = timed_invoke(http, name)
    check_cold_then_warm(name, cold.headers, warm.headers)
    into.cold.append(cold_ms)
    into.warm.append(warm_ms)


def run_cold_starts(plan: Plan, code: str, preload: list[str], zygote_trials: int,
                    fresh_trials: int) -> dict[str, ColdWarm]:
    """Time cold and warm requests of one function in both start modes, trials interleaved."""
    results = {"zygote": ColdWarm(), "fresh": ColdWarm()}
    with running_server(plan.limit_mode) as (server, client):
        for mode in results:
            deploy(client, function_spec(f"{code}-{mode}", code, start_mode=mode,
                                         preload=preload, keep_alive_s=SHORT_KEEP_ALIVE_S,
                                         memory_mb=512), code)
        with httpx.Client(base_url=server.url, timeout=300.0) as http:
            http.get("/healthz")  # opens the connection outside the timing
            for trial in range(max(zygote_trials, fresh_trials)):
                for mode, trials in (("zygote", zygote_trials), ("fresh", fresh_trials)):
                    if trial < trials:
                        measure_trial(http, client, f"{code}-{mode}", results[mode])
    return results


def run_comparator(module: str, trials: int) -> dict[str, Any]:
    """Run `python -m MODULE TRIALS` and return the JSON object it prints."""
    completed = subprocess.run([sys.executable, "-m", module, str(trials)], capture_output=True,
                               text=True, timeout=COMPARATOR_TIMEOUT_S, env=python_env())
    if completed.returncode != 0:
        raise BenchmarkError(f"{module} exited with code {completed.returncode}:\n"
                             f"{completed.stderr[-3000:]}")
    output: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return output


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def cold_start_trivial(plan: Plan) -> BenchmarkResult:
    """Benchmark 1: zygote vs fresh vs a Ray actor vs the bare fork floor, no-op handler."""
    timings = run_cold_starts(plan, "noop", [], plan.cold_trials, plan.fresh_trials)
    floor = run_comparator("bench.comparators.fork_floor", plan.floor_trials)

    ray: Summary | None = None
    notes: dict[str, Any] = {}
    if ray_installed():
        ray_run = run_comparator("bench.comparators.ray_actor", plan.ray_trials)
        ray = Summary.of("ms", ray_run["values_ms"])
        notes["ray_init_s"] = ray_run["init_s"]
        notes["ray_prestarted_workers"] = ray_run["num_cpus"]
        remark = (f"ray actor: Ray started in {ray_run['init_s']:.1f} s before the timing; the "
                  f"first {ray_run['num_cpus']} actors reuse workers Ray prestarted")
    else:
        notes["ray"] = "skipped: ray is not installed"
        remark = "ray actor: skipped, ray is not installed (./bench.sh installs it)"
        logger.warning("ray is not installed; skipping the Ray actor comparator")

    result = BenchmarkResult("cold_start_trivial", notes=notes, remarks=[remark])
    zygote = result.series["zygote_ms"] = Summary.of("ms", timings["zygote"].cold)
    fresh = result.series["fresh_ms"] = Summary.of("ms", timings["fresh"].cold)
    result.series["zygote_warm_ms"] = Summary.of("ms", timings["zygote"].warm)
    result.series["fresh_warm_ms"] = Summary.of("ms", timings["fresh"].warm)
    result.series["zygote_overhead_ms"] = Summary.of("ms", timings["zygote"].overhead())
    floor_ms = result.series["fork_floor_ms"] = Summary.of("ms", floor["values_ms"])
    if ray is not None:
        result.series["ray_actor_ms"] = ray

    benchmark, metric = "cold start, trivial", "first request"
    result.comparisons += [
        Comparison(benchmark, metric, "zygote", zygote, "fresh", fresh,
                   "comparator/coldbrew", ">=", 10.0),
        Comparison(benchmark, metric, "zygote", zygote, "ray actor", ray,
                   "comparator/coldbrew", ">=", 10.0),
        Comparison(benchmark, metric, "zygote", zygote, "fork floor", floor_ms,
                   "coldbrew/comparator", "<=", 3.0),
        # The platform's own cost of a cold start, without the HTTP round trip a warm
        # request also pays, next to the same floor.
        Comparison(benchmark, "cold minus warm", "zygote", result.series["zygote_overhead_ms"],
                   "fork floor", floor_ms, "coldbrew/comparator"),
    ]
    return result


def cold_start_heavy(plan: Plan) -> BenchmarkResult:
    """Benchmark 2: numpy and scikit-learn imports, preloaded by a zygote vs a fresh interpreter."""
    preload = heavy_preload()
    timings = run_cold_starts(plan, "heavy", preload, plan.heavy_trials, plan.heavy_fresh_trials)

    result = BenchmarkResult("cold_start_heavy", notes={"preload": preload}, remarks=[
        f"cold start, heavy imports: the handler imports {', '.join(preload)}; zygote "
        "instances have them preloaded"])
    series = result.series
    for mode, timing in timings.items():
        series[f"{mode}_ms"] = Summary.of("ms", timing.cold)
        series[f"{mode}_warm_ms"] = Summary.of("ms", timing.warm)
        series[f"{mode}_overhead_ms"] = Summary.of("ms", timing.overhead())

    benchmark = "cold start, heavy imports"
    result.comparisons += [
        Comparison(benchmark, "first request", "zygote", series["zygote_ms"], "fresh",
                   series["fresh_ms"], "comparator/coldbrew", ">=", 50.0),
        Comparison(benchmark, "cold minus warm", "zygote", series["zygote_overhead_ms"],
                   "fresh", series["fresh_overhead_ms"], "comparator/coldbrew", ">=", 50.0),
    ]
    return result
