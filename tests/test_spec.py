"""Spec validation: every bad field is rejected with a message that names it."""

from __future__ import annotations

import pytest

import coldbrew
from coldbrew.errors import InvalidSpec
from coldbrew.spec import parse_spec

BASE = {"name": "fn", "handler": "app.handler"}


def test_defaults_match_documentation() -> None:
    spec = parse_spec(BASE)
    assert spec.memory_mb == 256
    assert spec.timeout_s == 30.0
    assert spec.min_instances == 0
    assert spec.max_instances == 10
    assert spec.keep_alive_s == 600.0
    assert spec.preload == ()
    assert spec.env == {}
    assert spec.start_mode == "zygote"


@pytest.mark.parametrize("change, field, words", [
    ({"memroy_mb": 128}, "memroy_mb", "unknown spec field"),
    ({"memory_mb": -1}, "memory_mb", "outside the allowed range"),
    ({"memory_mb": 10**9}, "memory_mb", "outside the allowed range"),
    ({"memory_mb": "128"}, "memory_mb", "must be an integer"),
    ({"timeout_s": 0}, "timeout_s", "outside the allowed range"),
    ({"timeout_s": 30000}, "timeout_s", "outside the allowed range"),
    ({"max_instances": 0}, "max_instances", "outside the allowed range"),
    ({"min_instances": 5, "max_instances": 2}, "min_instances", "greater than max_instances"),
    ({"keep_alive_s": -5}, "keep_alive_s", "outside the allowed range"),
    ({"timeout_s": float("nan")}, "timeout_s", "finite number"),
    ({"keep_alive_s": float("inf")}, "keep_alive_s", "finite number"),
    ({"handler": ""}, "handler", "missing"),
    ({"handler": "nodots"}, "handler", "expected 'module.function'"),
    ({"handler": "app.class"}, "handler", "expected 'module.function'"),
    ({"name": "Bad Name"}, "name", "invalid function name"),
    ({"preload": "numpy"}, "preload", "must be a list"),
    ({"preload": ["not a module"]}, "preload", "invalid module name"),
    ({"env": {"PATH": "/tmp"}}, "env", "set by the platform"),
    ({"env": {"COLDBREW_X": "1"}}, "env", "set by the platform"),
    ({"env": {"A": 1}}, "env", "must be a string"),
    ({"start_mode": "thread"}, "start_mode", "expected one of"),
])
def test_invalid_field_rejected(change: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidSpec) as raised:
        parse_spec({**BASE, **change})
    assert raised.value.details.get("field") == field
    assert words in raised.value.message


def test_missing_handler_named() -> None:
    with pytest.raises(InvalidSpec, match="'handler' is missing"):
        parse_spec({"name": "fn"})


def test_sdk_decorator_builds_spec() -> None:
    app = coldbrew.App("demo")

    @app.function(memory_mb=128, timeout_s=5, preload=["json"])
    def hello_world(event, context):
        return event

    spec = app.functions["hello-world"].spec
    assert spec.handler == f"{__name__}.hello_world"
    assert spec.memory_mb == 128
    assert spec.preload == ("json",)
    assert hello_world({"a": 1}, None) == {"a": 1}


def test_sdk_decorator_rejects_bad_limit() -> None:
    app = coldbrew.App("demo")
    with pytest.raises(InvalidSpec, match="timeout_s"):
        @app.function(timeout_s=-1)
        def broken(event, context):
            return None
