"""Errors that cross the actor boundary and reach clients.

Each carries an HTTP-ish ``status`` so the front door can map it to the
OpenAI error shape without a lookup table of its own. Ray re-raises an
actor's exception on the caller as an instance of the same class, so callers
can ``except OverBudgetError`` directly.
"""

from __future__ import annotations


class ShoalError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __reduce__(self):  # keep the message across Ray's pickling
        return (self.__class__, self.args)


class UnknownModelError(ShoalError):
    status, code = 404, "model_not_found"


class UnknownDeviceError(ShoalError):
    """An admin action naming a device the controller does not know."""

    status, code = 404, "device_not_found"


class UnauthorizedError(ShoalError):
    """No API key, or one that is no tenant's (front door, tenants configured).
    The message never repeats the key that was sent."""

    status, code = 401, "invalid_api_key"


class BadRequestError(ShoalError):
    """Malformed input: bad parameters, prompt too long, bad checkpoint."""

    status, code = 400, "invalid_request_error"


class CheckpointError(BadRequestError):
    """A checkpoint path that is missing, unreadable or not a model."""

    code = "invalid_checkpoint"


class IncompatibleModelError(BadRequestError):
    """A swap between models whose shapes or tokenizers differ."""

    code = "incompatible_architecture"


class PromptTooLongError(BadRequestError):
    code = "context_length_exceeded"


class OverBudgetError(ShoalError):
    """A load that does not fit in the device's memory budget."""

    status, code = 507, "insufficient_device_memory"


class ModelNotActiveError(ShoalError):
    """The model is registered but its weights are not in an engine now."""

    status, code = 409, "model_not_active"


class ModelBusyError(ShoalError):
    """A control action that needs the model idle while requests are in flight."""

    status, code = 409, "model_busy"


class RequestAbortedError(ShoalError):
    """An in-flight request ended by an unload or a worker shutdown."""

    status, code = 503, "request_aborted"


class RetryLaterError(ShoalError):
    """Try again later; ``retry_after_s`` becomes the HTTP Retry-After header."""

    def __init__(self, message: str, retry_after_s: float = 5.0):
        super().__init__(message, retry_after_s)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return str(self.args[0])


class RateLimitedError(RetryLaterError):
    """A request rate limit (the model's, or the tenant's requests, tokens or
    concurrency) refused the request (front door)."""

    status, code = 429, "rate_limit_exceeded"


class ServiceUnavailableError(RetryLaterError):
    status, code = 503, "service_unavailable"


class ColdStartQueueFullError(ServiceUnavailableError):
    """Too many requests already wait for this model to load."""

    code = "cold_start_queue_full"


class LoadTimeoutError(ServiceUnavailableError):
    """The model did not become active within the load timeout."""

    code = "model_load_timeout"


class NoCapacityError(ServiceUnavailableError):
    """No device in the cluster may run the model (its allowed vendors or
    accelerators, its size) and the autoscaler can add none that may: the
    request fails at once instead of waiting out the load timeout."""

    code = "no_allowed_accelerator"


def root_cause(e: BaseException) -> BaseException:
    """The original error inside Ray's wrappers (an actor error raised
    through another actor arrives as a RayTaskError around a RayTaskError)."""
    seen = 0
    while getattr(e, "cause", None) is not None and seen < 8:
        e, seen = e.cause, seen + 1
    return e
