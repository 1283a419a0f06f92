"""Model weights: the object store (file:// and a real moto S3 server), node cache, tensors, CLI."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from safetensors.numpy import load_file as reference_load_file
from safetensors.numpy import save_file

from conftest import REPO, new_bucket
from coldbrew.errors import (InvalidModel, InvalidTensorFile, ModelNotFound, ObjectStoreError,
                             WeightsCorrupted)
from coldbrew.weights import tensors
from coldbrew.weights.cache import NodeCache
from coldbrew.weights.store import ObjectStore, default_store_uri, files_digest

KIB = 1024


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(params=["file", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "objects").as_uri()
    request.getfixturevalue("s3_env")
    return new_bucket()


@pytest.fixture
def store(store_uri: str) -> ObjectStore:
    return ObjectStore(store_uri)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small model folder: safetensors weights, a config, a nested file and a duplicate."""
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"embed": rng.standard_normal((64, 32)).astype(np.float32),
               "bias": np.arange(32, dtype=np.int64)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"hidden": 32}\n')
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (folder / "tokenizer" / "copy.txt").write_text("a\nb\nc\n")  # same bytes: one blob
    return folder


def make_model(folder: Path, seed: int, nbytes: int) -> Path:
    """A one-file model folder of `nbytes` random bytes."""
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(np.random.default_rng(seed).bytes(nbytes))
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def cache_leftovers(root: Path) -> list[str]:
    """Names in a cache root other than its lock and access-time folders."""
    return sorted(child.name for child in root.iterdir() if child.name not in (".locks", ".access"))


class CountingStore(ObjectStore):
    """An object store that counts blob opens and can slow or break reads, to test the cache."""

    def __init__(self, uri: str, read_delay_s: float = 0.0, fail_after_bytes: int | None = None,
                 failure: BaseException | None = None) -> None:
        super().__init__(uri)
        self.opens = 0
        self.read_delay_s = read_delay_s
        self.fail_after_bytes = fail_after_bytes
        self.failure = failure or OSError("connection reset by peer")
        self._lock = threading.Lock()

    def open_blob(self, sha256: str) -> BinaryIO:
        with self._lock:
            self.opens += 1
        return _SlowReader(super().open_blob(sha256), self)  # type: ignore[return-value]


class _SlowReader:
    def __init__(self, inner: BinaryIO, store: CountingStore) -> None:
        self.inner, self.store, self.read_bytes = inner, store, 0

    def __enter__(self) -> _SlowReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.inner.close()

    def read(self, size: int = -1) -> bytes:
        time.sleep(self.store.read_delay_s)
        limit = self.store.fail_after_bytes
        if limit is not None and self.read_bytes >= limit:
            raise self.store.failure
        chunk = self.inner.read(size)
        self.read_bytes += len(chunk)
        return chunk


# --- object store -----------------------------------------------------------------------------


def test_push_writes_manifest_and_blobs(store: ObjectStore, model_dir: Path) -> None:
    manifest = store.push("tiny-model", model_dir, progress=False)

    expected_paths = ["config.json", "model.safetensors", "tokenizer/copy.txt",
                      "tokenizer/vocab.txt"]
    assert [entry.path for entry in manifest.files] == expected_paths
    for entry in manifest.files:
        content = (model_dir / entry.path).read_bytes()
        assert entry.size == len(content)
        assert entry.sha256 == hashlib.sha256(content).hexdigest()
    assert manifest.name == "tiny-model"
    assert manifest.digest == files_digest(manifest.files)
    assert datetime.fromisoformat(manifest.created_at).tzinfo is not None

    stored = json.loads(store.fs.cat_file(store.manifest_key("tiny-model")))
    assert stored == manifest.to_json()
    assert set(stored) == {"name", "digest", "files", "created_at"}
    assert store.manifest("tiny-model") == manifest
    assert store.list() == [manifest]
    # copy.txt and vocab.txt have the same bytes, so 3 blobs hold 4 files.
    assert len(store.fs.ls(f"{store.root}/blobs", detail=False)) == 3


