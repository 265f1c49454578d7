# -*- test-case-name: tests.test_device_api -*-
"""
The errors nestproto answers with: each one is a JSON body and a status.
"""

from __future__ import annotations


class NestError(Exception):
    """
    A request nestproto refuses; raised before anything is changed.

    @cvar status: the HTTP status of the answer.
    @cvar code: the short machine-readable error word sent as C{error}.
    """

    status: int = 400
    code: str = "bad_request"


class BadBody(NestError):
    """The request body is not what this endpoint accepts."""

    code = "bad_body"


class BodyTooLarge(NestError):
    """The request body is over the size this endpoint accepts."""

    status = 413
    code = "body_too_large"


class SerialRequired(NestError):
    """No device serial could be found in the request (PROTOCOL.md §2.3)."""

    code = "serial_required"

    def __init__(self, message: str = "Device serial required") -> None:
        super().__init__(message)


class UnknownDevice(NestError):
    """No device with that serial has ever talked to this server."""

    status = 404
    code = "unknown_device"

    def __init__(self, serial: str | None = None) -> None:
        super().__init__(
            "Device not found" if serial is None else f"Device {serial} not found"
        )


class NotFound(NestError):
    """The path names nothing here."""

    status = 404
    code = "not_found"


class MethodNotAllowed(NestError):
    """The path exists but not for this method."""

    status = 405
    code = "method_not_allowed"


class Unavailable(NestError):
    """A collaborator (an upstream service, the store) cannot answer now."""

    status = 503
    code = "unavailable"


class BadQuery(NestError):
    """A query parameter is not valid UTF-8."""

    code = "bad_query"

    def __init__(self) -> None:
        super().__init__("Query parameter is not valid UTF-8")


class MissingQuery(NestError):
    """A required query parameter is absent or empty (PROTOCOL.md §9)."""

    code = "missing_query"

    def __init__(self, message: str = "Missing query parameter") -> None:
        super().__init__(message)


class WeatherUnavailable(Unavailable):
    """No weather answer, fresh or cached, could be had (PROTOCOL.md §9)."""

    code = "weather_unavailable"

    def __init__(self) -> None:
        super().__init__("Weather service unavailable")


class UploadTooLarge(BodyTooLarge):
    """A device log is over the size kept, compressed or once decompressed."""

    code = "upload_too_large"

    def __init__(self, limitBytes: int) -> None:
        super().__init__(f"Device log is over {limitBytes} bytes")


class StoreClosed(Unavailable):
    """The server is shutting down: nothing more can be made durable."""

    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("Server is shutting down")


class StoreUnavailable(Unavailable):
    """A change could not be made durable (disk full, I/O error): nothing changed."""

    code = "store_unavailable"

    def __init__(self) -> None:
        super().__init__("The change could not be saved; nothing was changed")


class TooManyBuckets(NestError):
    """A device's change would take it past the buckets one device may hold."""

    code = "too_many_buckets"
