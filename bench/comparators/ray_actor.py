"""Cold start of a Ray actor: create one and call it once, on a local Ray already running.

Run as `python -m bench.comparators.ray_actor TRIALS`; prints
`{"values_ms": [...], "init_s": ..., "num_cpus": ...}`. Ray starts before the timing,
as its users would start it, on this machine only (no address, no dashboard).
"""

from __future__ import annotations

import json
import sys
import time

import ray

# Two CPUs, as on the machine the recorded runs use. Ray prestarts one idle worker per
# CPU, so the first `NUM_CPUS` actors reuse those and the rest start new workers.
NUM_CPUS = 2
OBJECT_STORE_BYTES = 100 * 2**20  # Ray's minimum is 75 MiB; the default is 30% of RAM


@ray.remote
class Pinger:
    def ping(self) -> None:
        return None


def actor_cold_start_ms() -> float:
    """Time creating an actor and its first method call, in ms; kill it afterwards."""
    started = time.perf_counter()
    actor = Pinger.remote()  # type: ignore[attr-defined]
    ray.get(actor.ping.remote())
    elapsed_ms = (time.perf_counter() - started) * 1000
    ray.kill(actor)
    return elapsed_ms


def main() -> None:
    trials = int(sys.argv[1])
    started = time.perf_counter()
    ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False)
    init_s = time.perf_counter() - started
    try:
        values = [actor_cold_start_ms() for _ in range(trials)]
    finally:
        ray.shutdown()
    print(json.dumps({"values_ms": values, "init_s": init_s, "num_cpus": NUM_CPUS}))


if __name__ == "__main__":
    main()
