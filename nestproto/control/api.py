# -*- test-case-name: tests.test_control_api -*-
"""
The user-facing HTTP API: reading and changing thermostats, and pairing.

It speaks the anchor's control contract (PROTOCOL.md §13, §16), so the
Home Assistant, Homebridge and Matterbridge clients written for it work
unchanged, without the anchor's defects (§16.6).
"""

from __future__ import annotations

from typing import Any, ClassVar

from attrs import Factory, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from ..accounts import Accounts
from ..admission import Admission
from ..debuglog import SwitchedLogger
from ..device.auth import normaliseSerial
from ..device.wire import parseJSONObject
from ..errors import (
    BadBody,
    CommandError,
    CSRFRequired,
    ErrorShape,
    ForeignOrigin,
    HistoryOff,
    InvalidEntryKey,
    InvalidSerial,
    NotFound,
    NotJSON,
    SerialRequired,
    Unauthorized,
    Unavailable,
    UnknownDevice,
    WrongPassword,
    WrongToken,
)
from ..history import History
from ..httpjson import (
    compactJSON,
    encodedResponse,
    jsonResponse,
    readBody,
    requestOrigin,
)
from ..hub import SubscriberHub
from ..membership import OWNER_RECORD
from ..metrics import CONTENT_TYPE, Metrics
from ..pairing import (
    ClaimThrottle,
    Pairing,
    checkUserId,
    normaliseCode,
)
from ..router import IGate, Route, Router
from ..state import DeviceState
from ..store import runInline
from . import commands
from . import history as historyAPI
from .access import (
    CHANGING_METHODS,
    CORS_ALLOW_HEADERS,
    CORS_ALLOW_METHODS,
    CORS_MAX_AGE_SECONDS,
    IPNetwork,
    isJSONType,
    isTrusted,
    judgeOrigin,
    sameSecret,
)
from .dashboard import (
    Dashboard,
    csrfMatches,
    renderAsset,
    renderPage,
    setSessionCookie,
)
from .events import EventStream
from .status import DEFAULT_UNAVAILABLE_AFTER_SECONDS, deviceStatus

_BODY_MAX_BYTES = 256 * 1024
#: Device statuses a C{/api/devices} answer encodes per reactor turn.
STATUSES_PER_TURN = 500

#: The anchor's words for a control call that names no device.
CONTROL_SERIAL_REQUIRED = "Serial parameter required"


@frozen(kw_only=True)
class ControlSettings:
    """
    @ivar token: when set, every request must carry it, as C{Authorization:
        Bearer <token>} or under the path prefix C{/k/<token>/}, or come
        from a C{trustedNetworks} address; when C{None} the API is open (the
        anchor's default), and any Authorization header is ignored.
    @ivar allowOrigins: browser origins (normalised C{scheme://host:port})
        besides the API's own whose pages may call it, with CORS.
    @ivar trustedNetworks: client addresses let in without the token.
    @ivar unavailableAfterSeconds: silence after which a device is shown
        unavailable.
    """

    token: str | None = None
    allowOrigins: frozenset[str] = frozenset()
    trustedNetworks: tuple[IPNetwork, ...] = ()
    unavailableAfterSeconds: float = DEFAULT_UNAVAILABLE_AFTER_SECONDS


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


def _hasBody(request: IRequest) -> bool:
    request.content.seek(0)
    present = bool(request.content.read(1))
    request.content.seek(0)
    return present


def _bodySerial(document: dict[str, Any]) -> str:
    return _pathSerial(document.get("serial"))


