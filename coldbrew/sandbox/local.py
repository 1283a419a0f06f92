"""The local backend: instances are processes on this machine, forked from zygotes.

Runs in the gateway process. One zygote runs per distinct preload set; a `fresh`
function instead starts a new interpreter per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import psutil

from coldbrew.errors import ImportFailed, InitFailed, InvalidSpec, OutOfMemory
from coldbrew.sandbox import protocol
from coldbrew.sandbox.backend import (
    Backend,
    ExitStatus,
    InstanceLost,
    InstanceProcess,
    InvocationTimedOut,
)
from coldbrew.sandbox.limits import RLIMIT, InstanceLimit, LimitManager
from coldbrew.sandbox.runtime import SINGLE_THREAD_ENV, InstanceSetup
from coldbrew.spec import Deployment

logger = logging.getLogger("coldbrew.sandbox")

INIT_TIMEOUT_S = 120.0
STANDBY_REFILL_DELAY_S = 0.5

# Maps a deployment's `weights` to a local folder, pulling them into the node cache.
WeightsResolver = Callable[[Deployment], Awaitable[str]]
EXIT_WAIT_S = 5.0
GRACEFUL_STOP_S = 2.0


class ZygoteFailed(Exception):
    pass


@dataclass
class Standby:
    """A child the zygote forked ahead of time; it waits for an instance setup."""

    standby_id: str
    pid: int
    limit: InstanceLimit
    exited: asyncio.Future[ExitStatus]
    # The gateway's end of the standby's socket: the setup goes here, then requests.
    sock: socket.socket


class ZygoteHandle:
    """The gateway's end of one zygote process and its control socket."""

    def __init__(self, preload: tuple[str, ...], hook: dict[str, Any] | None,
                 limits: LimitManager) -> None:
        self.preload = preload
        self.hook = hook
        self.limits = limits
        self.standby: Standby | None = None
        self._prefork_task: asyncio.Task[None] | None = None
        self.pid = 0
        self.process: asyncio.subprocess.Process | None = None
        self.users = 0
        self._sender: socket.socket | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # Pending fork and prefork requests: the result is the pid and its exit future,
        # handed over together because a quick child's exit report may follow at once.
        self._forks: dict[str, asyncio.Future[tuple[int, asyncio.Future[ExitStatus]]]] = {}
        self._exits: dict[int, asyncio.Future[ExitStatus]] = {}
        self._read_task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> dict[str, Any]:
        """Start the zygote and wait until its preload imports are done."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, **SINGLE_THREAD_ENV}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coldbrew.sandbox.zygote", str(theirs.fileno()),
            json.dumps({"preload": list(self.preload), "hook": self.hook}),
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
        )
        theirs.close()
        self.pid = self.process.pid
        self._sender = ours.dup()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)

        message = await protocol.read_frame(self._reader)
        if message is None or message.get("op") != "ready":
            await self.process.wait()
            error = (message or {}).get("error", {})
            raise ZygoteFailed(error.get("traceback") or
                               f"zygote exited with code {self.process.returncode}",
                               error.get("message", ""))
        if message["threads"] > 1:
            logger.warning("zygote pid=%d preload=%s runs %d threads after preload; forks of it "
                           "may deadlock in a library that holds a lock in another thread",
                           self.pid, list(self.preload), message["threads"])
        self._read_task = asyncio.create_task(self._read_loop())
        logger.info("zygote pid=%d started, preload=%s in %.0f ms", self.pid,
                    list(self.preload), message["preload_ms"])
        self.schedule_prefork()
        return message

    async def fork(self, setup: InstanceSetup,
                   instance_fd: int) -> tuple[int, asyncio.Future[ExitStatus]]:
        """Fork a new instance that serves on `instance_fd`."""
        message: dict[str, Any] = {"op": "fork", "setup": setup.__dict__}
        return await self._request(setup.instance_id, message, instance_fd)

    async def _request(self, key: str, message: dict[str, Any],
                       fd: int | None) -> tuple[int, asyncio.Future[ExitStatus]]:
        if not self.alive or self._sender is None:
            raise ZygoteFailed(f"zygote pid={self.pid} is not running")
        future: asyncio.Future[tuple[int, asyncio.Future[ExitStatus]]] = (
            asyncio.get_running_loop().create_future())
        self._forks[key] = future
        try:
            if fd is None:
                protocol.send(self._sender, message)
            else:
                protocol.send_with_fd(self._sender, message, fd)
            return await asyncio.wait_for(future, EXIT_WAIT_S)
        finally:
            self._forks.pop(key, None)

    def take_standby(self) -> Standby | None:
        standby, self.standby = self.standby, None
        if standby is not None and standby.exited.done():
            standby.sock.close()
            standby.limit.remove()
            return None
        return standby

    def schedule_prefork(self) -> None:
        if self.standby is not None or not self.alive:
            return
        if self._prefork_task is not None and not self._prefork_task.done():
            return
        self._prefork_task = asyncio.create_task(self._prefork())

    async def _prefork(self) -> None:
        standby_id = f"standby-{os.urandom(6).hex()}"
        limit = self.limits.create(standby_id, None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            message = {"op": "prefork", "standby_id": standby_id,
                       "cgroup_procs": limit.procs_path}
            pid, exited = await self._request(standby_id, message, theirs.fileno())
        except (ZygoteFailed, OSError, TimeoutError) as error:
            logger.warning("zygote pid=%d could not pre-fork a standby: %s", self.pid, error)
            ours.close()
            limit.remove()
            return
        finally:
            theirs.close()
        self.standby = Standby(standby_id, pid, limit, exited, ours)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while (message := await protocol.read_frame(self._reader)) is not None:
                self._dispatch(message)
        except (OSError, protocol.ProtocolError) as error:
            logger.error("zygote pid=%d control socket failed: %s", self.pid, error)
        finally:
            self._on_zygote_gone()

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "forked":
            pid = message["pid"]
            exited = self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
            future = self._forks.get(message["instance_id"])
            if future is not None and not future.done():
                future.set_result((pid, exited))
        elif op == "exited":
            status = ExitStatus(message.get("exit_code"), message.get("signal"))
            exit_future = self._exits.pop(message["pid"], None)
            if exit_future is not None and not exit_future.done():
                exit_future.set_result(status)

    def _on_zygote_gone(self) -> None:
        # The zygote's instances die with it (parent-death signal), so no more exit
        # reports will come: resolve every pending one as killed.
        for exit_future in self._exits.values():
            if not exit_future.done():
                exit_future.set_result(ExitStatus(signal=signal.SIGKILL))
        self._exits.clear()
        for fork_future in self._forks.values():
            if not fork_future.done():
                fork_future.set_exception(ZygoteFailed(f"zygote pid={self.pid} exited"))

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), EXIT_WAIT_S)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._writer is not None:
            self._writer.close()
        if self._sender is not None:
            self._sender.close()
        if self._read_task is not None:
            await asyncio.gather(self._read_task, return_exceptions=True)
        if self._prefork_task is not None:
            await asyncio.gather(self._prefork_task, return_exceptions=True)
        if self.standby is not None:
            self.standby.sock.close()
            self.standby.limit.remove()
            self.standby = None
        logger.info("zygote pid=%d stopped, preload=%s", self.pid, list(self.preload))


class LocalInstance(InstanceProcess):
    def __init__(self, instance_id: str, pid: int, memory_mb: int, limit: InstanceLimit,
                 tmpdir: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 exited: asyncio.Future[ExitStatus]) -> None:
        self.instance_id = instance_id
        self.pid = pid
        self.memory_mb = memory_mb
        self.init_ms = 0.0
        self.limit = limit
        self.tmpdir = tmpdir
        self.reader = reader
        self.writer = writer
        self._exited = exited
        self._cleaned = False
        # Called once, after the first reply or at stop: work that should not compete with
        # the cold start for the CPU (pre-forking the next standby).
        self.after_first_reply: Callable[[], None] | None = None

    def _run_after_first_reply(self) -> None:
        callback, self.after_first_reply = self.after_first_reply, None
        if callback is not None:
            callback()

    @property
    def exited(self) -> asyncio.Future[ExitStatus]:
        return self._exited

    async def wait_ready(self) -> dict[str, Any]:
        """Read the init-phase report; raise InitFailed or OutOfMemory if init failed."""
        try:
            message = await asyncio.wait_for(protocol.read_frame(self.reader), INIT_TIMEOUT_S)
        except TimeoutError:
            await self.stop(graceful=False)
            raise InitFailed(f"instance {self.instance_id} did not finish its init phase "
                             f"within {INIT_TIMEOUT_S:.0f} s", instance_id=self.instance_id)
        except (OSError, protocol.ProtocolError):
            message = None
        if message is not None and message.get("type") == "ready":
            self.init_ms = float(message["init_ms"])
            return message

        if message is None:
            status = await self._wait_exit()
            oom = self.limit.oom_kills() > 0
            await self.stop(graceful=False)
            if oom:
                raise OutOfMemory(f"instance {self.instance_id} exceeded its memory cap of "
                                  f"{self.memory_mb} MB during its init phase",
                                  memory_mb=self.memory_mb, instance_id=self.instance_id)
            raise InitFailed(f"instance {self.instance_id} {status.describe()} during its "
                             "init phase", instance_id=self.instance_id, **status.to_json())
        await self.stop(graceful=False)
        error = message["error"]
        raise InitFailed(
            f"instance {self.instance_id} failed its init phase: "
            f"{error['exception_type']}: {error['message']}",
            instance_id=self.instance_id, traceback=error["traceback"],
            output=message["error"].get("output", ""),
        )

    async def invoke(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            self.writer.write(protocol.encode(request))
            await self.writer.drain()
            async with asyncio.timeout(timeout_s):
                reply = await protocol.read_frame(self.reader)
        except TimeoutError:
            await self.stop(graceful=False)
            raise InvocationTimedOut() from None
        except (OSError, protocol.ProtocolError):
            reply = None
        if reply is None:
            status = await self._wait_exit()
            oom = self.limit.oom_kills() > 0
            await self.stop(graceful=False)
            raise InstanceLost(status, out_of_memory=oom)
        self._run_after_first_reply()
        return reply

    async def _wait_exit(self) -> ExitStatus:
        try:
            return await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)
        except TimeoutError:
            self._kill()
            return await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)

    def _kill(self) -> None:
        # The instance leads its own session, so its process group also contains any
        # children it spawned. The cgroup catches those that left the group.
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(self.pid, signal.SIGKILL)
        self.limit.kill_all()

    async def stop(self, graceful: bool = True) -> ExitStatus:
        self._run_after_first_reply()
        if graceful and not self._exited.done():
            self.writer.close()  # end of stream: the instance's loop exits with code 0
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), GRACEFUL_STOP_S)
            except TimeoutError:
                pass
        if not self._exited.done():
            self._kill()
        status = await self._wait_exit()
        self._cleanup()
        return status

    def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self.writer.close()
        self.limit.kill_all()  # a grandchild may outlive the instance in its cgroup
        self.limit.remove()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def memory(self) -> dict[str, float | None]:
        return process_memory(self.pid)


def process_memory(pid: int) -> dict[str, float | None]:
    """Return resident and proportional memory of a process, in MiB (None if it is gone)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return {"rss_mb": None, "pss_mb": None}
    return {"rss_mb": info.rss / 2**20, "pss_mb": getattr(info, "pss", 0) / 2**20}


