"""The `coldbrew` command line against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import Server, write_code

APP_FILE = """
    import coldbrew
    from helpers import shout

    app = coldbrew.App("cli-demo")

    @app.function(memory_mb=128, timeout_s=5)
    def greet(event, context):
        print("greeting", event.get("name"))
        return {"greeting": shout(event.get("name", "world"))}

    @app.function(name="count-words", preload=["collections"])
    def count_words(event, context):
        from collections import Counter
        return dict(Counter(event["text"].split()))
"""

PLAIN_HANDLER = """
    def main(event, context):
        return {"plain": True, "function": context.function_name}
"""


def run_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLDBREW_URL": server.url}
    return subprocess.run([sys.executable, "-m", "coldbrew.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_deploy_app_file_with_sibling_module(shared_server: Server, tmp_path: Path) -> None:
    folder = write_code(tmp_path / "proj", {"app.py": APP_FILE,
                                            "helpers.py": "def shout(s):\n    return s.upper()\n"})
    deployed = run_cli(shared_server, "deploy", str(folder / "app.py"))
    assert deployed.returncode == 0, deployed.stderr
    assert "deployed greet version 1" in deployed.stdout
    assert "deployed count-words version 1" in deployed.stdout

    invoked = run_cli(shared_server, "invoke", "greet", "--data", '{"name": "ada"}')
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout) == {"greeting": "ADA"}
    assert "cold start" in invoked.stderr

    again = run_cli(shared_server, "invoke", "greet", "--data", '{"name": "bob"}')
    assert "warm start" in again.stderr

    event_file = tmp_path / "event.json"
    event_file.write_text('{"text": "a b a"}')
    counted = run_cli(shared_server, "invoke", "count-words", "--file", str(event_file))
    assert json.loads(counted.stdout) == {"a": 2, "b": 1}


def test_list_instances_logs_and_remove(shared_server: Server, tmp_path: Path) -> None:
    folder = write_code(tmp_path / "plain", {"handler.py": PLAIN_HANDLER})
    deployed = run_cli(shared_server, "deploy", str(folder / "handler.py"), "--handler", "main",
                       "--name", "plain-fn", "--memory", "64", "--env", "A=1")
    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(run_cli(shared_server, "invoke", "plain-fn").stdout)["plain"] is True

    listing = run_cli(shared_server, "ls")
    assert "plain-fn" in listing.stdout
    instances = run_cli(shared_server, "instances", "plain-fn")
    assert "idle" in instances.stdout
    logs = run_cli(shared_server, "logs", "plain-fn")
    assert "cold status 200" in logs.stdout

    again = run_cli(shared_server, "deploy", str(folder / "handler.py"), "--handler", "main",
                    "--name", "plain-fn", "--memory", "64", "--env", "A=1")
    assert "plain-fn is unchanged: version 1 keeps serving" in again.stdout

    removed = run_cli(shared_server, "rm", "plain-fn")
    assert removed.returncode == 0
    assert "plain-fn" not in run_cli(shared_server, "ls").stdout


def test_errors_are_one_line_and_nonzero(shared_server: Server, tmp_path: Path) -> None:
    missing = run_cli(shared_server, "invoke", "does-not-exist")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.count("\n") == 1
    assert "FunctionNotFound" in missing.stderr

    folder = write_code(tmp_path / "named", {"handler.py": PLAIN_HANDLER})
    typed = run_cli(shared_server, "deploy", str(folder / "handler.py"), "--handler", "main",
                    "--name", "MyFunc")
    assert typed.returncode == 1
    assert "'MyFunc'" in typed.stderr

    infinite = run_cli(shared_server, "deploy", str(folder / "handler.py"), "--handler", "main",
                       "--timeout", "inf")
    assert infinite.returncode == 2
    assert "finite" in infinite.stderr

    bad_json = run_cli(shared_server, "invoke", "x", "--data", "{oops")
    assert bad_json.returncode == 1
    assert bad_json.stderr.count("\n") == 1
    assert "not valid JSON" in bad_json.stderr

    folder = write_code(tmp_path / "bad", {"handler.py": PLAIN_HANDLER})
    bad_spec = run_cli(shared_server, "deploy", str(folder / "handler.py"), "--handler", "main",
                       "--memory", "-1")
    assert bad_spec.returncode == 1
    assert "memory_mb" in bad_spec.stderr
    assert bad_spec.stderr.count("\n") == 1

    no_server = subprocess.run([sys.executable, "-m", "coldbrew.cli.main", "--url",
                                "http://127.0.0.1:9", "ls"], capture_output=True, text=True)
    assert no_server.returncode == 1
    assert "cannot reach the coldbrew gateway" in no_server.stderr
