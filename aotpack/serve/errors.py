"""Serving errors: each maps to one HTTP status and says the fix (aotpack.errors style)."""

from __future__ import annotations

from ..errors import AdapterError, AdapterUnavailableError, AotpackError


class ServeError(AotpackError):
    status = 500
    kind = "server_error"


class InvalidRequestError(ServeError):
    """A request field out of range or malformed (size, steps, n, ...)."""

    status, kind = 422, "invalid_request"


class UnknownAdapterError(ServeError):
    """A request names an adapter that is not registered."""

    status, kind = 404, "unknown_adapter"


class AdapterNotAllowedError(ServeError):
    """A path or URL where a registered name is expected, or a registration from a disallowed source."""

    status, kind = 422, "adapter_not_allowed"


class QueueFullError(ServeError):
    status, kind = 429, "queue_full"

    def __init__(self, problem: str, fix: str, retry_after: int):
        super().__init__(problem, fix)
        self.retry_after = retry_after


class RequestTimeoutError(ServeError):
    status, kind = 504, "timeout"


class UnauthorizedError(ServeError):
    status, kind = 401, "unauthorized"


class NotReadyError(ServeError):
    status, kind = 503, "not_ready"


def http_status(err: Exception) -> tuple[int, str]:
    """(status, type) for any error a request can raise; adapter problems are the client's (422), except a Hub
    file the server cannot fetch now (503: the server's network or cache, not the request)."""
    if isinstance(err, ServeError):
        return err.status, err.kind
    if isinstance(err, AdapterUnavailableError):
        return 503, "adapter_unavailable"
    if isinstance(err, AdapterError):
        return 422, "invalid_adapter"
    if isinstance(err, AotpackError):
        return 422, "invalid_request"
    return 500, "server_error"


def error_body(err: Exception, redact=None) -> dict:
    """The JSON error answer; `redact` (the registry's) shows the server's adapter paths as clients know them."""
    status, kind = http_status(err)
    if isinstance(err, AotpackError):
        message, fix = err.problem, err.fix
    else:  # an unexpected failure: say what it was, never crash the server
        message, fix = f"{type(err).__name__}: {err}", "retry; if it persists, report it with the server log"
    if redact is not None:
        message, fix = redact(message), redact(fix)
    return {"error": {"type": kind, "message": message, "fix": fix}}
