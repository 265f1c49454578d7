# -*- test-case-name: tests.test_device_api,tests.test_transport -*-
"""
The device-facing HTTP API: the endpoints a thermostat calls.

Handlers are thin: they parse with their route's dialect (L{V7}: L{wire}),
act through L{DeviceState} and L{SubscriberHub}, and render with the
dialect; a held subscribe answers with the dialect's hold policy.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar, cast
from urllib.parse import parse_qs

from attrs import Factory, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from zope.interface import implementer

from .._version import __version__
from ..accounts import Accounts, Login
from ..admission import FRONT_DOOR, TRANSPORT, Admission
from ..buckets import Bucket, empty, serverIsNewer
from ..control import appputs, commands
from ..debuglog import SwitchedLogger
from ..errors import (
    AppTokenRequired,
    BadBody,
    ErrorShape,
    NestError,
    NotFound,
    NotYours,
    PairingRequired,
    SerialRequired,
    TooManySubscribes,
    Unavailable,
    WrongCredentials,
)
from ..httpjson import jsonResponse, readBody, requestOrigin
from ..hub import (
    Deliver,
    EndOnChange,
    IHoldPolicy,
    OneBucketPerAnswer,
    Reaction,
    SubscriberHub,
)
from ..membership import GLOBAL_SCOPE
from ..metrics import Metrics
from ..model import PutEntry
from ..pairing import ClaimThrottle, Pairing
from ..proinfo import proInfo, proInfoCode
from ..router import IGate, Route, Router
from ..state import DeviceState, SubscribeOutcome
from ..store import ThreadRunner, runInline
from ..uploads import MAX_UPLOAD_BODY_BYTES, LogStore
from ..weather import WeatherService, parseWeatherQuery
from . import jsonp, keylist, wire
from .auth import deviceSerial, normaliseSerial
from .dialect import KEY_LIST, V7, Dialect
from .keylist import KeyListSessions, ListedKey
from .wire import Rendered, SubscribeBody

#: Entry form fields and how each must look (PROTOCOL.md §4).
_ENTRY_FIELD_PATTERNS = {
    "mac": re.compile(r"^[0-9A-Fa-f]{12}$"),
    "request_id": re.compile(r"^[0-9]{1,20}$"),
    "reset": re.compile(r"^(?i:true|false)$"),
}
_ENTRY_FIELD_MAX_LENGTH = 128
_ENTRY_BODY_MAX_BYTES = 4096


@frozen
class TransportSettings:
    """
    The long-poll timings announced to devices (PROTOCOL.md §12).

    @ivar origin: the public origin for the entry map; C{None} builds it
        from each request's Host header.
    """

    origin: str | None = None
    suspendTimeMaxSeconds: int = 300
    deferDeviceWindowSeconds: int = 15
    disableDeferWindowSeconds: int = 60


def entryMap(origin: str) -> dict[str, str]:
    """
    The flat service map of C{/nest/entry} (PROTOCOL.md §4, seed 000).

    C{ping_url} is the transport URL, as the Nest cloud's own entry answer
    had it (§18 item 11); a GET there answers like C{/nest/ping}.
    """
    transport = f"{origin}/nest/transport"
    return {
        "czfe_url": transport,
        "transport_url": transport,
        "direct_transport_url": transport,
        "passphrase_url": f"{origin}/nest/passphrase",
        "ping_url": transport,
        "pro_info_url": f"{origin}/nest/pro_info",
        "weather_url": f"{origin}/nest/weather/v1?query=",
        "upload_url": f"{origin}/nest/upload",
        "software_update_url": "",
        "server_version": __version__,
        "tier_name": "local",
    }


def parseEntryForm(body: bytes, contentType: bytes | None) -> dict[str, str]:
    """
    The fields of an entry POST: form-urlencoded as the firmware sends, or
    a JSON object as older documents show.

    @raise BadBody: when the body is neither, or a field is malformed.
    """
    if not body.strip():
        return {}
    if (
        contentType
        and contentType.split(b";")[0].strip().lower() == b"application/json"
    ):
        fields = {key: str(value) for key, value in wire.parseJSONObject(body).items()}
    else:
        try:
            parsed = parse_qs(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=True,
                max_num_fields=64,
            )
        except UnicodeDecodeError:
            raise BadBody("Body is not UTF-8") from None
        except ValueError:
            raise BadBody("Body is not a valid form") from None
        fields = {key: values[-1] for key, values in parsed.items()}
    for name, value in fields.items():
        pattern = _ENTRY_FIELD_PATTERNS.get(name)
        if len(value) > _ENTRY_FIELD_MAX_LENGTH or (
            pattern and not pattern.match(value)
        ):
            raise BadBody(f"Entry field {name} is malformed")
    return fields


def _transportTail(rest: str) -> str:
    return rest.rstrip("/").rsplit("/", 1)[-1]


def _speaksKeyList(rest: str) -> bool:
    """Whether a transport path is the 4.x firmware's (PROTOCOL.md §20.1)."""
    return rest.startswith("v3/") or rest == "v3"


