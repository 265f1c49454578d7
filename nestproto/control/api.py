# -*- test-case-name: tests.test_control_api -*-
"""
The user-facing HTTP API: reading and changing thermostats, and pairing.

It speaks the anchor's control contract (PROTOCOL.md §13, §16), so the
Home Assistant, Homebridge and Matterbridge clients written for it work
unchanged, without the anchor's defects (§16.6).
"""

from __future__ import annotations

import hmac
from typing import Any, ClassVar

from attrs import Factory, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from ..device.auth import normaliseSerial
from ..device.wire import parseJSONObject
from ..errors import (
    BadBody,
    CommandError,
    ErrorShape,
    SerialRequired,
    Unauthorized,
    Unavailable,
    UnknownDevice,
)
from ..httpjson import jsonResponse, readBody
from ..hub import SubscriberHub
from ..membership import OWNER_RECORD
from ..pairing import (
    INVALID_KEY_MESSAGE,
    ClaimThrottle,
    Pairing,
    checkUserId,
    normaliseCode,
)
from ..router import IGate, Route, Router
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


@implementer(IGate)
@frozen(kw_only=True, eq=False)
class ControlAPI:
    """The control port's Klein app."""

    app: ClassVar[Router] = Router(ErrorShape.CONTROL, secretPrefix=b"k")
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

    # The gate (nestproto.router): every request, every route.

    def enter(self, request: IRequest) -> bytes | None:
        _cors(request)
        if request.method == b"OPTIONS":
            # A CORS preflight: browsers send it without credentials.
            request.setResponseCode(204)
            return b""
        return None

    def admit(self, request: IRequest, route: Route) -> None:
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
    def status(self, request: IRequest) -> bytes:
        raw = _queryText(request, b"serial")
        serial = self._knownSerial(_pathSerial(raw or ""))
        return jsonResponse(request, self._status(serial))

    def _status(self, serial: str) -> dict[str, Any]:
        return deviceStatus(
            self.state, self.hub, serial, self.settings.unavailableAfterSeconds
        )

    @app.route("/api/devices", methods=["GET"])
    def devices(self, request: IRequest) -> bytes:
        devices = []
        for serial in self.state.membership.knownSerials():
            status = self._status(serial)
            status["subscription_count"] = self.hub.count(serial)
            devices.append(status)
        return jsonResponse(request, {"devices": devices, "total": len(devices)})

    @app.route("/api/schedule", methods=["GET"])
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
    def command(self, request: IRequest) -> Deferred[bytes]:
        document = self._jsonBody(request)
        serial = _bodySerial(document)
        if "command" not in document:
            raise CommandError("command required")
        planned = commands.plan(
            self.state, serial, document["command"], document.get("value")
        )
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
    def unregister(self, request: IRequest, serial: str) -> Deferred[bytes]:
        serial = _pathSerial(serial)
        return self.pairing.unclaim(serial).addCallback(
            lambda owner: jsonResponse(
                request,
                {"success": True, "message": f"Device {serial} deleted"},
            )
        )

    @app.route("/api/device", methods=["DELETE"])
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