def test_push_skips_stored_blobs(store: ObjectStore, model_dir: Path) -> None:
    first = store.push("first", model_dir, progress=False)
    assert store.last_push is not None
    assert store.last_push.bytes == first.total_bytes - len("a\nb\nc\n")  # the duplicate is skipped

    second = store.push("second", model_dir, progress=False)
    assert store.last_push.bytes == 0
    assert store.last_push.skipped_bytes == second.total_bytes
    assert second.digest == first.digest  # the digest covers the files, not the name

    single = store.push("single", model_dir / "model.safetensors", progress=False)
    assert [entry.path for entry in single.files] == ["model.safetensors"]
    assert store.last_push.bytes == 0
    assert [manifest.name for manifest in store.list()] == ["first", "second", "single"]


def test_remove_deletes_unreferenced_blobs(store: ObjectStore, model_dir: Path,
                                           tmp_path: Path) -> None:
    shared = store.push("shared", model_dir, progress=False)
    other_dir = make_model(tmp_path / "other", seed=1, nbytes=4 * KIB)
    (other_dir / "config.json").write_text('{"hidden": 32}\n')  # same bytes as in `shared`
    other = store.push("other", other_dir, progress=False)
    blob_count = len(store.fs.ls(f"{store.root}/blobs", detail=False))

    store.remove("other")

    with pytest.raises(ModelNotFound):
        store.manifest("other")
    weights_blob = next(entry.sha256 for entry in other.files if entry.path == "weights.bin")
    config_blob = next(entry.sha256 for entry in other.files if entry.path == "config.json")
    assert store.blob_size(weights_blob) is None
    assert store.blob_size(config_blob) is not None  # `shared` still uses it
    assert len(store.fs.ls(f"{store.root}/blobs", detail=False)) == blob_count - 1

    with pytest.raises(ModelNotFound, match="'other'"):
        store.remove("other")
    store.remove("shared")
    assert store.list() == []
    assert all(store.blob_size(entry.sha256) is None for entry in shared.files)


def test_missing_model_names_model_and_store(store: ObjectStore) -> None:
    with pytest.raises(ModelNotFound) as caught:
        store.manifest("absent")
    assert "'absent'" in caught.value.message
    assert store.uri in caught.value.message
    assert caught.value.details == {"model": "absent", "store": store.uri}
    assert store.list() == []


@pytest.mark.parametrize("name", ["", "Upper", "-dash-first", ".hidden", "a/b", "../up", "sp ace",
                                  "x" * 129, "ümlaut"])
def test_invalid_model_name_rejected(tmp_path: Path, model_dir: Path, name: str) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    with pytest.raises(InvalidModel) as caught:
        store.push(name, model_dir, progress=False)
    assert repr(name) in caught.value.message
    assert not (tmp_path / "objects").exists()  # rejected before any upload


def test_valid_model_names_accepted(tmp_path: Path, model_dir: Path) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    for name in ["a", "0", "bert-base.v2_int8", "x" * 128]:
        assert store.push(name, model_dir / "config.json", progress=False).name == name


def test_push_rejects_unusable_paths(tmp_path: Path) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    with pytest.raises(InvalidModel, match="does not exist"):
        store.push("m", tmp_path / "missing", progress=False)

    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModel, match="contains no files"):
        store.push("m", tmp_path / "empty", progress=False)

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "elsewhere").symlink_to(tmp_path / "empty")
    (linked / "weights.bin").write_bytes(b"w")
    with pytest.raises(InvalidModel, match="link to a folder"):
        store.push("m", linked, progress=False)