@implementer(IGate)
@frozen(kw_only=True, eq=False)
class DeviceAPI:
    """The device port's Klein app."""

    app: ClassVar[Router] = Router(ErrorShape.DEVICE)
    log: ClassVar[Logger] = SwitchedLogger()

    state: DeviceState
    hub: SubscriberHub
    weather: WeatherService
    logs: LogStore
    #: Where blocking work (log decompression and disk) runs.
    runInThread: ThreadRunner
    #: Shared with the control port: codes shown here are claimed there.
    pairing: Pairing
    settings: TransportSettings = field(factory=TransportSettings)
    metrics: Metrics = field(
        default=Factory(lambda self: Metrics(self.state.clock), takes_self=True)
    )
    #: What each key-list session was sent (PROTOCOL.md §20.3).
    sessions: KeyListSessions = field(factory=KeyListSessions)
    #: App accounts (PROTOCOL.md §20.6), created on the control port.
    accounts: Accounts = field(
        default=Factory(
            lambda self: Accounts(self.state.store, self.state.clock, runInline),
            takes_self=True,
        )
    )
    #: Locks out an address after repeated failed logins.
    loginThrottle: ClaimThrottle = field(
        default=Factory(lambda self: ClaimThrottle(self.state.clock), takes_self=True)
    )
    #: Who may talk to us as which serial; shared with the control port.
    admission: Admission = field(
        default=Factory(lambda self: Admission(self.state), takes_self=True)
    )

    # The gate (nestproto.router): every route is open at the router; who
    # the caller is comes from its serial, which each route that needs one
    # requires (PROTOCOL.md §2).

    def enter(self, request: IRequest) -> bytes | None:
        return None

    def admit(self, request: IRequest, route: Route) -> None:
        return None

    # Discovery and liveness

    @app.route("/nest/entry", methods=["GET", "POST"])
    @app.route("/entry", methods=["GET", "POST"])
    def entry(self, request: IRequest) -> bytes:
        fields = parseEntryForm(
            readBody(request, _ENTRY_BODY_MAX_BYTES), request.getHeader(b"content-type")
        )
        serial = deviceSerial(request)
        if serial is not None and self._mayNote(request, serial):
            self.state.presence.noteEntry(serial, fields)
        origin = self.settings.origin or requestOrigin(request)
        return jsonResponse(request, entryMap(origin))

    @app.route("/nest/ping", methods=["GET"])
    @app.route("/ping", methods=["GET"])
    def ping(self, request: IRequest) -> bytes:
        return jsonResponse(request, {"status": "ok", "timestamp": self.state.nowMs()})

    # Transport

    @app.route("/nest/transport", methods=["GET"])
    @app.route("/transport", methods=["GET"])
    def transportPing(self, request: IRequest) -> bytes:
        self._transportHeaders(request)
        return self.ping(request)

    @app.route("/nest/transport", methods=["POST"])
    @app.route("/transport", methods=["POST"])
    @app.route("/nest/transport/<path:rest>", methods=["POST"])
    @app.route("/transport/<path:rest>", methods=["POST"])
    @app.route("/czfe/<path:rest>", methods=["POST"])
    def transport(self, request: IRequest, rest: str = "") -> Deferred[bytes]:
        """The v7 transport (PROTOCOL.md §6, §7): subscribe, or put."""
        if self.hub.closed:
            # Stopping: the store takes no more writes. Send the device to a
            # new connection, which the next server process will answer.
            _closeAfter(request)
            raise Unavailable("Server is shutting down")
        if _speaksKeyList(rest):
            # The tail may carry §20.2's mutation (C{put ._sync}).
            if keylist.canonicalKey(_transportTail(rest)) == "put":
                return self.keyListPut(request, None)
            return self.keyListSubscribe(request)
        if _transportTail(rest) == "put":
            return self.put(request, V7)
        if keylist.isKeyListBody(readBody(request, KEY_LIST.maxBodyBytes)):
            return self.keyListSubscribe(request)
        return self.subscribe(request, V7)

    @app.route("/v2/subscribe", methods=["POST"])
    def v2Subscribe(self, request: IRequest) -> Deferred[bytes]:
        """
        The key-list subscribe of seed 001's path (PROTOCOL.md §20.3): an
        app's, with its token, or a device's.
        """
        self._refuseWhenClosed(request)
        userId = self._appUserIfAny(request)
        if userId is None:
            return self.keyListSubscribe(request)
        return self.appSubscribe(request, userId)

    @app.route("/v5/subscribe", methods=["POST"])
    def v5Subscribe(self, request: IRequest) -> Deferred[bytes]:
        """
        A later app's subscribe (PROTOCOL.md §20.1): a C{keys} body is
        answered as the key-list dialect, an C{objects} body as v7's.
        """
        self._refuseWhenClosed(request)
        userId = self._appUser(request)
        if keylist.isKeyListBody(readBody(request, KEY_LIST.maxBodyBytes)):
            return self.appSubscribe(request, userId)
        return self.appObjectsSubscribe(request, userId)

    @app.route("/v1/subscribe", methods=["GET"])
    @app.route("/v2/subscribe", methods=["GET"])
    def jsonpSubscribe(self, request: IRequest) -> Deferred[bytes]:
        """
        The browser's key-list subscribe (PROTOCOL.md §20.6, scenario 71):
        everything in the query, the answer C{CB({"status", "headers",
        "payload"})}; a callback name that is not a plain JavaScript name
        is a 400, before anything else is read.
        """
        self._refuseWhenClosed(request)
        callback = jsonp.callbackName(_queryText(request, b"jsonp"))
        token = _queryText(request, b"Authorization")
        if token is not None and request.getHeader(b"authorization") is None:
            request.requestHeaders.setRawHeaders(
                b"authorization", [token.encode("latin-1")]
            )
        userId = self._appUser(request)
        payload = _queryText(request, b"payload")
        if payload is None:
            raise BadBody("payload (the keys to subscribe) is required")
        listed = keylist.parseKeys(payload.encode("utf-8"))
        holdSeconds = keylist.parseSubscribeTimeout(
            _queryBytes(request, b"X-nl-subscribe-timeout")
        )
        session = _queryText(request, b"X-nl-session-id") or _headerText(
            request, b"x-nl-session-id"
        )
        return self._appKeyList(
            request, userId, listed, holdSeconds, session or "", callback
        )

    @app.route("/v1/put", methods=["POST"])
    @app.route("/v2/put", methods=["POST"])
    @app.route("/v1/put/<path:key>", methods=["POST"])
    @app.route("/v2/put/<path:key>", methods=["POST"])
    def v2Put(self, request: IRequest, key: str | None = None) -> Deferred[bytes]:
        """
        The nested put of seed 001's paths (PROTOCOL.md §20.4): an app's,
        with its token, is a user command; a device's is its own put.
        """
        self._refuseWhenClosed(request)
        userId = self._appUserIfAny(request)
        if userId is None:
            return self.keyListPut(request, key)
        body = readBody(request, KEY_LIST.maxBodyBytes)
        entries = (
            keylist.parsePut(body) if key is None else keylist.parseBucketPut(key, body)
        )
        return self.appPut(request, userId, entries, KEY_LIST)

    @app.route("/v5/put", methods=["POST"])
    def v5Put(self, request: IRequest) -> Deferred[bytes]:
        """An app's put in the v7 C{objects} shape (PROTOCOL.md §20.1)."""
        self._refuseWhenClosed(request)
        userId = self._appUser(request)
        entries = V7.parsePut(readBody(request, V7.maxBodyBytes))
        return self.appPut(request, userId, entries, V7)

    @app.route("/nest/transport/<path:rest>", methods=["GET"])
    @app.route("/transport/<path:rest>", methods=["GET"])
    @app.route("/czfe/<path:rest>", methods=["GET"])
    def listing(self, request: IRequest, rest: str) -> bytes:
        """
        Keys, revisions and timestamps of a device's buckets, no values
        (PROTOCOL.md §8): C{device/SERIAL} or C{v7/device/device.SERIAL}.
        """
        named = normaliseSerial(
            keylist.canonicalKey(_transportTail(rest)).removeprefix("device.")
        )
        caller = deviceSerial(request)
        if caller is not None and named is not None and caller != named:
            raise NotFound("No such device")
        serial = caller or named
        if serial is None:
            raise SerialRequired()
        self.admission.admit(request, serial, FRONT_DOOR)
        self.state.presence.touch(serial)
        self._transportHeaders(request)
        # The 4.x firmware's BigGet gets the buckets with their fields
        # (PROTOCOL.md §20.5); the v7 listing never a value (§8).
        dialect = KEY_LIST if _speaksKeyList(rest) else V7
        return _render(request, dialect.renderListing(self.state.listing(serial)))

    # What every dialect's transport does, parsing and rendering as the
    # route's dialect says.

    def subscribe(self, request: IRequest, dialect: Dialect) -> Deferred[bytes]:
        serial = self._callerSerial(request, TRANSPORT)
        self.metrics.subscribes.inc()
        body = dialect.parseSubscribe(readBody(request, dialect.maxBodyBytes))
        weaveId = _headerText(request, b"x-nl-weave-device-id")
        self.log.debug("subscribe from {serial}", serial=serial)
        return self.state.subscribe(serial, body.objects, weaveId).addCallback(
            self._answerSubscribe, request, serial, body, dialect
        )

    def _answerSubscribe(
        self,
        outcome: SubscribeOutcome,
        request: IRequest,
        serial: str,
        body: SubscribeBody,
        dialect: Dialect,
    ) -> bytes | Deferred[bytes]:
        self._transportHeaders(request)
        if outcome.buckets or not body.chunked:
            if wire.touchesSetpoint(outcome.buckets):
                request.setHeader(
                    b"x-nl-disable-defer-window",
                    b"%d" % (self.settings.disableDeferWindowSeconds,),
                )
            answer = _render(request, dialect.renderAnswer(outcome.buckets))
            if not body.chunked:
                request.setHeader(b"content-length", b"%d" % (len(answer),))
            return answer
        held = self.hub.hold(
            serial,
            _answerWriter(request, dialect),
            outcome.replayFilter,
            dialect.holdPolicy(body),
        )
        if held is None:
            self.log.warn("{serial} holds too many subscribes", serial=serial)
            return _render(request, dialect.renderAnswer([]))
        return held.addCallback(self._heldEnded, request)

    def _heldEnded(self, ignored: None, request: IRequest) -> bytes:
        if self.hub.closed:
            # A shutdown's end of the hold makes the device resubscribe at
            # once (PROTOCOL.md §12, tickle); on this connection it would
            # reach a server that no longer writes.
            _closeAfter(request)
        return b""

    def put(self, request: IRequest, dialect: Dialect) -> Deferred[bytes]:
        serial, keeps = self._writer(request)
        self.metrics.puts.inc()
        entries = dialect.parsePut(readBody(request, dialect.maxBodyBytes))
        return self._putEntries(request, dialect, serial, entries, keeps)

    def _writer(self, request: IRequest) -> tuple[str, bool]:
        """
        The serial a put comes from, and whether what it puts is kept: not
        while pairing is required and the device is not claimed yet.
        """
        serial = deviceSerial(request)
        if serial is None:
            raise SerialRequired()
        return serial, self.admission.admit(request, serial, TRANSPORT)

    def _putEntries(
        self,
        request: IRequest,
        dialect: Dialect,
        serial: str,
        entries: list[PutEntry],
        keeps: bool = True,
    ) -> Deferred[bytes]:
        weaveId = _headerText(request, b"x-nl-weave-device-id")
        if not keeps:
            # Answered as the anchor does and dropped (PROTOCOL.md §2.3, §19
            # scenario 59).
            self._transportHeaders(request)
            return succeed(_render(request, dialect.renderReceipts([])))

        def answer(receipts: list[Bucket]) -> bytes:
            if dialect is KEY_LIST:
                self.sessions.wrote(serial, receipts)
            self._transportHeaders(request)
            return _render(request, dialect.renderReceipts(receipts))

        return self.state.put(serial, entries, weaveId).addCallback(answer)

    # The key-list dialect (PROTOCOL.md §20)

    def keyListSubscribe(self, request: IRequest) -> Deferred[bytes]:
        """
        A key-list subscribe (PROTOCOL.md §20.3): the first listed bucket
        newer than the client's copy, alone, as a bare value named by the
        C{X-nl-skv-*} headers; nothing newer, the answer's headers at once
        and its end, with no body, when a listed key changes.
        """
        serial = self._callerSerial(request, TRANSPORT)
        listed = keylist.parseKeys(readBody(request, KEY_LIST.maxBodyBytes))
        holdSeconds = keylist.parseSubscribeTimeout(
            request.getHeader(b"x-nl-subscribe-timeout")
        )
        session = _headerText(request, b"x-nl-session-id") or ""
        weaveId = _headerText(request, b"x-nl-weave-device-id")

        def currentTimestamp(key: str) -> int:
            return (self.state.bucket(serial, key) or empty(key)).timestamp

        objects = self.sessions.clientObjects(serial, session, listed, currentTimestamp)
        self.log.debug("key-list subscribe from {serial}", serial=serial)
        return self.state.subscribe(serial, objects, weaveId).addCallback(
            self._answerKeyList, request, serial, session, listed, holdSeconds
        )

    def _answerKeyList(
        self,
        outcome: SubscribeOutcome,
        request: IRequest,
        serial: str,
        session: str,
        listed: tuple[ListedKey, ...],
        holdSeconds: float | None,
    ) -> bytes | Deferred[bytes]:
        self._transportHeaders(request)
        watched = frozenset(entry.key for entry in listed)
        # Only a listed key is an answer: the client names what it takes.
        newer = [bucket for bucket in outcome.buckets if bucket.key in watched]
        if newer:
            bucket = newer[0]
            self.sessions.sent(serial, session, listed, bucket)
            if wire.touchesSetpoint([bucket]):
                request.setHeader(
                    b"x-nl-disable-defer-window",
                    b"%d" % (self.settings.disableDeferWindowSeconds,),
                )
            answer = _render(request, keylist.renderBucket(bucket))
            request.setHeader(b"content-length", b"%d" % (len(answer),))
            return answer
        held = self.hub.hold(
            serial,
            _answerWriter(request, KEY_LIST),
            outcome.replayFilter,
            EndOnChange(watched, holdSeconds),
        )
        if held is None:
            self.log.warn("{serial} holds too many subscribes", serial=serial)
            request.setHeader(b"content-length", b"0")
            return b""
        return held.addCallback(self._heldEnded, request)

    def keyListPut(self, request: IRequest, key: str | None) -> Deferred[bytes]:
        """
        A nested put, or one bucket's bare fields when the path names it
        (PROTOCOL.md §20.4), answered with metadata only.
        """
        if key is None:
            return self.put(request, KEY_LIST)
        serial, keeps = self._writer(request)
        entries = keylist.parseBucketPut(key, readBody(request, KEY_LIST.maxBodyBytes))
        return self._putEntries(request, KEY_LIST, serial, entries, keeps)

    # The apps' login (PROTOCOL.md §20.6)

    @app.route("/user/login", methods=["POST"])
    def login(self, request: IRequest) -> Deferred[bytes]:
        """
        An app logs in with C{username} and C{password} (a form); a wrong
        pair is a 401, repeated failures a 429 (never a 401: python-nest
        answers a 401 by logging in again, recursively).
        """
        client = request.getClientAddress()
        address = str(getattr(client, "host", client))
        self.loginThrottle.check(address)
        fields = _loginForm(readBody(request, _LOGIN_BODY_MAX_BYTES))
        username, password = fields.get("username"), fields.get("password")
        if not username or not password:
            raise BadBody("Missing required fields: username, password")
        origin = self.settings.origin or requestOrigin(request)

        def answer(login: Login | None) -> bytes:
            if login is None:
                self.loginThrottle.failed(address)
                self.log.info("failed login for {name}", name=username[:64])
                raise WrongCredentials()
            self.loginThrottle.succeeded(address)
            for name in (b"sessionid", b"cztoken"):
                cast(Request, request).addCookie(
                    name, login.token.encode("ascii"), path=b"/", httpOnly=True
                )
            return jsonResponse(request, loginAnswer(login, origin))

        return self.accounts.login(username, password).addCallback(answer)

    # The apps' reads (PROTOCOL.md §20.5, §20.6)

    @app.route("/v2/mobile/<path:key>", methods=["GET"])
    @app.route("/v3/mobile/<path:key>", methods=["GET"])
    def mobile(self, request: IRequest, key: str) -> bytes:
        """
        An app's whole-state read of its user: the user, its structures,
        their devices and each device's buckets, nested; any other user is
        a 403 and nothing is read.
        """
        userId = self._appUser(request)
        named = keylist.canonicalKey(key)
        if named != f"user.{userId}":
            raise NotYours("This token reads only its own user")
        return _render(request, keylist.renderMobile(self._mobileState(userId)))

    def appPut(
        self,
        request: IRequest,
        userId: str,
        entries: list[PutEntry],
        dialect: Dialect,
    ) -> Deferred[bytes]:
        """
        An app's put as user commands (PROTOCOL.md §20.4): checked like
        C{/command}, written in one transaction and pushed to every device
        and client that sees it (the app is not a device: nothing is held
        back from the thermostat).
        """
        planned = appputs.planAppPut(self.state, userId, entries)
        self.log.info("app put by {user}", user=userId)

        def answer(written: list[Bucket]) -> bytes:
            self._transportHeaders(request)
            return _render(request, dialect.renderReceipts(written))

        if not planned.edits:
            return succeed(answer([]))
        return commands.execute(self.state, planned).addCallback(answer)

    def appSubscribe(self, request: IRequest, userId: str) -> Deferred[bytes]:
        """An app's key-list subscribe, over its account only (§20.3, §20.6)."""
        listed = keylist.parseKeys(readBody(request, KEY_LIST.maxBodyBytes))
        holdSeconds = keylist.parseSubscribeTimeout(
            request.getHeader(b"x-nl-subscribe-timeout")
        )
        session = _headerText(request, b"x-nl-session-id") or ""
        return self._appKeyList(request, userId, listed, holdSeconds, session, None)

    def _appKeyList(
        self,
        request: IRequest,
        userId: str,
        listed: tuple[ListedKey, ...],
        holdSeconds: float | None,
        session: str,
        callback: str | None,
    ) -> Deferred[bytes]:
        """
        The first listed bucket newer than the app's copy, alone; nothing
        newer: held, ended with no body when a listed key changes (a JSONP
        answer, which cannot end empty, waits for the bucket instead).
        """
        scopes = {
            entry.key: appputs.appScope(self.state, userId, entry.key)[0]
            for entry in listed
        }
        subscriber = appputs.appSubscriber(userId)

        def current(key: str) -> Bucket:
            return self.state.store.get(scopes[key], key) or empty(key)

        objects = self.sessions.clientObjects(
            subscriber, session, listed, lambda key: current(key).timestamp
        )
        request.setHeader(b"x-nl-service-timestamp", b"%d" % (self.state.nowMs(),))
        for entry in objects:
            bucket = current(entry.key)
            if serverIsNewer(entry.timestamp, bucket.timestamp):
                self.sessions.sent(subscriber, session, listed, bucket)
                if callback is not None:
                    return succeed(jsonp.render(request, callback, bucket, self.state))
                answer = _render(request, keylist.renderBucket(bucket))
                request.setHeader(b"content-length", b"%d" % (len(answer),))
                return succeed(answer)
        watched = frozenset(scopes)
        if callback is None:
            policy: IHoldPolicy = EndOnChange(watched, holdSeconds)
            deliver = _answerWriter(request, KEY_LIST)
        else:
            policy = OneBucketPerAnswer(watched, holdSeconds)
            deliver = jsonp.writer(request, callback, self.state)
        held = self.hub.hold(subscriber, deliver, lambda kept: [], policy)
        if held is None:
            raise TooManySubscribes("This account holds too many subscribes")

        def ended(ignored: None) -> bytes:
            if callback is not None and not cast(Request, request).startedWriting:
                # The hold timed out with nothing new: an answer naming no
                # bucket, as the device's empty end.
                return jsonp.render(request, callback, None, self.state)
            return self._heldEnded(None, request)

        return held.addCallback(ended)

    def appObjectsSubscribe(self, request: IRequest, userId: str) -> Deferred[bytes]:
        """
        A C{/v5/subscribe} in the v7 C{objects} shape: the listed buckets
        newer than the app's copies, or held as v7 holds (§6.3); values
        in the body are not writes (an app writes with a put).
        """
        body = V7.parseSubscribe(readBody(request, V7.maxBodyBytes))
        scopes = {
            entry.key: appputs.appScope(self.state, userId, entry.key)[0]
            for entry in body.objects
        }
        newer = []
        for entry in body.objects:
            bucket = self.state.store.get(scopes[entry.key], entry.key)
            bucket = bucket or empty(entry.key)
            if serverIsNewer(entry.timestamp, bucket.timestamp):
                newer.append(bucket)
        self._transportHeaders(request)
        if newer or not body.chunked:
            return succeed(_render(request, V7.renderAnswer(newer)))
        watched = frozenset(scopes)
        held = self.hub.hold(
            appputs.appSubscriber(userId),
            _answerWriter(request, V7),
            lambda kept: [],
            _Watching(watched, V7.holdPolicy(body)),
        )
        if held is None:
            raise TooManySubscribes("This account holds too many subscribes")
        return held.addCallback(self._heldEnded, request)

    def _appUserIfAny(self, request: IRequest) -> str | None:
        """
        The user of an app token, or C{None} for a device's request: a
        Basic header that is neither a live token nor a device's
        credentials is a 403 (a valid-looking token, PROTOCOL.md §20.6).
        """
        header = request.getHeader(b"authorization")
        if header is None:
            return None
        scheme, _, token = header.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() == "basic" and token:
            userId = self.accounts.userFor(token)
            if userId is not None:
                return userId
        if deviceSerial(request) is not None:
            return None
        raise NotYours("The token is not valid")

    def _appUser(self, request: IRequest) -> str:
        """
        The user of the app token in C{Authorization: Basic <token>}
        (PROTOCOL.md §20.6): none is a 401; a token that names nobody is a
        403, since python-nest answers a 401 by logging in again, until it
        crashes.
        """
        header = request.getHeader(b"authorization")
        if header is None:
            raise AppTokenRequired()
        scheme, _, token = header.decode("latin-1").partition(" ")
        userId = self.accounts.userFor(token.strip()) if token.strip() else None
        if scheme.lower() != "basic" or userId is None:
            raise NotYours("The token is not valid")
        return userId

    def _mobileState(self, userId: str) -> keylist.MobileState:
        store = self.state.store
        membership = self.state.membership
        serials = [
            s for s in membership.knownSerials() if membership.ownerOf(s) == userId
        ]
        structures: dict[str, list[str]] = {}
        for serial in serials:
            structures.setdefault(membership.structureKey(serial), []).append(serial)
        return keylist.MobileState(
            user=store.get(GLOBAL_SCOPE, f"user.{userId}") or empty(f"user.{userId}"),
            structures=[
                (store.get(GLOBAL_SCOPE, key) or empty(key), members)
                for key, members in structures.items()
            ],
            devices=[(serial, store.buckets(serial)) for serial in serials],
        )

    # The rest of the entry map (PROTOCOL.md §9)

    @app.route("/nest/weather/<path:rest>", methods=["GET"])
    @app.route("/weather/<path:rest>", methods=["GET"])
    def weatherReport(self, request: IRequest, rest: str) -> Deferred[bytes]:
        query = parseWeatherQuery(request.args)
        return self.weather.lookup(query).addCallback(
            lambda report: jsonResponse(request, report)
        )

    @app.route("/nest/upload", methods=["POST"])
    @app.route("/upload", methods=["POST"])
    def upload(self, request: IRequest) -> Deferred[bytes]:
        body = readBody(request, MAX_UPLOAD_BODY_BYTES)
        serial = deviceSerial(request)
        if serial is not None:
            if not self.admission.admit(request, serial, TRANSPORT):
                raise PairingRequired()
        elif self.admission.settings.pairingRequired:
            raise PairingRequired()
        return self.runInThread(self.logs.save, serial, body).addCallback(
            lambda ignored: jsonResponse(request, {"status": "ok"})
        )

    @app.route("/nest/pro_info", methods=["GET"])
    @app.route("/nest/pro_info/<code>", methods=["GET"])
    @app.route("/pro_info", methods=["GET"])
    @app.route("/pro_info/<code>", methods=["GET"])
    @app.route("/pro-info", methods=["GET"])
    @app.route("/pro-info/<code>", methods=["GET"])
    def installerInfo(self, request: IRequest, code: str | None = None) -> bytes:
        return jsonResponse(request, proInfo(proInfoCode(code, request.args)))

    # Pairing (PROTOCOL.md §5)

    @app.route("/nest/passphrase", methods=["GET"])
    @app.route("/passphrase", methods=["GET"])
    def passphrase(self, request: IRequest) -> Deferred[bytes]:
        serial = self._callerSerial(request)
        return self.pairing.passphrase(serial).addCallback(
            # expires is a JSON number: a string makes the device ignore
            # the key (PROTOCOL.md §5).
            lambda key: jsonResponse(
                request, {"value": key.code, "expires": key.expiresMs}
            )
        )

    @app.route("/nest/passphrase/status", methods=["GET"])
    @app.route("/passphrase/status", methods=["GET"])
    def passphraseStatus(self, request: IRequest) -> bytes:
        serial = self._callerSerial(request)
        return jsonResponse(request, self.pairing.status(serial))

    # Helpers

    def _refuseWhenClosed(self, request: IRequest) -> None:
        if self.hub.closed:
            _closeAfter(request)
            raise Unavailable("Server is shutting down")

    def _callerSerial(self, request: IRequest, kind: str = FRONT_DOOR) -> str:
        serial = deviceSerial(request)
        if serial is None:
            raise SerialRequired()
        self.admission.admit(request, serial, kind)
        return serial

    def _mayNote(self, request: IRequest, serial: str) -> bool:
        """
        Whether an entry may be remembered for C{serial}: entry itself is
        answered to anyone (PROTOCOL.md §2.3).
        """
        try:
            self.admission.admit(request, serial, FRONT_DOOR)
        except NestError:
            return False
        return True

    def _transportHeaders(self, request: IRequest) -> None:
        request.setHeader(b"x-nl-service-timestamp", b"%d" % (self.state.nowMs(),))
        request.setHeader(
            b"x-nl-suspend-time-max", b"%d" % (self.settings.suspendTimeMaxSeconds,)
        )
        request.setHeader(
            b"x-nl-defer-device-window",
            b"%d" % (self.settings.deferDeviceWindowSeconds,),
        )


