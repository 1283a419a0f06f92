"""The interface between the control plane and whatever runs instances.

The control plane only starts, invokes and stops instances through these two classes,
so that a backend on another engine (Ray, for one) can replace the local one.
"""

from __future__ import annotations

import abc
import asyncio
import signal
from dataclasses import dataclass
from typing import Any

from coldbrew.spec import Deployment


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int | None = None
    signal: int | None = None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name} ({self.signal})"
        return f"exited with code {self.exit_code}"

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "signal": self.signal}


class InstanceLost(Exception):
    """The instance died while it was handling a request."""

    def __init__(self, status: ExitStatus, out_of_memory: bool) -> None:
        super().__init__(status.describe())
        self.status = status
        self.out_of_memory = out_of_memory


class InvocationTimedOut(Exception):
    """The handler ran past the function's timeout; the instance has been killed."""


class InstanceProcess(abc.ABC):
    """A running instance, ready to serve one request at a time."""

    instance_id: str
    pid: int
    init_ms: float
    memory_mb: int

    @abc.abstractmethod
    async def invoke(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request and return the instance's reply frame.

        Raise InvocationTimedOut after `timeout_s` or InstanceLost if the process dies.
        """

    @abc.abstractmethod
    async def stop(self, graceful: bool = True) -> ExitStatus:
        """Stop the process and release its cap and temp dir; safe to call twice."""

    @property
    @abc.abstractmethod
    def exited(self) -> asyncio.Future[ExitStatus]:
        """Resolved with the exit status once the process is gone."""

    @abc.abstractmethod
    def memory(self) -> dict[str, float | None]:
        """Return resident (rss_mb) and proportional (pss_mb) memory of the process."""


class Backend(abc.ABC):
    """Runs instances for deployments; one per gateway process."""

    limit_mode: str

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every instance and helper process this backend started."""

    @abc.abstractmethod
    async def prepare(self, deployment: Deployment) -> None:
        """Get ready to start instances of `deployment` and check that its code imports.

        Raise ImportFailed with the traceback when a preload module or the handler's
        module fails to import, or the handler is missing.
        """

    @abc.abstractmethod
    async def release(self, deployment: Deployment) -> None:
        """Drop what `prepare` kept for a deployment that is gone or replaced."""

    def zygote_of(self, deployment: Deployment) -> dict[str, Any] | None:
        """Return the pid and memory of the process instances fork from, if there is one."""
        return None

    @abc.abstractmethod
    async def start_instance(self, deployment: Deployment, instance_id: str) -> InstanceProcess:
        """Start an instance and wait for its init phase; raise InitFailed if it fails."""