def break_uploads(store: ObjectStore, after_bytes: int) -> None:
    """Make every file that `store` opens for writing fail once `after_bytes` were written."""
    real_open = store.fs.open

    def open_failing(path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = real_open(path, mode, **kwargs)
        if "w" not in mode:
            return handle
        real_write, written = handle.write, [0]

        def write(data: bytes) -> int:
            if written[0] >= after_bytes:
                raise OSError("connection reset by peer")
            written[0] += len(data)
            return int(real_write(data))

        handle.write = write
        return handle

    store.fs.open = open_failing


def test_failed_upload_leaves_no_blob(store_uri: str, tmp_path: Path) -> None:
    folder = make_model(tmp_path / "big", seed=5, nbytes=9 * 2**20)  # two 8 MiB chunks
    store = ObjectStore(store_uri)
    break_uploads(store, after_bytes=1)

    with pytest.raises(ObjectStoreError, match="connection reset by peer"):
        store.push("m", folder, progress=False)
    gc.collect()  # a leaked S3 file would commit its buffer when collected

    clean = ObjectStore(store_uri)
    with pytest.raises(ModelNotFound):
        clean.manifest("m")
    try:
        blobs = clean.fs.ls(f"{clean.root}/blobs", detail=False)
    except FileNotFoundError:
        blobs = []
    assert blobs == []  # neither a partial blob nor a staging file
    assert clean.push("m", folder, progress=False).total_bytes == 9 * 2**20


def test_store_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ObjectStore(str(tmp_path / "plain")).uri == (tmp_path / "plain").as_uri()
    assert ObjectStore(f"file://{tmp_path}/x/").root == str(tmp_path / "x")
    for bad, problem in [("gs://bucket/x", "unsupported scheme"), ("file://host/x", "not a local"),
                         ("file:relative", "not a local"), ("s3:///prefix", "no bucket"),
                         ("", "empty")]:
        with pytest.raises(ObjectStoreError, match=problem):
            ObjectStore(bad)

    monkeypatch.delenv("COLDBREW_STORE", raising=False)
    assert default_store_uri(tmp_path / "state") == f"file://{tmp_path}/state/objects"
    monkeypatch.setenv("COLDBREW_STORE", "s3://bucket/models")
    assert default_store_uri(tmp_path / "state") == "s3://bucket/models"


def test_s3_missing_bucket_is_clear(s3_env: dict[str, str], model_dir: Path) -> None:
    store = ObjectStore(f"s3://absent-{uuid.uuid4().hex[:8]}/models")
    with pytest.raises(ObjectStoreError, match="create the bucket"):
        store.push("m", model_dir, progress=False)


def test_s3_endpoint_argument_wins(s3_env: dict[str, str], moto_url: str,
                                   monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    uri = new_bucket()
    # Nothing listens on port 9, so the test fails unless the argument wins.
    monkeypatch.setenv("COLDBREW_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    store = ObjectStore(uri, endpoint_url=moto_url)
    assert store.push("m", model_dir, progress=False).name == "m"


def test_tampered_manifest_is_corrupted(store: ObjectStore, model_dir: Path) -> None:
    manifest = store.push("m", model_dir, progress=False)
    key = store.manifest_key("m")

    store.fs.pipe_file(key, b"{not json")
    with pytest.raises(WeightsCorrupted, match="not valid JSON"):
        store.manifest("m")

    escaping = manifest.to_json()
    escaping["files"][0]["path"] = "../outside"
    store.fs.pipe_file(key, json.dumps(escaping).encode())
    with pytest.raises(WeightsCorrupted, match="not a relative path"):
        store.manifest("m")

    wrong_digest = {**manifest.to_json(), "digest": "0" * 64}
    store.fs.pipe_file(key, json.dumps(wrong_digest).encode())
    with pytest.raises(WeightsCorrupted, match="does not match the file list"):
        store.manifest("m")


# --- node cache -------------------------------------------------------------------------------


def test_ensure_lays_out_pushed_folder(store: ObjectStore, model_dir: Path, tmp_path: Path) -> None:
    manifest = store.push("m", model_dir, progress=False)
    store.push("one-file", model_dir / "model.safetensors", progress=False)
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)

    path = cache.ensure(store, "m")
    assert path == tmp_path / "cache" / manifest.digest
    assert tree(path) == tree(model_dir)
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o444

    single = cache.ensure(store, "one-file")
    assert tree(single) == {"model.safetensors": (model_dir / "model.safetensors").read_bytes()}

    assert cache.ensure(store, "m") == path
    assert len(cache.downloads) == 2  # the second ensure of "m" reused the folder
    stats = cache.downloads[0]
    assert (stats.name, stats.files, stats.bytes) == ("m", 4, manifest.total_bytes)
    assert stats.seconds > 0
    assert cache_leftovers(tmp_path / "cache") == sorted([manifest.digest, single.name])


def test_corrupted_blob_leaves_nothing(store: ObjectStore, model_dir: Path, tmp_path: Path) -> None:
    manifest = store.push("m", model_dir, progress=False)
    entry = next(entry for entry in manifest.files if entry.path == "model.safetensors")
    store.fs.pipe_file(store.blob_key(entry.sha256), b"flipped bits")
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)

    with pytest.raises(WeightsCorrupted) as caught:
        cache.ensure(store, "m")

    message = caught.value.message
    assert "'model.safetensors'" in message
    assert entry.sha256 in message
    assert hashlib.sha256(b"flipped bits").hexdigest() in message
    assert caught.value.details["actual_sha256"] == hashlib.sha256(b"flipped bits").hexdigest()
    assert cache_leftovers(tmp_path / "cache") == []
    assert cache.downloads == []


def test_missing_blob_leaves_nothing(store: ObjectStore, model_dir: Path, tmp_path: Path) -> None:
    manifest = store.push("m", model_dir, progress=False)
    entry = next(entry for entry in manifest.files if entry.path == "model.safetensors")
    store.fs.rm_file(store.blob_key(entry.sha256))
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)

    with pytest.raises(WeightsCorrupted, match="is missing from") as caught:
        cache.ensure(store, "m")

    assert "'model.safetensors'" in caught.value.message
    assert entry.sha256 in caught.value.message
    assert store.uri in caught.value.message
    assert cache_leftovers(tmp_path / "cache") == []