@implementer(IGate)
@frozen(kw_only=True, eq=False)
class ControlAPI:
    """The control port's Klein app."""

    app: ClassVar[Router] = Router(ErrorShape.CONTROL, secretPrefix=b"k")
    log: ClassVar[Logger] = SwitchedLogger()

    state: DeviceState
    hub: SubscriberHub
    #: Shared with the device port: codes shown there are claimed here.
    pairing: Pairing
    settings: ControlSettings = field(factory=ControlSettings)
    throttle: ClaimThrottle = field(
        default=Factory(lambda self: ClaimThrottle(self.state.clock), takes_self=True)
    )
    events: EventStream
    dashboard: Dashboard = field(
        default=Factory(lambda self: Dashboard(self.state.clock), takes_self=True)
    )
    #: App accounts (PROTOCOL.md §20.6); the same ones the device port's
    #: login checks.
    accounts: Accounts = field(
        default=Factory(
            lambda self: Accounts(self.state.store, self.state.clock, runInline),
            takes_self=True,
        )
    )
    #: Which devices are shown: with pairing required, only claimed ones.
    admission: Admission = field(
        default=Factory(lambda self: Admission(self.state), takes_self=True)
    )
    metrics: Metrics = field(
        default=Factory(lambda self: Metrics(self.state.clock), takes_self=True)
    )
    #: C{None} when the server keeps no history.
    history: History | None = None

    # The gate (nestproto.router): every request, every route.

    def enter(self, request: IRequest) -> bytes | None:
        """
        A browser page of a foreign origin is refused before anything is
        routed, so it changes nothing; an allowed one gets CORS headers on
        every answer, and its preflight is answered here, without
        credentials (browsers send none with it).
        """
        verdict = judgeOrigin(
            request.getHeader(b"origin"),
            requestOrigin(request),
            self.settings.allowOrigins,
        )
        if self.settings.allowOrigins:
            request.setHeader(b"vary", b"Origin")
        if not verdict.allowed:
            raise ForeignOrigin()
        if verdict.cors is not None:
            request.setHeader(
                b"access-control-allow-origin", verdict.cors.encode("latin-1")
            )
        if request.method == b"OPTIONS":
            if verdict.cors is not None:
                request.setHeader(b"access-control-allow-headers", CORS_ALLOW_HEADERS)
                request.setHeader(b"access-control-allow-methods", CORS_ALLOW_METHODS)
                request.setHeader(
                    b"access-control-max-age", b"%d" % (CORS_MAX_AGE_SECONDS,)
                )
            request.setResponseCode(204)
            return b""
        return None

    def admit(self, request: IRequest, route: Route) -> None:
        """
        With a token, the request carries it (header or path prefix) or
        comes from a trusted network; C{/health} needs none. A request that
        changes something has a JSON body, or no body for a C{DELETE}.
        """
        if not self._authenticated(request, route):
            raise Unauthorized()
        if request.method in CHANGING_METHODS and not isJSONType(
            request.getHeader(b"content-type")
        ):
            if request.method != b"DELETE" or _hasBody(request):
                raise NotJSON()

    def _authenticated(self, request: IRequest, route: Route) -> bool:
        token = self.settings.token
        if route.pathSecret is not None:
            if token is None:
                # No token, no secret prefix: it names nothing here.
                raise NotFound("Not Found")
            return sameSecret(route.pathSecret, token)
        if token is None or route.public:
            return True
        return self._hasCredentials(request, token)

    def _hasCredentials(self, request: IRequest, token: str) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, provided = header.partition(b" ")
        if scheme.lower() == b"bearer" and sameSecret(provided.strip(), token):
            return True
        # The dashboard's session cookie; its changing requests also carry
        # the session's CSRF token (nestproto.control.dashboard).
        session = self.dashboard.sessions.find(request)
        if session is not None:
            if request.method in CHANGING_METHODS and not csrfMatches(request, session):
                raise CSRFRequired()
            return True
        client = request.getClientAddress()
        host = getattr(client, "host", None)
        return isinstance(host, str) and isTrusted(host, self.settings.trustedNetworks)

    def _jsonBody(self, request: IRequest) -> dict[str, Any]:
        return parseJSONObject(readBody(request, _BODY_MAX_BYTES))

    def _knownSerial(self, serial: str) -> str:
        if not self.admission.shown(serial):
            raise UnknownDevice()
        return serial

    # Reading

    @app.route("/health", methods=["GET"])
    @app.public
    def health(self, request: IRequest) -> bytes:
        """
        For health checks, which carry no token: that the server answers,
        and nothing about what it serves (issue 12 item 10).
        """
        return jsonResponse(request, {"status": "ok"})

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        serial = self._knownSerial(_pathSerial(_queryText(request, b"serial")))
        return jsonResponse(request, self._status(serial))

    def _status(self, serial: str) -> dict[str, Any]:
        return deviceStatus(
            self.state, self.hub, serial, self.settings.unavailableAfterSeconds
        )

    @app.route("/api/devices", methods=["GET"])
    async def devices(self, request: IRequest) -> bytes:
        # Encoded STATUSES_PER_TURN devices a reactor turn: 20,000 statuses
        # are about a second of CPU, which would hold up every thermostat.
        serials = self.state.membership.knownSerials()
        devices = []
        for start in range(0, len(serials), STATUSES_PER_TURN):
            if start:
                await deferLater(self.state.clock, 0, lambda: None)
            for serial in serials[start : start + STATUSES_PER_TURN]:
                if not self.admission.shown(serial):
                    # Hidden, or removed since the list was taken.
                    continue
                status = self._status(serial)
                status["subscription_count"] = self.hub.count(serial)
                devices.append(compactJSON(status))
        text = f'{{"devices":[{",".join(devices)}],"total":{len(devices)}}}'
        return encodedResponse(request, text)

    @app.route("/api/schedule", methods=["GET"])
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
    def eventStream(self, request: IRequest) -> Deferred[bytes] | bytes:
        lastEventId = request.getHeader(b"last-event-id")
        attached = self.events.attach(
            request,
            None if lastEventId is None else lastEventId.decode("ascii", "replace"),
        )
        if attached is None:
            raise Unavailable("Too many event stream clients")
        return attached.addCallback(lambda ignored: b"")

    # The dashboard (issue 13): the page, its assets, its login.

    @app.route("/", methods=["GET"])
    @app.public
    def page(self, request: IRequest) -> bytes:
        return renderPage(request)

    @app.route("/assets/<name>", methods=["GET"])
    @app.public
    def asset(self, request: IRequest, name: str) -> bytes:
        return renderAsset(request, name)

    @app.route("/api/session", methods=["GET"])
    @app.public
    def session(self, request: IRequest) -> bytes:
        """
        Whether the page must log in, whether it may with an account, and
        its session's CSRF token.
        """
        token = self.settings.token
        found = self.dashboard.sessions.find(request)
        underPrefix = len(request.prepath) >= 2 and request.prepath[0] == b"k"
        authenticated = (
            token is None or underPrefix or self._hasCredentials(request, token)
        )
        return jsonResponse(
            request,
            {
                "login_required": token is not None,
                "accounts": token is not None and self.accounts.anyExist(),
                "authenticated": authenticated,
                "csrf": None if found is None else found.csrf,
                "user": None if found is None else found.user,
            },
        )

    @app.route("/api/login", methods=["POST"])
    @app.public
    async def login(self, request: IRequest) -> bytes:
        """
        Trade the control token, or an account's name and password, for a
        session cookie. Both kinds of failure count against the client's
        address alike.
        """
        token = self.settings.token
        if token is None:
            return jsonResponse(request, {"success": True, "csrf": None})
        client = request.getClientAddress()
        address = str(getattr(client, "host", client))
        self.throttle.check(address)
        document = self._jsonBody(request)
        username = document.get("username")
        user: str | None = None
        if username is not None:
            password = document.get("password")
            if (
                not isinstance(username, str)
                or not isinstance(password, str)
                or not await self.accounts.verify(username, password)
            ):
                self.throttle.failed(address)
                raise WrongPassword()
            user = username
        else:
            given = document.get("token")
            if not isinstance(given, str) or not sameSecret(given.encode(), token):
                self.throttle.failed(address)
                raise WrongToken()
        self.throttle.succeeded(address)
        sessionId, session = self.dashboard.sessions.open(user)
        setSessionCookie(request, sessionId)
        self.log.info("dashboard login as {user}", user=user or "token holder")
        return jsonResponse(request, {"success": True, "csrf": session.csrf})

    @app.route("/api/logout", methods=["POST"])
    @app.public
    def logout(self, request: IRequest) -> bytes:
        self.dashboard.sessions.close(request)
        setSessionCookie(request, None)
        return jsonResponse(request, {"success": True})

    @app.route("/api/pairing", methods=["GET"])
    def pairingInfo(self, request: IRequest) -> bytes:
        """
        Where to point a thermostat, and the devices that booted but are
        not claimed: their serials, never their codes.
        """
        membership = self.state.membership
        unclaimed = [
            serial
            for serial in self.state.presence.heardFrom()
            if membership.ownerOf(serial) is None
        ]
        return jsonResponse(
            request,
            {"entry_url": self.dashboard.entryURL(request), "unclaimed": unclaimed},
        )

    # History and metrics (issue 15)

    @app.route("/api/history", methods=["GET"])
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
            raise HistoryOff()
        return self.history

    @app.route("/metrics", methods=["GET"])
    def metricsText(self, request: IRequest) -> Deferred[bytes]:
        def answer(body: bytes) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
            return body

        return self.metrics.render().addCallback(answer)

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
        self._knownSerial(serial)
        self.log.debug(
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
        # ?serial= or a JSON body (the anchor's): many HTTP clients send no
        # body with a DELETE.
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

    # App accounts (PROTOCOL.md §20.6)

    @app.route("/api/users", methods=["POST"])
    def createUser(self, request: IRequest) -> Deferred[bytes]:
        """
        Create an app account; its name is the C{userId} pairing claims
        link devices to.
        """
        document = self._jsonBody(request)
        created = self.accounts.create(
            document.get("username"), document.get("password")
        )
        self.log.info("creating account {name}", name=document.get("username"))
        return created.addCallback(
            lambda userId: jsonResponse(request, {"success": True, "userId": userId})
        )

    @app.route("/api/users", methods=["DELETE"])
    def removeUser(self, request: IRequest) -> Deferred[bytes]:
        """Remove an app account and its tokens; its devices stay paired."""
        document = self._jsonBody(request)
        name = document.get("username")
        return self.accounts.remove(name).addCallback(
            lambda ignored: jsonResponse(
                request, {"success": True, "message": f"Account {name} removed"}
            )
        )
