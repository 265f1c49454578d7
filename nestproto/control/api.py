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

from ..device.auth import normaliseSerial
from ..device.wire import parseJSONObject
from ..errors import BadBody, NestError, SerialRequired, Unavailable, UnknownDevice
from ..history import History
from ..httpjson import JSONKlein, jsonResponse, readBody
from ..hub import SubscriberHub
from ..membership import OWNER_RECORD
from ..metrics import CONTENT_TYPE, Metrics
from ..pairing import (
    INVALID_KEY_MESSAGE,
    ClaimThrottle,
    Pairing,
    TooManyAttempts,
    checkUserId,
    normaliseCode,
)
from ..state import DeviceState
from . import commands
from . import history as historyAPI
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


def _pathSerial(raw: str) -> str:
    serial = normaliseSerial(raw)
    if serial is None:
        raise SerialRequired(CONTROL_SERIAL_REQUIRED)
    return serial


def _bodySerial(document: dict[str, Any]) -> str:
    raw = document.get("serial")
    serial = normaliseSerial(raw) if isinstance(raw, str) else None
    if serial is None:
        raise SerialRequired(CONTROL_SERIAL_REQUIRED)
    return serial


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
    metrics: Metrics = field(
        default=Factory(lambda self: Metrics(self.state.clock), takes_self=True)
    )
    #: C{None} when the server keeps no history.
    history: History | None = None

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
        if not self.state.membership.isKnown(serial):
            raise UnknownDevice()
        return serial

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
        raw = _queryText(request, b"serial")
        serial = self._knownSerial(_pathSerial(raw or ""))
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
            status = self._status(serial)
            status["subscription_count"] = self.hub.count(serial)
            devices.append(status)
        return jsonResponse(request, {"devices": devices, "total": len(devices)})

    @app.route("/api/schedule", methods=["GET"])
    @_guarded
    def schedule(self, request: IRequest) -> bytes:
        serial = self._knownSerial(_pathSerial(_queryText(request, b"serial") or ""))
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

    @app.route("/api/history", methods=["GET"])
    @_guarded
    def historyRows(self, request: IRequest) -> Deferred[bytes]:
        history = self._history()
        serial = self._knownSerial(_pathSerial(_queryText(request, b"serial") or ""))
        query = historyAPI.parseHistoryQuery(serial, request.args, self.state.nowMs())

        def answer(document: dict[str, Any]) -> bytes:
            if query.format == "json":
                return jsonResponse(request, document)
            request.setHeader(b"content-type", b"text/csv; charset=utf-8")
            request.setHeader(
                b"content-disposition",
                b'attachment; filename="history-%s-%s.csv"'
                % (serial.encode("ascii", "replace"), query.step.encode()),
            )
            return historyAPI.historyCSV(document)

        return historyAPI.historyDocument(history, query).addCallback(answer)

    @app.route("/api/usage", methods=["GET"])
    @_guarded
    def usage(self, request: IRequest) -> Deferred[bytes]:
        history = self._history()
        serial = self._knownSerial(_pathSerial(_queryText(request, b"serial") or ""))
        days = historyAPI.parseUsageDays(request.args, history.settings.hourlyDays)
        nowMs = self.state.nowMs()
        zone = historyAPI.deviceZone(self.state, serial, nowMs / 1000)
        return historyAPI.usageDocument(history, serial, zone, nowMs, days).addCallback(
            lambda document: jsonResponse(request, document)
        )

    def _history(self) -> History:
        if self.history is None:
            raise historyAPI.HistoryOff()
        return self.history

    @app.route("/metrics", methods=["GET"])
    @_guarded
    def metricsText(self, request: IRequest) -> Deferred[bytes]:
        def answer(body: bytes) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
            return body

        return self.metrics.render().addCallback(answer)

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
        self.log.info(
            "{command} for {serial}", command=document["command"], serial=serial
        )
        self.metrics.commands.labels(command=document["command"]).inc()

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
                return jsonResponse(
                    request, {"success": False, "message": INVALID_KEY_MESSAGE}
                )
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
        serial = _bodySerial(self._jsonBody(request))
        objects = len(self.state.store.buckets(serial))
        self.log.info("removing {serial}", serial=serial)
        return self.pairing.removeDevice(serial).addCallback(
            lambda ignored: jsonResponse(
                request,
                {"success": True, "serial": serial, "objects_deleted": objects},
            )
        )
