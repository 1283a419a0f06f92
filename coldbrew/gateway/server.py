"""Run the gateway under uvicorn: `coldbrew serve`."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import psutil
import uvicorn

from coldbrew.gateway.app import GatewayConfig, create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_STATE_DIR = ".coldbrew"
DEFAULT_BUDGET_FRACTION = 0.8


def default_memory_budget_mb() -> int:
    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_FRACTION / 2**20)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _exit_after_shutdown(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def serve(host: str, port: int, state_dir: str | None, memory_budget_mb: int | None,
          limit_mode: str | None, log_level: str = "info", store_uri: str | None = None) -> None:
    """Start the gateway and block until SIGINT or SIGTERM; then stop every instance."""
    configure_logging(log_level)
    config = GatewayConfig(
        state_dir=Path(state_dir or os.environ.get("COLDBREW_STATE_DIR", DEFAULT_STATE_DIR)).resolve(),
        memory_budget_mb=memory_budget_mb or default_memory_budget_mb(),
        limit_mode=limit_mode or os.environ.get("COLDBREW_LIMIT_MODE") or None,
        store_uri=store_uri,
    )
    app = create_app(config)
    # uvicorn stops gracefully on these signals and then raises the signal again to the
    # previous handler. This handler turns that second delivery into exit status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_after_shutdown)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=10)
