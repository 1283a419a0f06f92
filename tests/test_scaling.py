"""Pools: scale to zero, provisioned concurrency, bursts, queueing and the memory budget."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import Server, pid_alive, wait_until

SLOW = {"app.py": """
    import os
    import time

    def handler(event, context):
        time.sleep(event.get("seconds", 0))
        return {"pid": os.getpid(), "tmpdir": os.environ["TMPDIR"]}
"""}


def invoke_many(server: Server, name: str, events: list[dict]) -> list[httpx.Response]:
    def one(event: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/functions/{name}/invoke", json=event, timeout=60)

    with ThreadPoolExecutor(len(events)) as pool:
        return list(pool.map(one, events))


def test_scale_to_zero_after_keep_alive(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "napper", "handler": "app.handler", "keep_alive_s": 0.5}, SLOW)
    body = client.invoke("napper").body
    assert pid_alive(body["pid"])
    assert os.path.isdir(body["tmpdir"])

    wait_until(lambda: client.instances("napper") == [], timeout_s=10,
               message="the idle instance to be stopped")
    wait_until(lambda: not pid_alive(body["pid"]), message="the instance process to exit")
    assert not os.path.exists(body["tmpdir"])
    assert client.invoke("napper").cold_start is True


def test_min_instances_started_and_replaced(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "provisioned", "handler": "app.handler", "min_instances": 2,
                    "keep_alive_s": 0.2}, SLOW)
    instances = wait_until(lambda: [i for i in client.instances("provisioned")
                                    if i["state"] == "idle"] if len(
        client.instances("provisioned")) == 2 else None, message="2 provisioned instances")
    assert all(i["provisioned"] for i in instances)
    first = client.invoke("provisioned")
    assert first.cold_start is False

    victim = instances[0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: victim["id"] not in {i["id"] for i in client.instances("provisioned")}
               and len([i for i in client.instances("provisioned") if i["state"] == "idle"]) == 2,
               message="the killed instance to be replaced")
    # keep_alive_s is short, but min_instances keeps the pool at 2.
    wait_until(lambda: len(client.instances("provisioned")) == 2, timeout_s=2)


def test_burst_starts_at_most_max_instances(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "burst", "handler": "app.handler", "max_instances": 3}, SLOW)
    responses = invoke_many(shared_server, "burst", [{"seconds": 0.3}] * 10)
    assert [r.status_code for r in responses] == [200] * 10
    instance_ids = {r.headers["X-Coldbrew-Instance-Id"] for r in responses}
    assert len(instance_ids) <= 3
    assert len(client.instances("burst")) <= 3
    cold = sum(r.headers["X-Coldbrew-Cold-Start"] == "true" for r in responses)
    assert cold == len(instance_ids)


def test_burst_below_max_starts_one_per_request(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "smallburst", "handler": "app.handler", "max_instances": 10}, SLOW)
    responses = invoke_many(shared_server, "smallburst", [{"seconds": 0.5}] * 4)
    assert all(r.status_code == 200 for r in responses)
    assert len(client.instances("smallburst")) <= 4


def test_full_queue_answers_429(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "throttled", "handler": "app.handler", "max_instances": 1,
                    "max_queue": 1}, SLOW)
    client.invoke("throttled")  # the instance is warm: no start-up in the timing below
    responses = invoke_many(shared_server, "throttled", [{"seconds": 1.0}] * 4)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429]
    throttled = [r for r in responses if r.status_code == 429]
    assert throttled[0].headers["Retry-After"] == "1"
    assert throttled[0].json()["error"]["type"] == "TooManyRequests"
    assert client.invoke("throttled").status == 200


def test_memory_budget_evicts_idle_lru(start_server, deploy) -> None:
    server = start_server("--memory-budget-mb", "300")
    client = server.client()
    deploy(client, {"name": "first", "handler": "app.handler", "memory_mb": 200}, SLOW)
    deploy(client, {"name": "second", "handler": "app.handler", "memory_mb": 200}, SLOW)
    first_pid = client.invoke("first").body["pid"]

    second = client.invoke("second")
    assert second.status == 200
    assert client.instances("first") == []
    wait_until(lambda: not pid_alive(first_pid), message="the evicted instance to exit")


def test_memory_budget_rejects_oversized_spec(start_server, deploy) -> None:
    server = start_server("--memory-budget-mb", "300")
    response = httpx.put(f"{server.url}/v1/functions/huge", json={
        "spec": {"handler": "app.handler", "memory_mb": 400}, "code": ""})
    assert response.status_code == 400
    assert "memory budget" in response.json()["error"]["message"]


def test_redeploy_replaces_idle_instances(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "rolling", "handler": "app.handler"}, SLOW)
    old_pid = client.invoke("rolling").body["pid"]
    deploy(client, {"name": "rolling", "handler": "app.handler", "memory_mb": 128}, SLOW)
    wait_until(lambda: not pid_alive(old_pid), message="the old version's instance to stop")
    response = client.invoke("rolling")
    assert response.cold_start is True
    assert response.body["pid"] != old_pid


def test_instances_report_shared_memory(shared_server: Server, deploy) -> None:
    client = shared_server.client()
    deploy(client, {"name": "sharing", "handler": "app.handler", "preload": ["decimal"]}, SLOW)
    invoke_many(shared_server, "sharing", [{"seconds": 0.3}] * 3)
    report = httpx.get(f"{shared_server.url}/v1/functions/sharing/instances").json()
    assert len(report["instances"]) == 3
    assert report["zygote"]["pid"] > 0
    for instance in report["instances"]:
        assert 0 < instance["pss_mb"] < instance["rss_mb"]
    assert report["total_pss_mb"] < report["total_rss_mb"]
