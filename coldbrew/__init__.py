"""coldbrew: a self-hosted serverless platform for Python functions."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["App", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported lazily: instances import this package, and should not pay for httpx.
    if name == "App":
        from coldbrew.sdk.app import App

        return App
    if name == "Client":
        from coldbrew.sdk.client import Client

        return Client
    raise AttributeError(f"module 'coldbrew' has no attribute {name!r}")
