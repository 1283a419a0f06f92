"""The HTTP API end to end: deploy, invoke, headers, logs and request errors."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import Server

ECHO = {"app.py": """
    import os

    def handler(event, context):
        print("got", event)
        return {
            "event": event,
            "request_id": context.aws_request_id,
            "function_name": context.function_name,
            "function_version": context.function_version,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "remaining_ms": context.get_remaining_time_in_millis(),
            "cold_start": context.cold_start,
            "pid": os.getpid(),
        }
"""}


def test_deploy_then_invoke_returns_result(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deployed = deploy(client, {"name": "echo", "handler": "app.handler", "timeout_s": 7}, ECHO)
    assert deployed["version"] == 1

    response = client.invoke("echo", {"x": [1, 2]})
    assert response.status == 200
    assert response.body["event"] == {"x": [1, 2]}
    assert response.body["request_id"] == response.request_id
    assert response.body["function_name"] == "echo"
    assert response.body["function_version"] == "1"
    assert response.body["memory_limit_in_mb"] == 256
    assert 0 < response.body["remaining_ms"] <= 7000


def test_cold_then_warm_headers_and_logs_agree(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "coldwarm", "handler": "app.handler"}, ECHO)

    first = client.invoke("coldwarm", {"n": 1})
    second = client.invoke("coldwarm", {"n": 2})
    assert first.cold_start is True
    assert first.body["cold_start"] is True
    assert first.init_ms is not None
    assert second.cold_start is False
    assert second.body["cold_start"] is False
    assert second.init_ms is None
    assert second.instance_id == first.instance_id
    assert second.body["pid"] == first.body["pid"]

    rows = {row["id"]: row for row in client.invocations("coldwarm", 10)}
    assert rows[first.request_id]["cold_start"] is True
    assert rows[first.request_id]["init_ms"] == pytest.approx(first.init_ms, abs=0.01)
    assert rows[second.request_id]["cold_start"] is False
    assert rows[second.request_id]["status"] == 200
    assert rows[second.request_id]["instance_id"] == second.instance_id
    assert "got {'n': 2}" in rows[second.request_id]["output"]
    assert "got {'n': 1}" not in rows[second.request_id]["output"]


def test_every_invoke_header_present(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "headers", "handler": "app.handler"}, ECHO)
    response = httpx.post(f"{shared_server.url}/v1/functions/headers/invoke", json={})
    for header in ("X-Coldbrew-Request-Id", "X-Coldbrew-Cold-Start", "X-Coldbrew-Init-Ms",
                   "X-Coldbrew-Duration-Ms", "X-Coldbrew-Instance-Id"):
        assert header in response.headers, header
    assert float(response.headers["X-Coldbrew-Duration-Ms"]) >= 0


def test_function_listing_and_details(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "listed", "handler": "app.handler", "memory_mb": 64}, ECHO)
    names = [f["name"] for f in client.list_functions()]
    assert "listed" in names
    details = client.get_function("listed")
    assert details["spec"]["memory_mb"] == 64
    assert len(details["code_hash"]) == 64


def test_redeploy_same_code_keeps_version(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    spec = {"name": "versioned", "handler": "app.handler"}
    assert deploy(client, spec, ECHO)["version"] == 1
    assert deploy(client, spec, ECHO)["version"] == 1
    changed = {"app.py": ECHO["app.py"] + "    EXTRA = 1\n"}
    assert deploy(client, spec, changed)["version"] == 2
    assert client.invoke("versioned").body["function_version"] == "2"


def test_unknown_function_is_404(shared_server: Server) -> None:
    response = httpx.post(f"{shared_server.url}/v1/functions/nope/invoke", json={})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "FunctionNotFound"
    assert "nope" in response.json()["error"]["message"]


def test_malformed_json_is_400(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "badjson", "handler": "app.handler"}, ECHO)
    response = httpx.post(f"{shared_server.url}/v1/functions/badjson/invoke", content=b"{nope",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "InvalidRequest"
    assert "not valid JSON" in response.json()["error"]["message"]
    assert client.invoke("badjson", {"ok": 1}).status == 200


def test_wrong_content_type_is_400(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "ctype", "handler": "app.handler"}, ECHO)
    response = httpx.post(f"{shared_server.url}/v1/functions/ctype/invoke", content=b"a=1",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    assert "application/json" in response.json()["error"]["message"]
    assert client.invoke("ctype", {"ok": 1}).status == 200


def test_oversized_body_is_413(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "big", "handler": "app.handler"}, ECHO)
    body = json.dumps({"blob": "x" * (7 * 2**20)})
    response = httpx.post(f"{shared_server.url}/v1/functions/big/invoke", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "PayloadTooLarge"
    assert client.invoke("big", {"ok": 1}).status == 200


def test_invocations_limit_validated(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "limits", "handler": "app.handler"}, ECHO)
    response = httpx.get(f"{shared_server.url}/v1/functions/limits/invocations?limit=abc")
    assert response.status_code == 400
    assert "'limit'" in response.json()["error"]["message"]


def test_unknown_route_is_json_404(shared_server: Server) -> None:
    response = httpx.get(f"{shared_server.url}/v2/whatever")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "NotFound"


def test_delete_function(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "doomed", "handler": "app.handler"}, ECHO)
    client.invoke("doomed")
    pid = client.instances("doomed")[0]["pid"]
    client.delete("doomed")
    assert "doomed" not in [f["name"] for f in client.list_functions()]
    response = httpx.post(f"{shared_server.url}/v1/functions/doomed/invoke", json={})
    assert response.status_code == 404
    from conftest import pid_alive, wait_until
    wait_until(lambda: not pid_alive(pid), message=f"instance pid {pid} to exit")


def test_healthz_reports_limit_mode(shared_server: Server) -> None:
    health = httpx.get(f"{shared_server.url}/healthz").json()
    assert health["status"] == "ok"
    assert health["limit_mode"] in ("cgroup2", "cgroup1", "rlimit")


FAKE_EMBEDDER = {"app.py": """
    from coldbrew.inference import apply_context_policy

    WINDOW = 4

    def embed(event, context):
        texts = [event["input"]] if isinstance(event["input"], str) else event["input"]
        data, truncation, total = [], [], 0
        for index, text in enumerate(texts):
            tokens, cut = apply_context_policy(text.split(), WINDOW, event["context_policy"], index)
            total += len(tokens)
            if cut:
                truncation.append(cut.to_json())
            data.append({"object": "embedding", "index": index,
                         "embedding": [float(len(tokens)), 1.0]})
        body = {"object": "list", "data": data, "model": event["model"],
                "usage": {"prompt_tokens": total, "total_tokens": total}}
        if truncation:
            body["truncation"] = truncation
        return body