class LocalBackend(Backend):
    def __init__(self, run_dir: str, limit_mode: str | None = None,
                 resolve_weights: WeightsResolver | None = None) -> None:
        self.run_dir = run_dir
        self.resolve_weights = resolve_weights
        self.forced_limit_mode = limit_mode
        self.limits: LimitManager | None = None
        self.limit_mode = "unknown"
        self.zygotes: dict[tuple[str, ...], ZygoteHandle] = {}
        self._zygote_locks: dict[tuple[str, ...], asyncio.Lock] = {}
        self._instances: dict[str, LocalInstance] = {}

    async def start(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        os.makedirs(self.run_dir, exist_ok=True)
        self.limits = LimitManager.detect(self.forced_limit_mode)
        self.limit_mode = self.limits.mode

    async def close(self) -> None:
        await asyncio.gather(*(instance.stop(graceful=False)
                               for instance in list(self._instances.values())),
                             return_exceptions=True)
        for zygote in list(self.zygotes.values()):
            await zygote.stop()
        self.zygotes.clear()
        if self.limits is not None:
            self.limits.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @staticmethod
    def _zygote_key(deployment: Deployment) -> tuple[str, ...]:
        # Functions share a zygote per preload set, except those with a preload_hook,
        # whose zygote keeps one version's code and weights in memory.
        preload = tuple(sorted(deployment.spec.preload))
        if deployment.spec.preload_hook is None:
            return preload
        return ("hook", deployment.name, str(deployment.version), *preload)

    async def _zygote(self, deployment: Deployment) -> ZygoteHandle:
        key = self._zygote_key(deployment)
        spec = deployment.spec
        preload = tuple(sorted(spec.preload))
        # Resolved before the lock: a first download must not hold up other zygotes.
        weights_path = await self._weights_path(deployment) if spec.preload_hook else None
        # One lock per zygote: starting one (seconds, for torch) must not hold up others.
        async with self._zygote_locks.setdefault(key, asyncio.Lock()):
            zygote = self.zygotes.get(key)
            if zygote is not None and zygote.alive:
                return zygote
            users = 0
            if zygote is not None:
                logger.warning("zygote pid=%d preload=%s exited; starting a new one",
                               zygote.pid, list(key))
                await zygote.stop()
                users = zygote.users
            hook = None
            if spec.preload_hook is not None:
                hook = {"hook": spec.preload_hook, "code_dir": deployment.code_dir,
                        "env": dict(spec.env), "weights_path": weights_path}
            zygote = ZygoteHandle(preload, hook, self.limits)
            zygote.users = users
            try:
                await zygote.start()
            except ZygoteFailed as error:
                traceback, message = error.args[0], error.args[1] if len(error.args) > 1 else ""
                if hook is not None:
                    raise ImportFailed(f"preload_hook {spec.preload_hook!r} or a preload module "
                                       f"of {list(preload)} failed in the zygote: {message}",
                                       traceback=traceback, field="preload_hook") from None
                raise ImportFailed(f"a preload module of {list(preload)} failed to import: "
                                   f"{message}", traceback=traceback, field="preload") from None
            self.zygotes[key] = zygote
            return zygote

    def zygote_of(self, deployment: Deployment) -> dict[str, Any] | None:
        """Return the pid and memory of the zygote that forks this deployment's instances."""
        zygote = self.zygotes.get(self._zygote_key(deployment))
        if deployment.spec.start_mode != "zygote" or zygote is None or not zygote.alive:
            return None
        memory = process_memory(zygote.pid)
        return {"pid": zygote.pid, **{key: round(value, 2) if value is not None else None
                                      for key, value in memory.items()}}

    async def _weights_path(self, deployment: Deployment) -> str | None:
        """Return the local folder of the deployment's weights, pulling them if needed."""
        if deployment.spec.weights is None:
            return None
        if self.resolve_weights is None:
            raise InvalidSpec(f"function {deployment.name!r} has weights "
                              f"{deployment.spec.weights!r}, but this server has no object "
                              "store configured", field="weights")
        return await self.resolve_weights(deployment)

    async def prepare(self, deployment: Deployment) -> None:
        if deployment.spec.start_mode == "zygote":
            zygote = await self._zygote(deployment)
            zygote.users += 1
        # A throw-away instance imports the module the way real ones will, so that an
        # import error is reported at deploy rather than at the first request.
        try:
            instance = await self.start_instance(deployment, f"validate-{os.urandom(4).hex()}",
                                                 validate_only=True)
        except InitFailed as error:
            await self.release(deployment)
            raise ImportFailed(
                f"function {deployment.name!r} failed to import handler "
                f"{deployment.spec.handler!r}: {error.message.split(': ', 1)[-1]}",
                **{k: v for k, v in error.details.items() if k in ("traceback", "output")},
            ) from None
        except OutOfMemory as error:
            await self.release(deployment)
            raise ImportFailed(f"function {deployment.name!r} ran out of memory while importing "
                               f"its module: {error.message}", field="memory_mb") from None
        await instance.stop(graceful=False)

    async def release(self, deployment: Deployment) -> None:
        if deployment.spec.start_mode != "zygote":
            return
        key = self._zygote_key(deployment)
        zygote = self.zygotes.get(key)
        if zygote is None:
            return
        zygote.users -= 1
        if zygote.users <= 0:
            del self.zygotes[key]
            await zygote.stop()

    async def start_instance(self, deployment: Deployment, instance_id: str,
                             validate_only: bool = False) -> LocalInstance:
        assert self.limits is not None, "LocalBackend.start() was not called"
        spec = deployment.spec
        tmpdir = os.path.join(self.run_dir, instance_id)
        os.makedirs(tmpdir, mode=0o700)
        setup = InstanceSetup(
            instance_id=instance_id, function_name=spec.name,
            function_version=str(deployment.version), handler=spec.handler,
            code_dir=deployment.code_dir, memory_mb=spec.memory_mb, tmpdir=tmpdir,
            env=dict(spec.env), cap_address_space=self.limits.mode == RLIMIT,
            preload=list(spec.preload), validate_only=validate_only,
            weights_path=await self._weights_path(deployment), preload_hook=spec.preload_hook,
        )
        limit: InstanceLimit | None = None
        try:
            if spec.start_mode == "zygote":
                zygote = await self._zygote(deployment)
                limit, pid, exited, ours = await self._fork(zygote, setup)
            else:
                limit = self.limits.create(instance_id, spec.memory_mb)
                setup.cgroup_procs = limit.procs_path
                pid, exited, ours = await self._start_fresh(setup)
        except BaseException:
            if limit is not None:
                limit.remove()
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise

        reader, writer = await asyncio.open_unix_connection(sock=ours)
        instance = LocalInstance(instance_id, pid, spec.memory_mb, limit, tmpdir, reader,
                                 writer, exited)
        self._instances[instance_id] = instance
        exited.add_done_callback(lambda _f: self._instances.pop(instance_id, None))
        if spec.start_mode == "zygote":
            instance.after_first_reply = zygote.schedule_prefork
            # A provisioned instance may wait long for its first request; refill anyway.
            asyncio.get_running_loop().call_later(STANDBY_REFILL_DELAY_S,
                                                  instance._run_after_first_reply)
        await instance.wait_ready()
        return instance

    async def _fork(self, zygote: ZygoteHandle, setup: InstanceSetup
                    ) -> tuple[InstanceLimit, int, asyncio.Future[ExitStatus], socket.socket]:
        """Start an instance from the zygote's standby when it has one, else by a new fork.

        Return its cap, pid, exit future and the gateway's end of its socket.
        """
        assert self.limits is not None
        standby = zygote.take_standby()
        if standby is not None:
            limit = self.limits.apply(standby.limit, setup.memory_mb)
            try:
                # The standby reads its setup straight from this socket. If it died in the
                # meantime, the init phase reads end of stream and reports how it exited.
                protocol.send(standby.sock, {"setup": setup.__dict__})
                return limit, standby.pid, standby.exited, standby.sock
            except OSError as error:
                logger.warning("standby %s of zygote pid=%d failed (%s); forking instead",
                               standby.standby_id, zygote.pid, error)
                standby.sock.close()
                limit.remove()
        limit = self.limits.create(setup.instance_id, setup.memory_mb)
        setup.cgroup_procs = limit.procs_path
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid, exited = await zygote.fork(setup, theirs.fileno())
        except BaseException:
            ours.close()
            limit.remove()
            raise
        finally:
            theirs.close()
        return limit, pid, exited, ours

    async def _start_fresh(self, setup: InstanceSetup
                           ) -> tuple[int, asyncio.Future[ExitStatus], socket.socket]:
        # NOTE: without a cgroup, a process that a fresh instance detaches into a new
        # session outlives it, because only zygotes act as subreapers for their instances.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "coldbrew.sandbox.runtime", str(theirs.fileno()),
                str(os.getpid()), pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            protocol.send(ours, {"setup": setup.__dict__})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        exited = asyncio.ensure_future(_exit_status_of(process))
        return process.pid, exited, ours


async def _exit_status_of(process: asyncio.subprocess.Process) -> ExitStatus:
    code = await process.wait()
    if code < 0:
        return ExitStatus(signal=-code)
    return ExitStatus(exit_code=code)
