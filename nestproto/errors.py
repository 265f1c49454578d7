# -*- test-case-name: tests.test_router -*-
"""
The errors nestproto answers with, on either port: one hierarchy under
L{NestError}, and L{refusal}, the one mapping from an error to a status, a
JSON body and headers.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from attrs import frozen
from werkzeug.exceptions import HTTPException


class NestError(Exception):
    """
    A request nestproto refuses; raised before anything is changed.

    @cvar status: the HTTP status of the answer.
    @cvar code: the short machine-readable error word sent as C{error}.
    """

    status: int = 400
    code: str = "bad_request"

    def headers(self) -> dict[bytes, bytes]:
        """Headers the answer carries besides the body's content type."""
        return {}


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


class BadURL(NestError):
    """The request's URL is not UTF-8 once percent-decoded."""

    code = "bad_url"

    def __init__(self) -> None:
        super().__init__("URL is not UTF-8")


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


# The control port's refusals (PROTOCOL.md §16).


class CommandError(NestError):
    """A command that is unknown, malformed, or not possible for the device."""

    code = "bad_command"


class Unauthorized(NestError):
    """The control API has a token and the request did not carry it."""

    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Missing or wrong Authorization: Bearer token")

    def headers(self) -> dict[bytes, bytes]:
        return {b"www-authenticate": b'Bearer realm="nestproto"'}


class ForeignOrigin(NestError):
    """
    A browser page of another origin, not one the server was told to
    allow, made the request (issue 12 item 5).
    """

    status = 403
    code = "origin_not_allowed"

    def __init__(self) -> None:
        super().__init__("Requests from this origin are not allowed (--allow-origin)")


class NotJSON(NestError):
    """A request that changes something did not say its body is JSON."""

    status = 415
    code = "unsupported_media_type"

    def __init__(self) -> None:
        super().__init__("Content-Type must be application/json")


class InvalidSerial(NestError):
    """A control call names a device by something that is not a serial."""

    code = "invalid_serial"

    def __init__(self) -> None:
        super().__init__(
            "Invalid serial: a serial is 10 to 64 letters and digits "
            "(separators are ignored)"
        )


class CSRFRequired(NestError):
    """
    A changing request authenticated by the dashboard's session cookie
    without that session's CSRF token (issue 13).
    """

    status = 403
    code = "csrf_required"

    def __init__(self) -> None:
        super().__init__("Missing or wrong X-CSRF-Token for this session")


class WrongToken(NestError):
    """A dashboard login with a wrong control token."""

    status = 403
    code = "wrong_token"

    def __init__(self) -> None:
        super().__init__("Wrong token")


class WrongPassword(NestError):
    """A dashboard login with a wrong account name or password."""

    status = 403
    code = "wrong_password"

    def __init__(self) -> None:
        super().__init__("Wrong account name or password")


# Pairing (PROTOCOL.md §13).


class BadClaim(NestError):
    """A claim request is malformed: no code, no user, or a bad format."""

    code = "bad_claim"


#: The anchor's answer to a claim of a code no claimable key has.
INVALID_KEY_MESSAGE = "Invalid, expired, or already claimed entry key"


class InvalidEntryKey(NestError):
    """
    No claimable key has the code: unknown, expired or claimed already,
    which the answer does not tell apart (PROTOCOL.md §13 step 2).
    """

    code = "invalid_entry_key"

    def __init__(self) -> None:
        super().__init__(INVALID_KEY_MESSAGE)


class TooManyAttempts(NestError):
    """A client guessed wrong too often and must wait."""

    status = 429
    code = "too_many_attempts"

    def __init__(self, retryAfterSeconds: int) -> None:
        super().__init__(
            f"Too many invalid entry keys; try again in {retryAfterSeconds} seconds"
        )
        self.retryAfterSeconds = retryAfterSeconds

    def headers(self) -> dict[bytes, bytes]:
        return {b"retry-after": b"%d" % (self.retryAfterSeconds,)}


class NotPaired(NestError):
    """The device has no owner to remove."""

    status = 404
    code = "not_paired"


