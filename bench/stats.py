"""Summaries of repeated measurements: median, p99 and the raw values."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values`, with `fraction` 0.99 for p99."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    """Repeated measurements of one quantity, in `unit`."""

    unit: str
    values: tuple[float, ...]

    @classmethod
    def of(cls, unit: str, values: Sequence[float]) -> "Summary":
        if not values:
            raise ValueError(f"no measurements in {unit}")
        return cls(unit, tuple(float(v) for v in values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p99(self) -> float:
        return percentile(self.values, 0.99)

    def to_json(self) -> dict[str, Any]:
        # Large samples (load-test latencies) keep only their summary, to keep files small.
        data: dict[str, Any] = {"unit": self.unit, "n": len(self.values),
                                "median": self.median, "p99": self.p99,
                                "min": min(self.values), "max": max(self.values)}
        if len(self.values) <= 200:
            data["values"] = list(self.values)
        return data