def test_missing_model_leaves_nothing(store: ObjectStore, tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)
    with pytest.raises(ModelNotFound, match="'ghost'"):
        cache.ensure(store, "ghost")
    assert cache_leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("failure", [OSError("connection reset by peer"), KeyboardInterrupt()])
def test_interrupted_download_leaves_nothing(model_dir: Path, tmp_path: Path,
                                             failure: BaseException) -> None:
    uri = (tmp_path / "objects").as_uri()
    ObjectStore(uri).push("m", model_dir, progress=False)
    store = CountingStore(uri, fail_after_bytes=1, failure=failure)
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)

    expected = ObjectStoreError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        cache.ensure(store, "m")
    assert cache_leftovers(tmp_path / "cache") == []

    assert tree(cache.ensure(ObjectStore(uri), "m")) == tree(model_dir)  # a later try succeeds


def test_stale_download_is_removed(tmp_path: Path, model_dir: Path) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    manifest = store.push("m", model_dir, progress=False)
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)
    stale = tmp_path / "cache" / f".download-{manifest.digest}-killed"
    (stale / "tokenizer").mkdir(parents=True)
    (stale / "tokenizer" / "vocab.txt").write_text("partial")

    cache.ensure(store, "m")
    assert cache_leftovers(tmp_path / "cache") == [manifest.digest]


def test_concurrent_threads_download_once(model_dir: Path, tmp_path: Path) -> None:
    uri = (tmp_path / "objects").as_uri()
    manifest = ObjectStore(uri).push("m", model_dir, progress=False)
    store = CountingStore(uri, read_delay_s=0.05)  # widen the race window
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)
    barrier = threading.Barrier(8)
    paths: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            paths.append(cache.ensure(store, "m"))
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert paths == [tmp_path / "cache" / manifest.digest] * 8
    assert len(cache.downloads) == 1
    assert store.opens == len(manifest.files)