_LOGIN_BODY_MAX_BYTES = 4096


def _loginForm(body: bytes) -> dict[str, str]:
    """The fields of a login: a form, as the apps send, or a JSON object."""
    if body.lstrip().startswith(b"{"):
        return {
            key: value
            for key, value in wire.parseJSONObject(body).items()
            if isinstance(value, str)
        }
    try:
        parsed = parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=16
        )
    except UnicodeDecodeError:
        raise BadBody("Body is not UTF-8") from None
    except ValueError:
        raise BadBody("Body is not a valid form") from None
    return {key: values[-1] for key, values in parsed.items()}


def _cookieDate(seconds: float) -> str:
    # As the Nest cloud wrote it: "Mon, 02-Jan-2027 15:04:05 GMT" (§20.6).
    return time.strftime("%a, %d-%b-%Y %H:%M:%S GMT", time.gmtime(seconds))


def loginAnswer(login: Login, origin: str) -> dict[str, Any]:
    """
    The answer of a login (PROTOCOL.md §20.6): every field the apps of
    that era index, C{urls.transport_url} the device port's origin.
    """
    return {
        "access_token": login.token,
        "user": f"user.{login.userId}",
        "userid": login.userId,
        "user_id": login.userId,
        "email": f"{login.userId}@localhost",
        "expires_in": _cookieDate(login.expiresSeconds),
        "urls": {
            "transport_url": origin,
            "direct_transport_url": origin,
            "rubyapi_url": origin + "/",
            "weather_url": f"{origin}/nest/weather/v1?query=",
            "log_upload_url": f"{origin}/nest/upload",
            "support_url": origin + "/",
        },
        "limits": {
            "thermostats_per_structure": 20,
            "structures": 2,
            "smoke_detectors_per_structure": 0,
            "smoke_detectors": 0,
            "thermostats": 20,
        },
        "weave": {
            "service_config": "",
            "pairing_token": "",
            "access_token": "",
        },
        "is_staff": False,
        "is_superuser": False,
    }


