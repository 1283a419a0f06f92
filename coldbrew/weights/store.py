"""Object store for model weights through fsspec: content-addressed blobs and a manifest per model.

Layout under the store's root (a local folder or an S3 prefix):

    blobs/<sha256>        the bytes of one file, stored once whatever its name
    models/<name>.json    the manifest: the model's files with their sizes and SHA-256 digests

A push uploads the blobs first and the manifest last, so a reader that finds a manifest also
finds its blobs, unless `collect_garbage` raced with the push (see `_restore_missing_blobs`).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator, cast
from urllib.parse import unquote, urlsplit

import fsspec

from coldbrew.errors import (ColdbrewError, InvalidModel, ModelNotFound, ObjectStoreError,
                             WeightsCorrupted)
from coldbrew.weights.progress import Advance, progress_task, transfer_progress

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
CHUNK_BYTES = 8 * 2**20
STORE_ENV = "COLDBREW_STORE"
S3_ENDPOINT_ENV = "COLDBREW_S3_ENDPOINT_URL"


@dataclass(frozen=True)
class FileEntry:
    """One file of a model: its POSIX path inside the pushed folder, size in bytes and SHA-256."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """A pushed model: its name, content digest, files and UTC creation time (ISO 8601)."""

    name: str
    digest: str
    files: tuple[FileEntry, ...]
    created_at: str

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    @classmethod
    def create(cls, name: str, files: list[FileEntry]) -> Manifest:
        ordered = tuple(sorted(files, key=lambda entry: entry.path))
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(name, files_digest(ordered), ordered, created_at)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest,
                "files": [entry.to_json() for entry in self.files], "created_at": self.created_at}

    @classmethod
    def from_json(cls, data: Any, source: str) -> Manifest:
        """Parse and check a stored manifest; raise WeightsCorrupted naming `source` if invalid."""
        try:
            return _parse_manifest(data)
        except (KeyError, TypeError, ValueError) as error:
            raise WeightsCorrupted(f"manifest {source} is malformed ({error}); push the model "
                                   "again to rewrite it", manifest=source) from None


@dataclass(frozen=True)
class TransferStats:
    """Transfer counts of one push or download: bytes moved, bytes already present, wall seconds."""

    name: str
    digest: str
    files: int
    bytes: int
    skipped_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10^6 bytes), or 0 when nothing moved."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def validate_model_name(name: str) -> str:
    """Return `name` if it is a valid model name; raise InvalidModel naming it otherwise."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidModel(f"invalid model name {name!r}: use 1-128 characters from a-z 0-9 . _ -, "
                           "starting with a letter or digit", field="name")
    return name


