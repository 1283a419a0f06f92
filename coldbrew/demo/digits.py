"""The demo's second part: hello, and the digits classifier's accuracy and cold starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from coldbrew.sdk.client import Client, InvokeResponse


from coldbrew.demo.common import (
    DEMO_KEEP_ALIVE_S,
    DIGITS_APP,
    DemoError,
    FRESH_SUFFIX,
    HELLO_APP,
    _median,
    _ms,
    invoke_expecting,
    wait_for_zero_instances,
)


@dataclass(frozen=True)
class ModeResult:
    """Responses and memory use of one deployed function, all for the same event."""

    start_mode: str
    cold: list[InvokeResponse]
    warm: list[InvokeResponse]
    predictions: list[int]
    rss_mb: float | None
    pss_mb: float | None


def load_held_out(model_path: Path) -> tuple[list[list[float]], list[int]]:
    """Return the digits images and labels that the model never trained on.

    model.npz stores `test_start`, the first `load_digits()` row that train.py held out.
    """
    from sklearn.datasets import load_digits

    with np.load(model_path, allow_pickle=False) as stored:
        test_start = int(stored["test_start"])
    dataset = load_digits()
    if not 0 < test_start < len(dataset.data):
        raise DemoError(f"{model_path} has test_start={test_start}, outside the "
                        f"{len(dataset.data)} rows of load_digits(); rerun train.py")
    images = dataset.data[test_start:].tolist()
    labels = [int(label) for label in dataset.target[test_start:]]
    return images, labels


def count_correct(predictions: list[int], labels: list[int]) -> int:
    if len(predictions) != len(labels):
        raise DemoError(f"got {len(predictions)} predictions for {len(labels)} images")
    return sum(prediction == label for prediction, label in zip(predictions, labels))


def predictions_of(response: InvokeResponse) -> list[int]:
    body = response.body
    if not isinstance(body, dict) or not isinstance(body.get("predictions"), list):
        raise DemoError(f"request {response.request_id} returned {str(body)[:80]!r}; expected "
                        "a JSON object with a 'predictions' list")
    return body["predictions"]


def measure_function(client: Client, name: str, start_mode: str, event: Any, cold_rounds: int,
                     warm_requests: int) -> ModeResult:
    """Invoke cold `cold_rounds` times (scaling to zero between), then warm right after."""
    cold: list[InvokeResponse] = []
    for _ in range(cold_rounds):
        wait_for_zero_instances(client, name)
        cold.append(invoke_expecting(client, name, event, cold=True))
    warm = [invoke_expecting(client, name, event, cold=False) for _ in range(warm_requests)]

    predictions = predictions_of(cold[0])
    for response in cold + warm:
        if predictions_of(response) != predictions:
            raise DemoError(f"request {response.request_id} to {name!r} returned different "
                            "predictions for the same images")

    # Memory of the instance that served the warm requests, before keep-alive stops it.
    instances = client.instances(name)
    rss_mb = instances[0]["rss_mb"] if instances else None
    pss_mb = instances[0]["pss_mb"] if instances else None
    return ModeResult(start_mode, cold, warm, predictions, rss_mb, pss_mb)


def latency_table(results: list[ModeResult], images: int) -> Table:
    table = Table(title=f"digits, {images} held-out images per request (medians)")
    table.add_column("requests", no_wrap=True)
    for header in ("round trip ms", "init ms", "duration ms", "RSS MB", "PSS MB"):
        table.add_column(header, justify="right", no_wrap=True)
    for result in results:
        for kind, responses in (("cold", result.cold), ("warm", result.warm)):
            warm = kind == "warm"
            table.add_row(
                f"{result.start_mode}, {kind} x{len(responses)}",
                _ms(_median([r.latency_ms for r in responses])),
                _ms(_median([r.init_ms for r in responses])),
                _ms(_median([r.duration_ms for r in responses])),
                _ms(result.rss_mb) if warm else "",
                _ms(result.pss_mb) if warm else "")
    return table


def run_digits_demo(console: Console, client: Client, hello_specs: dict[str, dict[str, Any]],
                    digits_specs: dict[str, dict[str, Any]], images: list[list[float]],
                    labels: list[int], cold_rounds: int, warm_requests: int) -> None:
    """Invoke hello, then measure digits' accuracy and its zygote and fresh cold starts."""
    console.rule("6. hello and digits")
    for spec in hello_specs.values():
        client.deploy(spec, HELLO_APP.parent)
        response = client.invoke(spec["name"], {"name": "coldbrew"})
        console.print(f"{spec['name']}: {response.body['message']} "
                      f"({'cold' if response.cold_start else 'warm'} start, "
                      f"{response.latency_ms:.1f} ms round trip)")

    event = {"images": images}
    results: list[ModeResult] = []
    for spec in digits_specs.values():
        for start_mode in ("zygote", "fresh"):
            name = spec["name"] if start_mode == "zygote" else spec["name"] + FRESH_SUFFIX
            deployed = client.deploy({**spec, "name": name, "start_mode": start_mode,
                                      "keep_alive_s": DEMO_KEEP_ALIVE_S}, DIGITS_APP.parent)
            console.print(f"deployed {name} version {deployed['version']}, start mode "
                          f"{start_mode}, preload: {', '.join(spec['preload'])}")
            results.append(measure_function(client, name, start_mode, event, cold_rounds,
                                            warm_requests))

    zygote, fresh = results[0], results[1]
    correct = count_correct(zygote.predictions, labels)
    console.print(f"digits accuracy on {len(labels)} held-out images: "
                  f"{correct / len(labels):.1%} ({correct}/{len(labels)} correct)")
    if fresh.predictions != zygote.predictions:
        raise DemoError("the zygote and fresh instances returned different predictions "
                        "for the same images")
    console.print(latency_table(results, len(images)))
    console.print("round trip: measured by the client. init: X-Coldbrew-Init-Ms, the "
                  "instance's imports that no zygote did for it, plus the model load. "
                  "duration: X-Coldbrew-Duration-Ms. RSS and PSS: the warm instance.")
    print_comparison(console, zygote, fresh)


def print_comparison(console: Console, zygote: ModeResult, fresh: ModeResult) -> None:
    zygote_cold = _median([r.latency_ms for r in zygote.cold])
    fresh_cold = _median([r.latency_ms for r in fresh.cold])
    if zygote_cold is None or fresh_cold is None:
        return
    console.print(f"median cold start round trip: zygote {zygote_cold:.1f} ms, fresh "
                  f"{fresh_cold:.1f} ms ({fresh_cold / zygote_cold:.1f} times as long)")
