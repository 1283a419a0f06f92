"""Declare functions in code: `app = coldbrew.App("demo")` and `@app.function(...)`."""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from coldbrew.spec import FunctionSpec, parse_spec

Handler = TypeVar("Handler", bound=Callable[..., Any])


@dataclass(frozen=True)
class FunctionDefinition:
    spec: FunctionSpec
    handler: Callable[..., Any]
    source_file: Path | None


class App:
    """A named group of functions that `coldbrew deploy FILE` deploys together."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.functions: dict[str, FunctionDefinition] = {}

    def function(
        self,
        handler: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        memory_mb: int = 256,
        timeout_s: float = 30.0,
        min_instances: int = 0,
        max_instances: int = 10,
        keep_alive_s: float = 600.0,
        max_queue: int = 100,
        preload: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        start_mode: str = "zygote",
        weights: str | None = None,
        preload_hook: str | None = None,
        model_name: str | None = None,
        context_policy: str = "error",
    ) -> Any:
        """Register a handler `(event, context)`; the spec is validated right away."""

        def register(func: Handler) -> Handler:
            spec = parse_spec({
                "name": name or func.__name__.replace("_", "-"),
                "handler": f"{func.__module__}.{func.__name__}",
                "memory_mb": memory_mb,
                "timeout_s": timeout_s,
                "min_instances": min_instances,
                "max_instances": max_instances,
                "keep_alive_s": keep_alive_s,
                "max_queue": max_queue,
                "preload": list(preload),
                "env": dict(env or {}),
                "start_mode": start_mode,
                "weights": weights,
                "preload_hook": preload_hook,
                "model_name": model_name,
                "context_policy": context_policy,
            })
            if spec.name in self.functions:
                raise ValueError(f"app {self.name!r} already has a function named {spec.name!r}")
            source = getattr(sys.modules.get(func.__module__), "__file__", None)
            self.functions[spec.name] = FunctionDefinition(
                spec, func, Path(source).resolve() if source else None)
            return func

        if handler is not None:
            return register(handler)
        return functools.partial(register)


def load_apps(path: Path) -> list[App]:
    """Import a Python file the way an instance will (its folder on sys.path) and find its Apps."""
    folder = str(path.parent.resolve())
    module_name = path.stem
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return [value for value in vars(module).values() if isinstance(value, App)]
