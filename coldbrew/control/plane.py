"""The control plane: deployments, invocations and the machine-wide memory budget.

Runs in the gateway process. It owns one FunctionPool per deployed function and a
background task that stops idle instances past their keep-alive, keeps min_instances
running, and retries requests that wait for memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from coldbrew.control.pool import FunctionPool, Instance
from coldbrew.errors import (
    ColdbrewError,
    ContextLengthError,
    FunctionNotFound,
    HandlerError,
    InstanceCrashed,
    InvalidRequest,
    InvalidSpec,
    OutOfMemory,
    ResponseTooLarge,
    Timeout,
)
from coldbrew.sandbox.backend import Backend, InstanceLost, InvocationTimedOut
from coldbrew.spec import Deployment, FunctionSpec
from coldbrew.store.db import InvocationRecord, StateStore

logger = logging.getLogger("coldbrew.control")

TICK_INTERVAL_S = 0.1


@dataclass
class InvocationResult:
    request_id: str
    function: str
    version: int
    instance_id: str | None = None
    cold_start: bool = False
    init_ms: float | None = None
    duration_ms: float | None = None
    body: str | None = None
    error: ColdbrewError | None = None
    output: str = ""
    peak_memory_mb: float | None = None
    started_at: float = field(default_factory=time.time)


class ControlPlane:
    def __init__(self, backend: Backend, store: StateStore, memory_budget_mb: int,
                 max_response_bytes: int) -> None:
        self.backend = backend
        self.store = store
        self.memory_budget_mb = memory_budget_mb
        self.max_response_bytes = max_response_bytes
        self.pools: dict[str, FunctionPool] = {}
        self.used_mb = 0
        self._memory_waiters: list[FunctionPool] = []
        self._deploy_locks: dict[str, asyncio.Lock] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # Lifecycle

    async def start(self) -> None:
        await self.backend.start()
        logger.info("memory budget %d MB, limit mode %s", self.memory_budget_mb,
                    self.backend.limit_mode)
        self._ticker = asyncio.create_task(self._tick_forever())

    async def restore(self, deployments: list[Deployment]) -> None:
        """Re-deploy functions found in the state store at start-up, concurrently."""
        async def restore_one(deployment: Deployment) -> None:
            try:
                await self.deploy(deployment)
            except ColdbrewError as error:
                logger.error("function=%s version=%d could not be restored: %s",
                             deployment.name, deployment.version, error.message)

        await asyncio.gather(*(restore_one(deployment) for deployment in deployments))

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await asyncio.gather(*(pool.close(grace_s=2.0) for pool in self.pools.values()),
                             return_exceptions=True)
        self.pools.clear()
        await self.backend.close()
        self.store.flush()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            try:
                self.tick()
                await asyncio.to_thread(self.store.flush)
            except Exception:  # noqa: BLE001 - the ticker must survive one bad round
                logger.exception("control plane tick failed")

    def tick(self) -> None:
        now = time.monotonic()
        for pool in list(self.pools.values()):
            pool.stop_expired(now)
            pool.ensure_min_instances()
        self.on_instance_idle()

    # Deployments

    def check_budget(self, spec: FunctionSpec) -> None:
        """Reject a spec whose instances could never fit in the server's memory budget."""
        if spec.memory_mb > self.memory_budget_mb:
            raise InvalidSpec(f"memory_mb={spec.memory_mb} exceeds the server's memory budget of "
                              f"{self.memory_budget_mb} MB", field="memory_mb")
        provisioned_mb = spec.min_instances * spec.memory_mb
        if provisioned_mb > self.memory_budget_mb:
            raise InvalidSpec(
                f"min_instances={spec.min_instances} x memory_mb={spec.memory_mb} = "
                f"{provisioned_mb} MB exceeds the server's memory budget of "
                f"{self.memory_budget_mb} MB", field="min_instances")

    async def deploy(self, deployment: Deployment) -> None:
        """Prepare (zygote, import check) and route to a new version of a function."""
        spec = deployment.spec
        self.check_budget(spec)
        pool = self.pools.get(spec.name)
        if pool is not None and pool.deployment.version == deployment.version:
            return
        await self.backend.prepare(deployment)
        if pool is None:
            pool = FunctionPool(self, deployment)
            self.pools[spec.name] = pool
            pool.ensure_min_instances()
        else:
            previous = pool.deployment
            pool.replace(deployment)
            task = asyncio.create_task(self._release_when_drained(pool, previous))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        logger.info("function=%s version=%d deployed (start_mode=%s, preload=%s)", spec.name,
                    deployment.version, spec.start_mode, list(spec.preload))

    async def _release_when_drained(self, pool: FunctionPool, previous: Deployment) -> None:
        # Busy instances of the old version finish their request first; their zygote
        # must outlive them, because instances die with their zygote.
        deadline = time.monotonic() + previous.spec.timeout_s + 5
        while time.monotonic() < deadline and any(
                i.deployment.version == previous.version for i in pool.instances.values()):
            await asyncio.sleep(TICK_INTERVAL_S)
        await self.backend.release(previous)

    def deploy_lock(self, name: str) -> asyncio.Lock:
        """Return the lock that serialises deploys and removals of one function name."""
        return self._deploy_locks.setdefault(name, asyncio.Lock())

    async def remove(self, name: str) -> None:
        pool = self.pools.pop(name, None)
        if pool is None:
            raise FunctionNotFound(f"function {name!r} is not deployed")
        await pool.close(grace_s=pool.spec.timeout_s)
        await self.backend.release(pool.deployment)
        logger.info("function=%s removed", name)

    def pool(self, name: str) -> FunctionPool:
        pool = self.pools.get(name)
        if pool is None:
            raise FunctionNotFound(f"function {name!r} is not deployed; list functions with "
                                   "GET /v1/functions", function=name)
        return pool

    # Memory budget

    def reserve_memory(self, requester: FunctionPool, memory_mb: int) -> bool:
        """Reserve memory for a new instance, evicting idle ones of other functions if needed.

        Return False when the request must wait; the pool is retried when memory frees up.
        """
        if self.used_mb + memory_mb <= self.memory_budget_mb:
            self.used_mb += memory_mb
            if requester in self._memory_waiters:
                self._memory_waiters.remove(requester)
            return True

        releasing = sum(pool.stopping_mb() for pool in self.pools.values())
        candidates = sorted((instance for pool in self.pools.values() if pool is not requester
                             for instance in pool.evictable()), key=lambda i: i.last_used)
        for instance in candidates:
            if self.used_mb - releasing + memory_mb <= self.memory_budget_mb:
                break
            victim_pool = self.pools[instance.deployment.name]
            logger.info("memory budget full (%d of %d MB): evicting idle instance %s of "
                        "function=%s for function=%s", self.used_mb, self.memory_budget_mb,
                        instance.id, victim_pool.name, requester.name)
            victim_pool.stop_instance(instance, graceful=False)
            releasing += instance.memory_mb
        if requester not in self._memory_waiters:
            self._memory_waiters.append(requester)
        return False

    def release_memory(self, memory_mb: int) -> None:
        self.used_mb -= memory_mb
        self._retry_memory_waiters()

    def on_instance_idle(self) -> None:
        # An idle instance may be evicted for a request that waits for memory.
        if self._memory_waiters:
            self._retry_memory_waiters()

    def _retry_memory_waiters(self) -> None:
        for pool in list(self._memory_waiters):
            if self.pools.get(pool.name) is not pool:
                self._memory_waiters.remove(pool)
                continue
            pool.scale_up()
            pool.ensure_min_instances()

    # Invocations

    async def invoke(self, name: str, event: Any) -> InvocationResult:
        pool = self.pool(name)
        result = InvocationResult(request_id=str(uuid.uuid4()), function=name,
                                  version=pool.deployment.version)
        try:
            instance, cold = await pool.acquire()
        except ColdbrewError as error:
            result.error = error
            self._record(result)
            return result

        result.instance_id = instance.id
        result.version = instance.deployment.version
        result.cold_start = cold
        assert instance.process is not None
        if cold:
            result.init_ms = instance.process.init_ms
        spec = instance.deployment.spec
        request = {"request_id": result.request_id, "event": event, "cold_start": cold,
                   "deadline": time.time() + spec.timeout_s}
        started = time.perf_counter()
        try:
            reply = await instance.process.invoke(request, spec.timeout_s)
        except InvocationTimedOut:
            pool.stop_instance(instance, graceful=False)
            result.error = Timeout(
                f"function {name!r} timed out after {spec.timeout_s} s (timeout_s); the "
                f"instance {instance.id} was killed. Deploy with a larger timeout_s if the "
                "function needs more time", timeout_s=spec.timeout_s,
                instance_id=instance.id)
        except InstanceLost as lost:
            pool.stop_instance(instance, graceful=False)
            result.error = self._lost_error(instance, lost)
        except BaseException:
            # Cancelled mid-request: the reply will never be read, so the instance
            # cannot be reused.
            pool.stop_instance(instance, graceful=False)
            raise
        else:
            self._apply_reply(result, reply, pool, instance)
        result.duration_ms = (time.perf_counter() - started) * 1000
        self._record(result)
        return result

    def _apply_reply(self, result: InvocationResult, reply: dict[str, Any], pool: FunctionPool,
                     instance: Instance) -> None:
        result.output = reply.get("output", "")
        result.peak_memory_mb = reply.get("max_rss_mb")
        if reply["ok"]:
            body = reply["body"]
            if len(body) > self.max_response_bytes:
                result.error = ResponseTooLarge(
                    f"function {result.function!r} returned {len(body)} bytes; the limit is "
                    f"{self.max_response_bytes} bytes", size=len(body),
                    limit=self.max_response_bytes)
            else:
                result.body = body
        else:
            result.error = self._handler_error(result, reply["error"], instance)
        if reply.get("exiting"):
            pool.stop_instance(instance, graceful=True)
        else:
            pool.release(instance)

    @staticmethod
    def _handler_error(result: InvocationResult, error: dict[str, Any],
                       instance: Instance) -> ColdbrewError:
        if error["type"] == "OutOfMemory":
            memory_mb = instance.memory_mb
            return OutOfMemory(
                f"function {result.function!r} exceeded its memory cap of {memory_mb} MB "
                f"(MemoryError under RLIMIT_AS); the instance {instance.id} was stopped. "
                "Deploy with a larger memory_mb if the function needs more",
                memory_mb=memory_mb, instance_id=instance.id,
                traceback=error["traceback"])
        if error["type"] == "ContextLengthExceeded":
            return ContextLengthError(error["message"], **error.get("details", {}))
        if error["type"] == "InvalidInput":
            return InvalidRequest(error["message"], **error.get("details", {}))
        return HandlerError(
            f"{error['exception_type']}: {error['message']}",
            exception_type=error["exception_type"], traceback=error["traceback"])

    @staticmethod
    def _lost_error(instance: Instance, lost: InstanceLost) -> ColdbrewError:
        name = instance.deployment.name
        if lost.out_of_memory:
            return OutOfMemory(
                f"function {name!r} exceeded its memory cap of {instance.memory_mb} MB; the "
                f"kernel killed instance {instance.id}. Deploy with a larger memory_mb if the "
                "function needs more", memory_mb=instance.memory_mb,
                instance_id=instance.id)
        return InstanceCrashed(
            f"instance {instance.id} of function {name!r} {lost.status.describe()} while "
            "handling the request", instance_id=instance.id, **lost.status.to_json())

    def _record(self, result: InvocationResult) -> None:
        status = 200 if result.error is None else result.error.status
        error_type = result.error.error_type if result.error is not None else None
        if result.error is not None and result.error.status >= 500:
            logger.warning("function=%s request=%s instance=%s failed: %s: %s", result.function,
                           result.request_id, result.instance_id, error_type,
                           result.error.message)
        self.store.record_invocation(InvocationRecord(
            id=result.request_id, function=result.function, version=result.version,
            instance_id=result.instance_id, cold_start=result.cold_start,
            init_ms=result.init_ms, duration_ms=result.duration_ms, status=status,
            error_type=error_type, peak_memory_mb=result.peak_memory_mb,
            started_at=result.started_at, output=result.output))

    def describe(self, name: str) -> dict[str, Any]:
        pool = self.pool(name)
        counts: dict[str, int] = {}
        for instance in pool.instances.values():
            counts[instance.state.value] = counts.get(instance.state.value, 0) + 1
        return {"name": name, "version": pool.deployment.version,
                "code_hash": pool.deployment.code_hash, "spec": pool.spec.to_json(),
                "instances": counts, "queued": pool.queued_requests()}
