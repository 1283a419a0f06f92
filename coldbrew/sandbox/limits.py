"""Kernel-enforced memory caps per instance: cgroup v2, cgroup v1 or RLIMIT_AS.

The gateway process picks one mode at start-up. With a cgroup, the server creates one
child group per instance, and the instance moves itself into it before it runs user
code. The kernel's OOM killer then kills it when it exceeds `memory_mb`, and the group's
`oom_kill` counter records the kill. Without a writable cgroup hierarchy the instance
sets RLIMIT_AS on itself, so an allocation over the cap fails with MemoryError instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("coldbrew.limits")

CGROUP_V2 = "cgroup2"
CGROUP_V1 = "cgroup1"
RLIMIT = "rlimit"
LIMIT_MODES = (CGROUP_V2, CGROUP_V1, RLIMIT)


@dataclass(frozen=True)
class InstanceLimit:
    """The cap for one instance: a cgroup directory, or a RLIMIT_AS size the instance sets."""

    mode: str
    memory_mb: int
    cgroup_dir: str | None = None

    @property
    def procs_path(self) -> str | None:
        return f"{self.cgroup_dir}/cgroup.procs" if self.cgroup_dir else None

    def oom_kills(self) -> int:
        """Return how many times the kernel OOM killer fired in this instance's cgroup."""
        if self.cgroup_dir is None:
            return 0
        name = "memory.events" if self.mode == CGROUP_V2 else "memory.oom_control"
        try:
            text = Path(self.cgroup_dir, name).read_text()
        except OSError:
            return 0
        match = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        return int(match.group(1)) if match else 0

    def peak_mb(self) -> float | None:
        if self.cgroup_dir is None:
            return None
        name = "memory.peak" if self.mode == CGROUP_V2 else "memory.max_usage_in_bytes"
        try:
            return int(Path(self.cgroup_dir, name).read_text()) / 2**20
        except (OSError, ValueError):
            return None

    def kill_all(self) -> None:
        """SIGKILL every process left in the cgroup, including ones that left the session."""
        if self.procs_path is None:
            return
        try:
            pids = Path(self.procs_path).read_text().split()
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone; retry briefly while they exit."""
        if self.cgroup_dir is None:
            return
        for _ in range(50):
            try:
                os.rmdir(self.cgroup_dir)
                return
            except FileNotFoundError:
                return
            except OSError:
                self.kill_all()
                time.sleep(0.01)
        logger.warning("could not remove cgroup %s: processes still in it", self.cgroup_dir)


class LimitManager:
    """Creates and removes per-instance caps under one cgroup owned by this server."""

    def __init__(self, mode: str, root: str | None) -> None:
        self.mode = mode
        self.root = root

    @classmethod
    def detect(cls, forced_mode: str | None = None) -> "LimitManager":
        """Pick the strongest mode this process may use, or `forced_mode` if given."""
        if forced_mode is not None and forced_mode not in LIMIT_MODES:
            raise ValueError(f"unknown limit mode {forced_mode!r}; expected one of {LIMIT_MODES}")
        candidates = [forced_mode] if forced_mode else [CGROUP_V2, CGROUP_V1]
        for mode in candidates:
            if mode == RLIMIT:
                break
            root = _create_server_cgroup(mode)
            if root is not None:
                logger.info("memory caps use %s (server cgroup %s)", mode, root)
                return cls(mode, root)
            if forced_mode:
                raise RuntimeError(f"limit mode {forced_mode} requested, but no writable "
                                   f"{forced_mode} memory controller was found")
        logger.info("memory caps use RLIMIT_AS: no writable cgroup memory controller found")
        return cls(RLIMIT, None)

    def create(self, name: str, memory_mb: int | None) -> InstanceLimit:
        """Create a cap; with memory_mb None, a cgroup without a limit yet (for a standby)."""
        if self.root is None:
            return InstanceLimit(RLIMIT, memory_mb or 0)
        cgroup_dir = f"{self.root}/{name}"
        os.mkdir(cgroup_dir)
        limit = InstanceLimit(self.mode, 0, cgroup_dir)
        return limit if memory_mb is None else self.apply(limit, memory_mb)

    def apply(self, limit: InstanceLimit, memory_mb: int) -> InstanceLimit:
        """Set the memory cap of an existing cap's cgroup; return the updated cap."""
        if limit.cgroup_dir is None:
            return InstanceLimit(RLIMIT, memory_mb)
        cgroup_dir = limit.cgroup_dir
        limit_bytes = str(memory_mb * 2**20)
        if self.mode == CGROUP_V2:
            Path(cgroup_dir, "memory.max").write_text(limit_bytes)
            _write_if_present(Path(cgroup_dir, "memory.swap.max"), "0")
        else:
            Path(cgroup_dir, "memory.limit_in_bytes").write_text(limit_bytes)
            # Without this the cap could be met by swapping out instead of an OOM kill.
            _write_if_present(Path(cgroup_dir, "memory.memsw.limit_in_bytes"), limit_bytes)
        return InstanceLimit(self.mode, memory_mb, cgroup_dir)

    def close(self) -> None:
        if self.root is None:
            return
        for child in Path(self.root).iterdir():
            if child.is_dir():
                InstanceLimit(self.mode, 0, str(child)).remove()
        try:
            os.rmdir(self.root)
        except OSError as error:
            logger.warning("could not remove server cgroup %s: %s", self.root, error)


def _write_if_present(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass


def _own_cgroup(controller: str | None) -> str | None:
    """Return this process's cgroup path for a v1 controller, or the v2 path for None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


def _mount_point(fstype: str, option: str | None) -> str | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _source, target, kind, options, *_rest = line.split()
        if kind == fstype and (option is None or option in options.split(",")):
            return target
    return None


def _create_server_cgroup(mode: str) -> str | None:
    """Create this server's parent cgroup with the memory controller; None if not allowed."""
    if mode == CGROUP_V2:
        mount = _mount_point("cgroup2", None)
        own = _own_cgroup(None)
    else:
        mount = _mount_point("cgroup", "memory")
        own = _own_cgroup("memory")
    if mount is None or own is None:
        return None

    parent = Path(mount + own)
    _remove_stale_server_cgroups(parent)
    root = parent / f"coldbrew-{os.getpid()}"
    try:
        if mode == CGROUP_V2:
            if "memory" not in (parent / "cgroup.controllers").read_text().split():
                return None
            # cgroup v2 only lets a group hand a controller to its children when it has no
            # processes of its own, so this fails unless the server's group is empty (or root).
            (parent / "cgroup.subtree_control").write_text("+memory")
        root.mkdir(exist_ok=True)
        if mode == CGROUP_V2:
            (root / "cgroup.subtree_control").write_text("+memory")
        else:
            _write_if_present(root / "memory.use_hierarchy", "1")
    except OSError as error:
        logger.debug("%s memory controller not writable at %s: %s", mode, parent, error)
        try:
            root.rmdir()
        except OSError:
            pass
        return None
    return str(root)


def _remove_stale_server_cgroups(parent: Path) -> None:
    """Remove empty groups left by coldbrew servers that were killed without cleanup."""
    for stale in parent.glob("coldbrew-*"):
        pid = stale.name.removeprefix("coldbrew-")
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        for child in list(stale.iterdir()):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            stale.rmdir()