PROCESS_WORKER = """
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from test_weights import CountingStore
    from coldbrew.weights.cache import NodeCache

    store = CountingStore({uri!r}, read_delay_s=0.05)
    cache = NodeCache({root!r}, max_bytes=2**30)
    # Start together: announce readiness, then wait for the other workers.
    open(os.path.join({ready!r}, f"worker-{{os.getpid()}}"), "w").close()
    deadline = time.monotonic() + 30
    while len(os.listdir({ready!r})) < {workers!r} and time.monotonic() < deadline:
        time.sleep(0.005)
    path = cache.ensure(store, "m")
    result = {{"downloads": len(cache.downloads), "opens": store.opens, "path": str(path)}}
    print(json.dumps(result))
"""


def test_concurrent_processes_download_once(model_dir: Path, tmp_path: Path) -> None:
    uri = (tmp_path / "objects").as_uri()
    manifest = ObjectStore(uri).push("m", model_dir, progress=False)
    (tmp_path / "ready").mkdir()
    script = textwrap.dedent(PROCESS_WORKER).format(
        tests=str(REPO / "tests"), uri=uri, root=str(tmp_path / "cache"),
        ready=str(tmp_path / "ready"), workers=3)

    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        results.append(json.loads(stdout))

    assert sum(result["downloads"] for result in results) == 1
    assert sum(result["opens"] for result in results) == len(manifest.files)
    assert {result["path"] for result in results} == {str(tmp_path / "cache" / manifest.digest)}
    assert cache_leftovers(tmp_path / "cache") == [manifest.digest]


def test_ensure_async_shares_one_download(model_dir: Path, tmp_path: Path) -> None:
    uri = (tmp_path / "objects").as_uri()
    manifest = ObjectStore(uri).push("m", model_dir, progress=False)
    store = CountingStore(uri, read_delay_s=0.02)
    cache = NodeCache(tmp_path / "cache", max_bytes=2**30)

    async def ensure_many() -> list[Path]:
        return list(await asyncio.gather(*(cache.ensure_async(store, "m") for _ in range(10))))

    paths = asyncio.run(ensure_many())
    assert paths == [tmp_path / "cache" / manifest.digest] * 10
    assert len(cache.downloads) == 1
    assert store.opens == len(manifest.files)


def test_lru_eviction_keeps_recent_models(tmp_path: Path) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    digests = {name: store.push(name, make_model(tmp_path / name, seed, 40 * KIB),
                                progress=False).digest
               for seed, name in enumerate(["a", "b", "c"])}
    cache = NodeCache(tmp_path / "cache", max_bytes=100 * KIB)  # room for two models

    def cached() -> set[str]:
        return {entry.digest for entry in cache.entries()}

    cache.ensure(store, "a")
    cache.ensure(store, "b")
    cache.ensure(store, "a")  # a is now more recent than b
    cache.ensure(store, "c")
    assert cached() == {digests["a"], digests["c"]}

    cache.ensure(store, "b")  # a was used before c, so a goes
    assert cached() == {digests["c"], digests["b"]}
    assert [entry.digest for entry in cache.entries()] == [digests["c"], digests["b"]]
    assert len(cache.downloads) == 4
    assert cache_leftovers(tmp_path / "cache") == sorted([digests["b"], digests["c"]])


def test_eviction_skips_models_in_use(tmp_path: Path) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    digests = {name: store.push(name, make_model(tmp_path / name, seed, 40 * KIB),
                                progress=False).digest
               for seed, name in enumerate(["a", "b", "c"])}
    cache = NodeCache(tmp_path / "cache", max_bytes=50 * KIB)  # room for one model

    with cache.use(store, "a") as path:
        cache.ensure(store, "b")
        cache.ensure(store, "c")  # b is evicted; a is in use and stays
        assert path.is_dir()
        assert {entry.digest for entry in cache.entries()} == {digests["a"], digests["c"]}

    cache.ensure(store, "b")
    assert {entry.digest for entry in cache.entries()} == {digests["b"]}


