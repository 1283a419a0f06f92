"""One function's pool of instances: routing to warm ones, cold starts, queueing, keep-alive.

Runs in the gateway process, on its event loop; nothing here blocks. Requests that
find no idle instance wait in a FIFO queue of futures. Each waiting request may cause
one instance to start, so a burst of N requests starts at most min(N, max_instances).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coldbrew.errors import ColdbrewError, InitFailed, ServiceUnavailable, TooManyRequests
from coldbrew.sandbox.backend import InstanceProcess
from coldbrew.spec import Deployment, FunctionSpec

if TYPE_CHECKING:
    from coldbrew.control.plane import ControlPlane

logger = logging.getLogger("coldbrew.pool")


class InstanceState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"


@dataclass(eq=False)
class Instance:
    id: str
    deployment: Deployment
    provisioned: bool
    state: InstanceState = InstanceState.STARTING
    process: InstanceProcess | None = None
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    served: int = 0
    # True until the first request it serves: that request waited for the init phase.
    cold_pending: bool = True

    @property
    def memory_mb(self) -> int:
        return self.deployment.spec.memory_mb


class FunctionPool:
    def __init__(self, plane: "ControlPlane", deployment: Deployment) -> None:
        self.plane = plane
        self.deployment = deployment
        self.instances: dict[str, Instance] = {}
        self.waiters: deque[asyncio.Future[Instance]] = deque()
        self.closed = False
        self.created_at = time.time()
        self.drained = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def spec(self) -> FunctionSpec:
        return self.deployment.spec

    @property
    def name(self) -> str:
        return self.deployment.spec.name

    def _live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state != InstanceState.STOPPING]

    def _count(self, state: InstanceState) -> int:
        return sum(1 for i in self.instances.values() if i.state == state)

    def queued_requests(self) -> int:
        return sum(1 for waiter in self.waiters if not waiter.done())

    # Routing

    async def acquire(self) -> tuple[Instance, bool]:
        """Return an instance reserved for one request, and whether it is a cold start."""
        if self.closed:
            raise ServiceUnavailable(f"function {self.name!r} is being removed or replaced")
        if self.queued_requests() == 0:
            instance = self._take_idle()
            if instance is not None:
                return instance, self._claim_cold(instance)

        may_start = len(self._live()) < self.spec.max_instances
        queued = self.queued_requests() - self._count(InstanceState.STARTING)
        if not may_start and queued >= self.spec.max_queue:
            raise TooManyRequests(
                f"function {self.name!r} has all {self.spec.max_instances} instances busy and "
                f"{queued} requests queued (max_queue={self.spec.max_queue}); retry later",
                retry_after_s=1, max_instances=self.spec.max_instances,
                max_queue=self.spec.max_queue)

        waiter: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.scale_up()
        try:
            instance = await waiter
        except asyncio.CancelledError:
            self._forget_waiter(waiter)
            raise
        return instance, self._claim_cold(instance)

    def _forget_waiter(self, waiter: asyncio.Future[Instance]) -> None:
        # The request went away (client disconnect, shutdown). If an instance had already
        # been handed to it, give that instance to the next request.
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.make_available(waiter.result())
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    @staticmethod
    def _claim_cold(instance: Instance) -> bool:
        cold = instance.cold_pending
        instance.cold_pending = False
        return cold

    def _take_idle(self) -> Instance | None:
        # Most recently used first, so that surplus instances stay idle and age out.
        idle = [i for i in self.instances.values() if i.state == InstanceState.IDLE]
        if not idle:
            return None
        instance = max(idle, key=lambda i: i.last_used)
        instance.state = InstanceState.BUSY
        return instance

    def release(self, instance: Instance) -> None:
        """Return an instance after a request it finished normally."""
        instance.served += 1
        self.make_available(instance)

    def make_available(self, instance: Instance) -> None:
        """Hand a ready instance to the oldest waiting request, or mark it idle."""
        if self.closed or instance.deployment.version != self.deployment.version:
            self.stop_instance(instance, graceful=True)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                instance.state = InstanceState.BUSY
                waiter.set_result(instance)
                return
        instance.state = InstanceState.IDLE
        instance.last_used = time.monotonic()
        self.plane.on_instance_idle()

    # Scaling

    def scale_up(self) -> None:
        """Start instances for waiting requests, bounded by max_instances and memory."""
        while (self.queued_requests() > self._count(InstanceState.STARTING)
               and len(self._live()) < self.spec.max_instances):
            if not self.plane.reserve_memory(self, self.spec.memory_mb):
                return
            self._spawn(provisioned=False)

    def ensure_min_instances(self) -> None:
        while not self.closed and len(self._live()) < self.spec.min_instances:
            if not self.plane.reserve_memory(self, self.spec.memory_mb):
                return
            self._spawn(provisioned=True)

    def stop_expired(self, now: float) -> None:
        """Stop idle instances past keep_alive_s, keeping min_instances.

        On-demand instances go before provisioned ones, each group oldest first, so that
        the instances kept for min_instances are the ones started for it.
        """
        surplus = len(self._live()) - self.spec.min_instances
        idle = sorted((i for i in self.instances.values() if i.state == InstanceState.IDLE),
                      key=lambda i: (i.provisioned, i.last_used))
        for instance in idle:
            if surplus <= 0:
                return
            if now - instance.last_used >= self.spec.keep_alive_s:
                logger.info("function=%s instance=%s idle for %.1f s (keep_alive_s=%s): stopping",
                            self.name, instance.id, now - instance.last_used,
                            self.spec.keep_alive_s)
                self.stop_instance(instance, graceful=True)
                surplus -= 1

    def stopping_mb(self) -> int:
        return sum(i.memory_mb for i in self.instances.values()
                   if i.state == InstanceState.STOPPING)

    def evictable(self) -> list[Instance]:
        """Return idle instances that may be stopped to free memory for another function."""
        surplus = len(self._live()) - self.spec.min_instances
        idle = sorted((i for i in self.instances.values() if i.state == InstanceState.IDLE),
                      key=lambda i: i.last_used)
        return idle[:max(0, surplus)]

    def _spawn(self, provisioned: bool) -> None:
        instance = Instance(id=f"{self.name}-{uuid.uuid4().hex[:12]}",
                            deployment=self.deployment, provisioned=provisioned,
                            cold_pending=not provisioned)
        self.instances[instance.id] = instance
        self._run(self._start(instance))

    def _run(self, coroutine: "asyncio.coroutines.Coroutine[object, object, None]") -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, instance: Instance) -> None:
        started = time.perf_counter()
        try:
            instance.process = await self.plane.backend.start_instance(instance.deployment,
                                                                       instance.id)
        except Exception as error:  # noqa: BLE001 - every failure goes to one waiting request
            if not isinstance(error, ColdbrewError):
                logger.exception("function=%s instance=%s failed to start", self.name, instance.id)
                error = InitFailed(f"instance {instance.id} failed to start: {error}")
            else:
                logger.warning("function=%s instance=%s failed to start: %s", self.name,
                               instance.id, error.message)
            self._forget(instance)
            self._fail_one_waiter(error)
            return

        logger.info("function=%s instance=%s pid=%d started in %.1f ms (init %.1f ms)%s",
                    self.name, instance.id, instance.process.pid,
                    (time.perf_counter() - started) * 1000, instance.process.init_ms,
                    " provisioned" if instance.provisioned else "")
        instance.process.exited.add_done_callback(lambda _f: self._on_exit(instance))
        if instance.state == InstanceState.STOPPING:
            self._run(self._stop(instance, graceful=False))
            return
        self.make_available(instance)

    def _fail_one_waiter(self, error: ColdbrewError) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                return

    def _on_exit(self, instance: Instance) -> None:
        if instance.state in (InstanceState.IDLE, InstanceState.STARTING):
            status = instance.process.exited.result() if instance.process else None
            logger.warning("function=%s instance=%s exited while %s: %s", self.name, instance.id,
                           instance.state.value, status.describe() if status else "unknown")
            self.stop_instance(instance, graceful=False)

    def stop_instance(self, instance: Instance, graceful: bool) -> None:
        if instance.state == InstanceState.STOPPING:
            return
        was_starting = instance.state == InstanceState.STARTING
        instance.state = InstanceState.STOPPING
        if was_starting and instance.process is None:
            return  # _start finds STOPPING when the process is ready and stops it then
        self._run(self._stop(instance, graceful))

    async def _stop(self, instance: Instance, graceful: bool) -> None:
        instance.state = InstanceState.STOPPING
        try:
            if instance.process is not None:
                await instance.process.stop(graceful=graceful)
        except Exception:  # noqa: BLE001 - a failed stop must not leak the memory reservation
            logger.exception("function=%s instance=%s failed to stop cleanly", self.name,
                             instance.id)
        finally:
            self._forget(instance)

    def _forget(self, instance: Instance) -> None:
        if self.instances.pop(instance.id, None) is None:
            return
        self.plane.release_memory(instance.memory_mb)
        if not self.instances:
            self.drained.set()
        if not self.closed:
            self.scale_up()

    # Lifecycle

    def replace(self, deployment: Deployment) -> None:
        """Switch to a new version: old idle instances stop now, busy ones after their request."""
        self.deployment = deployment
        for instance in list(self.instances.values()):
            if instance.deployment.version != deployment.version:
                if instance.state == InstanceState.IDLE:
                    self.stop_instance(instance, graceful=True)
                elif instance.state == InstanceState.STARTING:
                    self.stop_instance(instance, graceful=False)
        self.ensure_min_instances()
        self.scale_up()

    async def close(self, grace_s: float) -> None:
        """Reject new requests, let running ones finish for up to grace_s, then kill the rest."""
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ServiceUnavailable(
                    f"function {self.name!r} was removed while the request waited"))
        for instance in list(self.instances.values()):
            if instance.state in (InstanceState.IDLE, InstanceState.STARTING):
                self.stop_instance(instance, graceful=False)
        if self.instances:
            self.drained.clear()
            try:
                await asyncio.wait_for(self.drained.wait(), grace_s)
            except TimeoutError:
                logger.warning("function=%s: %d instances still busy after %.0f s; killing them",
                               self.name, len(self.instances), grace_s)
        for instance in list(self.instances.values()):
            if instance.process is not None:
                await instance.process.stop(graceful=False)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def describe_instances(self) -> list[dict[str, object]]:
        now = time.time()
        rows = []
        for instance in self.instances.values():
            process = instance.process
            memory = process.memory() if process is not None else {"rss_mb": None, "pss_mb": None}
            rows.append({
                "id": instance.id,
                "state": instance.state.value,
                "pid": process.pid if process is not None else None,
                "version": instance.deployment.version,
                "age_s": round(now - instance.created_at, 3),
                "provisioned": instance.provisioned,
                "requests_served": instance.served,
                "init_ms": round(process.init_ms, 3) if process is not None else None,
                **{key: round(value, 2) if value is not None else None
                   for key, value in memory.items()},
            })
        return rows
