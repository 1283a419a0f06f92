"""Node-local cache of model files, addressed by manifest digest and bounded by LRU eviction.

Layout under the cache root:

    <digest>/...              a complete model, laid out like the pushed folder, files read-only
    .download-<digest>-*/     a download in progress, renamed to <digest> once all files verify
    .locks/<digest>.lock      flock(2) target: shared while a model is read or in use, exclusive
                              while it is downloaded or evicted
    .access/<digest>          its modification time is the model's last `ensure`, for LRU order

One process or thread downloads a model while the others wait on its lock, then reuse it.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from coldbrew.errors import WeightsCorrupted
from coldbrew.weights.progress import Advance, progress_task, transfer_progress
from coldbrew.weights.store import (CHUNK_BYTES, SHA256_PATTERN, FileEntry, Manifest, ObjectStore,
                                    TransferStats)

logger = logging.getLogger(__name__)

DEFAULT_DISK_FRACTION = 0.8


@dataclass(frozen=True)
class CacheEntry:
    """A cached model: its digest, folder, size in bytes and last access (ns since the epoch)."""

    digest: str
    path: Path
    bytes: int
    last_access_ns: int


def default_cache_max_bytes(root: str | os.PathLike[str]) -> int:
    """Return 80% of the size of the file system that contains `root`."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    return int(shutil.disk_usage(folder).total * DEFAULT_DISK_FRACTION)