def test_model_larger_than_cache_is_kept(tmp_path: Path) -> None:
    store = ObjectStore((tmp_path / "objects").as_uri())
    store.push("big", make_model(tmp_path / "big", 0, 40 * KIB), progress=False)
    cache = NodeCache(tmp_path / "cache", max_bytes=10 * KIB)
    assert cache.ensure(store, "big").is_dir()  # never evict the model just ensured


# --- tensors ----------------------------------------------------------------------------------


def write_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]],
                      trailing: bytes = b"", header: dict[str, Any] | None = None) -> Path:
    """Write a safetensors file from (dtype, shape, bytes); `header` replaces the computed one."""
    computed: dict[str, Any] = {}
    data = b""
    for name, (dtype, shape, raw) in entries.items():
        computed[name] = {"dtype": dtype, "shape": shape,
                          "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header_bytes = json.dumps(header if header is not None else computed).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # writers pad the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data + trailing)
    return path


def sample_arrays() -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    return {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((4, 3, 2)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-2**40, 2**40, size=(2, 2)),
        "i32": rng.integers(-2**20, 2**20, size=5, dtype=np.int32),
        "i16": rng.integers(-2**10, 2**10, size=(3,), dtype=np.int16),
        "i8": np.arange(-5, 5, dtype=np.int8),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def assert_maps_file(array: np.ndarray[Any, Any]) -> None:
    """Check that `array` is a read-only view of a memory map, not a copy."""
    assert not array.flags.owndata
    assert not array.flags.writeable
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview)
    assert isinstance(base.obj, mmap.mmap)


def test_load_matches_reference_loader(tmp_path: Path) -> None:
    path = tmp_path / "sample.safetensors"
    save_file(sample_arrays(), str(path), metadata={"format": "np"})

    loaded = tensors.load(path)
    reference = reference_load_file(str(path))

    assert loaded.keys() == reference.keys()
    for name, expected in reference.items():
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape, name
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)
        assert_maps_file(loaded[name])
    assert tensors.read_header(path).metadata == {"format": "np"}


def test_load_bf16_as_raw_bits(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 0.15625], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")  # bf16 is the top half of a float32
    path = write_safetensors(tmp_path / "bf16.safetensors", {"w": ("BF16", [3], bits.tobytes())})

    loaded = tensors.load(path)["w"]
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, bits)
    np.testing.assert_array_equal((loaded.astype(np.uint32) << 16).view(np.float32), values)


def test_load_torch_shares_one_map(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as reference_torch_load

    path = tmp_path / "sample.safetensors"
    save_file(sample_arrays(), str(path))
    bf16 = torch.tensor([1.0, -2.5, 0.15625], dtype=torch.bfloat16)
    bf16_path = write_safetensors(tmp_path / "bf16.safetensors",
                                  {"w": ("BF16", [3], bf16.view(torch.uint16).numpy().tobytes())})

    loaded = tensors.load(path, framework="torch")
    reference = reference_torch_load(str(path))
    for name, expected in reference.items():
        assert loaded[name].dtype == expected.dtype, name
        assert torch.equal(loaded[name], expected), name
    assert torch.equal(tensors.load(bf16_path, framework="torch")["w"], bf16)

    # Every tensor sits in one mapping of the file: addresses differ exactly as file offsets do.
    header = tensors.read_header(path)
    first = header.tensors["f64"]
    for name, info in header.tensors.items():
        if info.numel:
            assert loaded[name].data_ptr() - loaded["f64"].data_ptr() == info.begin - first.begin

    before = path.read_bytes()
    loaded["f32"].fill_(0.0)  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before


def test_load_resolves_folders(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}

    standard = tmp_path / "standard"
    standard.mkdir()
    save_file(arrays, str(standard / "model.safetensors"))
    save_file({"other": np.zeros(1, np.float32)}, str(standard / "extra.safetensors"))
    assert list(tensors.load(standard)) == ["w"]

    only = tmp_path / "only"
    only.mkdir()
    save_file(arrays, str(only / "weights.safetensors"))
    np.testing.assert_array_equal(tensors.load(only)["w"], arrays["w"])

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(3, np.int64)}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(tensors.load(sharded)) == ["a", "b"]

    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "../only/weights.safetensors"}}))
    with pytest.raises(InvalidTensorFile, match="not a file in"):
        tensors.load(sharded)

    ambiguous = tmp_path / "ambiguous"
    ambiguous.mkdir()
    save_file(arrays, str(ambiguous / "one.safetensors"))
    save_file(arrays, str(ambiguous / "two.safetensors"))
    with pytest.raises(InvalidTensorFile, match="one.safetensors, two.safetensors"):
        tensors.load(ambiguous)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        tensors.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="framework"):
        tensors.load(standard, framework="jax")