def _headerText(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")[:128]


def _queryBytes(request: IRequest, name: bytes) -> bytes | None:
    values = request.args.get(name)
    return values[-1] if values else None


def _queryText(request: IRequest, name: bytes) -> str | None:
    value = _queryBytes(request, name)
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody(f"{name.decode()} is not UTF-8") from None


@implementer(IHoldPolicy)
@frozen
class _Watching:
    """
    An app's hold in the v7 shape: C{policy}'s, over the C{watched} keys
    only (the app named them; others of its account are not its answer).
    """

    watched: frozenset[str]
    policy: IHoldPolicy

    @property
    def headersAtOnce(self) -> bool:
        return bool(self.policy.headersAtOnce)

    @property
    def holdSeconds(self) -> float | None:
        return self.policy.holdSeconds

    def react(self, buckets: Sequence[Bucket]) -> Reaction | None:
        kept = [bucket for bucket in buckets if bucket.key in self.watched]
        return self.policy.react(kept) if kept else None


def _closeAfter(request: IRequest) -> None:
    """Close the connection once C{request}'s response is complete."""
    request.setHeader(b"connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False


def _render(request: IRequest, rendered: Rendered) -> bytes:
    for name, value in rendered.headers:
        request.setHeader(name, value)
    return rendered.body


def _answerWriter(request: IRequest, dialect: Dialect) -> Deliver:
    """
    Writes a held answer as the hub delivers it, rendered by C{dialect}:
    headers alone when the hold begins with them (the device may sleep,
    PROTOCOL.md §6.3), then each batch as one chunk; raises when the client
    has gone, so the hub keeps the batch for the next subscribe.
    """
    # notifyFinish and startedWriting are on every twisted.web request, but
    # not on IRequest.
    web = cast(Request, request)
    gone: list[bool] = []
    web.notifyFinish().addBoth(lambda result: gone.append(True))

    def deliver(batch: Sequence[Bucket]) -> None:
        if gone:
            raise ConnectionLost("subscriber left before the push")
        if not batch:
            for name, value in dialect.openingHeaders:
                request.setHeader(name, value)
            request.write(b"")
            return
        rendered = dialect.renderAnswer(batch)
        if not web.startedWriting:
            for name, value in rendered.headers:
                request.setHeader(name, value)
        request.write(rendered.body)

    return deliver
