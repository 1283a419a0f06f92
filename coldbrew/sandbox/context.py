"""The `context` argument of a handler, with AWS Lambda's attribute names."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Context:
    aws_request_id: str
    function_name: str
    function_version: str
    memory_limit_in_mb: int
    cold_start: bool
    instance_id: str
    deadline_epoch_s: float
    # Local folder of the function's weights in the node cache, when the spec has `weights`.
    weights_path: str | None = None
    # What the spec's preload_hook returned: built in the zygote, or in this instance's
    # init phase in fresh mode.
    preloaded: Any = None

    @property
    def request_id(self) -> str:
        return self.aws_request_id

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline_epoch_s - time.time()) * 1000))
