"""Content-addressed code bundles: a zip archive stored once per SHA-256, unpacked next to it."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from coldbrew.errors import InvalidBundle

MAX_BUNDLE_BYTES = 250 * 2**20  # Lambda's limit for unzipped code
MAX_BUNDLE_FILES = 20000


class CodeStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def code_dir(self, code_hash: str) -> Path:
        return self.root / code_hash

    def remove(self, code_hash: str) -> None:
        shutil.rmtree(self.code_dir(code_hash), ignore_errors=True)

    def put(self, bundle: bytes) -> str:
        """Store and unpack a zip bundle; return its SHA-256. Raise InvalidBundle if unusable."""
        code_hash = hashlib.sha256(bundle).hexdigest()
        target = self.code_dir(code_hash)
        if target.is_dir():
            return code_hash

        # Unpack into a temporary sibling, then rename: a failed upload leaves nothing behind.
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            _unpack(bundle, staging)
            os.rename(staging, target)
        except FileExistsError:  # OSError on some systems: the same bundle won a race
            shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return code_hash


def _unpack(bundle: bytes, target: Path) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(bundle))
    except zipfile.BadZipFile as error:
        raise InvalidBundle(f"code bundle is not a zip archive: {error}") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_BUNDLE_FILES:
            raise InvalidBundle(f"code bundle has {len(members)} files; the limit is "
                                f"{MAX_BUNDLE_FILES}")
        total = sum(member.file_size for member in members)
        if total > MAX_BUNDLE_BYTES:
            raise InvalidBundle(f"code bundle unpacks to {total} bytes; the limit is "
                                f"{MAX_BUNDLE_BYTES} bytes")
        for member in members:
            _check_member(member)
        try:
            archive.extractall(target)
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise InvalidBundle(f"code bundle could not be unpacked: {error}") from None


def _check_member(member: zipfile.ZipInfo) -> None:
    path = PurePosixPath(member.filename)
    if path.is_absolute() or ".." in path.parts or "\\" in member.filename:
        raise InvalidBundle(f"code bundle entry {member.filename!r} points outside the bundle; "
                            "use relative paths only")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise InvalidBundle(f"code bundle entry {member.filename!r} is a symbolic link; "
                            "links are not allowed in bundles")


def zip_folder(folder: Path) -> bytes:
    """Build a deterministic zip of a folder (sorted entries, fixed timestamps)."""
    buffer = io.BytesIO()
    skip_dirs = {"__pycache__", ".git", ".venv", ".coldbrew", ".pytest_cache"}
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
            for filename in sorted(filenames):
                path = Path(dirpath, filename)
                if filename.endswith(".pyc") or path.is_symlink():
                    continue
                info = zipfile.ZipInfo(str(path.relative_to(folder)), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (path.stat().st_mode & 0o777) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    return buffer.getvalue()
