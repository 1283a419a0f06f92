"""OpenAI-compatible endpoints: `POST /v1/embeddings` and `GET /v1/models`.

A function serves a model when its spec has `model_name`. The request body goes to that
function as the event, with the spec's `context_policy` added, and the handler returns
the OpenAI response body. Errors use OpenAI's shape, so the official `openai` client
raises its usual exceptions; `coldbrew_type` keeps coldbrew's own error type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from coldbrew.errors import ColdbrewError, InvalidRequest, ModelNotFound, TooManyRequests

if TYPE_CHECKING:
    from coldbrew.control.pool import FunctionPool
    from coldbrew.gateway.app import Gateway

ENCODING_FORMATS = ("float", "base64")


def openai_error(error: ColdbrewError, headers: dict[str, str] | None = None) -> Response:
    """Render a coldbrew error in OpenAI's error shape."""
    headers = dict(headers or {})
    if isinstance(error, TooManyRequests):
        headers["Retry-After"] = str(error.retry_after_s)
    if error.status == 429:
        kind = "rate_limit_error"
    elif error.status < 500:
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    details = dict(error.details)
    body = {
        "message": error.message,
        "type": kind,
        "param": details.pop("param", None),
        "code": details.pop("code", _snake_case(error.error_type)),
        "coldbrew_type": error.error_type,
        **details,
    }
    return JSONResponse({"error": body}, status_code=error.status, headers=headers)


def _snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def models_by_name(gateway: "Gateway") -> dict[str, "FunctionPool"]:
    return {pool.spec.model_name: pool for pool in gateway.plane.pools.values()
            if pool.spec.model_name is not None}


async def list_models(gateway: "Gateway", _request: Request) -> Response:
    data = [{"id": name, "object": "model", "created": int(pool.created_at),
             "owned_by": "coldbrew", "function": pool.name}
            for name, pool in sorted(models_by_name(gateway).items())]
    return JSONResponse({"object": "list", "data": data})


async def create_embeddings(gateway: "Gateway", request: Request) -> Response:
    try:
        body = await gateway.read_json(request)
        pool = _validate(gateway, body)
    except ColdbrewError as error:
        return openai_error(error)

    event = {**body, "context_policy": pool.spec.context_policy}
    result = await gateway.plane.invoke(pool.name, event)
    headers = gateway.invocation_headers(result)
    if result.error is not None:
        return openai_error(result.error, headers)
    return Response(result.body, media_type="application/json", headers=headers)


def _validate(gateway: "Gateway", body: Any) -> "FunctionPool":
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object with 'model' and 'input'")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is missing; list served models with GET /v1/models",
                             param="model")
    pool = models_by_name(gateway).get(model)
    if pool is None:
        raise ModelNotFound(f"model {model!r} is not served here; served models: "
                            f"{sorted(models_by_name(gateway))}", param="model",
                            code="model_not_found")
    if "context_policy" in body:
        raise InvalidRequest(f"'context_policy' is set by the function's spec "
                             f"({pool.spec.context_policy!r} for model {model!r}), not per "
                             "request; remove it from the request", param="context_policy")
    _validate_input(body.get("input"))
    encoding = body.get("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise InvalidRequest(f"'encoding_format' is {encoding!r}; expected one of "
                             f"{list(ENCODING_FORMATS)}", param="encoding_format")
    return pool


def _validate_input(value: Any) -> None:
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' is an empty string", param="input")
        return
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"'input' must be a string or a non-empty list of strings, got "
                             f"{type(value).__name__}", param="input")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise InvalidRequest(f"'input[{index}]' must be a non-empty string, got {item!r:.60}",
                                 param="input")