"""}


def test_embeddings_route_to_model_function(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "fake-embed", "handler": "app.embed", "model_name": "fake-model"},
           FAKE_EMBEDDER)
    models = httpx.get(f"{shared_server.url}/v1/models").json()
    assert {"fake-model"} <= {m["id"] for m in models["data"]}

    response = httpx.post(f"{shared_server.url}/v1/embeddings",
                          json={"model": "fake-model", "input": ["a b", "c"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["embedding"][0] for d in body["data"]] == [2.0, 1.0]
    assert body["usage"]["prompt_tokens"] == 3
    assert "X-Coldbrew-Request-Id" in response.headers


def test_embeddings_context_policies(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "strict-embed", "handler": "app.embed", "model_name": "strict"},
           FAKE_EMBEDDER)
    deploy(client, {"name": "lenient-embed", "handler": "app.embed", "model_name": "lenient",
                    "context_policy": "truncate"}, FAKE_EMBEDDER)
    long_text = "one two three four five six"

    rejected = httpx.post(f"{shared_server.url}/v1/embeddings",
                          json={"model": "strict", "input": ["ok", long_text]})
    assert rejected.status_code == 400
    error = rejected.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["tokens"] == 6
    assert error["limit"] == 4
    assert error["index"] == 1

    truncated = httpx.post(f"{shared_server.url}/v1/embeddings",
                           json={"model": "lenient", "input": long_text})
    assert truncated.status_code == 200
    assert truncated.json()["truncation"] == [{"index": 0, "tokens_kept": 4, "tokens_dropped": 2}]


@pytest.mark.parametrize("body, param", [
    ({"input": "x"}, "model"),
    ({"model": "no-such-model", "input": "x"}, "model"),
    ({"model": "fake-model-2", "input": []}, "input"),
    ({"model": "fake-model-2", "input": [1, 2]}, "input"),
    ({"model": "fake-model-2", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "fake-model-2", "input": "x", "context_policy": "truncate"}, "context_policy"),
])
def test_embeddings_bad_requests(shared_server: Server, deploy, body: dict, param: str) -> None:
    deploy(shared_server.client(), {"name": "fake-embed-2", "handler": "app.embed",
                                    "model_name": "fake-model-2"}, FAKE_EMBEDDER)
    response = httpx.post(f"{shared_server.url}/v1/embeddings", json=body)
    assert response.status_code in (400, 404)
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["message"]
