"""The floor for a cold start: fork() a child that replies to one message on a socketpair.

Run as `python -m bench.comparators.fork_floor TRIALS`; prints `{"values_ms": [...]}`.
It runs in a fresh interpreter that imports little, so the forked process is about
the size of coldbrew's zygote for a function without preloads.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def fork_round_trip_ms() -> float:
    """Time fork() plus one request and reply between parent and child, in ms."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        parent_end.close()
        child_end.recv(64)
        child_end.sendall(b"pong")
        os._exit(0)
    child_end.close()
    parent_end.sendall(b"ping")
    reply = parent_end.recv(64)
    elapsed_ms = (time.perf_counter() - started) * 1000

    # Reaping is outside the timing: a platform reaps its instances later, off the request path.
    os.waitpid(pid, 0)
    parent_end.close()
    if reply != b"pong":
        raise RuntimeError(f"child {pid} replied {reply!r}, expected b'pong'")
    return elapsed_ms


def main() -> None:
    trials = int(sys.argv[1])
    values = [fork_round_trip_ms() for _ in range(trials)]
    print(json.dumps({"values_ms": values}))


if __name__ == "__main__":
    main()
