"""Progress bars on stderr for large transfers, shared by push and the node cache."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.progress import Progress

# Files smaller than this finish before a bar is worth drawing.
PROGRESS_MIN_BYTES = 16 * 2**20

Advance = Callable[[int], None]


def _ignore(_nbytes: int) -> None:
    return None


@contextmanager
def transfer_progress(enabled: bool) -> Iterator[Progress | None]:
    """Yield a rich progress display on stderr, or None when `enabled` is false."""
    if not enabled:
        yield None
        return

    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield progress


def progress_task(progress: Progress | None, description: str, total_bytes: int) -> Advance:
    """Add a bar for a file of `total_bytes` and return the function that advances it."""
    if progress is None or total_bytes < PROGRESS_MIN_BYTES:
        return _ignore
    task = progress.add_task(description, total=total_bytes)

    def advance(nbytes: int) -> None:
        progress.advance(task, nbytes)

    return advance
