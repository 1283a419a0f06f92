"""Model weights end to end: push, deploy with weights, zygote preload, sharing, S3."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from coldbrew.sdk.client import ClientError
from conftest import aws_test_env, new_bucket

WEIGHTS_MB = 48

MODEL_CODE = {"app.py": """
    import os

    import numpy as np

    from coldbrew.weights.tensors import load

    def load_model(weights_path):
        tensors = load(weights_path)
        # Reading every page here makes them resident before the fork, shared by all
        # instances through the page cache.
        return {"tensors": tensors, "checksum": float(tensors["w"].sum()), "pid": os.getpid()}

    def handler(event, context):
        model = context.preloaded
        w = model["tensors"]["w"]
        return {
            "weights_path": context.weights_path,
            "built_by": model["pid"],
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "checksum": float(w.sum()),
            "first": float(w[event.get("index", 0)]),
            "files": sorted(os.listdir(context.weights_path)),
        }
"""}


def push(state_dir: Path, name: str, path: Path, *store_args: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coldbrew.cli.main", "models", "push", name, str(path),
         "--no-progress", *store_args],
        env={**os.environ, "COLDBREW_STATE_DIR": str(state_dir), **(env or {})},
        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    weights = np.arange(WEIGHTS_MB * 2**20 // 4, dtype=np.float32) % 1000
    save_file({"w": weights, "b": np.ones(3, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"kind": "tiny"}')
    return folder


def test_weights_preloaded_in_zygote(start_server, deploy, model_folder: Path) -> None:
    server = start_server()
    pushed = push(server.state_dir, "tiny", model_folder)
    assert pushed.returncode == 0, pushed.stderr
    client = server.client()
    deploy(client, {"name": "tiny-fn", "handler": "app.handler", "weights": "tiny",
                    "preload": ["numpy"], "preload_hook": "app.load_model"}, MODEL_CODE)

    body = client.invoke("tiny-fn", {"index": 1001}).body
    assert body["first"] == 1.0
    assert body["files"] == ["config.json", "model.safetensors"]
    assert body["weights_path"].startswith(str(server.state_dir / "weights"))
    assert body["built_by"] == body["ppid"]  # loaded once, in the zygote
    expected = float((np.arange(WEIGHTS_MB * 2**20 // 4, dtype=np.float32) % 1000).sum())
    assert body["checksum"] == pytest.approx(expected)


def test_weights_in_fresh_mode(start_server, deploy, model_folder: Path) -> None:
    server = start_server()
    assert push(server.state_dir, "tiny", model_folder).returncode == 0
    client = server.client()
    deploy(client, {"name": "tiny-fresh", "handler": "app.handler", "weights": "tiny",
                    "preload_hook": "app.load_model", "start_mode": "fresh"}, MODEL_CODE)
    body = client.invoke("tiny-fresh").body
    assert body["built_by"] == body["pid"]
    assert body["files"] == ["config.json", "model.safetensors"]


def test_instances_share_one_copy(start_server, deploy, model_folder: Path) -> None:
    server = start_server()
    assert push(server.state_dir, "tiny", model_folder).returncode == 0
    client = server.client()
    deploy(client, {"name": "shared-w", "handler": "app.handler", "weights": "tiny",
                    "preload": ["numpy"], "preload_hook": "app.load_model",
                    "max_instances": 4}, MODEL_CODE)
    client.invoke("shared-w")
    one_instance = client.instance_report("shared-w")
    assert len(one_instance["instances"]) == 1

    slow = {"app.py": MODEL_CODE["app.py"].replace(
        "model = context.preloaded", "import time; time.sleep(0.5); model = context.preloaded")}
    deploy(client, {"name": "shared-w", "handler": "app.handler", "weights": "tiny",
                    "preload": ["numpy"], "preload_hook": "app.load_model",
                    "max_instances": 4}, slow)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: client.invoke("shared-w"), range(4)))
    assert len({r.instance_id for r in responses}) == 4
    four_instances = client.instance_report("shared-w")
    assert len(four_instances["instances"]) == 4

    # Every instance read all 48 MB, yet together they cost about one copy.
    assert four_instances["total_rss_mb"] > 4 * WEIGHTS_MB
    assert four_instances["total_pss_mb"] < 1.5 * one_instance["total_pss_mb"]


def test_missing_weights_rejected_at_deploy(start_server, deploy) -> None:
    server = start_server()
    with pytest.raises(ClientError) as raised:
        deploy(server.client(), {"name": "nomodel", "handler": "app.handler",
                                 "weights": "not-pushed"}, MODEL_CODE)
    assert raised.value.status == 400
    assert raised.value.error["field"] == "weights"
    assert "not-pushed" in str(raised.value)
    assert "coldbrew models push" in str(raised.value)
    assert "nomodel" not in [f["name"] for f in server.client().list_functions()]


def test_weights_from_s3(start_server, deploy, model_folder: Path, moto_url: str,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    env = aws_test_env(moto_url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = new_bucket()
    server = start_server("--store", store, env=env)
    pushed = push(server.state_dir, "tiny-s3", model_folder, "--store", store, env=env)
    assert pushed.returncode == 0, pushed.stderr

    client = server.client()
    deploy(client, {"name": "from-s3", "handler": "app.handler", "weights": "tiny-s3",
                    "preload": ["numpy"], "preload_hook": "app.load_model"}, MODEL_CODE)
    assert client.invoke("from-s3", {"index": 3}).body["first"] == 3.0
    # A second function with the same weights reuses the node cache: one download only.
    deploy(client, {"name": "from-s3-too", "handler": "app.handler", "weights": "tiny-s3",
                    "preload": ["numpy"], "preload_hook": "app.load_model"}, MODEL_CODE)
    assert client.invoke("from-s3-too").status == 200
    assert server.log().count("pulled") == 1
    digests = [p for p in (server.state_dir / "weights").iterdir() if not p.name.startswith(".")]
    assert len(digests) == 1