F32_2 = ("F32", [2], b"\0" * 8)
INVALID_FILES: list[tuple[str, dict[str, Any], str]] = [
    ("overlap", {"header": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                 "entries": {"a": F32_2}}, "overlaps"),
    ("gap", {"header": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
             "entries": {"a": F32_2}}, "leaving a gap"),
    ("past end", {"header": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                  "entries": {"a": F32_2}}, "cover 16 bytes of data but the file holds 8"),
    ("size mismatch", {"header": {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                       "entries": {"a": F32_2}}, "needs 12 bytes"),
    ("unknown dtype", {"header": {"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}},
                       "entries": {"a": F32_2}}, "unsupported dtype 'F8_E4M3'"),
    ("negative dim", {"header": {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                      "entries": {"a": F32_2}}, "non-negative integers"),
    ("reversed offsets", {"header": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
                          "entries": {"a": F32_2}}, "begin <= end"),
    ("missing key", {"header": {"a": {"dtype": "F32", "shape": [2]}}, "entries": {"a": F32_2}},
     "exactly the keys"),
    ("bad metadata", {"header": {"__metadata__": {"n": 1}}, "entries": {}}, "map of strings"),
    ("trailing bytes", {"entries": {"a": F32_2}, "trailing": b"junk"}, "trailing bytes"),
]


@pytest.mark.parametrize("case, spec, problem", INVALID_FILES, ids=[c[0] for c in INVALID_FILES])
def test_invalid_header_rejected(tmp_path: Path, case: str, spec: dict[str, Any],
                                 problem: str) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", spec.get("entries", {}),
                             trailing=spec.get("trailing", b""), header=spec.get("header"))
    with pytest.raises(InvalidTensorFile, match=problem):
        tensors.load(path)


def test_malformed_file_rejected(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidTensorFile, match="2 bytes"):
        tensors.load(short)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InvalidTensorFile, match="declares a 1000-byte header but is only 10 bytes"):
        tensors.load(truncated)

    not_json = tmp_path / "not-json.safetensors"
    not_json.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(InvalidTensorFile, match="not UTF-8 JSON"):
        tensors.load(not_json)


RSS_PROBE = """
    import json, sys
    import numpy as np
    from coldbrew.weights import tensors

    def rss_kib():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {key: int(fields[key].split()[0]) for key in ("RssAnon", "RssFile")}

    before = rss_kib()
    loaded = tensors.load(sys.argv[1])
    after_load = rss_kib()
    total = sum(float(array.sum(dtype=np.float64)) for array in loaded.values())
    after_read = rss_kib()
    print(json.dumps({"before": before, "after_load": after_load, "after_read": after_read}))
"""


def test_load_does_not_copy_large_file(tmp_path: Path) -> None:
    path = tmp_path / "large.safetensors"
    rng = np.random.default_rng(3)
    save_file({f"layer{i}": rng.standard_normal(2**21).astype(np.float32) for i in range(8)},
              str(path))  # 64 MiB
    file_kib = path.stat().st_size // KIB

    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_PROBE), str(path)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert probe.returncode == 0, probe.stderr
    rss = json.loads(probe.stdout)

    anon_growth = rss["after_read"]["RssAnon"] - rss["before"]["RssAnon"]
    load_growth = sum(rss["after_load"].values()) - sum(rss["before"].values())
    file_growth = rss["after_read"]["RssFile"] - rss["before"]["RssFile"]
    assert load_growth < file_kib // 8, rss  # mapping touches no data pages
    assert anon_growth < file_kib // 8, rss  # even reading every value copies nothing
    assert file_growth > file_kib // 2, rss  # the reads were served from the file's pages


