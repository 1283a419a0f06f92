"""Run coldbrew end to end on this machine: `python -m coldbrew.demo`.

The demo pushes the all-MiniLM-L6-v2 weights to a throw-away object store, starts a
gateway subprocess on a free 127.0.0.1 port with a throw-away state dir, and serves the
embed example through OpenAI's `POST /v1/embeddings` with scale to zero:

1. It embeds a set of sentences on a cold start, then warm, and ranks the sentences
   against a few queries by cosine similarity.
2. It compares the cold start of three deployments of the same function: forked from a
   zygote that loaded the model before fork (the preload hook), forked from a zygote that
   only imported torch, and a fresh interpreter per instance.
3. It bursts concurrent requests so that several instances start, and reports their
   memory next to one instance's.

Then it deploys the hello and digits examples, measures the digits classifier's
accuracy, and compares its zygote and fresh cold starts. The gateway is stopped with
SIGTERM before the demo returns, also when a step fails. The examples' dependencies and
the openai client are installed by ./demo.sh.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from coldbrew.sdk.client import Client, ClientError

from coldbrew.demo.common import (
    DIGITS_APP,
    DIGITS_MODEL,
    DemoError,
    EMBED_APP,
    HELLO_APP,
    OFFLINE_ENV,
    example_specs,
    running_gateway,
)
from coldbrew.demo.digits import load_held_out, run_digits_demo
from coldbrew.demo.embed import (
    EMBED_MODEL,
    check_openai_installed,
    minilm_path,
    push_model,
    run_embed_demo,
)


# The demo


def run_demo(console: Console, cold_rounds: int, warm_requests: int) -> None:
    started = time.monotonic()
    # Everything that can fail without a gateway is checked first.
    check_openai_installed()
    weights = minilm_path()
    embed_spec = example_specs(EMBED_APP)["embed"]
    hello_specs = example_specs(HELLO_APP)
    digits_specs = example_specs(DIGITS_APP)
    images, labels = load_held_out(DIGITS_MODEL)

    with tempfile.TemporaryDirectory(prefix="coldbrew-demo-") as work_dir:
        store_uri = (Path(work_dir) / "state" / "objects").as_uri()
        console.rule(f"1. push {EMBED_MODEL} to the object store")
        console.print(push_model(store_uri, weights))

        with running_gateway(Path(work_dir), store_uri=store_uri, env=OFFLINE_ENV) as gateway, \
                Client(gateway.url) as client:
            console.print(f"gateway running at {gateway.url} (pid {gateway.pid}), "
                          f"offline: {', '.join(f'{k}={v}' for k, v in OFFLINE_ENV.items())}")
            run_embed_demo(console, gateway, client, embed_spec, cold_rounds, warm_requests)
            run_digits_demo(console, client, hello_specs, digits_specs, images, labels,
                            cold_rounds, warm_requests)
    console.print(f"gateway stopped; demo finished in {time.monotonic() - started:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coldbrew.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold-rounds", type=int, default=3,
                        help="cold starts measured per deployment (default 3)")
    parser.add_argument("--warm-requests", type=int, default=5,
                        help="warm requests measured per deployment (default 5)")
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