# Device admission (nestproto.admission, PROTOCOL.md §2).


class DeviceUnauthorized(NestError):
    """The serial is bound to another password than the one given."""

    status = 401
    code = "device_unauthorized"

    def __init__(self) -> None:
        super().__init__("Unauthorized: wrong credentials for this device")

    def headers(self) -> dict[bytes, bytes]:
        return {b"www-authenticate": b'Basic realm="nest"'}


class PairingRequired(NestError):
    """Pairing is required and the device is neither claimed nor pairing."""

    status = 401
    code = "pairing_required"

    def __init__(self) -> None:
        # The anchor's words (PROTOCOL.md §2.3).
        super().__init__("Device not authorized. Complete pairing first.")


class TooManyNewDevices(NestError):
    """A client address brought more new serials this hour than allowed."""

    status = 429
    code = "too_many_new_devices"

    def __init__(self, retryAfterSeconds: int) -> None:
        super().__init__(
            "Too many new devices from this address; try again in "
            f"{retryAfterSeconds} seconds"
        )
        self.retryAfterSeconds = retryAfterSeconds

    def headers(self) -> dict[bytes, bytes]:
        return {b"retry-after": b"%d" % (self.retryAfterSeconds,)}


# The one mapping from an error to an answer.


class AccountExists(NestError):
    """An app account of that name exists already (PROTOCOL.md §20.6)."""

    status = 409
    code = "account_exists"


class NoSuchAccount(NestError):
    """No app account of that name."""

    status = 404
    code = "no_such_account"


class WrongCredentials(NestError):
    """An app's login names no account, or the wrong password."""

    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Wrong user name or password")


class AppTokenRequired(NestError):
    """An app request without C{Authorization: Basic <token>} (§20.6)."""

    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Log in first: Authorization: Basic <access_token>")


class NotYours(NestError):
    """
    An app token that names nobody, or asks for what is outside its account
    (PROTOCOL.md §20.6): a 403, never a 401, which apps answer by logging
    in again.
    """

    status = 403
    code = "forbidden"


class ErrorShape(Enum):
    """
    The body each port's clients read an error from. Thermostats read
    C{error} (PROTOCOL.md §2.3); control clients read C{message} after a
    command and C{error} after a read, and check C{success} (§16.1, §16.6).
    """

    DEVICE = "device"
    CONTROL = "control"


@frozen
class Refusal:
    """An error as it is answered: status, JSON document and extra headers."""

    status: int
    document: dict[str, Any]
    headers: dict[bytes, bytes]


def refusal(error: BaseException, shape: ErrorShape) -> Refusal:
    """
    How C{error} is answered on a port whose clients read C{shape}: a
    L{NestError} with its status, code and sentence; a routing error
    (werkzeug's unknown path, wrong method) with its status and name; any
    other exception, which is a bug of ours, as a bare 500.
    """
    headers: dict[bytes, bytes] = {}
    if isinstance(error, NestError):
        status, code, message = error.status, error.code, str(error)
        headers = error.headers()
    elif isinstance(error, HTTPException):
        status = error.code or 400
        message = error.name or "Bad request"
        code = message.lower().replace(" ", "_")
    else:
        status, code, message = 500, "internal", "Internal error"
    document: dict[str, Any]
    if shape is ErrorShape.CONTROL:
        document = {"success": False, "error": message, "message": message}
    else:
        document = {"error": message}
    document["code"] = code
    return Refusal(status, document, headers)


class BadParameter(NestError):
    """A query parameter is missing its meaning: out of range, or not a number."""

    code = "bad_parameter"


class HistoryOff(NestError):
    """This server keeps no history."""

    status = 404
    code = "history_off"

    def __init__(self) -> None:
        super().__init__("This server keeps no history (started with --no-history)")


class TooManySubscribes(NestError):
    """An account's apps hold as many subscribes as one may (§20.3)."""

    status = 429
    code = "too_many_subscribes"


class BadCallback(NestError):
    """A JSONP callback name that is not a plain JavaScript name (§20.6)."""

    code = "bad_callback"
