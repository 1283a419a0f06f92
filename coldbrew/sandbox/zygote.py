"""The zygote process: import the preload modules once, then fork instances on request.

Runs as `python -m coldbrew.sandbox.zygote CONTROL_FD CONFIG_JSON` under the gateway
process. CONFIG_JSON names the preload modules and, for a function with a preload_hook,
the hook, its code folder, environment and weights path. The zygote is single-threaded on
purpose: fork() copies only the calling thread, so a
thread started before it (a BLAS pool, a logging thread) would leave its locks held in
every instance. It is the parent of its instances, so it reaps them and reports each
exit status to the gateway, which cannot wait for processes it did not start.

The zygote can also pre-fork a standby child that has already started its session and
joined its cgroup. Joining a cgroup waits for an RCU grace period: about 10 ms on an
idle 2-core VM, against 0.3 ms on a busy one (measured on Linux 6.18, cgroup v1).
Doing it ahead of time takes that wait off the cold-start path. The gateway keeps the other end of the
standby's socket and sends the instance setup on it directly.

Control messages (frames of `coldbrew.sandbox.protocol`):
  gateway -> zygote  {"op": "prefork", "standby_id", "cgroup_procs"}  plus the standby's socket
                     {"op": "fork", "setup": {...}}  plus the instance's socket
  zygote -> gateway  {"op": "ready", "pid", "preload_ms", "threads"} once preloaded
                     {"op": "preload_error", "error": {...}} when a preload import fails
                     {"op": "forked", "instance_id", "pid"}  (instance_id is the standby id
                                                            for a prefork)
                     {"op": "exited", "pid", "exit_code" | "signal"}
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any, NoReturn

from coldbrew.sandbox import protocol
from coldbrew.sandbox.runtime import (
    InstanceSetup,
    enter_sandbox,
    error_info,
    isolate,
    run_preload_hook,
    serve,
    set_parent_death_signal,
)

PR_SET_CHILD_SUBREAPER = 36


def exit_status_message(pid: int, status: int) -> dict[str, object]:
    if os.WIFSIGNALED(status):
        return {"op": "exited", "pid": pid, "signal": os.WTERMSIG(status)}
    return {"op": "exited", "pid": pid, "exit_code": os.waitstatus_to_exitcode(status)}


class Zygote:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: set[int] = set()
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_write, False)
        os.set_blocking(self.wakeup_read, False)
        self.stopping = False

    def preload(self, modules: list[str], hook: dict[str, Any] | None) -> None:
        started = time.perf_counter()
        try:
            for module in modules:
                importlib.import_module(module)
            if hook is not None:
                self._run_hook(hook)
        except BaseException as error:  # noqa: BLE001 - reported to the gateway, then exit
            protocol.send(self.control, {"op": "preload_error",
                                         "error": error_info(error, "ImportFailed")})
            os._exit(3)
        # Objects that exist now stay untouched by the collector in every instance, so
        # the pages that hold them stay shared with the zygote instead of being copied.
        gc.freeze()
        protocol.send(self.control, {
            "op": "ready",
            "pid": os.getpid(),
            "preload_ms": (time.perf_counter() - started) * 1000,
            "threads": _native_thread_count(),
        })

    @staticmethod
    def _run_hook(hook: dict[str, Any]) -> None:
        # This zygote serves one function version: its code folder and environment are
        # the function's, so the hook (and the handler module it may live in) imports
        # here exactly as it would in an instance, and instances inherit the result.
        os.environ.update(hook["env"])
        os.chdir(hook["code_dir"])
        sys.path.insert(0, hook["code_dir"])
        run_preload_hook(hook["hook"], hook["weights_path"])

    def run(self) -> NoReturn:
        signal.set_wakeup_fd(self.wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._request_stop)
        # Ctrl-C in a terminal reaches the whole process group. The gateway stops its
        # zygotes itself, in order, so the zygote must not die first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(self.wakeup_read, selectors.EVENT_READ, "signal")

        while not self.stopping:
            for key, _events in selector.select():
                if key.data == "signal":
                    self._drain_wakeup()
                    self._reap()
                elif not self._handle_control():
                    self.stopping = True
        self._shutdown()

    def _request_stop(self, *_args: object) -> None:
        self.stopping = True

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_read, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_control(self) -> bool:
        message, fd = protocol.recv_with_fd(self.control)
        if message is None:
            return False
        op = message.get("op")
        if op == "prefork" and fd is not None:
            self._prefork(message["standby_id"], message.get("cgroup_procs"), fd)
        elif op == "fork" and fd is not None:
            self._fork(InstanceSetup.from_json(message["setup"]), fd)
        else:
            print(f"zygote {os.getpid()}: ignoring malformed control message {message!r}",
                  file=sys.stderr)
            if fd is not None:
                os.close(fd)
        return True

    def _fork(self, setup: InstanceSetup, fd: int) -> None:
        pid = os.fork()
        if pid == 0:
            self._become_instance(setup, fd)
        self.children.add(pid)
        os.close(fd)
        protocol.send(self.control, {"op": "forked", "instance_id": setup.instance_id, "pid": pid})

    def _prefork(self, standby_id: str, cgroup_procs: str | None, fd: int) -> None:
        """Fork a standby child now, so that a later cold start skips fork and cgroup entry.

        `fd` is the standby's end of a socket whose other end the gateway keeps. The
        gateway later sends the instance setup on it directly, and it becomes the
        instance's socket. So the zygote is not on the cold-start path at all.
        """
        pid = os.fork()
        if pid == 0:
            self._become_standby(socket.socket(fileno=fd), cgroup_procs)
        os.close(fd)
        self.children.add(pid)
        protocol.send(self.control, {"op": "forked", "instance_id": standby_id, "pid": pid})

    def _leave_zygote(self) -> int:
        """In a forked child: start a session and close the zygote's fds; return the zygote pid."""
        zygote_pid = os.getppid()
        os.setsid()
        self.control.close()
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)
        # gc.freeze() stays in effect: a collection here would write to the GC headers of
        # inherited objects and copy the pages that the zygote shares with every instance.
        return zygote_pid

    def _become_instance(self, setup: InstanceSetup, fd: int) -> NoReturn:
        """Run in a forked child: isolate, then serve. Never returns."""
        try:
            zygote_pid = self._leave_zygote()
            enter_sandbox(zygote_pid, setup.cgroup_procs)
            isolate(setup)
            serve(socket.socket(fileno=fd), setup)
        except BaseException:  # noqa: BLE001 - never return into the zygote's loop
            traceback.print_exc()
            os._exit(70)

    def _become_standby(self, channel: socket.socket, cgroup_procs: str | None) -> NoReturn:
        """Run in a pre-forked child: enter the sandbox, wait for a setup, then serve."""
        try:
            zygote_pid = self._leave_zygote()
            enter_sandbox(zygote_pid, cgroup_procs)
            message = protocol.recv(channel)
            if message is None:
                os._exit(0)  # discarded before use
            setup = InstanceSetup.from_json(message["setup"])
            isolate(setup)
            serve(channel, setup)
        except BaseException:  # noqa: BLE001 - never return into the zygote's loop
            traceback.print_exc()
            os._exit(70)

    def _reap(self) -> None:
        instance_exited = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid not in self.children:
                continue  # an adopted orphan (see _kill_adopted)
            self.children.discard(pid)
            instance_exited = True
            try:
                protocol.send(self.control, exit_status_message(pid, status))
            except OSError:
                self.stopping = True
        if instance_exited:
            self._kill_adopted()

    def _kill_adopted(self) -> None:
        """SIGKILL processes an instance left behind, which the kernel re-parented to us."""
        for pid in _child_pids() - self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _shutdown(self) -> NoReturn:
        for pid in _child_pids() - self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.discard(pid)
        os._exit(0)


def _set_child_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child_pids() -> set[int]:
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as children:
            return {int(pid) for pid in children.read().split()}
    except OSError:
        return set()


def _native_thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def main() -> NoReturn:
    set_parent_death_signal()
    # Processes that an instance starts and abandons (a daemon, a detached subprocess) are
    # re-parented to the zygote rather than to init, so that the zygote can kill them.
    _set_child_subreaper()
    control = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    zygote = Zygote(control)
    # Handler files import coldbrew for its App decorator; load it once here, not per fork.
    zygote.preload(["coldbrew.sdk.app", *config["preload"]], config.get("hook"))
    zygote.run()


if __name__ == "__main__":
    main()
