"""A closed-loop HTTP/1.1 load generator on loopback, bounded in requests and in seconds.

It speaks just enough HTTP/1.1 over asyncio streams for the two servers it targets
(keep-alive, Content-Length bodies). On the 2-core machine of the recorded runs an
httpx.AsyncClient managed about 700 requests/s against a no-op Starlette app that
this client drives at about 3,500, so with httpx the client, not the server under
test, set the throughput.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bench.harness import HOST

READ_TIMEOUT_S = 60.0


class HttpError(Exception):
    """The server's reply was not a well-formed HTTP/1.1 response with Content-Length."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to HOST:port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> "HttpConnection":
        self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
        return self

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> HttpResponse:
        """Send one request and read its whole response, reconnecting first if it was closed."""
        if self._writer is None:
            await self.open()
        assert self._reader is not None and self._writer is not None
        head = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self._writer.write(head.encode("ascii") + body)
        response = await asyncio.wait_for(self._read_response(self._reader), READ_TIMEOUT_S)
        if response.headers.get("connection", "").lower() == "close":
            self.close()
        return response

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> HttpResponse:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"malformed status line {status_line!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise HttpError(f"response without Content-Length (headers {headers})")
        body = await reader.readexactly(int(headers["content-length"]))
        return HttpResponse(int(parts[1]), headers, body)


@dataclass
class LoadResult:
    """Latencies in ms of the successful requests, the error count and the wall time in s."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    elapsed_s: float = 0.0

    @property
    def throughput_rps(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def record_error(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message


async def _worker(connection: HttpConnection, path: str, budget: list[int], deadline: float,
                  result: LoadResult) -> None:
    # `budget` is a one-element list shared by the workers: requests still to send.
    while budget[0] > 0 and time.monotonic() < deadline:
        budget[0] -= 1
        started = time.perf_counter()
        try:
            response = await connection.request("POST", path, b"{}")
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, HttpError) as error:
            result.record_error(repr(error))
            connection.close()
            continue
        elapsed_ms = (time.perf_counter() - started) * 1000
        if response.status == 200:
            result.latencies_ms.append(elapsed_ms)
        else:
            result.record_error(f"HTTP {response.status}: {response.body[:200]!r}")


async def _generate(port: int, path: str, concurrency: int, max_requests: int,
                    max_seconds: float) -> LoadResult:
    connections = [await HttpConnection(port).open() for _ in range(concurrency)]
    result = LoadResult()
    budget = [max_requests]
    try:
        started = time.perf_counter()
        deadline = time.monotonic() + max_seconds
        await asyncio.gather(*(_worker(connection, path, budget, deadline, result)
                               for connection in connections))
        result.elapsed_s = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
    return result


def generate_load(port: int, path: str, concurrency: int, max_requests: int,
                  max_seconds: float) -> LoadResult:
    """POST `{}` to `path` over `concurrency` connections until `max_requests` or `max_seconds`."""
    return asyncio.run(_generate(port, path, concurrency, max_requests, max_seconds))
