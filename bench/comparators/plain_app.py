"""The warm-invocation comparator: the same no-op as an always-on Starlette app.

Run as `python -m bench.comparators.plain_app PORT`. It parses the JSON event and
returns `null`, as coldbrew's no-op function does, and runs under uvicorn with the
settings that `coldbrew.gateway.server.serve` uses.
"""

from __future__ import annotations

import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def invoke(request: Request) -> Response:
    body = await request.body()
    event = json.loads(body) if body.strip() else {}
    del event  # the no-op ignores its event, as the coldbrew handler does
    return Response("null", media_type="application/json")


async def healthz(_request: Request) -> Response:
    return Response("ok")


def main() -> None:
    port = int(sys.argv[1])
    app = Starlette(routes=[Route("/invoke", invoke, methods=["POST"]),
                            Route("/healthz", healthz, methods=["GET"])])
    # Keep in step with coldbrew.gateway.server.serve: access log off, info level,
    # 10 s graceful shutdown, one worker process.
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", access_log=False,
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
