"""The zygote process: import the preload modules once, then fork instances on request.

Runs as `python -m coldbrew.sandbox.zygote CONTROL_FD` under the gateway process. The
zygote is single-threaded on purpose: fork() copies only the calling thread, so a
thread started before it (a BLAS pool, a logging thread) would leave its locks held in
every instance. It is the parent of its instances, so it reaps them and reports each
exit status to the gateway, which cannot wait for processes it did not start.

Control messages (frames of `coldbrew.sandbox.protocol`):
  gateway -> zygote  {"op": "fork", "setup": {...}}  plus the instance's socket as an fd
  zygote -> gateway  {"op": "ready", "pid", "preload_ms", "threads"} once preloaded
                     {"op": "preload_error", "error": {...}} when a preload import fails
                     {"op": "forked", "instance_id", "pid"}
                     {"op": "exited", "pid", "exit_code" | "signal"}
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import time
from typing import NoReturn

from coldbrew.sandbox import protocol

PR_SET_CHILD_SUBREAPER = 36
from coldbrew.sandbox.runtime import InstanceSetup, error_info, isolate, serve, set_parent_death_signal


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

    def preload(self, modules: list[str]) -> None:
        started = time.perf_counter()
        try:
            for module in modules:
                importlib.import_module(module)
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

    def run(self) -> NoReturn:
        signal.set_wakeup_fd(self.wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
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
        if message.get("op") != "fork" or fd is None:
            print(f"zygote {os.getpid()}: ignoring malformed control message {message!r}",
                  file=sys.stderr)
            if fd is not None:
                os.close(fd)
            return True
        setup = InstanceSetup.from_json(message["setup"])
        pid = os.fork()
        if pid == 0:
            self._become_instance(setup, fd)
        os.close(fd)
        self.children.add(pid)
        protocol.send(self.control, {"op": "forked", "instance_id": setup.instance_id, "pid": pid})
        return True

    def _become_instance(self, setup: InstanceSetup, fd: int) -> NoReturn:
        """Run in the forked child: drop the zygote's fds, isolate, serve. Never returns."""
        try:
            zygote_pid = os.getppid()
            os.setsid()
            self.control.close()
            os.close(self.wakeup_read)
            os.close(self.wakeup_write)
            gc.unfreeze()
            isolate(setup, expected_parent=zygote_pid)
            serve(socket.socket(fileno=fd), setup)
        except BaseException:  # noqa: BLE001 - never return into the zygote's loop
            import traceback

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
    modules = [m for m in sys.argv[2].split(",") if m] if len(sys.argv) > 2 else []
    zygote = Zygote(control)
    # Handler files import coldbrew for its App decorator; load it once here, not per fork.
    zygote.preload(["coldbrew.sdk.app", *modules])
    zygote.run()


if __name__ == "__main__":
    main()
