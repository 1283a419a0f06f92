"""Zero-copy loading of safetensors files: numpy arrays or torch tensors over one memory map.

The safetensors format (documented by the safetensors project): an 8-byte little-endian
unsigned header size N, then N bytes of UTF-8 JSON that map each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` plus an optional `"__metadata__"` map of
strings, then the data buffer. Offsets count from the start of that buffer. Tensors are
little-endian and row-major, and together they fill the buffer with no gap or overlap.

Loaded arrays are views of the mapped file: the kernel pages them in on first touch and
shares those pages with every process that maps the same file, such as forked instances.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coldbrew.errors import InvalidTensorFile

HEADER_SIZE_BYTES = 8
# The safetensors reference implementation rejects headers over 100 MB.
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype -> (numpy dtype, torch dtype name). numpy has no bfloat16, so BF16 loads
# as its raw bits in uint16 for numpy; `load(..., framework="torch")` gives real bfloat16.
DTYPES: dict[str, tuple[str, str]] = {
    "F64": ("<f8", "float64"),
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"),
    "I64": ("<i8", "int64"),
    "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"),
    "I8": ("i1", "int8"),
    "U64": ("<u8", "uint64"),
    "U32": ("<u4", "uint32"),
    "U16": ("<u2", "uint16"),
    "U8": ("u1", "uint8"),
    "BOOL": ("?", "bool"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype, shape, and byte range [begin, end) inside the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, checked safetensors header; `data_start` is the file offset of the data buffer."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def prefetch(path: str | os.PathLike[str]) -> int:
    """Read the weights files once so that their pages are in the page cache; return bytes read.

    Call it in a zygote's preload hook. A cgroup charges a page-cache page to the process
    that first reads it in, so afterwards the instances that map the weights are charged
    nothing for them, instead of the first instance paying for every page it touches.
    """
    total = 0
    for file in safetensors_files(Path(path)):
        with open(file, "rb", buffering=0) as stream:
            while chunk := stream.read(8 * 2**20):
                total += len(chunk)
    return total


def load(path: str | os.PathLike[str], framework: str = "numpy") -> dict[str, Any]:
    """Map a .safetensors file (or a model folder's) and return its tensors without copying them.

    `framework` is "numpy" (read-only arrays; BF16 as uint16 bits) or "torch" (tensors over a
    copy-on-write map: a write copies the touched page and never reaches the file).
    """
    if framework not in ("numpy", "torch"):
        raise ValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")

    tensors: dict[str, Any] = {}
    for file in safetensors_files(Path(path)):
        loaded = _load_numpy(file) if framework == "numpy" else _load_torch(file)
        duplicates = tensors.keys() & loaded.keys()
        if duplicates:
            raise InvalidTensorFile(f"tensor {sorted(duplicates)[0]!r} appears in more than one "
                                    f"shard of {path}; rewrite the shards", path=str(file))
        tensors.update(loaded)
    return tensors


def safetensors_files(path: Path) -> list[Path]:
    """Return the files to load for `path`: itself, or a folder's model, shards or only file."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; give a .safetensors file or a model "
                                "folder")

    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if (path / INDEX_FILE).is_file():
        return _shard_files(path / INDEX_FILE)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    found = ", ".join(candidate.name for candidate in candidates) or "none"
    raise InvalidTensorFile(f"{path} has no model.safetensors, no {INDEX_FILE} and not exactly one "
                            f"*.safetensors file (found: {found}); pass the file to load",
                            path=str(path))


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of a .safetensors file without mapping its data."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(HEADER_SIZE_BYTES)
        header_bytes = file.read(_header_length(Path(path), prefix, size))
    return _parse_header(Path(path), header_bytes, size)


def _load_numpy(file: Path) -> dict[str, np.ndarray[Any, Any]]:
    buffer = _map(file, mmap.ACCESS_READ)
    header = _header_of_map(file, buffer)
    arrays = {}
    for name, info in header.tensors.items():
        dtype = np.dtype(DTYPES[info.dtype][0])
        # frombuffer over a read-only map: no copy, and the array is read-only too.
        flat = np.frombuffer(buffer, dtype=dtype, count=info.numel,
                             offset=header.data_start + info.begin)
        arrays[name] = flat.reshape(info.shape)
    return arrays


