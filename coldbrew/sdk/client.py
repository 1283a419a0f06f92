"""A small HTTP client for the gateway, used by the CLI and by Python callers."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from coldbrew.store.code import zip_folder

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(Exception):
    """The gateway returned an error response, or could not be reached."""

    def __init__(self, message: str, status: int | None = None,
                 error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error or {}


@dataclass
class InvokeResponse:
    status: int
    body: Any
    request_id: str
    cold_start: bool
    instance_id: str | None
    init_ms: float | None
    duration_ms: float | None
    latency_ms: float


class Client:
    def __init__(self, url: str | None = None, timeout_s: float = 960.0) -> None:
        self.url = (url or os.environ.get("COLDBREW_URL") or DEFAULT_URL).rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ClientError(f"cannot reach the coldbrew gateway at {self.url}: {error}; start "
                              "it with 'coldbrew serve' or set --url / COLDBREW_URL") from None

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error_from(response)
        return response.json()

    def deploy(self, spec: dict[str, Any], code_dir: Path) -> dict[str, Any]:
        code = base64.b64encode(zip_folder(code_dir)).decode()
        return self._json("PUT", f"/v1/functions/{spec['name']}", json={"spec": spec, "code": code})

    def list_functions(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/functions")["functions"]

    def get_function(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/functions/{name}")

    def delete(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/functions/{name}")

    def instances(self, name: str) -> list[dict[str, Any]]:
        return self.instance_report(name)["instances"]

    def instance_report(self, name: str) -> dict[str, Any]:
        """Return the instances, their zygote, and total RSS and PSS in MiB."""
        return self._json("GET", f"/v1/functions/{name}/instances")

    def invocations(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/functions/{name}/invocations",
                          params={"limit": limit})["invocations"]

    def invoke(self, name: str, event: Any = None, raise_for_error: bool = True) -> InvokeResponse:
        response = self._request("POST", f"/v1/functions/{name}/invoke",
                                 json={} if event is None else event)
        if response.status_code >= 400 and raise_for_error:
            raise _error_from(response)
        headers = response.headers
        return InvokeResponse(
            status=response.status_code,
            body=response.json(),
            request_id=headers.get("x-coldbrew-request-id", ""),
            cold_start=headers.get("x-coldbrew-cold-start") == "true",
            instance_id=headers.get("x-coldbrew-instance-id"),
            init_ms=_float(headers.get("x-coldbrew-init-ms")),
            duration_ms=_float(headers.get("x-coldbrew-duration-ms")),
            latency_ms=response.elapsed.total_seconds() * 1000,
        )


def _float(value: str | None) -> float | None:
    return float(value) if value is not None else None


def _error_from(response: httpx.Response) -> ClientError:
    try:
        error = response.json()["error"]
        message = f"{error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        error = {}
        message = response.text.strip() or response.reason_phrase
    return ClientError(f"HTTP {response.status_code} {message}", response.status_code, error)
