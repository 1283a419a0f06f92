"""`python -m bench`: run coldbrew's benchmarks against live local servers and report them."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

from bench.cold_start import cold_start_heavy, cold_start_trivial
from bench.harness import BenchmarkError, Plan, make_plan
from bench.memory import memory
from bench.model_cold_start import model_cold_start
from bench.report import BenchmarkResult, print_table, utc_now, write_json
from bench.scale_out import scale_out
from bench.warm import warm_invocation
from bench.weight_load import weight_load

BENCHMARKS: dict[str, Callable[[Plan], BenchmarkResult]] = {
    "cold": cold_start_trivial,
    "heavy": cold_start_heavy,
    "warm": warm_invocation,
    "scale": scale_out,
    "memory": memory,
    "model": model_cold_start,
    "weights": weight_load,
}
DEFAULT_OUT = Path("bench-results")
TABLE_WIDTH = 150


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="run the reduced set: fewer repeats, memory at 1 and 10 instances, "
                             "no S3 pulls (under two minutes on 2 cores)")
    parser.add_argument("--trials", type=int, metavar="N",
                        help="repeats of every cold-start, burst and load measurement "
                             "(default: 50 full or 10 quick for zygote cold starts, fewer for "
                             "slower ones)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="folder for the JSON results, one file per run (default "
                             "bench-results)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these benchmarks, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--skip", metavar="NAME[,NAME]",
                        help="leave out these benchmarks, applied after --only")
    parser.add_argument("--limit-mode", choices=["cgroup2", "cgroup1", "rlimit"],
                        help="memory cap mode passed to `coldbrew serve` (default: the best "
                             "available, as for users)")
    return parser


def parse_names(option: str, value: str) -> list[str]:
    """Split a comma-separated list of benchmark names; exit on an unknown name."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"python -m bench: {option}: unknown benchmark(s) {unknown}; "
                         f"expected names from {list(BENCHMARKS)}")
    return names


def selected_benchmarks(only: str | None, skip: str | None = None) -> list[str]:
    names = list(BENCHMARKS) if only is None else parse_names("--only", only)
    skipped = [] if skip is None else parse_names("--skip", skip)
    return [name for name in names if name not in skipped]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trials is not None and args.trials < 1:
        raise SystemExit(f"python -m bench: --trials must be at least 1, got {args.trials}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    console = Console()
    if not console.is_terminal:
        # Rich wraps at 80 columns when output goes to a file or pipe; the table needs more.
        console = Console(width=TABLE_WIDTH)
    names = selected_benchmarks(args.only, args.skip)
    plan = make_plan(args.quick, args.trials, args.limit_mode)
    started_at = utc_now()
    clock = time.perf_counter()

    results: list[BenchmarkResult] = []
    for name in names:
        console.log(f"benchmark {name}: running")
        benchmark_clock = time.perf_counter()
        try:
            results.append(BENCHMARKS[name](plan))
        except BenchmarkError as error:
            console.log(f"[red]benchmark {name} failed:[/red] {error}")
            return 1
        console.log(f"benchmark {name}: done in {time.perf_counter() - benchmark_clock:.1f} s")

    duration_s = time.perf_counter() - clock
    print_table(results, console)
    path = write_json(results, args.out, ["python", "-m", "bench", *(argv or sys.argv[1:])],
                      dataclasses.asdict(plan), started_at, duration_s)
    console.print(f"{len(results)} benchmarks in {duration_s:.0f} s; results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
