"""Run coldbrew end to end on this machine: `python -m coldbrew.demo`.

The demo starts a gateway subprocess on a free 127.0.0.1 port with a throw-away
state dir and deploys the hello and digits examples. It measures the digits
classifier's accuracy on its held-out images and its cold and warm latency. Then it
deploys digits a second time with start_mode="fresh" to compare a zygote fork with a
new interpreter. The gateway is stopped with SIGTERM before the demo returns, also
when a step fails. The examples need numpy and scikit-learn: `pip install -e '.[examples]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
from rich.console import Console
from rich.table import Table

from coldbrew.sdk.client import Client, ClientError, InvokeResponse

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
HELLO_APP = EXAMPLES_DIR / "hello" / "app.py"
DIGITS_APP = EXAMPLES_DIR / "digits" / "app.py"
DIGITS_MODEL = EXAMPLES_DIR / "digits" / "model.npz"
FRESH_SUFFIX = "-fresh"

HEALTH_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# Short, so that an idle instance is stopped soon after a request and the next request
# to the function is a cold start. The gateway checks keep-alive every 0.1 s.
DEMO_KEEP_ALIVE_S = 1.0
SCALE_TO_ZERO_TIMEOUT_S = DEMO_KEEP_ALIVE_S + 15.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class DemoError(Exception):
    """A demo step failed; the message names the step and the value involved."""


@dataclass(frozen=True)
class Gateway:
    """A running `coldbrew serve` subprocess."""

    url: str
    pid: int
    log_path: Path


@dataclass(frozen=True)
class ModeResult:
    """Responses and memory use of one deployed function, all for the same event."""

    start_mode: str
    cold: list[InvokeResponse]
    warm: list[InvokeResponse]
    predictions: list[int]
    rss_mb: float | None
    pss_mb: float | None


# Gateway process


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_with_parent() -> None:
    # Runs in the gateway child before exec: if the demo is killed (a test timeout sends
    # SIGKILL), the kernel sends the gateway SIGTERM, so it still stops its instances.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def running_gateway(work_dir: Path, port: int | None = None) -> Iterator[Gateway]:
    """Start `coldbrew serve` with its state under work_dir; stop it with SIGTERM on exit."""
    port = port or free_port()
    log_path = work_dir / "gateway.log"
    command = [sys.executable, "-m", "coldbrew.cli.main", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--state-dir", str(work_dir / "state")]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=_stop_with_parent)
    gateway = Gateway(f"http://127.0.0.1:{port}", process.pid, log_path)
    try:
        _wait_healthy(gateway, process)
        yield gateway
    finally:
        stop_gateway(process)


def _wait_healthy(gateway: Gateway, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"the gateway exited with code {process.returncode} before it "
                            f"became healthy: {_last_error_line(gateway.log_path)}")
        try:
            if httpx.get(f"{gateway.url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # the gateway is not listening yet
        time.sleep(0.1)
    raise DemoError(f"the gateway at {gateway.url} did not become healthy: GET /healthz "
                    f"timed out after {HEALTH_TIMEOUT_S:.0f} s; see {gateway.log_path}")


def stop_gateway(process: subprocess.Popen[bytes]) -> int:
    """Send SIGTERM and wait for the gateway's graceful shutdown; SIGKILL it if that hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"the gateway (pid {process.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s "
                  "of SIGTERM; sending SIGKILL", file=sys.stderr)
            process.kill()
            process.wait()
    return process.returncode


