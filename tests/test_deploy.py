"""Deploy-time checks: bad specs, bad bundles and import errors never reach a request."""

from __future__ import annotations

import base64
import io
import textwrap
import zipfile

import httpx
import pytest

from conftest import Server

GOOD = {"app.py": """
    import sys
    PRELOADED_BEFORE_IMPORT = "decimal" in sys.modules

    def handler(event, context):
        return {"preloaded": PRELOADED_BEFORE_IMPORT, "version": 1}
"""}


def put(server: Server, name: str, spec: dict, files: dict[str, str] | None = None,
        bundle: bytes | None = None) -> httpx.Response:
    if bundle is None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for path, text in (files or GOOD).items():
                archive.writestr(path, textwrap.dedent(text))
        bundle = buffer.getvalue()
    return httpx.put(f"{server.url}/v1/functions/{name}", timeout=60,
                     json={"spec": spec, "code": base64.b64encode(bundle).decode()})


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_preload_imported_in_zygote(shared_server: Server) -> None:
    assert put(shared_server, "preloaded", {"handler": "app.handler", "preload": ["decimal"]}
               ).status_code == 201
    assert shared_server.client().invoke("preloaded").body["preloaded"] is True


def test_fresh_mode_skips_zygote(shared_server: Server) -> None:
    assert put(shared_server, "freshstart", {"handler": "app.handler", "preload": ["decimal"],
                                             "start_mode": "fresh"}).status_code == 201
    response = shared_server.client().invoke("freshstart")
    assert response.cold_start is True
    assert response.body["preloaded"] is True  # fresh instances import preload modules first


def test_unknown_spec_key_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "typo", {"handler": "app.handler", "memory": 128}))
    assert error["type"] == "InvalidSpec"
    assert error["field"] == "memory"


def test_negative_memory_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "negative", {"handler": "app.handler", "memory_mb": -5}))
    assert error["field"] == "memory_mb"
    assert "-5" in error["message"]


def test_missing_handler_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "nohandler", {"memory_mb": 128}))
    assert error["field"] == "handler"


def test_syntax_error_rejected_with_traceback(shared_server: Server) -> None:
    error = error_of(put(shared_server, "broken", {"handler": "app.handler"},
                         {"app.py": "def handler(event, context):\n    return (\n"}))
    assert error["type"] == "ImportFailed"
    assert "SyntaxError" in error["message"]
    assert "app.py" in error["traceback"]
    names = [f["name"] for f in shared_server.client().list_functions()]
    assert "broken" not in names


def test_missing_dependency_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "nodep", {"handler": "app.handler"},
                         {"app.py": "import no_such_package_xyz\n"}))
    assert "ModuleNotFoundError" in error["message"]
    assert "no_such_package_xyz" in error["traceback"]


def test_missing_handler_attribute_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "noattr", {"handler": "app.missing"}))
    assert "has no attribute 'missing'" in error["message"]


def test_missing_preload_module_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "nopreload", {"handler": "app.handler",
                                                      "preload": ["no_such_module_abc"]}))
    assert error["type"] == "ImportFailed"
    assert error["field"] == "preload"
    assert "no_such_module_abc" in error["traceback"]


def test_not_a_zip_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "notzip", {"handler": "app.handler"}, bundle=b"plain"))
    assert error["type"] == "InvalidBundle"


def test_path_escape_rejected(shared_server: Server) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../escape.py", "x = 1\n")
    error = error_of(put(shared_server, "escape", {"handler": "app.handler"},
                         bundle=buffer.getvalue()))
    assert "outside the bundle" in error["message"]


def test_name_mismatch_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "one", {"name": "two", "handler": "app.handler"}))
    assert error["field"] == "name"


def test_nan_timeout_rejected(shared_server: Server) -> None:
    response = httpx.put(f"{shared_server.url}/v1/functions/nan", timeout=30,
                         content=b'{"spec": {"handler": "app.handler", "timeout_s": NaN}, "code": ""}',
                         headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "timeout_s"


@pytest.mark.parametrize("body", [b"[]", b"{}", b'{"spec": {}, "code": 5}'])
def test_malformed_deploy_body_rejected(shared_server: Server, body: bytes) -> None:
    response = httpx.put(f"{shared_server.url}/v1/functions/shape", content=body,
                         headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"]


def test_failed_redeploy_keeps_previous_version(shared_server: Server) -> None:
    assert put(shared_server, "stable", {"handler": "app.handler"}).status_code == 201
    error_of(put(shared_server, "stable", {"handler": "app.handler"},
                 {"app.py": "raise RuntimeError('broken on purpose')\n"}))
    details = shared_server.client().get_function("stable")
    assert details["version"] == 1
    assert shared_server.client().invoke("stable").body["version"] == 1


HOOKED = {"app.py": """
    import os

    def build_index(weights_path):
        return {"built_by": os.getpid(), "weights_path": weights_path,
                "mode": os.environ.get("INDEX_MODE")}

    def handler(event, context):
        return {"preloaded": context.preloaded, "pid": os.getpid(), "ppid": os.getppid()}
"""}


def test_preload_hook_runs_in_zygote(shared_server: Server) -> None:
    assert put(shared_server, "hooked", {"handler": "app.handler",
                                         "preload_hook": "app.build_index",
                                         "env": {"INDEX_MODE": "fast"}}, HOOKED).status_code == 201
    body = shared_server.client().invoke("hooked").body
    assert body["preloaded"]["built_by"] == body["ppid"]  # built once, in the zygote
    assert body["preloaded"]["mode"] == "fast"
    assert body["preloaded"]["weights_path"] is None


def test_preload_hook_runs_in_fresh_instance(shared_server: Server) -> None:
    assert put(shared_server, "hooked-fresh", {"handler": "app.handler", "start_mode": "fresh",
                                               "preload_hook": "app.build_index"},
               HOOKED).status_code == 201
    body = shared_server.client().invoke("hooked-fresh").body
    assert body["preloaded"]["built_by"] == body["pid"]


def test_failing_preload_hook_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "badhook", {"handler": "app.handler",
                                                    "preload_hook": "app.missing_hook"}, HOOKED))
    assert error["type"] == "ImportFailed"
    assert error["field"] == "preload_hook"
    assert "missing_hook" in error["traceback"]


def test_weights_without_store_rejected(shared_server: Server) -> None:
    error = error_of(put(shared_server, "noweights", {"handler": "app.handler",
                                                      "weights": "no-such-model"}))
    assert error["field"] == "weights"