# --- command line -----------------------------------------------------------------------------


def run_models(*args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if key != "COLDBREW_STORE"}
    return subprocess.run([sys.executable, "-m", "coldbrew.cli.main", "models", *args],
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_cli_push_ls_pull_rm(tmp_path: Path, model_dir: Path) -> None:
    env = {"COLDBREW_STATE_DIR": str(tmp_path / "state")}

    pushed = run_models("push", "tiny", str(model_dir), "--no-progress", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith("pushed tiny ")
    assert f"to {(tmp_path / 'state' / 'objects').as_uri()}" in pushed.stdout
    single = run_models("push", "weights-only", str(model_dir / "model.safetensors"), env=env)
    assert single.returncode == 0, single.stderr

    listed = run_models("ls", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2
    manifest = ObjectStore((tmp_path / "state" / "objects").as_uri()).manifest("tiny")
    assert lines[0].split()[:4] == ["tiny", manifest.digest[:12], "4", "files"]
    assert lines[1].split()[:4] == ["weights-only", lines[1].split()[1], "1", "files"]

    pulled = run_models("pull", "tiny", "--no-progress", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert str(tmp_path / "state" / "weights" / manifest.digest) in pulled.stdout
    assert tree(tmp_path / "state" / "weights" / manifest.digest) == tree(model_dir)
    again = run_models("pull", "tiny", env=env)
    assert "already cached" in again.stdout

    removed = run_models("rm", "tiny", env=env)
    assert removed.returncode == 0, removed.stderr
    remaining = run_models("ls", env=env).stdout.splitlines()
    assert [line.split()[0] for line in remaining] == ["weights-only"]


def test_cli_errors_are_one_line(tmp_path: Path, model_dir: Path) -> None:
    store = f"--store={(tmp_path / 'objects').as_uri()}"
    cases = [
        (("push", "Bad_Name", str(model_dir), store),
         "coldbrew models push: invalid model name 'Bad_Name'"),
        (("push", "m", str(tmp_path / "nowhere"), store), "does not exist"),
        (("rm", "ghost", store), "coldbrew models rm: model 'ghost' not found in file://"),
        (("pull", "ghost", store, "--cache", str(tmp_path / "cache")), "model 'ghost' not found"),
        (("ls", "--store=gs://bucket"), "unsupported scheme 'gs'"),
    ]
    for args, expected in cases:
        result = run_models(*args)
        assert result.returncode == 1, args
        assert expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_cli_with_s3_store(s3_env: dict[str, str], model_dir: Path, tmp_path: Path) -> None:
    uri = new_bucket("team/models")
    pushed = run_models("push", "tiny", str(model_dir), "--store", uri, "--no-progress", env=s3_env)
    assert pushed.returncode == 0, pushed.stderr

    listed = run_models("ls", env={**s3_env, "COLDBREW_STORE": uri})
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[:4] == ["tiny", ObjectStore(uri).manifest("tiny").digest[:12], "4",
                                         "files"]
    pulled = run_models("pull", "tiny", "--store", uri, "--cache", str(tmp_path / "cache"),
                        "--no-progress", env=s3_env)
    assert pulled.returncode == 0, pulled.stderr
    missing = run_models("rm", "ghost", "--store", uri, env=s3_env)
    assert missing.returncode == 1
    assert f"model 'ghost' not found in {uri}" in missing.stderr
