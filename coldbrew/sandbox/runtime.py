"""The instance side: isolate the process, run the init phase, then serve invocations.

This code runs inside an instance process, either right after a zygote forked it or at
the start of a `fresh` interpreter. It talks to the gateway over one connected Unix
socket and handles one request at a time.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from coldbrew.inference import ContextLengthExceeded, InvalidInput
from coldbrew.sandbox import protocol
from coldbrew.sandbox.context import Context

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
OUTPUT_LIMIT_BYTES = 64 * 1024

# Thread pools of numerical libraries are sized at import. A zygote must start none,
# because fork() copies only the calling thread and leaves a pool's locks held.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class InstanceSetup:
    """Everything an instance needs to know about itself, sent by the gateway."""

    instance_id: str
    function_name: str
    function_version: str
    handler: str
    code_dir: str
    memory_mb: int
    tmpdir: str
    env: dict[str, str] = field(default_factory=dict)
    # The cgroup to join; None when there is none or a standby process already joined it.
    cgroup_procs: str | None = None
    # Set RLIMIT_AS to memory_mb on top of the inherited address space (no cgroup available).
    cap_address_space: bool = False
    preload: list[str] = field(default_factory=list)
    weights_path: str | None = None
    preload_hook: str | None = None
    validate_only: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InstanceSetup":
        return cls(**data)


def set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def enter_sandbox(expected_parent: int, cgroup_procs: str | None) -> None:
    """Arm the parent-death signal and join the instance's cgroup, before anything else."""
    set_parent_death_signal()
    if os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the death signal was armed
    if cgroup_procs is not None:
        with open(cgroup_procs, "w") as procs:
            procs.write(str(os.getpid()))


def isolate(setup: InstanceSetup, cap_now: bool = True) -> None:
    """Apply the address-space cap, environment and temp dir before any user code runs."""
    if setup.cap_address_space and cap_now:
        set_address_space_limit(setup.memory_mb)

    _set_process_name(f"cb:{setup.function_name}")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)

    os.environ.clear()
    os.environ.update(platform_env(setup))
    os.environ.update(setup.env)
    tempfile.tempdir = setup.tmpdir  # tempfile caches the directory it saw first
    os.chdir(setup.code_dir)
    sys.path.insert(0, setup.code_dir)

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _set_process_name(name: str) -> None:
    """Name the process in `ps -o comm` and top, where forks would show the zygote's name."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def platform_env(setup: InstanceSetup) -> dict[str, str]:
    """Return the documented variables every instance gets, before the spec's `env`."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": setup.tmpdir,
        "TMPDIR": setup.tmpdir,
        "PYTHONUNBUFFERED": "1",
        "COLDBREW_FUNCTION_NAME": setup.function_name,
        "COLDBREW_FUNCTION_VERSION": setup.function_version,
        "COLDBREW_INSTANCE_ID": setup.instance_id,
        "COLDBREW_MEMORY_MB": str(setup.memory_mb),
        **({"COLDBREW_WEIGHTS_PATH": setup.weights_path} if setup.weights_path else {}),
        **SINGLE_THREAD_ENV,
    }


def set_address_space_limit(memory_mb: int) -> None:
    # The address space inherited from the zygote (preloaded modules) is not counted:
    # the cap is on growth beyond it, like a cgroup that charges shared pages to the zygote.
    # NOTE: RLIMIT_AS caps virtual memory, so a handler that maps large files without
    # touching them can hit it below `memory_mb` of resident memory.
    inherited = _vm_size_bytes()
    limit = inherited + memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class OutputCapture:
    """Points fds 1 and 2 at a file in the instance's temp dir, emptied per invocation."""

    def __init__(self, tmpdir: str) -> None:
        path = os.path.join(tmpdir, ".coldbrew-output")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        os.unlink(path)
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)

    def collect(self) -> str:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        size = os.fstat(self.fd).st_size
        if size == 0:
            return ""  # the common case: nothing printed, nothing to read
        start = max(0, size - OUTPUT_LIMIT_BYTES)
        data = os.pread(self.fd, size - start, start)
        prefix = f"[... {start} earlier bytes dropped]\n" if start else ""
        return prefix + data.decode("utf-8", "replace")


def error_info(error: BaseException, error_type: str) -> dict[str, Any]:
    return {
        "type": error_type,
        "exception_type": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }


class PreloadedState:
    """The value the spec's preload_hook returned, built once per zygote or fresh instance."""

    value: Any = None
    done = False


def run_preload_hook(hook: str, weights_path: str | None) -> None:
    """Import and call `module.function(weights_path)`; keep its result for every instance."""
    module_name, function_name = hook.rsplit(".", 1)
    function = getattr(importlib.import_module(module_name), function_name, None)
    if function is None or not callable(function):
        raise AttributeError(f"preload_hook {hook!r}: module {module_name!r} has no function "
                             f"{function_name!r}")
    PreloadedState.value = function(weights_path)
    PreloadedState.done = True


