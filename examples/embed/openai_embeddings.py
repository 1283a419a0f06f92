"""The request and response bodies of OpenAI's `POST /v1/embeddings`, as the handler uses them.

The event is the OpenAI request body, to which the gateway adds `context_policy` from
the function's spec. Every check raises InvalidInput (a ValueError, returned as HTTP 400)
that quotes the invalid value.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from coldbrew.inference import CONTEXT_POLICIES, InvalidInput, Truncation

# OpenAI's limit on the inputs of one embeddings request (its OpenAPI spec: "any array
# must be 2048 dimensions or less").
MAX_INPUTS = 2048
ENCODING_FORMATS = ("float", "base64")
# OpenAI's request fields, plus context_policy, which the gateway adds. OpenAI's spec
# rejects other fields too (additionalProperties: false), which catches misspelled names.
REQUEST_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "context_policy")


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A validated embeddings request."""

    inputs: list[str]
    # The requested model name, or None when the function was invoked directly.
    model: str | None
    encoding_format: str
    context_policy: str


def parse_request(event: Any, dimensions: int) -> EmbeddingsRequest:
    """Validate an embeddings request for a model whose embeddings have `dimensions` values."""
    if not isinstance(event, dict):
        raise InvalidInput(f"the event must be a JSON object with an 'input' field, as in "
                           f"OpenAI's embeddings request, got {_preview(event)}")
    unknown = sorted(set(event) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown request fields {unknown}; expected only {list(REQUEST_FIELDS)}",
                           param=unknown[0])

    _check_dimensions(event.get("dimensions"), dimensions)
    _optional_string(event, "user")
    return EmbeddingsRequest(
        inputs=_parse_inputs(event.get("input")),
        model=_optional_string(event, "model"),
        encoding_format=_choice(event, "encoding_format", ENCODING_FORMATS, "float"),
        context_policy=_choice(event, "context_policy", CONTEXT_POLICIES, "error"),
    )


def _parse_inputs(value: Any) -> list[str]:
    if value is None:
        raise InvalidInput("the request has no 'input'; send a string or a list of strings")
    if isinstance(value, str):
        _check_text("input", value)
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"'input' must be a string or a non-empty list of strings, got "
                           f"{_preview(value)}")
    if all(_is_int(item) for item in value):
        raise InvalidInput(f"'input' is a list of token ids {_preview(value)}; this function "
                           "tokenizes text itself, so send the text as a string")
    if len(value) > MAX_INPUTS:
        raise InvalidInput(f"'input' has {len(value)} items, more than the maximum of {MAX_INPUTS} "
                           "per request; split it into several requests")

    for index, item in enumerate(value):
        if isinstance(item, list) and item and all(_is_int(token) for token in item):
            raise InvalidInput(f"'input[{index}]' is a list of token ids {_preview(item)}; this "
                               "function tokenizes text itself, so send the text as a string")
        _check_text(f"input[{index}]", item)
    return list(value)


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' is {_preview(value)}; expected a non-empty string")
    if not value:
        raise InvalidInput(f"'{name}' is an empty string; OpenAI's API rejects empty inputs too, "
                           "so leave it out of the request")


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but true and false are neither token ids nor dimensions.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_dimensions(value: Any, dimensions: int) -> None:
    # A JSON null counts as an absent field.
    if value is None or (_is_int(value) and value == dimensions):
        return
    raise InvalidInput(f"'dimensions' is {_preview(value)}, but this model returns "
                       f"{dimensions}-dimensional embeddings and cannot shorten them; "
                       f"omit 'dimensions' or set it to {dimensions}", param="dimensions")


def _optional_string(event: dict[str, Any], key: str) -> str | None:
    value = event.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"'{key}' is {_preview(value)}; expected a string", param=key)
    return value


def _choice(event: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = event.get(key)
    if value is None:
        return default
    if value not in choices:
        raise InvalidInput(f"'{key}' is {_preview(value)}; expected one of {list(choices)}",
                           param=key)
    return str(value)


def build_response(request: EmbeddingsRequest, embeddings: np.ndarray, tokens: int,
                   truncations: list[Truncation], default_model: str) -> dict[str, Any]:
    """Return OpenAI's embeddings response body, with a `truncation` list when anything was cut.

    `tokens` counts the tokens that the model embedded, special tokens included.
    """
    data = [{"object": "embedding", "index": index,
             "embedding": encode_embedding(row, request.encoding_format)}
            for index, row in enumerate(embeddings)]
    response: dict[str, Any] = {
        "object": "list",
        "data": data,
        "model": request.model or default_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    if truncations:
        response["truncation"] = [truncation.to_json() for truncation in truncations]
    return response


def encode_embedding(row: np.ndarray, encoding_format: str) -> list[float] | str:
    """Return the vector as JSON numbers, or as OpenAI's base64 of little-endian float32 bytes."""
    values = row.astype("<f4")
    if encoding_format == "base64":
        return base64.b64encode(values.tobytes()).decode("ascii")
    # tolist() turns each float32 into the Python float of the same value, so a client
    # that reads the numbers back as float32 gets the same vector as from base64.
    return values.tolist()


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
