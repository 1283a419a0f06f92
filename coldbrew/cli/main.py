"""The `coldbrew` command line: run the gateway, deploy, invoke and inspect functions."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from coldbrew.cli import models
from coldbrew.errors import ColdbrewError
from coldbrew.sdk.client import Client, ClientError

def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {text!r}")
    return value


SPEC_FLAGS = {
    "memory_mb": ("--memory", int, "memory cap per instance, in MB (default 256)"),
    "timeout_s": ("--timeout", finite_float, "time limit per request, in seconds (default 30)"),
    "min_instances": ("--min-instances", int, "instances kept warm at all times (default 0)"),
    "max_instances": ("--max-instances", int, "maximum concurrent instances (default 10)"),
    "keep_alive_s": ("--keep-alive", finite_float,
                     "idle seconds before an instance is stopped (default 600)"),
    "max_queue": ("--max-queue", int,
                  "requests that may wait when all instances are busy (default 100)"),
    "start_mode": ("--start-mode", str, "'zygote' (fork, the default) or 'fresh' (new interpreter)"),
    "weights": ("--weights", str, "model pushed with 'coldbrew models push', by name"),
    "preload_hook": ("--preload-hook", str,
                     "'module.function' the zygote calls with the weights folder before forking"),
    "model_name": ("--model-name", str, "model name served on POST /v1/embeddings"),
    "context_policy": ("--context-policy", str,
                       "'error' (default) or 'truncate' for inputs over the context window"),
}


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldbrew", description=__doc__)
    parser.add_argument("--url", help="gateway URL (default $COLDBREW_URL or http://127.0.0.1:8080)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway in the foreground")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    serve.add_argument("--state-dir", help="state folder (default $COLDBREW_STATE_DIR or ./.coldbrew)")
    serve.add_argument("--memory-budget-mb", type=int,
                       help="sum of memory_mb allowed across live instances (default 80%% of RAM)")
    serve.add_argument("--limit-mode", choices=["cgroup2", "cgroup1", "rlimit"],
                       help="force how memory caps are enforced (default: best available)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--store", help="object store URI for model weights, file:///PATH or "
                       "s3://BUCKET/PREFIX (default $COLDBREW_STORE or STATE_DIR/objects)")

    deploy = commands.add_parser("deploy", help="deploy the functions of a file or folder")
    deploy.add_argument("path", type=Path, help="a Python file with a coldbrew.App, or with "
                        "--handler a plain handler file or folder")
    deploy.add_argument("--name", help="function name (plain handler files only)")
    deploy.add_argument("--handler", help="'module.function' inside the folder, or 'function' "
                        "inside the given file; skips App discovery")
    for key, (flag, kind, help_text) in SPEC_FLAGS.items():
        deploy.add_argument(flag, dest=key, type=kind, help=help_text)
    deploy.add_argument("--preload", action="append", default=[],
                        help="module the zygote imports ahead of time (repeatable or comma-separated)")
    deploy.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the function (repeatable)")

    invoke = commands.add_parser("invoke", help="invoke a function and print its result")
    invoke.add_argument("name")
    source = invoke.add_mutually_exclusive_group()
    source.add_argument("--data", help="event as a JSON string")
    source.add_argument("--file", type=Path, help="file that contains the JSON event")

    commands.add_parser("ls", help="list deployed functions")
    instances = commands.add_parser("instances", help="list a function's instances")
    instances.add_argument("name")
    logs = commands.add_parser("logs", help="show recent invocations and their output")
    logs.add_argument("name")
    logs.add_argument("--limit", type=int, default=10, help="how many invocations (default 10)")
    remove = commands.add_parser("rm", help="remove a function and stop its instances")
    remove.add_argument("name")
    models.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from coldbrew.gateway.server import serve

        serve(args.host, args.port, args.state_dir, args.memory_budget_mb, args.limit_mode,
              args.log_level, args.store)
        return 0
    if args.command == "models":
        return models.run(args)
    try:
        with Client(args.url) as client:
            return COMMANDS[args.command](client, args)
    except (ClientError, UsageError, ColdbrewError) as error:
        print(f"coldbrew {args.command}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`coldbrew logs fn | head`): stop quietly, as cat does.
        sys.stderr.close()
        return 0


def cmd_deploy(client: Client, args: argparse.Namespace) -> int:
    from coldbrew.sdk.app import load_apps

    path: Path = args.path
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    overrides = _spec_overrides(args)
    if args.handler is None:
        if path.is_dir() or path.suffix != ".py":
            raise UsageError(f"{path} is not a Python file; pass a file with a coldbrew.App, or "
                             "give --handler module.function")
        try:
            apps = load_apps(path)
        except Exception:  # noqa: BLE001 - the user's file failed to import; show why
            raise UsageError(f"importing {path} failed:\n{traceback.format_exc()}") from None
        specs = [{**definition.spec.to_json(), **overrides}
                 for app in apps for definition in app.functions.values()]
        if not specs:
            raise UsageError(f"{path} defines no coldbrew.App functions; decorate a handler with "
                             "@app.function() or give --handler")
        code_dir = path.parent
    else:
        code_dir = path if path.is_dir() else path.parent
        handler = args.handler
        if path.is_file() and "." not in handler:
            handler = f"{path.stem}.{handler}"
        # A name given with --name is used as typed, so that a bad one is reported as such.
        derived = path.stem if path.is_file() else path.resolve().name
        name = args.name or derived.replace("_", "-").lower()
        specs = [{"name": name, "handler": handler, **overrides}]
    if args.name and args.handler is None and len(specs) == 1:
        specs[0]["name"] = args.name

    for spec in specs:
        result = client.deploy(spec, code_dir)
        if result.get("changed", True):
            print(f"deployed {result['name']} version {result['version']} (memory "
                  f"{result['spec']['memory_mb']} MB, start mode {result['spec']['start_mode']})")
        else:
            print(f"{result['name']} is unchanged: version {result['version']} keeps serving")
    return 0


def _spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {key: getattr(args, key) for key in SPEC_FLAGS
                                 if getattr(args, key) is not None}
    preload = [m.strip() for item in args.preload for m in item.split(",") if m.strip()]
    if preload:
        overrides["preload"] = preload
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    if env:
        overrides["env"] = env
    return overrides


def cmd_invoke(client: Client, args: argparse.Namespace) -> int:
    try:
        if args.file is not None:
            event = json.loads(args.file.read_text())
        else:
            event = json.loads(args.data) if args.data is not None else {}
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"the event is not valid JSON: {error}") from None
    response = client.invoke(args.name, event)
    print(json.dumps(response.body, indent=2))
    start = "cold" if response.cold_start else "warm"
    init = f", init {response.init_ms:.1f} ms" if response.init_ms is not None else ""
    duration = f"{response.duration_ms:.1f} ms" if response.duration_ms is not None else "n/a"
    print(f"[{start} start, handler {duration}{init}, round trip {response.latency_ms:.1f} ms, "
          f"request {response.request_id}]", file=sys.stderr)
    return 0


def _console() -> Any:
    from rich.console import Console

    # Piped output has no terminal width; rich would assume 80 columns and cut headers.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _table(*headers: str) -> Any:
    from rich.table import Table

    table = Table()
    for header in headers:
        # Names and ids are what users copy into the next command: never wrap them.
        table.add_column(header, no_wrap=header in ("name", "id", "handler"))
    return table


def cmd_ls(client: Client, _args: argparse.Namespace) -> int:
    table = _table("name", "version", "handler", "memory MB", "timeout s", "min", "max",
                   "start mode", "instances")
    for function in client.list_functions():
        spec = function["spec"]
        states = ", ".join(f"{n} {s}" for s, n in sorted(function["instances"].items())) or "0"
        table.add_row(function["name"], str(function["version"]), spec["handler"],
                      str(spec["memory_mb"]), str(spec["timeout_s"]), str(spec["min_instances"]),
                      str(spec["max_instances"]), spec["start_mode"], states)
    _console().print(table)
    return 0


def cmd_instances(client: Client, args: argparse.Namespace) -> int:
    table = _table("id", "state", "pid", "version", "age s", "served", "RSS MB", "PSS MB")
    report = client.instance_report(args.name)
    for row in report["instances"]:
        table.add_row(row["id"], row["state"], str(row["pid"]), str(row["version"]),
                      f"{row['age_s']:.1f}", str(row["requests_served"]), str(row["rss_mb"]),
                      str(row["pss_mb"]))
    console = _console()
    console.print(table)
    zygote = report["zygote"]
    if zygote is not None:
        console.print(f"zygote pid {zygote['pid']}: RSS {zygote['rss_mb']:.1f} MB, "
                      f"PSS {zygote['pss_mb']:.1f} MB")
    console.print(f"total with zygote: RSS {report['total_rss_mb']:.1f} MB, "
                  f"PSS {report['total_pss_mb']:.1f} MB")
    return 0


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    for row in reversed(client.invocations(args.name, args.limit)):
        start = "cold" if row["cold_start"] else "warm"
        duration = f"{row['duration_ms']:.1f} ms" if row["duration_ms"] is not None else "n/a"
        error = f" {row['error_type']}" if row["error_type"] else ""
        print(f"--- {row['id']} v{row['version']} {start} status {row['status']}{error} "
              f"{duration} instance {row['instance_id']}")
        if row["output"]:
            print(row["output"].rstrip("\n"))
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    client.delete(args.name)
    print(f"removed {args.name}")
    return 0


COMMANDS = {
    "deploy": cmd_deploy,
    "invoke": cmd_invoke,
    "ls": cmd_ls,
    "instances": cmd_instances,
    "logs": cmd_logs,
    "rm": cmd_rm,
}

if __name__ == "__main__":
    sys.exit(main())
