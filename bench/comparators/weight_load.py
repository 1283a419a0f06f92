"""Load a model's weights once in this new process and report how long and how much memory it took.

Run as `python -m bench.comparators.weight_load load LOADER SAFETENSORS_FILE TORCH_FILE`,
which prints one JSON object, or `... save SAFETENSORS_FILE TORCH_FILE`, which writes the
same tensors once with `torch.save` for the torch.load loaders.

Every loader's imports happen before the timing starts, so the times are those of the
load itself. "ready" ends when the loader returns a dict of tensors. "read" is the sum
of every tensor, which touches every byte once: a memory-mapped loader pays its page
faults there, a copying loader paid them during the load.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

PROC_STATUS = Path("/proc/self/status")
STATUS_FIELDS = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}


def memory_mb() -> dict[str, float]:
    """Return this process's resident, anonymous and file-backed memory in MiB (Linux)."""
    values: dict[str, float] = {}
    for line in PROC_STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            values[STATUS_FIELDS[key]] = int(rest.split()[0]) / 1024  # the kernel reports kB
    return values


def loaders() -> dict[str, Callable[[Path, Path], dict[str, Any]]]:
    """Import torch, safetensors and coldbrew's loader, and return the loaders by name."""
    import safetensors.torch
    import torch

    from coldbrew.weights import tensors

    return {
        "coldbrew": lambda st_file, _pt_file: tensors.load(st_file, framework="torch"),
        "safetensors": lambda st_file, _pt_file: safetensors.torch.load_file(st_file),
        "torch_load": lambda _st_file, pt_file: torch.load(pt_file, weights_only=True),
        "torch_load_mmap": lambda _st_file, pt_file: torch.load(pt_file, mmap=True,
                                                                 weights_only=True),
    }


def load(loader: str, safetensors_file: Path, torch_file: Path) -> dict[str, Any]:
    """Time one load and one full read: times in ms, sizes in bytes, memory growth in MiB."""
    started = time.perf_counter()
    available = loaders()
    import torch

    torch.set_num_threads(1)  # the sums run on one thread, so every loader reads alike
    imports_ms = (time.perf_counter() - started) * 1000
    before = memory_mb()

    started = time.perf_counter()
    tensors = available[loader](safetensors_file, torch_file)
    ready_ms = (time.perf_counter() - started) * 1000
    loaded = memory_mb()

    started = time.perf_counter()
    checksum = sum(float(tensor.sum()) for tensor in tensors.values())
    read_ms = (time.perf_counter() - started) * 1000
    read = memory_mb()

    return {
        "loader": loader, "imports_ms": imports_ms, "ready_ms": ready_ms, "read_ms": read_ms,
        "bytes": sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()),
        "tensors": len(tensors), "checksum": checksum,
        "ready_growth": {key: loaded[key] - before[key] for key in before},
        "read_growth": {key: read[key] - before[key] for key in before},
    }


def save(safetensors_file: Path, torch_file: Path) -> None:
    import safetensors.torch
    import torch

    torch.save(safetensors.torch.load_file(safetensors_file), torch_file)


def main() -> None:
    action, *arguments = sys.argv[1:]
    if action == "save":
        save(Path(arguments[0]), Path(arguments[1]))
        return
    loader, safetensors_file, torch_file = arguments
    print(json.dumps(load(loader, Path(safetensors_file), Path(torch_file))))


if __name__ == "__main__":
    main()
