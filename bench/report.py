"""Results of one run: comparisons against targets, the printed table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from bench.stats import Summary


@dataclass(frozen=True)
class Comparison:
    """coldbrew against one comparator on one metric, with the ratio the target is set on.

    `ratio_of` is "comparator/coldbrew" (how many times faster or smaller coldbrew is)
    or "coldbrew/comparator". `goal` is ">=" when the ratio should be at least `target`
    and "<=" when it should be at most `target`.
    """

    benchmark: str
    metric: str
    coldbrew_label: str
    coldbrew: Summary
    comparator_label: str
    comparator: Summary | None
    ratio_of: str
    goal: str | None = None
    target: float | None = None
    show_p99: bool = True

    @property
    def ratio(self) -> float | None:
        if self.comparator is None:
            return None
        if self.ratio_of == "comparator/coldbrew":
            return self.comparator.median / self.coldbrew.median
        return self.coldbrew.median / self.comparator.median

    @property
    def target_met(self) -> bool | None:
        ratio = self.ratio
        if ratio is None or self.target is None:
            return None
        return ratio >= self.target if self.goal == ">=" else ratio <= self.target

    def ratio_text(self) -> str:
        if self.ratio_of == "comparator/coldbrew":
            return f"{self.comparator_label} ÷ {self.coldbrew_label}"
        return f"{self.coldbrew_label} ÷ {self.comparator_label}"

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark, "metric": self.metric,
            "coldbrew": self.coldbrew_label, "comparator": self.comparator_label,
            "coldbrew_median": self.coldbrew.median,
            "coldbrew_p99": self.coldbrew.p99 if self.show_p99 else None,
            "comparator_median": self.comparator.median if self.comparator else None,
            "ratio": self.ratio, "ratio_of": self.ratio_text(), "goal": self.goal,
            "target": self.target, "target_met": self.target_met,
        }


@dataclass
class BenchmarkResult:
    """The named series of measurements of one benchmark, and its comparisons."""

    key: str
    series: dict[str, Summary] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)  # printed below the table

    def to_json(self) -> dict[str, Any]:
        return {"series": {name: summary.to_json() for name, summary in self.series.items()},
                "notes": self.notes, "remarks": self.remarks}


def machine_description() -> dict[str, Any]:
    """Describe the machine the way docs/benchmarks.md records it."""
    memory = psutil.virtual_memory()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(memory.total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    """Return the output of a git command in this checkout, or None outside a git checkout."""
    try:
        completed = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                   cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout.strip()


def _format(value: float, unit: str) -> str:
    if unit in ("instances",):
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _target_text(comparison: Comparison) -> str:
    if comparison.target is None:
        return ""
    sign = "≥" if comparison.goal == ">=" else "≤"
    if comparison.target_met is None:
        verdict = "n/a"
    elif comparison.target_met:
        verdict = "[green]met[/green]"
    else:
        verdict = "[red]missed[/red]"
    return f"{sign} {comparison.target:g}x: {verdict}"


def print_table(results: list[BenchmarkResult], console: Console) -> None:
    """Print one row per comparison: medians, coldbrew's p99, the ratio and its target."""
    table = Table(title="coldbrew benchmarks (medians; p99 is coldbrew's)", show_lines=False)
    for column in ("benchmark", "metric", "coldbrew", "median", "p99", "comparator", "median",
                   "ratio", "ratio of", "target"):
        table.add_column(column, justify="right" if column in ("median", "p99", "ratio")
                         else "left")
    for result in results:
        for comparison in result.comparisons:
            unit = comparison.coldbrew.unit
            comparator_median = ("skipped" if comparison.comparator is None
                                 else _format(comparison.comparator.median, unit))
            ratio = comparison.ratio
            table.add_row(
                comparison.benchmark, f"{comparison.metric} ({unit})", comparison.coldbrew_label,
                _format(comparison.coldbrew.median, unit),
                _format(comparison.coldbrew.p99, unit) if comparison.show_p99 else "-",
                comparison.comparator_label, comparator_median,
                "-" if ratio is None else f"{ratio:.2f}x", comparison.ratio_text(),
                _target_text(comparison))
    console.print(table)
    for result in results:
        for remark in result.remarks:
            console.print(f"- {remark}")


def write_json(results: list[BenchmarkResult], out_dir: Path, command: list[str],
               plan: dict[str, Any], started_at: datetime, duration_s: float) -> Path:
    """Write one run to OUT_DIR/<UTC timestamp>.json and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    document = {
        "started_at": started_at.isoformat(),
        "duration_s": duration_s,
        "command": command,
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes make the commit an incomplete description of the code.
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine_description(),
        "plan": plan,
        "benchmarks": {result.key: result.to_json() for result in results},
        "comparisons": [c.to_json() for result in results for c in result.comparisons],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