def files_digest(files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """Return the SHA-256 of the canonical JSON of a file list, sorted by path."""
    ordered = sorted(files, key=lambda entry: entry.path)
    canonical = json.dumps([entry.to_json() for entry in ordered], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_store_uri(state_dir: str | os.PathLike[str]) -> str:
    """Return $COLDBREW_STORE, or the `objects` folder inside `state_dir` as a file:// URI."""
    configured = os.environ.get(STORE_ENV)
    if configured:
        return configured
    return (Path(state_dir).resolve() / "objects").as_uri()


class ObjectStore:
    """Model manifests and blobs in a local folder (file://) or an S3 bucket (s3://)."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        """Open `uri`; for s3://, `endpoint_url` and `storage_options` (s3fs arguments) apply."""
        self.uri, self.fs, self.root = _open_filesystem(uri, endpoint_url, storage_options)
        self.is_local = self.uri.startswith("file://")
        self.last_push: TransferStats | None = None

    def __repr__(self) -> str:
        return f"ObjectStore({self.uri!r})"

    def blob_key(self, sha256: str) -> str:
        return posixpath.join(self.root, "blobs", sha256)

    def manifest_key(self, name: str) -> str:
        return posixpath.join(self.root, "models", f"{name}.json")

    def push(self, name: str, path: str | os.PathLike[str], progress: bool = True) -> Manifest:
        """Upload a file or folder as model `name`: new blobs first, then the manifest."""
        validate_model_name(name)
        files = _collect_files(Path(path))
        started = time.monotonic()
        entries: list[FileEntry] = []
        uploaded = skipped = 0

        with transfer_progress(progress) as bar:
            for relative, local in files:
                before = local.stat()
                hash_progress = progress_task(bar, f"hash {relative}", before.st_size)
                sha256, size = _hash_file(local, hash_progress)
                if self.blob_size(sha256) == size:
                    skipped += size
                else:
                    self._upload_blob(local, sha256, progress_task(bar, f"push {relative}", size))
                    uploaded += size
                _check_unchanged(local, before)
                entries.append(FileEntry(relative, size, sha256))

        manifest = Manifest.create(name, entries)
        self._write_manifest(manifest)
        self._restore_missing_blobs(manifest, dict(files))
        self.last_push = TransferStats(name, manifest.digest, len(entries), uploaded, skipped,
                                       time.monotonic() - started)
        logger.info("pushed model %s (digest %s) to %s: %d files, %d bytes uploaded, %d already "
                    "stored", name, manifest.digest[:12], self.uri, len(entries), uploaded, skipped)
        return manifest

    def manifest(self, name: str) -> Manifest:
        """Return the manifest of model `name`; raise ModelNotFound if the store has none."""
        validate_model_name(name)
        key = self.manifest_key(name)
        try:
            with self.wrap_errors(f"reading manifest of model {name!r}"):
                raw = self.fs.cat_file(key)
        except FileNotFoundError:
            raise ModelNotFound(f"model {name!r} not found in {self.uri}; push it with "
                                f"'coldbrew models push {name} PATH'", model=name,
                                store=self.uri) from None

        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WeightsCorrupted(f"manifest {key} is not valid JSON ({error}); push the model "
                                   "again to rewrite it", manifest=key) from None
        manifest = Manifest.from_json(data, key)
        if manifest.name != name:
            raise WeightsCorrupted(f"manifest {key} names model {manifest.name!r}, expected "
                                   f"{name!r}; push the model again to rewrite it", manifest=key)
        return manifest

    def list(self) -> list[Manifest]:
        """Return every model's manifest, sorted by name."""
        manifests = []
        for name in self._model_names():
            try:
                manifests.append(self.manifest(name))
            except ModelNotFound:
                continue  # removed while we listed
        return manifests

    def remove(self, name: str) -> None:
        """Delete model `name`'s manifest, then the blobs no other manifest references."""
        validate_model_name(name)
        key = self.manifest_key(name)
        with self.wrap_errors(f"removing model {name!r}"):
            if not self.fs.exists(key):
                raise ModelNotFound(f"model {name!r} not found in {self.uri}; 'coldbrew models ls' "
                                    "lists the models", model=name, store=self.uri)
            self.fs.rm_file(key)
        deleted = self.collect_garbage()
        logger.info("removed model %s from %s and %d unreferenced blobs", name, self.uri, deleted)

    def collect_garbage(self) -> int:
        """Delete blobs that no manifest references; return how many were deleted."""
        # List the blobs before the manifests: a blob uploaded after the first listing is not
        # a candidate, and a push whose manifest lands after the second restores its blobs.
        blobs = self._blob_digests()
        referenced = {entry.sha256 for manifest in self.list() for entry in manifest.files}
        deleted = 0
        for sha256 in sorted(blobs - referenced):
            with self.wrap_errors(f"deleting blob {sha256}"):
                try:
                    self.fs.rm_file(self.blob_key(sha256))
                    deleted += 1
                except FileNotFoundError:
                    pass  # another remove deleted it first
        return deleted

    def blob_size(self, sha256: str) -> int | None:
        """Return the stored size of blob `sha256` in bytes, or None if it is missing."""
        try:
            with self.wrap_errors(f"checking blob {sha256}"):
                info = self.fs.info(self.blob_key(sha256))
        except FileNotFoundError:
            return None
        return int(info["size"])

    def open_blob(self, sha256: str) -> BinaryIO:
        """Open blob `sha256` for streaming reads; raise FileNotFoundError if it is missing."""
        with self.wrap_errors(f"opening blob {sha256}"):
            if self.is_local:
                return cast(BinaryIO, self.fs.open(self.blob_key(sha256), "rb"))
            # No read-ahead cache: the caller reads CHUNK_BYTES at a time, one ranged GET each.
            return cast(BinaryIO, self.fs.open(self.blob_key(sha256), "rb", cache_type="none",
                                               block_size=CHUNK_BYTES))

    @contextmanager
    def wrap_errors(self, action: str) -> Iterator[None]:
        """Turn transport and permission errors into ObjectStoreError; FileNotFoundError passes."""
        try:
            yield
        except (ColdbrewError, FileNotFoundError):
            raise
        except _transport_errors() as error:
            raise ObjectStoreError(f"{action} in {self.uri} failed: {error}; check the store URI, "
                                   "its credentials and its endpoint", store=self.uri) from error

    def _model_names(self) -> builtins.list[str]:  # `list` here is the method above
        try:
            with self.wrap_errors("listing models"):
                keys = self.fs.ls(posixpath.join(self.root, "models"), detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(key)[:-len(".json")] for key in keys if key.endswith(".json")]
        return sorted(name for name in names if NAME_PATTERN.fullmatch(name))

    def _blob_digests(self) -> set[str]:
        try:
            with self.wrap_errors("listing blobs"):
                keys = self.fs.ls(posixpath.join(self.root, "blobs"), detail=False)
        except FileNotFoundError:
            return set()
        # Staging files of unfinished local uploads start with '.' and are not blobs.
        names = (posixpath.basename(key) for key in keys)
        return {name for name in names if SHA256_PATTERN.fullmatch(name)}

    def _upload_blob(self, local: Path, sha256: str, advance: Advance) -> None:
        """Stream `local` to blobs/<sha256>; a failed upload leaves no object under that key."""
        key = self.blob_key(sha256)
        # Local writes are not atomic, so they go to a staging name and are renamed. An S3 object
        # appears only when its upload completes, so it is written in place.
        if self.is_local:
            target = posixpath.join(self.root, "blobs", f".staging-{uuid.uuid4().hex}")
        else:
            target = key

        with self._write_errors(f"uploading {local} as blob {sha256}"):
            handle = self.fs.open(target, "wb")
            try:
                if _copy_file(local, handle, advance) != sha256:
                    raise InvalidModel(f"{local} changed while it was pushed; push it again once "
                                       "nothing writes to it", path=str(local))
                handle.close()
            except BaseException:
                self._abandon_upload(handle, target)
                raise
            if self.is_local:
                self.fs.mv(target, key)

    def _abandon_upload(self, handle: Any, target: str) -> None:
        if self.is_local:
            handle.close()
            self.fs.rm_file(target)
            return
        # fsspec's S3File uploads its buffer on close(), even after an error, and __del__
        # calls close(). discard() drops the buffer and aborts a started multipart upload.
        # Marking the file closed keeps __del__ from calling close() on the dropped buffer.
        try:
            handle.discard()
        finally:
            handle.closed = True

    @contextmanager
    def _write_errors(self, action: str) -> Iterator[None]:
        """Like `wrap_errors`, and a missing bucket or folder becomes ObjectStoreError too."""
        try:
            with self.wrap_errors(action):
                yield
        except FileNotFoundError as error:
            raise ObjectStoreError(f"{action} in {self.uri} failed: {error}; create the bucket "
                                   "or fix the store URI", store=self.uri) from None

    def _write_manifest(self, manifest: Manifest) -> None:
        data = json.dumps(manifest.to_json(), indent=2).encode() + b"\n"
        key = self.manifest_key(manifest.name)
        with self._write_errors(f"writing manifest of model {manifest.name!r}"):
            if not self.is_local:
                self.fs.pipe_file(key, data)
                return
            staging = posixpath.join(self.root, "models", f".staging-{uuid.uuid4().hex}")
            self.fs.pipe_file(staging, data)
            self.fs.mv(staging, key)

    def _restore_missing_blobs(self, manifest: Manifest, local_files: dict[str, Path]) -> None:
        """Upload again any blob that a concurrent `collect_garbage` deleted before the manifest."""
        for entry in manifest.files:
            if self.blob_size(entry.sha256) != entry.size:
                logger.warning("blob %s of model %s was deleted during the push; uploading it "
                               "again", entry.sha256, manifest.name)
                self._upload_blob(local_files[entry.path], entry.sha256, lambda _nbytes: None)


def _open_filesystem(uri: str, endpoint_url: str | None,
                     storage_options: dict[str, Any] | None) -> tuple[str, Any, str]:
    """Return (normalised URI, fsspec filesystem, root path inside it) for a store URI."""
    parts = urlsplit(uri)
    if parts.scheme == "":
        if not uri:
            raise ObjectStoreError("the object store URI is empty; give file:///absolute/folder "
                                   "or s3://bucket/prefix")
        folder = Path(uri).resolve()  # a plain path means a local folder
        return folder.as_uri(), _local_filesystem(), str(folder)

    if parts.scheme == "file":
        folder_text = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not folder_text.startswith("/"):
            raise ObjectStoreError(f"object store URI {uri!r} is not a local absolute path; "
                                   "write file:///absolute/folder")
        folder = Path(folder_text)
        return folder.as_uri(), _local_filesystem(), str(folder)

    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise ObjectStoreError(f"object store URI {uri!r} has no bucket; write "
                                   "s3://bucket/prefix")
        prefix = parts.path.strip("/")
        root = f"{bucket}/{prefix}" if prefix else bucket
        normalised = f"s3://{root}"
        return normalised, _s3_filesystem(endpoint_url, storage_options), root

    raise ObjectStoreError(f"object store URI {uri!r} has unsupported scheme {parts.scheme!r}; "
                           "use file:///absolute/folder or s3://bucket/prefix")


def _local_filesystem() -> Any:
    # A private instance: fsspec shares cached instances process-wide otherwise.
    return fsspec.filesystem("file", auto_mkdir=True, skip_instance_cache=True)


def _s3_filesystem(endpoint_url: str | None, storage_options: dict[str, Any] | None) -> Any:
    """Build an s3fs filesystem; botocore reads credentials from the AWS variables and files."""
    try:
        import s3fs
    except ImportError:
        raise ObjectStoreError("s3:// stores need the s3fs package; reinstall coldbrew with its "
                               "dependencies") from None

    options: dict[str, Any] = dict(storage_options or {})
    client_kwargs: dict[str, Any] = dict(options.pop("client_kwargs", {}))
    endpoint = (endpoint_url or os.environ.get(S3_ENDPOINT_ENV)
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        client_kwargs.setdefault("endpoint_url", endpoint)
    # The region is left to botocore, which reads AWS_DEFAULT_REGION and ~/.aws/config.

    # Another process may change the bucket at any time: no cached instances or listings.
    options.setdefault("skip_instance_cache", True)
    options.setdefault("use_listings_cache", False)
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, **options)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types a failed store request raises: OSError, and botocore's own."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def _collect_files(source: Path) -> list[tuple[str, Path]]:
    """Return (POSIX path inside the model, local path) for a file, or every file under a folder."""
    if not source.exists():
        raise InvalidModel(f"{source} does not exist; give a weights file or a folder",
                           path=str(source))
    if source.is_file():
        return [(source.name, source)]
    if not source.is_dir():
        raise InvalidModel(f"{source} is neither a file nor a folder", path=str(source))

    files: list[tuple[str, Path]] = []
    for folder, subfolders, filenames in os.walk(source):
        subfolders.sort()
        for subfolder in subfolders:
            # os.walk does not enter linked folders; reject them instead of dropping their files.
            if os.path.islink(os.path.join(folder, subfolder)):
                raise InvalidModel(f"{os.path.join(folder, subfolder)} is a link to a folder; "
                                   "copy the folder in or push it on its own", path=str(source))
        for filename in sorted(filenames):
            local = Path(folder) / filename
            if not local.is_file():
                raise InvalidModel(f"{local} is not a regular file (a broken link, socket or "
                                   "device); remove it and push again", path=str(local))
            files.append((local.relative_to(source).as_posix(), local))
    if not files:
        raise InvalidModel(f"{source} contains no files; give a weights file or a folder that "
                           "contains one", path=str(source))
    return files


def _copy_file(local: Path, output: Any, advance: Advance) -> str:
    """Copy `local` into the open store file `output`; return the SHA-256 of what was copied."""
    hasher = hashlib.sha256()
    try:
        source = open(local, "rb")
    except OSError as error:
        raise InvalidModel(f"reading {local} failed: {error}", path=str(local)) from None
    with source:
        while chunk := source.read(CHUNK_BYTES):
            hasher.update(chunk)
            output.write(chunk)
            advance(len(chunk))
    return hasher.hexdigest()


def _hash_file(path: Path, advance: Advance) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
            advance(len(chunk))
    return hasher.hexdigest(), size


def _check_unchanged(path: Path, before: os.stat_result) -> None:
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise InvalidModel(f"{path} changed while it was pushed; push it again once nothing "
                           "writes to it", path=str(path))


def _parse_manifest(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise TypeError("the top level is not a JSON object")
    name = data["name"]
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"invalid model name {name!r}")

    files = tuple(_parse_file_entry(item) for item in data["files"])
    paths = [entry.path for entry in files]
    if len(set(paths)) != len(paths):
        raise ValueError("a file path is listed twice")
    folders = {str(parent) for path in paths for parent in PurePosixPath(path).parents}
    clashes = folders.intersection(paths)
    if clashes:
        raise ValueError(f"{sorted(clashes)[0]!r} is listed as a file and used as a folder")

    digest = data["digest"]
    if digest != files_digest(files):
        raise ValueError(f"digest {digest!r} does not match the file list")
    created_at = data["created_at"]
    if not isinstance(created_at, str):
        raise TypeError("created_at is not a string")
    return Manifest(name, digest, tuple(sorted(files, key=lambda entry: entry.path)), created_at)


def _parse_file_entry(item: Any) -> FileEntry:
    path, size, sha256 = item["path"], item["size"], item["sha256"]
    if not isinstance(path, str) or not _is_safe_relative_path(path):
        raise ValueError(f"file path {path!r} is not a relative path inside the model")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"file size {size!r} of {path!r} is not a non-negative integer")
    if not isinstance(sha256, str) or SHA256_PATTERN.fullmatch(sha256) is None:
        raise ValueError(f"sha256 {sha256!r} of {path!r} is not 64 lowercase hex digits")
    return FileEntry(path, size, sha256)


def _is_safe_relative_path(path: str) -> bool:
    """Return whether `path` stays inside the folder it is joined to (no '..', '.', or root)."""
    parts = path.split("/")
    return bool(path) and "\0" not in path and all(part not in ("", ".", "..") for part in parts)
