# -*- test-case-name: tests.test_control_api -*-
"""
The user-facing HTTP API: reading and changing thermostats, and pairing.

It speaks the anchor's control contract (PROTOCOL.md §13, §16), so the
Home Assistant, Homebridge and Matterbridge clients written for it work
unchanged, without the anchor's defects (§16.6).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any, ClassVar, TypeVar

from attrs import Factory, field, frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..admission import Admission
from ..device.auth import normaliseSerial
from ..device.wire import parseJSONObject
from ..errors import BadBody, NestError, SerialRequired, Unavailable, UnknownDevice
from ..httpjson import JSONKlein, jsonResponse, readBody
from ..hub import SubscriberHub
from ..membership import OWNER_RECORD
from ..pairing import (
    ClaimThrottle,
    InvalidEntryKey,
    Pairing,
    TooManyAttempts,
    checkUserId,
    normaliseCode,
)
from ..state import DeviceState
from . import commands
from .events import EventStream
from .status import DEFAULT_UNAVAILABLE_AFTER_SECONDS, deviceStatus

_BODY_MAX_BYTES = 256 * 1024
_CORS_HEADERS = {
    b"access-control-allow-origin": b"*",
    b"access-control-allow-headers": b"Authorization, Content-Type, Accept",
    b"access-control-allow-methods": b"GET, POST, DELETE, OPTIONS",
    b"access-control-max-age": b"600",
}

#: The anchor's words for a control call that names no device.
CONTROL_SERIAL_REQUIRED = "Serial parameter required"


class InvalidSerial(NestError):
    """A control call names a device by something that is not a serial."""

    code = "invalid_serial"

    def __init__(self) -> None:
        super().__init__(
            "Invalid serial: a serial is 10 to 64 letters and digits "
            "(separators are ignored)"
        )


F = TypeVar("F", bound=Callable[..., Any])


class Unauthorized(NestError):
    """The control API has a token and the request did not carry it."""

    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Missing or wrong Authorization: Bearer token")


@frozen
class ControlSettings:
    """
    @ivar token: when set, every request must carry C{Authorization:
        Bearer <token>}; when C{None} the API is open (the anchor's
        default), and any Authorization header is accepted and ignored.
    @ivar unavailableAfterSeconds: silence after which a device is shown
        unavailable.
    """

    token: str | None = None
    unavailableAfterSeconds: float = DEFAULT_UNAVAILABLE_AFTER_SECONDS


def _guarded(handler: F) -> F:
    """CORS headers and the token check, before the handler runs."""

    @wraps(handler)
    def guarded(self: ControlAPI, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        _cors(request)
        self._authorize(request)
        return handler(self, request, *args, **kwargs)

    return guarded  # type: ignore[return-value]


def _cors(request: IRequest) -> None:
    # Any origin: browser dashboards on other hosts call this API; the token,
    # when set, is what protects it, and it is not a cookie a page could
    # borrow.
    for name, value in _CORS_HEADERS.items():
        request.setHeader(name, value)


def _queryText(request: IRequest, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise BadBody(f"{name.decode()} is not UTF-8") from None


def _pathSerial(raw: object) -> str:
    """
    The serial C{raw} names.

    @raise SerialRequired: when it is missing or empty.
    @raise InvalidSerial: when it is there but not a serial.
    """
    if raw is None or raw == "":
        raise SerialRequired(CONTROL_SERIAL_REQUIRED)
    serial = normaliseSerial(raw) if isinstance(raw, str) else None
    if serial is None:
        raise InvalidSerial()
    return serial


def _bodySerial(document: dict[str, Any]) -> str:
    return _pathSerial(document.get("serial"))


@frozen(kw_only=True, eq=False)
class ControlAPI:
    """The control port's Klein app."""

    app: ClassVar[Klein] = JSONKlein()
    log: ClassVar[Logger] = Logger()

    state: DeviceState
    hub: SubscriberHub
    #: Shared with the device port: codes shown there are claimed here.
    pairing: Pairing
    settings: ControlSettings = field(factory=ControlSettings)
    throttle: ClaimThrottle = field(
        default=Factory(lambda self: ClaimThrottle(self.state.clock), takes_self=True)
    )
    events: EventStream
    #: Which devices are shown: with pairing required, only claimed ones.
    admission: Admission = field(
        default=Factory(lambda self: Admission(self.state), takes_self=True)
    )

    # Errors

    @app.handle_errors(NestError, HTTPException)
    def refused(self, request: IRequest, failure: Failure) -> bytes:
        _cors(request)
        error = failure.value
        if request.method == b"OPTIONS" and isinstance(error, MethodNotAllowed):
            # A CORS preflight: browsers send it without credentials.
            request.setResponseCode(204)
            return b""
        if isinstance(error, NestError):
            status, code, message = error.status, error.code, str(error)
        else:
            assert isinstance(error, HTTPException)
            status = error.code or 400
            code = (error.name or "error").lower().replace(" ", "_")
            message = error.name or "Bad request"
        if isinstance(error, TooManyAttempts):
            request.setHeader(b"retry-after", b"%d" % (error.retryAfterSeconds,))
        if isinstance(error, Unauthorized):
            request.setHeader(b"www-authenticate", b'Bearer realm="nestproto"')
        # /command clients show "message", /status clients show "error"
        # (PROTOCOL.md §16.6): every error carries both.
        document = {"success": False, "error": message, "message": message}
        document["code"] = code
        return jsonResponse(request, document, status)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        _cors(request)
        self.log.failure("error handling {path}", failure, path=request.path)
        return jsonResponse(
            request,
            {
                "success": False,
                "error": "Internal error",
                "message": "Internal error",
                "code": "internal",
            },
            500,
        )

    def _authorize(self, request: IRequest) -> None:
        token = self.settings.token
        if token is None:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, provided = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            provided.strip(), token.encode("utf-8")
        ):
            raise Unauthorized()

    def _jsonBody(self, request: IRequest) -> dict[str, Any]:
        return parseJSONObject(readBody(request, _BODY_MAX_BYTES))

    def _knownSerial(self, serial: str) -> str:
        if not self._shown(serial):
            raise UnknownDevice()
        return serial

    def _shown(self, serial: str) -> bool:
        return self.state.membership.isKnown(serial) and self.admission.listed(serial)

    # Reading

    @app.route("/health", methods=["GET"])
    @_guarded
    def health(self, request: IRequest) -> bytes:
        return jsonResponse(
            request,
            {
                "status": "ok",
                "timestamp": self.state.nowMs(),
                "devices": len(self.state.membership.knownSerials()),
                "subscriptions": self.hub.total(),
            },
        )

    @app.route("/status", methods=["GET"])
    @_guarded
    def status(self, request: IRequest) -> bytes:
        serial = self._knownSerial(_pathSerial(_queryText(request, b"serial")))
        return jsonResponse(request, self._status(serial))

    def _status(self, serial: str) -> dict[str, Any]:
        return deviceStatus(
            self.state, self.hub, serial, self.settings.unavailableAfterSeconds
        )

    @app.route("/api/devices", methods=["GET"])
    @_guarded
    def devices(self, request: IRequest) -> bytes:
        devices = []
        for serial in self.state.membership.knownSerials():
            if not self.admission.listed(serial):
                continue
            status = self._status(serial)
            status["subscription_count"] = self.hub.count(serial)
            devices.append(status)
        return jsonResponse(request, {"devices": devices, "total": len(devices)})

    @app.route("/api/schedule", methods=["GET"])
    @_guarded
    def schedule(self, request: IRequest) -> bytes:
        serial = self._knownSerial(_pathSerial(_queryText(request, b"serial")))
        stored = self.state.store.get(serial, f"schedule.{serial}")
        if stored is None:
            return jsonResponse(request, {"serial": serial, "schedule": None})
        return jsonResponse(
            request,
            {
                "serial": serial,
                "schedule": stored.value,
                "object_revision": stored.revision,
                "object_timestamp": stored.timestamp,
            },
        )

    @app.route("/api/events", methods=["GET"])
    @_guarded
    def eventStream(self, request: IRequest) -> Deferred[bytes] | bytes:
        lastEventId = request.getHeader(b"last-event-id")
        attached = self.events.attach(
            request,
            None if lastEventId is None else lastEventId.decode("ascii", "replace"),
        )
        if attached is None:
            raise Unavailable("Too many event stream clients")
        return attached.addCallback(lambda ignored: b"")

    # Changing

    @app.route("/command", methods=["POST"])
    @_guarded
    def command(self, request: IRequest) -> Deferred[bytes]:
        document = self._jsonBody(request)
        serial = _bodySerial(document)
        if "command" not in document:
            raise commands.CommandError("command required")
        planned = commands.plan(
            self.state, serial, document["command"], document.get("value")
        )
        self._knownSerial(serial)
        self.log.info(
            "{command} for {serial}", command=document["command"], serial=serial
        )

        def answer(ignored: object) -> bytes:
            return jsonResponse(
                request,
                {
                    "success": True,
                    "data": {"object_key": planned.key, "values": planned.values},
                },
            )

        return commands.execute(self.state, planned).addCallback(answer)

    # Pairing

    @app.route("/api/register", methods=["POST"])
    @_guarded
    def register(self, request: IRequest) -> Deferred[bytes]:
        client = request.getClientAddress()
        address = str(getattr(client, "host", client))
        self.throttle.check(address)
        document = self._jsonBody(request)
        if not document.get("code") or not document.get("userId"):
            raise BadBody("Missing required fields: code, userId")
        code = normaliseCode(document["code"])
        userId = checkUserId(document["userId"])

        def answer(serial: str | None) -> bytes:
            if serial is None:
                self.throttle.failed(address)
                self.log.info("claim with an invalid entry key")
                # A 4xx with a code, where the anchor answers 200 with
                # success false (PROTOCOL.md §13 step 2): a client that
                # checks only the status would report a failed claim as done.
                raise InvalidEntryKey()
            self.throttle.succeeded(address)
            return jsonResponse(
                request,
                {
                    "success": True,
                    "serial": serial,
                    "message": f"Device {serial} registered to {userId}",
                },
            )

        return self.pairing.claim(code, userId).addCallback(answer)

    @app.route("/api/dismiss-pairing/<serial>", methods=["POST"])
    @_guarded
    def dismissPairing(self, request: IRequest, serial: str) -> Deferred[bytes]:
        serial = self._knownSerial(_pathSerial(serial))

        def answer(dismissed: bool) -> bytes:
            message = (
                f"Pairing dialog dismissed for {serial}"
                if dismissed
                else f"No pairing dialog to dismiss for {serial}"
            )
            return jsonResponse(request, {"success": True, "message": message})

        return self.pairing.dismissDialog(serial).addCallback(answer)

    @app.route("/api/registered-devices", methods=["GET"])
    @_guarded
    def registeredDevices(self, request: IRequest) -> bytes:
        userId = _queryText(request, b"userId")
        owners = self.state.store.records(OWNER_RECORD)
        devices = [
            {"serial": serial, "userId": doc["user"], "createdAt": doc.get("claimedAt")}
            for serial, doc in sorted(owners.items())
            if userId is None or doc["user"] == userId
        ]
        return jsonResponse(request, devices)

    @app.route("/api/registered-devices/<serial>", methods=["DELETE"])
    @_guarded
    def unregister(self, request: IRequest, serial: str) -> Deferred[bytes]:
        serial = _pathSerial(serial)
        return self.pairing.unclaim(serial).addCallback(
            lambda owner: jsonResponse(
                request,
                {"success": True, "message": f"Device {serial} deleted"},
            )
        )

    @app.route("/api/device", methods=["DELETE"])
    @_guarded
    def deleteDevice(self, request: IRequest) -> Deferred[bytes]:
        # The serial may be given in the query, so that a client can send a
        # DELETE without a body, or in a JSON body as the anchor takes it.
        raw: object = _queryText(request, b"serial")
        if raw is None:
            body = readBody(request, _BODY_MAX_BYTES)
            raw = parseJSONObject(body).get("serial") if body.strip() else None
        serial = _pathSerial(raw)
        objects = len(self.state.store.buckets(serial))
        self.log.info("removing {serial}", serial=serial)
        return self.pairing.removeDevice(serial).addCallback(
            lambda ignored: jsonResponse(
                request,
                {"success": True, "serial": serial, "objects_deleted": objects},
            )
        )
