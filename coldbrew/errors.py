"""Errors that reach a client, each with its HTTP status and error type.

The gateway maps every `ColdbrewError` to the JSON body
`{"error": {"type": ..., "message": ..., **details}}` in one place.
"""

from __future__ import annotations

from typing import Any


class ColdbrewError(Exception):
    """Base class: `error_type` and `status` are what the client receives."""

    error_type = "InternalError"
    status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"error": {"type": self.error_type, "message": self.message, **self.details}}


class InvalidSpec(ColdbrewError):
    """A function spec field is missing, unknown or out of range."""

    error_type = "InvalidSpec"
    status = 400


class InvalidBundle(ColdbrewError):
    """The uploaded code bundle is not a usable zip archive."""

    error_type = "InvalidBundle"
    status = 400


class ImportFailed(ColdbrewError):
    """The function's module or a preload module raised on import, or the handler is missing."""

    error_type = "ImportFailed"
    status = 400


class InvalidRequest(ColdbrewError):
    error_type = "InvalidRequest"
    status = 400


class ContextLengthError(ColdbrewError):
    """An input is longer than the model's context window under the `error` policy."""

    error_type = "ContextLengthExceeded"
    status = 400


class FunctionNotFound(ColdbrewError):
    error_type = "FunctionNotFound"
    status = 404


class PayloadTooLarge(ColdbrewError):
    error_type = "PayloadTooLarge"
    status = 413


class TooManyRequests(ColdbrewError):
    """The function's instances are all busy and its queue is full."""

    error_type = "TooManyRequests"
    status = 429

    def __init__(self, message: str, retry_after_s: int, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class HandlerError(ColdbrewError):
    """The handler raised, or returned a value that is not JSON."""

    error_type = "HandlerError"
    status = 500


class OutOfMemory(ColdbrewError):
    error_type = "OutOfMemory"
    status = 502


class InstanceCrashed(ColdbrewError):
    error_type = "InstanceCrashed"
    status = 502


class InitFailed(ColdbrewError):
    """A new instance failed before it was ready to serve (init phase)."""

    error_type = "InitFailed"
    status = 502


class ResponseTooLarge(ColdbrewError):
    error_type = "ResponseTooLarge"
    status = 502


class Timeout(ColdbrewError):
    error_type = "Timeout"
    status = 504


class ServiceUnavailable(ColdbrewError):
    """The server is shutting down or the function was removed while the request waited."""

    error_type = "ServiceUnavailable"
    status = 503


class InvalidModel(ColdbrewError):
    """A model name is malformed, or the path given to push has no usable files."""

    error_type = "InvalidModel"
    status = 400


class InvalidTensorFile(ColdbrewError):
    """A safetensors file has a malformed header, or its header does not match its data."""

    error_type = "InvalidTensorFile"
    status = 400


class ModelNotFound(ColdbrewError):
    """The object store has no manifest under the model's name."""

    error_type = "ModelNotFound"
    status = 404


class WeightsCorrupted(ColdbrewError):
    """A model file in the object store is missing, or its SHA-256 differs from the manifest."""

    error_type = "WeightsCorrupted"
    status = 502


class ObjectStoreError(ColdbrewError):
    """The object store URI is unusable, or a request to the store failed."""

    error_type = "ObjectStoreError"
    status = 502
