"""The function spec: what a user declares about a function, validated once at deploy."""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from coldbrew.errors import InvalidSpec

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
HANDLER_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*\.[A-Za-z_]\w*$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

START_MODES = ("zygote", "fresh")
CONTEXT_POLICIES = ("error", "truncate")
WEIGHTS_PATTERN = re.compile(r"^([a-z0-9][a-z0-9._-]{0,127}|[a-z0-9]+://\S+/[a-z0-9][a-z0-9._-]{0,127})$")
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")

# Bounds that catch typos (a timeout in milliseconds, memory in bytes) rather than
# describe a machine: the memory budget decides what fits at run time.
MEMORY_MB_RANGE = (16, 65536)
TIMEOUT_S_RANGE = (0.1, 900.0)  # 900 s is Lambda's maximum
MAX_INSTANCES_RANGE = (1, 1000)
KEEP_ALIVE_S_RANGE = (0.1, 86400.0)
MAX_QUEUE_RANGE = (0, 100000)

# Variables that the platform sets in every instance; a spec may not override them.
RESERVED_ENV_PREFIXES = ("COLDBREW_",)
RESERVED_ENV_NAMES = frozenset({"TMPDIR", "HOME", "PATH", "PYTHONPATH"})


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    handler: str
    memory_mb: int = 256
    timeout_s: float = 30.0
    min_instances: int = 0
    max_instances: int = 10
    keep_alive_s: float = 600.0
    max_queue: int = 100
    preload: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    start_mode: str = "zygote"
    weights: str | None = None
    preload_hook: str | None = None
    model_name: str | None = None
    context_policy: str = "error"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["preload"] = list(self.preload)
        return data

    @property
    def module(self) -> str:
        return self.handler.rsplit(".", 1)[0]

    @property
    def function(self) -> str:
        return self.handler.rsplit(".", 1)[1]


SPEC_FIELDS = tuple(f.name for f in fields(FunctionSpec))


def parse_spec(data: Any) -> FunctionSpec:
    """Validate a JSON spec and build a FunctionSpec; raise InvalidSpec naming the field."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"spec must be a JSON object, got {type(data).__name__}")

    unknown = sorted(set(data) - set(SPEC_FIELDS))
    if unknown:
        raise InvalidSpec(
            f"unknown spec field(s) {unknown}; known fields are {list(SPEC_FIELDS)}",
            field=unknown[0],
        )
    for required in ("name", "handler"):
        if required not in data or data[required] in (None, ""):
            raise InvalidSpec(f"spec field '{required}' is missing", field=required)

    name = _string(data, "name")
    if not NAME_PATTERN.match(name):
        raise InvalidSpec(
            f"invalid function name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit",
            field="name",
        )
    handler = _string(data, "handler")
    if not HANDLER_PATTERN.match(handler) or any(keyword.iskeyword(p) for p in handler.split(".")):
        raise InvalidSpec(
            f"invalid handler {handler!r}: expected 'module.function', for example 'app.handler'",
            field="handler",
        )

    spec = FunctionSpec(
        name=name,
        handler=handler,
        memory_mb=_integer(data, "memory_mb", 256, MEMORY_MB_RANGE),
        timeout_s=_number(data, "timeout_s", 30.0, TIMEOUT_S_RANGE),
        min_instances=_integer(data, "min_instances", 0, (0, MAX_INSTANCES_RANGE[1])),
        max_instances=_integer(data, "max_instances", 10, MAX_INSTANCES_RANGE),
        keep_alive_s=_number(data, "keep_alive_s", 600.0, KEEP_ALIVE_S_RANGE),
        max_queue=_integer(data, "max_queue", 100, MAX_QUEUE_RANGE),
        preload=_preload(data.get("preload", [])),
        env=_env(data.get("env", {})),
        start_mode=_start_mode(data.get("start_mode", "zygote")),
        weights=_optional_string(data, "weights", WEIGHTS_PATTERN,
                                 "a model name such as 'minilm', or STORE_URI/NAME"),
        preload_hook=_optional_string(data, "preload_hook", HANDLER_PATTERN,
                                      "'module.function', for example 'app.load_model'"),
        model_name=_optional_string(data, "model_name", MODEL_NAME_PATTERN,
                                    "1-128 letters, digits, '.', '-', '_', ':' or '/'"),
        context_policy=_choice(data, "context_policy", "error", CONTEXT_POLICIES),
    )

    if spec.min_instances > spec.max_instances:
        raise InvalidSpec(
            f"min_instances ({spec.min_instances}) is greater than max_instances "
            f"({spec.max_instances})",
            field="min_instances",
        )
    return spec


def _string(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise InvalidSpec(f"spec field '{key}' must be a string, got {value!r}", field=key)
    return value


def _integer(data: dict[str, Any], key: str, default: int, bounds: tuple[int, int]) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"spec field '{key}' must be an integer, got {value!r}", field=key)
    _check_range(key, value, bounds)
    return value


def _number(data: dict[str, Any], key: str, default: float, bounds: tuple[float, float]) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidSpec(f"spec field '{key}' must be a finite number, got {value!r}",
                          field=key)
    _check_range(key, value, bounds)
    return float(value)


def _check_range(key: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise InvalidSpec(
            f"spec field '{key}' is {value}, outside the allowed range {low} to {high}",
            field=key,
            value=value,
        )


def _preload(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidSpec(f"spec field 'preload' must be a list of module names, got {value!r}",
                          field="preload")
    modules: list[str] = []
    for module in value:
        if not isinstance(module, str) or not re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", module):
            raise InvalidSpec(f"invalid module name {module!r} in 'preload'", field="preload")
        if module not in modules:
            modules.append(module)
    return tuple(modules)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidSpec(f"spec field 'env' must be an object of strings, got {value!r}",
                          field="env")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not ENV_NAME_PATTERN.match(key):
            raise InvalidSpec(f"invalid environment variable name {key!r}", field="env")
        if key in RESERVED_ENV_NAMES or key.startswith(RESERVED_ENV_PREFIXES):
            raise InvalidSpec(
                f"environment variable {key!r} is set by the platform and cannot be overridden",
                field="env",
            )
        if not isinstance(item, str):
            raise InvalidSpec(f"environment variable {key!r} must be a string, got {item!r}",
                              field="env")
        env[key] = item
    return env


def _start_mode(value: Any) -> str:
    return _choice({"start_mode": value}, "start_mode", "zygote", START_MODES)


def _choice(data: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = data.get(key, default)
    if value not in choices:
        raise InvalidSpec(f"spec field '{key}' is {value!r}; expected one of {list(choices)}",
                          field=key)
    return str(value)


def _optional_string(data: dict[str, Any], key: str, pattern: re.Pattern[str],
                     expected: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidSpec(f"invalid {key} {value!r}: expected {expected}", field=key)
    return value


@dataclass(frozen=True)
class Deployment:
    """One version of a function: its spec plus where its unpacked code lives."""

    spec: FunctionSpec
    version: int
    code_hash: str
    code_dir: str

    @property
    def name(self) -> str:
        return self.spec.name