def _last_error_line(path: Path) -> str:
    """Return the log's last line that mentions an error, or its last line if none does."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "(the log is empty)"


# Examples


def example_specs(app_path: Path) -> dict[str, dict[str, Any]]:
    """Import an example file as `coldbrew deploy` does and return its specs by function name."""
    from coldbrew.sdk.app import load_apps

    if not app_path.is_file():
        raise DemoError(f"example {app_path} not found; run the demo from a clone of the "
                        "coldbrew repository")
    try:
        apps = load_apps(app_path)
    except ImportError as error:
        raise DemoError(f"importing {app_path} failed ({error}); install the examples' "
                        "dependencies with pip install -e '.[examples]'") from None
    except Exception as error:  # noqa: BLE001 - example code may raise anything on import
        raise DemoError(f"importing {app_path} failed: {type(error).__name__}: {error}") from None
    specs = {name: definition.spec.to_json()
             for app in apps for name, definition in app.functions.items()}
    if not specs:
        raise DemoError(f"{app_path} defines no coldbrew.App functions")
    return specs


def load_held_out(model_path: Path) -> tuple[list[list[float]], list[int]]:
    """Return the digits images and labels that the model never trained on.

    model.npz stores `test_start`, the first `load_digits()` row that train.py held out.
    """
    import numpy as np
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


# Measurements


def invoke_expecting(client: Client, name: str, event: Any, cold: bool) -> InvokeResponse:
    """Invoke the function; raise DemoError unless the start was cold (cold=True) or warm."""
    response = client.invoke(name, event)
    if response.cold_start != cold:
        expected, got = ("cold", "warm") if cold else ("warm", "cold")
        raise DemoError(f"request {response.request_id} to {name!r} was a {got} start where "
                        f"the demo expected a {expected} one; the machine may be too busy "
                        f"for keep_alive_s={DEMO_KEEP_ALIVE_S}")
    return response


def wait_for_zero_instances(client: Client, name: str) -> None:
    """Wait until keep-alive has stopped every instance of the function."""
    deadline = time.monotonic() + SCALE_TO_ZERO_TIMEOUT_S
    while client.instances(name):
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {SCALE_TO_ZERO_TIMEOUT_S:.0f} s waiting for "
                            f"keep-alive (keep_alive_s={DEMO_KEEP_ALIVE_S}) to stop the "
                            f"instances of function {name!r}")
        time.sleep(0.1)


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


# Output


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


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


# The demo


def run_demo(console: Console, cold_rounds: int, warm_requests: int) -> None:
    started = time.monotonic()
    hello_specs = example_specs(HELLO_APP)
    digits_specs = example_specs(DIGITS_APP)
    images, labels = load_held_out(DIGITS_MODEL)
    event = {"images": images}

    with tempfile.TemporaryDirectory(prefix="coldbrew-demo-") as work_dir, \
            running_gateway(Path(work_dir)) as gateway, Client(gateway.url) as client:
        console.print(f"gateway running at {gateway.url} (pid {gateway.pid})")

        for spec in hello_specs.values():
            client.deploy(spec, HELLO_APP.parent)
            response = client.invoke(spec["name"], {"name": "coldbrew"})
            console.print(f"{spec['name']}: {response.body['message']} "
                          f"({'cold' if response.cold_start else 'warm'} start, "
                          f"{response.latency_ms:.1f} ms round trip)")

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
    console.print(f"gateway stopped; demo finished in {time.monotonic() - started:.1f} s")


def print_comparison(console: Console, zygote: ModeResult, fresh: ModeResult) -> None:
    zygote_cold = _median([r.latency_ms for r in zygote.cold])
    fresh_cold = _median([r.latency_ms for r in fresh.cold])
    if zygote_cold is None or fresh_cold is None:
        return
    console.print(f"median cold start round trip: zygote {zygote_cold:.1f} ms, fresh "
                  f"{fresh_cold:.1f} ms ({fresh_cold / zygote_cold:.1f} times as long)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coldbrew.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold-rounds", type=int, default=3,
                        help="cold starts measured per start mode (default 3)")
    parser.add_argument("--warm-requests", type=int, default=5,
                        help="warm requests measured per start mode (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for option, value in (("--cold-rounds", args.cold_rounds),
                          ("--warm-requests", args.warm_requests)):
        if value < 1:
            print(f"coldbrew demo: {option} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        run_demo(Console(soft_wrap=True), args.cold_rounds, args.warm_requests)
    except (DemoError, ClientError, OSError) as error:
        print(f"coldbrew demo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("coldbrew demo interrupted; the gateway was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
