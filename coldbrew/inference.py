"""Helpers for inference handlers: explicit context-window policies.

Requests are stateless, so every request carries its whole input. An input longer than
the model's context window is either rejected (`error`, the default) or cut to the
window with the cut reported in the response (`truncate`). It is never cut silently.
Handlers run this in the instance process, with the model's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

CONTEXT_POLICIES = ("error", "truncate")

Token = TypeVar("Token")


class InvalidInput(ValueError):
    """A malformed request input, which the gateway returns as 400 InvalidRequest, not 500."""

    error_type = "InvalidInput"

    def __init__(self, message: str, param: str = "input") -> None:
        super().__init__(message)
        self.param = param

    def details(self) -> dict[str, Any]:
        return {"param": self.param}


class ContextLengthExceeded(Exception):
    """An input has more tokens than the model's context window, under the `error` policy.

    The instance runtime reports it as error type `ContextLengthExceeded`, which the
    gateway returns as HTTP 400 with code `context_length_exceeded`.
    """

    error_type = "ContextLengthExceeded"

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(
            f"input {index} has {tokens} tokens, more than the model's context window of "
            f"{limit} tokens; shorten the input, split it, or deploy the function with "
            "context_policy='truncate'")
        self.index = index
        self.tokens = tokens
        self.limit = limit

    def details(self) -> dict[str, Any]:
        return {"index": self.index, "tokens": self.tokens, "limit": self.limit,
                "code": "context_length_exceeded", "param": "input"}


@dataclass(frozen=True)
class Truncation:
    """The part of one input that the `truncate` policy cut off."""

    index: int
    tokens_kept: int
    tokens_dropped: int

    def to_json(self) -> dict[str, int]:
        return {"index": self.index, "tokens_kept": self.tokens_kept,
                "tokens_dropped": self.tokens_dropped}


def apply_context_policy(tokens: Sequence[Token], limit: int, policy: str,
                         index: int = 0) -> tuple[list[Token], Truncation | None]:
    """Return the tokens to use and the truncation made, or raise ContextLengthExceeded.

    `limit` counts every token passed to the model, special tokens included.
    """
    if policy not in CONTEXT_POLICIES:
        raise ValueError(f"unknown context policy {policy!r}; expected one of "
                         f"{list(CONTEXT_POLICIES)}")
    if len(tokens) <= limit:
        return list(tokens), None
    if policy == "error":
        raise ContextLengthExceeded(index, len(tokens), limit)
    return list(tokens[:limit]), Truncation(index, limit, len(tokens) - limit)