class NodeCache:
    """Models pulled from an object store into `root`, at most `max_bytes` of them (LRU)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self.downloads: list[TransferStats] = []
        self._guard = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}
        self._tasks: dict[tuple[int, str, str], asyncio.Future[Path]] = {}
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        (self.root / ".access").mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest

    def ensure(self, store: ObjectStore, name: str, progress: bool = False) -> Path:
        """Return the local folder of model `name`, downloading it first if this node lacks it."""
        return self.ensure_manifest(store, store.manifest(name), progress)

    def ensure_manifest(self, store: ObjectStore, manifest: Manifest,
                        progress: bool = False) -> Path:
        """Return the local folder of `manifest`'s files, downloading them if they are missing."""
        digest = manifest.digest
        target = self.path(digest)
        with self._digest_lock(digest), _FileLock(self._lock_path(digest)) as lock:
            # Shared first, so that models pinned by `use` in other processes stay readable.
            lock.acquire(shared=True)
            if target.is_dir():
                self._touch(digest)
                return target

            # flock cannot upgrade atomically, so another process may finish the download
            # between the two calls: check again under the exclusive lock.
            lock.acquire(shared=False)
            if not target.is_dir():
                self._remove_stale_downloads(digest)
                self._evict(keep=digest, budget=self.max_bytes - manifest.total_bytes)
                self._download(store, manifest, progress)
            self._touch(digest)
            total = self._evict(keep=digest, budget=self.max_bytes)
        if total > self.max_bytes:
            logger.warning("node cache %s contains %d bytes, over its limit of %d bytes, because "
                           "the remaining models are in use or the model just ensured exceeds it",
                           self.root, total, self.max_bytes)
        return target

    async def ensure_async(self, store: ObjectStore, name: str, progress: bool = False) -> Path:
        """Run `ensure` in a thread; concurrent awaiters of the same model share one call."""
        key = (id(asyncio.get_running_loop()), store.uri, name)
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self.ensure, store, name, progress))
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._forget_task(key, done))
        # shield: one awaiter's cancellation must not cancel the download the others wait for.
        return await asyncio.shield(task)

    @contextmanager
    def use(self, store: ObjectStore, name: str, progress: bool = False) -> Iterator[Path]:
        """Ensure model `name` and keep it from eviction until the block exits."""
        while True:
            path = self.ensure(store, name, progress)
            lock = _FileLock(self._lock_path(path.name))
            lock.acquire(shared=True)
            if path.is_dir():
                break
            lock.close()  # evicted between ensure and the lock: fetch it again

        try:
            yield path
        finally:
            lock.close()

    def entries(self) -> list[CacheEntry]:
        """Return the complete models in the cache, least recently used first."""
        entries = []
        for child in self.root.iterdir():
            if not SHA256_PATTERN.fullmatch(child.name) or not child.is_dir():
                continue
            try:
                last_access = (self.root / ".access" / child.name).stat().st_mtime_ns
            except FileNotFoundError:
                last_access = 0  # never ensured through this cache: evict first
            entries.append(CacheEntry(child.name, child, _folder_bytes(child), last_access))
        return sorted(entries, key=lambda entry: entry.last_access_ns)

    def _download(self, store: ObjectStore, manifest: Manifest, progress: bool) -> None:
        """Fetch and verify every file into a staging folder, then rename it into place."""
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".download-{manifest.digest}-", dir=self.root))
        try:
            with transfer_progress(progress) as bar:
                for entry in manifest.files:
                    advance = progress_task(bar, f"pull {entry.path}", entry.size)
                    self._fetch_file(store, manifest, entry, staging / entry.path, advance)
            _fsync_folder(staging)
            os.rename(staging, self.path(manifest.digest))
            _fsync_folder_entry(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

        stats = TransferStats(manifest.name, manifest.digest, len(manifest.files),
                              manifest.total_bytes, 0, time.monotonic() - started)
        with self._guard:
            self.downloads.append(stats)
        logger.info("downloaded model %s (digest %s) from %s: %d files, %d bytes in %.2f s "
                    "(%.1f MB/s)", manifest.name, manifest.digest[:12], store.uri, stats.files,
                    stats.bytes, stats.seconds, stats.mb_per_s)

    def _fetch_file(self, store: ObjectStore, manifest: Manifest, entry: FileEntry,
                    destination: Path, advance: Advance) -> None:
        """Stream one blob to `destination` and hash it; raise WeightsCorrupted on a mismatch."""
        action = f"downloading file {entry.path!r} of model {manifest.name!r}"
        try:
            reader = store.open_blob(entry.sha256)
        except FileNotFoundError:
            raise WeightsCorrupted(
                f"model {manifest.name!r} file {entry.path!r}: blob {entry.sha256} is missing from "
                f"{store.uri}; push the model again", model=manifest.name, file=entry.path,
                expected_sha256=entry.sha256, actual_sha256=None) from None

        destination.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        size = 0
        with reader, open(destination, "xb") as output:
            # Stop one chunk past the expected size: a wrong blob may be much larger.
            while size <= entry.size:
                with store.wrap_errors(action):
                    chunk = reader.read(CHUNK_BYTES)
                if not chunk:
                    break
                hasher.update(chunk)
                output.write(chunk)
                size += len(chunk)
                advance(len(chunk))
            output.flush()
            os.fsync(output.fileno())

        actual = hasher.hexdigest()
        if size != entry.size or actual != entry.sha256:
            raise WeightsCorrupted(
                f"model {manifest.name!r} file {entry.path!r} is corrupted in {store.uri}: "
                f"expected sha256 {entry.sha256} ({entry.size} bytes), got {actual} "
                f"({size} bytes read); push the model again", model=manifest.name, file=entry.path,
                expected_sha256=entry.sha256, actual_sha256=actual)
        # Instances map these files into memory and share their pages: keep them read-only.
        os.chmod(destination, 0o444)

    def _evict(self, keep: str, budget: int) -> int:
        """Remove least recently used models, except `keep` and locked ones, until under `budget`.

        Return the bytes left in the cache.
        """
        self._remove_stale_evictions()
        entries = self.entries()
        total = sum(entry.bytes for entry in entries)
        for entry in entries:
            if total <= budget:
                break
            if entry.digest != keep and self._try_remove(entry.digest):
                total -= entry.bytes
                logger.info("evicted model %s (%d bytes) from node cache %s", entry.digest[:12],
                            entry.bytes, self.root)
        return total

    def _try_remove(self, digest: str) -> bool:
        """Delete one model unless any thread or process holds its lock; return whether it did."""
        with _FileLock(self._lock_path(digest)) as lock:
            if not lock.acquire(shared=False, blocking=False):
                return False
            target = self.path(digest)
            if not target.is_dir():
                return False  # another process evicted it first
            # Rename first, so that no reader ever sees a half-deleted model folder.
            doomed = self.root / f".evict-{digest}-{uuid.uuid4().hex}"
            os.rename(target, doomed)
            (self.root / ".access" / digest).unlink(missing_ok=True)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _remove_stale_downloads(self, digest: str) -> None:
        """Delete staging folders that a killed process left; the caller has the exclusive lock."""
        for stale in self.root.glob(f".download-{digest}-*"):
            logger.warning("removing the unfinished download %s that a stopped process left", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def _remove_stale_evictions(self) -> None:
        for stale in self.root.glob(".evict-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _touch(self, digest: str) -> None:
        # Explicit nanoseconds: a plain touch gets the kernel's coarse clock, which can give
        # two quick accesses the same time and make the LRU order arbitrary.
        marker = self.root / ".access" / digest
        marker.touch()
        now = time.time_ns()
        os.utime(marker, ns=(now, now))

    def _lock_path(self, digest: str) -> Path:
        return self.root / ".locks" / f"{digest}.lock"

    def _digest_lock(self, digest: str) -> threading.Lock:
        with self._guard:
            return self._digest_locks.setdefault(digest, threading.Lock())

    def _forget_task(self, key: tuple[int, str, str], task: asyncio.Future[Path]) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled():
            task.exception()  # mark it retrieved: the awaiters got it, or all of them left


class _FileLock:
    """An flock(2) on its own open file description, so that threads exclude each other too."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __enter__(self) -> _FileLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def acquire(self, shared: bool, blocking: bool = True) -> bool:
        """Take or convert to a shared or exclusive lock; False if it is busy and not `blocking`."""
        operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            operation |= fcntl.LOCK_NB
        try:
            fcntl.flock(self._fd, operation)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        """Close the file, which releases the lock."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _folder_bytes(folder: Path) -> int:
    total = 0
    for parent, _subfolders, filenames in os.walk(folder):
        for filename in filenames:
            try:
                total += os.lstat(os.path.join(parent, filename)).st_size
            except FileNotFoundError:
                continue  # evicted while we counted
    return total


def _fsync_folder(folder: Path) -> None:
    """Flush the entries of every folder under `folder`, so that a crash cannot lose its files."""
    for parent, _subfolders, _filenames in os.walk(folder):
        _fsync_folder_entry(Path(parent))


def _fsync_folder_entry(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
