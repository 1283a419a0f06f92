"""`coldbrew models`: push, list, pull and remove model weights, straight in the object store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from coldbrew.errors import ColdbrewError

if TYPE_CHECKING:
    from coldbrew.weights.store import ObjectStore

# The same rule as `coldbrew serve`, so that both find the same default store.
STATE_DIR_ENV = "COLDBREW_STATE_DIR"
DEFAULT_STATE_DIR = ".coldbrew"


def add_parser(commands: Any) -> None:
    """Register `models` and its subcommands on the top-level subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="object store URI, file:///folder or s3://bucket/prefix "
                        "(default $COLDBREW_STORE or file://<state dir>/objects, where the state "
                        "dir is $COLDBREW_STATE_DIR or ./.coldbrew)")

    models = commands.add_parser("models", help="push, list, pull and remove model weights")
    actions = models.add_subparsers(dest="models_command", required=True)

    push = actions.add_parser("push", parents=[common], help="upload a weights file or folder")
    push.add_argument("name", help="model name: 1-128 characters from a-z 0-9 . _ -")
    push.add_argument("path", type=Path, help="a weights file, or a folder uploaded whole")
    push.add_argument("--no-progress", action="store_true", help="draw no progress bars")

    actions.add_parser("ls", parents=[common], help="list models: name, digest, files, size")

    pull = actions.add_parser("pull", parents=[common],
                              help="download a model into this node's cache")
    pull.add_argument("name")
    pull.add_argument("--cache", type=Path, help="node cache folder (default <state dir>/weights)")
    pull.add_argument("--max-gb", type=float, help="cache size limit in GB (10^9 bytes; default "
                      "80%% of the cache's file system)")
    pull.add_argument("--no-progress", action="store_true", help="draw no progress bars")

    remove = actions.add_parser("rm", parents=[common],
                                help="remove a model and the blobs only it used")
    remove.add_argument("name")


def run(args: argparse.Namespace) -> int:
    """Run one `coldbrew models` subcommand; print one line on stderr and return 1 on error."""
    # Imported here: fsspec costs every other `coldbrew` command about 0.1 s at start-up.
    from coldbrew.weights.store import ObjectStore, default_store_uri

    try:
        store = ObjectStore(args.store or default_store_uri(_state_dir()))
        return ACTIONS[args.models_command](store, args)
    except ColdbrewError as error:
        print(f"coldbrew models {args.models_command}: {error}", file=sys.stderr)
        return 1


def cmd_push(store: ObjectStore, args: argparse.Namespace) -> int:
    manifest = store.push(args.name, args.path, progress=not args.no_progress)
    stats = store.last_push
    assert stats is not None  # push sets it before returning
    print(f"pushed {manifest.name} {manifest.digest[:12]}: {len(manifest.files)} files, "
          f"{format_bytes(manifest.total_bytes)} ({format_bytes(stats.bytes)} uploaded in "
          f"{stats.seconds:.2f} s, {format_bytes(stats.skipped_bytes)} already stored) "
          f"to {store.uri}")
    return 0


def cmd_ls(store: ObjectStore, _args: argparse.Namespace) -> int:
    manifests = store.list()
    if not manifests:
        print(f"no models in {store.uri}", file=sys.stderr)
        return 0
    width = max(len(manifest.name) for manifest in manifests)
    for manifest in manifests:
        print(f"{manifest.name:<{width}}  {manifest.digest[:12]}  {len(manifest.files):>4} files  "
              f"{format_bytes(manifest.total_bytes):>10}")
    return 0


def cmd_pull(store: ObjectStore, args: argparse.Namespace) -> int:
    from coldbrew.weights.cache import NodeCache, default_cache_max_bytes

    root = args.cache or Path(_state_dir()) / "weights"
    max_bytes = int(args.max_gb * 1e9) if args.max_gb is not None else default_cache_max_bytes(root)
    cache = NodeCache(root, max_bytes)
    path = cache.ensure(store, args.name, progress=not args.no_progress)

    if not cache.downloads:
        print(f"{args.name} is already cached in {path}")
        return 0
    stats = cache.downloads[-1]
    print(f"pulled {args.name} {stats.digest[:12]} to {path}: {format_bytes(stats.bytes)} in "
          f"{stats.seconds:.2f} s ({stats.mb_per_s:.1f} MB/s)")
    return 0


def cmd_rm(store: ObjectStore, args: argparse.Namespace) -> int:
    store.remove(args.name)
    print(f"removed {args.name} from {store.uri}")
    return 0


def format_bytes(size: int) -> str:
    """Format a byte count with binary units: 512 B, 1.5 KiB, 86.7 MiB."""
    if size < 1024:
        return f"{size} B"
    value, unit = size / 1024, "KiB"
    for larger_unit in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger_unit
    return f"{value:.1f} {unit}"


def _state_dir() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


ACTIONS: dict[str, Callable[[ObjectStore, argparse.Namespace], int]] = {
    "push": cmd_push,
    "ls": cmd_ls,
    "pull": cmd_pull,
    "rm": cmd_rm,
}