def load_handler(setup: InstanceSetup, cap_after_preload: bool = False) -> Callable[..., Any]:
    """Import the preload modules and run the hook (no-ops after a zygote fork), then the handler's module."""
    for module in setup.preload:
        importlib.import_module(module)
    if setup.preload_hook is not None and not PreloadedState.done:
        run_preload_hook(setup.preload_hook, setup.weights_path)
    if cap_after_preload:
        set_address_space_limit(setup.memory_mb)
    module_name, function_name = setup.handler.rsplit(".", 1)
    module = importlib.import_module(module_name)
    handler = getattr(module, function_name, None)
    if handler is None:
        raise AttributeError(f"module {module_name!r} has no attribute {function_name!r} "
                             f"(handler {setup.handler!r})")
    if not callable(handler):
        raise TypeError(f"handler {setup.handler!r} is a {type(handler).__name__}, not a function")
    return handler


def serve(sock: socket.socket, setup: InstanceSetup, cap_after_preload: bool = False) -> NoReturn:
    """Run the init phase, report it, then serve invocations until the socket closes."""
    capture = OutputCapture(setup.tmpdir)
    started = time.perf_counter()
    try:
        handler = load_handler(setup, cap_after_preload)
    except BaseException as error:  # noqa: BLE001 - any init failure is reported, then exit
        info = error_info(error, "ImportFailed")
        info["output"] = capture.collect()
        protocol.send(sock, {"type": "init_error", "error": info})
        os._exit(3)
    init_ms = (time.perf_counter() - started) * 1000
    protocol.send(sock, {"type": "ready", "pid": os.getpid(), "init_ms": init_ms,
                         "output": capture.collect()})
    if setup.validate_only:
        os._exit(0)

    while True:
        request = protocol.recv(sock)
        if request is None:
            os._exit(0)
        reply, exit_after = _invoke(handler, request, setup, capture)
        protocol.send(sock, reply)
        if exit_after:
            os._exit(4)
        release_free_heap()


def _invoke(handler: Callable[..., Any], request: dict[str, Any], setup: InstanceSetup,
            capture: OutputCapture) -> tuple[dict[str, Any], bool]:
    context = Context(
        aws_request_id=request["request_id"],
        function_name=setup.function_name,
        function_version=setup.function_version,
        memory_limit_in_mb=setup.memory_mb,
        cold_start=request["cold_start"],
        instance_id=setup.instance_id,
        deadline_epoch_s=request["deadline"],
        weights_path=setup.weights_path,
        preloaded=PreloadedState.value,
    )
    capture.reset()
    started = time.perf_counter()
    exit_after = False
    reply: dict[str, Any]
    try:
        result = handler(request["event"], context)
        reply = {"type": "result", "ok": True, "body": _to_json(result)}
    except (ContextLengthExceeded, InvalidInput) as error:
        info = error_info(error, error.error_type)
        info["details"] = error.details()
        reply = {"type": "result", "ok": False, "error": info}
    except MemoryError as error:
        # Under RLIMIT_AS an allocation over the cap raises here instead of an OOM kill;
        # the heap may be half-built, so the instance reports and exits.
        reply = {"type": "result", "ok": False, "error": error_info(error, "OutOfMemory")}
        exit_after = True
    except BaseException as error:  # noqa: BLE001 - the handler's error goes to the client
        reply = {"type": "result", "ok": False, "error": error_info(error, "HandlerError")}
        exit_after = isinstance(error, (SystemExit, KeyboardInterrupt))
    reply["exiting"] = exit_after
    reply["duration_ms"] = (time.perf_counter() - started) * 1000
    reply["output"] = capture.collect()
    reply["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return reply, exit_after


def release_free_heap() -> None:
    """Return freed heap pages to the kernel (glibc malloc_trim) after a reply is sent.

    A forked instance otherwise keeps the peak of its last request as private memory,
    which is what makes N instances of one model cost more than one copy. Trimming a
    small heap takes about 2 us; releasing 100 MB took about 9 ms here, after the reply.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim


_malloc_trim = _load_malloc_trim()


def _to_json(result: Any) -> str:
    try:
        # NaN and Infinity are not JSON: a client's parser would reject the body.
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"the handler's return value is not JSON serializable: {error}") from error


def main_fresh() -> NoReturn:
    """Entry point of a `fresh` instance: a new interpreter given its socket as fd 3."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    setup_message = protocol.recv(sock)
    if setup_message is None:
        os._exit(1)
    setup = InstanceSetup.from_json(setup_message["setup"])
    # Preload modules are imported before the RLIMIT_AS cap, as they are in a zygote.
    enter_sandbox(int(sys.argv[2]), setup.cgroup_procs)
    isolate(setup, cap_now=False)
    serve(sock, setup, cap_after_preload=setup.cap_address_space)


if __name__ == "__main__":
    main_fresh()