def _load_torch(file: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ImportError("framework='torch' needs PyTorch, which is not installed; install "
                          "torch, or load with framework='numpy'") from None
    if sys.byteorder != "little":
        raise InvalidTensorFile(f"cannot map {file} as torch tensors on a big-endian machine; "
                                "load with framework='numpy'", path=str(file))

    # torch has no read-only tensors, and a write to a read-only map kills the process with
    # SIGSEGV. A private (copy-on-write) map shares pages until one is written.
    buffer = _map(file, mmap.ACCESS_COPY)
    header = _header_of_map(file, buffer)
    tensors = {}
    for name, info in header.tensors.items():
        dtype = getattr(torch, DTYPES[info.dtype][1])
        if info.numel == 0:
            tensors[name] = torch.empty(info.shape, dtype=dtype)  # frombuffer rejects count 0
            continue
        flat = torch.frombuffer(buffer, dtype=dtype, count=info.numel,
                                offset=header.data_start + info.begin)
        tensors[name] = flat.reshape(info.shape)
    return tensors


def _map(file: Path, access: int) -> mmap.mmap:
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < HEADER_SIZE_BYTES:
            raise InvalidTensorFile(f"{file} is {size} bytes, shorter than the {HEADER_SIZE_BYTES}-"
                                    "byte safetensors header size; it is not a safetensors file",
                                    path=str(file))
        # The map stays valid after the file is closed; the arrays keep the map alive.
        return mmap.mmap(handle.fileno(), 0, access=access)


def _header_of_map(file: Path, buffer: mmap.mmap) -> Header:
    length = _header_length(file, buffer[:HEADER_SIZE_BYTES], len(buffer))
    header_bytes = buffer[HEADER_SIZE_BYTES:HEADER_SIZE_BYTES + length]
    return _parse_header(file, header_bytes, len(buffer))


def _header_length(file: Path, prefix: bytes, file_size: int) -> int:
    if len(prefix) < HEADER_SIZE_BYTES:
        raise InvalidTensorFile(f"{file} is {file_size} bytes, too short for a safetensors file",
                                path=str(file))
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise InvalidTensorFile(f"{file} declares a {length}-byte header, over the "
                                f"{MAX_HEADER_BYTES}-byte limit; it is not a valid safetensors "
                                "file",
                                path=str(file))
    if HEADER_SIZE_BYTES + length > file_size:
        raise InvalidTensorFile(f"{file} declares a {length}-byte header but is only {file_size} "
                                "bytes; the file is truncated or not a safetensors file",
                                path=str(file))
    return length


def _parse_header(file: Path, header_bytes: bytes, file_size: int) -> Header:
    try:
        raw = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidTensorFile(f"{file} has a header that is not UTF-8 JSON ({error})",
                                path=str(file)) from None
    if not isinstance(raw, dict):
        raise InvalidTensorFile(f"{file} has a header that is not a JSON object", path=str(file))

    metadata = raw.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()):
        raise InvalidTensorFile(f"{file} has __metadata__ that is not a map of strings to strings",
                                path=str(file))

    tensors = {name: _parse_tensor(file, name, entry) for name, entry in raw.items()}
    data_start = HEADER_SIZE_BYTES + len(header_bytes)
    _check_layout(file, tensors, file_size - data_start)
    return Header(tensors, metadata, data_start)


def _parse_tensor(file: Path, name: str, entry: Any) -> TensorInfo:
    def invalid(problem: str) -> InvalidTensorFile:
        return InvalidTensorFile(f"{file}: tensor {name!r} {problem}", path=str(file), tensor=name)

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise invalid("needs exactly the keys dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise invalid(f"has unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise invalid(f"has shape {shape!r}; expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1]):
        raise invalid(f"has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")

    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * np.dtype(DTYPES[dtype][0]).itemsize
    if info.end - info.begin != expected:
        raise invalid(f"spans {info.end - info.begin} bytes, but shape {shape} of {dtype} needs "
                      f"{expected} bytes")
    return info


def _check_layout(file: Path, tensors: dict[str, TensorInfo], buffer_bytes: int) -> None:
    """Check that the tensors tile the data buffer exactly, as the format requires."""
    position = 0
    for info in sorted(tensors.values(), key=lambda item: (item.begin, item.end)):
        if info.begin < position:
            raise InvalidTensorFile(f"{file}: tensor {info.name!r} overlaps the tensor before it",
                                    path=str(file), tensor=info.name)
        if info.begin > position:
            raise InvalidTensorFile(f"{file}: tensor {info.name!r} starts at byte {info.begin}, "
                                    f"leaving a gap after byte {position}", path=str(file),
                                    tensor=info.name)
        position = info.end
    if position != buffer_bytes:
        raise InvalidTensorFile(f"{file}: the tensors cover {position} bytes of data but the file "
                                f"holds {buffer_bytes} bytes after the header; the file is "
                                "truncated or has trailing bytes", path=str(file))


def _shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) for name in names):
            raise TypeError("a shard name is not a string")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise InvalidTensorFile(f"{index} is not a safetensors index with a weight_map ({error!r})",
                                path=str(index)) from None
    files = [index.parent / name for name in names]
    for file in files:
        if file.parent != index.parent or not file.is_file():
            raise InvalidTensorFile(f"{index} lists shard {file.name!r}, which is not a file in "
                                    f"{index.parent}", path=str(index))
    return files


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
