"""Server lifecycle: restarts keep functions, shutdown leaves no process behind."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import pid_alive, wait_until

APP = {"app.py": """
    import os
    import subprocess

    def handler(event, context):
        if event.get("spawn"):
            # A grandchild in a new session: only the cgroup or the shutdown sweep finds it.
            child = subprocess.Popen(["sleep", "300"], start_new_session=True)
            return {"pid": os.getpid(), "child": child.pid}
        return {"pid": os.getpid(), "env": dict(os.environ)}
"""}


def test_restart_keeps_functions(start_server, deploy, tmp_path) -> None:
    state_dir = tmp_path / "persist"
    server = start_server(state_dir=state_dir)
    client = server.client()
    deploy(client, {"name": "survivor", "handler": "app.handler", "min_instances": 1,
                    "env": {"GREETING": "hi"}}, APP)
    deploy(client, {"name": "survivor", "handler": "app.handler", "min_instances": 1,
                    "env": {"GREETING": "hello"}}, APP)
    assert server.stop() == 0

    restarted = start_server(state_dir=state_dir)
    client = restarted.client()
    details = client.get_function("survivor")
    assert details["version"] == 2
    assert details["spec"]["env"] == {"GREETING": "hello"}
    wait_until(lambda: len(client.instances("survivor")) == 1,
               message="min_instances re-provisioned after restart")
    response = client.invoke("survivor")
    assert response.cold_start is False
    assert response.body["env"]["GREETING"] == "hello"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_no_child_process(start_server, deploy, sig: int) -> None:
    server = start_server()
    client = server.client()
    deploy(client, {"name": "busy", "handler": "app.handler", "min_instances": 2}, APP)
    deploy(client, {"name": "fresh", "handler": "app.handler", "start_mode": "fresh"}, APP)
    client.invoke("fresh")
    wait_until(lambda: len(client.instances("busy")) == 2, message="2 provisioned instances")
    descendants = server.descendants()
    assert len(descendants) >= 4  # zygote, 2 forked instances, 1 fresh instance

    assert server.stop(sig) == 0
    for process in descendants:
        wait_until(lambda: not pid_alive(process.pid), timeout_s=5,
                   message=f"pid {process.pid} to exit")
    assert "gateway stopped" in server.log()


@pytest.mark.parametrize("limit_mode", ["auto", "rlimit"])
def test_shutdown_kills_escaped_grandchild(start_server, deploy, limit_mode: str) -> None:
    server = start_server(*(() if limit_mode == "auto" else ("--limit-mode", "rlimit")))
    client = server.client()
    deploy(client, {"name": "spawner", "handler": "app.handler"}, APP)
    body = client.invoke("spawner", {"spawn": True}).body
    assert pid_alive(body["child"])
    server.stop()
    wait_until(lambda: not pid_alive(body["child"]), timeout_s=5,
               message="the grandchild to be killed at shutdown")


@pytest.mark.parametrize("limit_mode", ["auto", "rlimit"])
def test_stopped_instance_takes_grandchild(start_server, deploy, limit_mode: str) -> None:
    server = start_server(*(() if limit_mode == "auto" else ("--limit-mode", "rlimit")))
    client = server.client()
    deploy(client, {"name": "spawner", "handler": "app.handler", "keep_alive_s": 0.3}, APP)
    body = client.invoke("spawner", {"spawn": True}).body
    wait_until(lambda: client.instances("spawner") == [], message="scale to zero")
    wait_until(lambda: not pid_alive(body["child"]), timeout_s=5,
               message="the abandoned grandchild to be killed when its instance stopped")


def test_instance_environment_is_isolated(start_server, deploy) -> None:
    server = start_server(env={"SERVER_SECRET": "do-not-leak"})
    client = server.client()
    deploy(client, {"name": "envcheck", "handler": "app.handler", "env": {"MODE": "test"}}, APP)
    env = client.invoke("envcheck").body["env"]
    assert env["MODE"] == "test"
    assert "SERVER_SECRET" not in env
    assert env["COLDBREW_FUNCTION_NAME"] == "envcheck"
    assert env["COLDBREW_MEMORY_MB"] == "256"
    assert env["TMPDIR"] == env["HOME"]
    assert os.path.isdir(env["TMPDIR"])
    assert env["COLDBREW_INSTANCE_ID"] in env["TMPDIR"]


def test_server_kill_takes_instances_down(start_server, deploy) -> None:
    server = start_server()
    client = server.client()
    deploy(client, {"name": "orphans", "handler": "app.handler", "min_instances": 2}, APP)
    deploy(client, {"name": "fresh-orphan", "handler": "app.handler", "start_mode": "fresh"}, APP)
    client.invoke("fresh-orphan")
    wait_until(lambda: len(client.instances("orphans")) == 2, message="2 provisioned instances")
    descendants = server.descendants()

    server.stop(signal.SIGKILL)
    # No shutdown code ran: the parent-death signal must take every process down.
    for process in descendants:
        wait_until(lambda: not pid_alive(process.pid), timeout_s=5,
                   message=f"pid {process.pid} to exit after the server was killed")


def test_dead_zygote_is_restarted(start_server, deploy) -> None:
    server = start_server()
    client = server.client()
    deploy(client, {"name": "phoenix", "handler": "app.handler", "preload": ["decimal"]}, APP)
    instance_pid = client.invoke("phoenix").body["pid"]
    # Forked instances share the zygote's command line; the zygote is the server's child.
    zygotes = [p for p in server.descendants() if p.ppid() == server.process.pid
               and "coldbrew.sandbox.zygote" in " ".join(p.cmdline())]
    assert len(zygotes) == 1

    zygotes[0].kill()
    wait_until(lambda: not pid_alive(instance_pid), message="the zygote's instance to die with it")
    wait_until(lambda: client.instances("phoenix") == [], message="the dead instance to be dropped")
    response = client.invoke("phoenix")
    assert response.status == 200
    assert response.cold_start is True
    assert "exited; starting a new one" in server.log()
