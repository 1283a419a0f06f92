"""The HTTP gateway: a Starlette app in front of the control plane.

Every error, ours or Starlette's, leaves as `{"error": {"type", "message", ...}}`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coldbrew import __version__
from coldbrew.control.plane import ControlPlane, InvocationResult
from coldbrew.gateway import openai
from coldbrew.gateway.weights import WeightsResolver
from coldbrew.errors import (
    ColdbrewError,
    InvalidRequest,
    InvalidSpec,
    PayloadTooLarge,
    TooManyRequests,
)
from coldbrew.sandbox.local import LocalBackend
from coldbrew.spec import Deployment, parse_spec
from coldbrew.store.code import CodeStore
from coldbrew.store.db import StateStore
from coldbrew.weights.cache import NodeCache, default_cache_max_bytes
from coldbrew.weights.store import default_store_uri

logger = logging.getLogger("coldbrew.gateway")

MAX_DEPLOY_BYTES = 100 * 2**20  # base64 of a 70 MB zip, above Lambda's 50 MB direct upload


@dataclass(frozen=True)
class GatewayConfig:
    state_dir: Path
    memory_budget_mb: int
    max_payload_bytes: int = 6 * 2**20  # Lambda's synchronous payload limit
    limit_mode: str | None = None
    store_uri: str | None = None


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.store = StateStore(config.state_dir / "state.db")
        self.code = CodeStore(config.state_dir / "code")
        cache_dir = config.state_dir / "weights"
        self.weights = WeightsResolver(config.store_uri or default_store_uri(config.state_dir),
                                       NodeCache(cache_dir, default_cache_max_bytes(cache_dir)))
        backend = LocalBackend(str(config.state_dir / "run"), limit_mode=config.limit_mode,
                               resolve_weights=self.weights)
        self.plane = ControlPlane(backend, self.store, config.memory_budget_mb,
                                  max_response_bytes=config.max_payload_bytes)
        self.started_at = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.plane.start()
        stored = self.store.functions()
        await self.plane.restore([
            Deployment(f.spec, f.version, f.code_hash, str(self.code.code_dir(f.code_hash)))
            for f in stored])
        logger.info("gateway ready: %d functions restored from %s", len(stored),
                    self.config.state_dir)
        try:
            yield
        finally:
            logger.info("gateway stopping: stopping all instances and zygotes")
            await self.plane.stop()
            self.store.close()
            logger.info("gateway stopped")

    # Functions

    async def deploy(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await _read_json(request, MAX_DEPLOY_BYTES)
        if not isinstance(body, dict) or "spec" not in body or "code" not in body:
            raise InvalidRequest("deploy body must be a JSON object with 'spec' (the function "
                                 "spec) and 'code' (a base64-encoded zip of the code folder)")
        spec_data = body["spec"]
        if isinstance(spec_data, dict):
            spec_data = {"name": name, **spec_data}
        spec = parse_spec(spec_data)
        if spec.name != name:
            raise InvalidSpec(f"spec name {spec.name!r} does not match the URL's function "
                              f"name {name!r}", field="name")
        self.plane.check_budget(spec)
        try:
            bundle = base64.b64decode(body["code"], validate=True)
        except (binascii.Error, TypeError, ValueError) as error:
            raise InvalidRequest(f"'code' is not valid base64: {error}") from None

        code_hash = self.code.put(bundle)
        async with self.plane.deploy_lock(name):
            version, changed = self.store.next_version(spec, code_hash)
            deployment = Deployment(spec, version, code_hash, str(self.code.code_dir(code_hash)))
            try:
                await self.plane.deploy(deployment)
            except ColdbrewError:
                if not self.store.code_in_use(code_hash):
                    self.code.remove(code_hash)
                raise
            if changed:
                self.store.save_version(spec, code_hash, version)
        logger.info("function=%s version=%d code=%s deployed%s", name, version, code_hash[:12],
                    "" if changed else " (unchanged)")
        return JSONResponse({**self.plane.describe(name), "changed": changed},
                            status_code=201 if changed else 200)

    async def list_functions(self, _request: Request) -> Response:
        return JSONResponse({"functions": [self.plane.describe(name)
                                           for name in sorted(self.plane.pools)]})

    async def get_function(self, request: Request) -> Response:
        return JSONResponse(self.plane.describe(request.path_params["name"]))

    async def delete_function(self, request: Request) -> Response:
        name = request.path_params["name"]
        async with self.plane.deploy_lock(name):
            self.plane.pool(name)
            self.store.delete_function(name)
            await self.plane.remove(name)
        return JSONResponse({"deleted": name})

    async def instances(self, request: Request) -> Response:
        pool = self.plane.pool(request.path_params["name"])
        instances = pool.describe_instances()
        zygote = self.plane.backend.zygote_of(pool.deployment)
        # With forked instances, PSS splits shared pages among their sharers, so the sum
        # over the zygote and its instances is what the function costs the machine.
        members = instances + ([zygote] if zygote else [])
        return JSONResponse({
            "instances": instances,
            "zygote": zygote,
            "total_rss_mb": round(sum(m["rss_mb"] or 0 for m in members), 2),
            "total_pss_mb": round(sum(m["pss_mb"] or 0 for m in members), 2),
        })

    async def invocations(self, request: Request) -> Response:
        name = request.path_params["name"]
        raw_limit = request.query_params.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise InvalidRequest(f"query parameter 'limit' must be an integer from 1 to 1000, "
                                 f"got {raw_limit!r}")
        self.plane.pool(name)  # FunctionNotFound, with the hint, for an unknown name
        return JSONResponse({"invocations": self.store.invocations(name, int(raw_limit))})

    # Invocation

    async def invoke(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.plane.pool(name)
        content_type = request.headers.get("content-type", "")
        raw = await _read_body(request, self.config.max_payload_bytes)
        if raw and not raw.isspace():  # no stripped copy of a body of up to 6 MB
            if content_type.split(";")[0].strip().lower() != "application/json":
                raise InvalidRequest(f"invoke body must have Content-Type application/json, "
                                     f"got {content_type or 'none'!r}")
            event = _parse_json(raw)
        else:
            event = {}

        result = await self.plane.invoke(name, event)
        headers = self.invocation_headers(result)
        if result.error is not None:
            return _error_response(result.error, headers)
        return Response(result.body, media_type="application/json", headers=headers)

    def invocation_headers(self, result: InvocationResult) -> dict[str, str]:
        return invocation_headers(result)

    async def read_json(self, request: Request) -> Any:
        return await _read_json(request, self.config.max_payload_bytes)

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "functions": len(self.plane.pools),
            "limit_mode": self.plane.backend.limit_mode,
            "memory_budget_mb": self.plane.memory_budget_mb,
            "memory_reserved_mb": self.plane.used_mb,
            "object_store": self.weights.store_uri,
        })


def invocation_headers(result: InvocationResult) -> dict[str, str]:
    headers = {
        "X-Coldbrew-Request-Id": result.request_id,
        "X-Coldbrew-Cold-Start": "true" if result.cold_start else "false",
        "X-Coldbrew-Function-Version": str(result.version),
    }
    if result.instance_id is not None:
        headers["X-Coldbrew-Instance-Id"] = result.instance_id
    if result.duration_ms is not None:
        headers["X-Coldbrew-Duration-Ms"] = f"{result.duration_ms:.3f}"
    if result.init_ms is not None:
        headers["X-Coldbrew-Init-Ms"] = f"{result.init_ms:.3f}"
    return headers


def _error_response(error: ColdbrewError, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if isinstance(error, TooManyRequests):
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} "
                              "bytes", size=int(declared), limit=limit)
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", limit=limit)
    return bytes(chunks)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"request body is not valid JSON: {error}") from None


async def _read_json(request: Request, limit: int) -> Any:
    return _parse_json(await _read_body(request, limit))


async def _coldbrew_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, ColdbrewError)
    return _error_response(error)


async def _http_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    error_type = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "HTTPError")
    return JSONResponse({"error": {"type": error_type, "message": str(error.detail)}},
                        status_code=error.status_code)


async def _unexpected_error(request: Request, error: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": {"type": "InternalError",
                                   "message": f"{type(error).__name__}: {error}"}},
                        status_code=500)


def create_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)
    routes = [
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/v1/functions", gateway.list_functions, methods=["GET"]),
        Route("/v1/functions/{name}", gateway.deploy, methods=["PUT"]),
        Route("/v1/functions/{name}", gateway.get_function, methods=["GET"]),
        Route("/v1/functions/{name}", gateway.delete_function, methods=["DELETE"]),
        Route("/v1/functions/{name}/invoke", gateway.invoke, methods=["POST"]),
        Route("/v1/functions/{name}/instances", gateway.instances, methods=["GET"]),
        Route("/v1/functions/{name}/invocations", gateway.invocations, methods=["GET"]),
        Route("/v1/embeddings", functools.partial(openai.create_embeddings, gateway),
              methods=["POST"]),
        Route("/v1/models", functools.partial(openai.list_models, gateway), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=gateway.lifespan,
        exception_handlers={
            ColdbrewError: _coldbrew_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    app.state.gateway = gateway
    return app
