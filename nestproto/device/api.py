# -*- test-case-name: tests.test_device_api,tests.test_transport -*-
"""
The device-facing HTTP API: the endpoints a thermostat calls.

Handlers are thin: they parse with L{wire}, act through L{DeviceState} and
L{SubscriberHub}, and render with L{wire}.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar, cast
from urllib.parse import parse_qs

from attrs import Factory, field, frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from .._version import __version__
from ..buckets import Bucket
from ..errors import BadBody, NestError, NotFound, SerialRequired, Unavailable
from ..httpjson import JSONKlein, errorDocument, jsonResponse, readBody
from ..hub import Deliver, SubscriberHub
from ..metrics import Metrics
from ..pairing import Pairing
from ..proinfo import proInfo, proInfoCode
from ..state import DeviceState, SubscribeOutcome
from ..store import ThreadRunner
from ..uploads import MAX_UPLOAD_BODY_BYTES, LogStore
from ..weather import WeatherService, parseWeatherQuery
from . import wire
from .auth import deviceSerial, normaliseSerial

#: Entry form fields and how each must look (PROTOCOL.md §4).
_ENTRY_FIELD_PATTERNS = {
    "mac": re.compile(r"^[0-9A-Fa-f]{12}$"),
    "request_id": re.compile(r"^[0-9]{1,20}$"),
    "reset": re.compile(r"^(?i:true|false)$"),
}
_ENTRY_FIELD_MAX_LENGTH = 128
_ENTRY_BODY_MAX_BYTES = 4096
_HOST_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?$")


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


def requestOrigin(request: IRequest) -> str:
    """
    C{scheme://host:port} as the device reached us, always with an explicit
    port: without one the firmware mis-parses the port and push can no
    longer wake it (PROTOCOL.md §1). A Host header without a port means the
    scheme's default port.
    """
    secure = request.isSecure()
    scheme = "https" if secure else "http"
    raw = request.getHeader(b"host")
    match = _HOST_PATTERN.match(raw.decode("latin-1")) if raw else None
    if match is None:
        local = request.getHost()
        host = f"[{local.host}]" if ":" in local.host else local.host
        return f"{scheme}://{host}:{local.port}"
    port = match.group(2) or ("443" if secure else "80")
    return f"{scheme}://{match.group(1)}:{int(port)}"


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


@frozen(kw_only=True, eq=False)
class DeviceAPI:
    """The device port's Klein app."""

    app: ClassVar[Klein] = JSONKlein()
    log: ClassVar[Logger] = Logger()

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

    # Errors

    @app.handle_errors(NestError, HTTPException)
    def refused(self, request: IRequest, failure: Failure) -> bytes:
        status, document = errorDocument(failure)
        self.log.debug("refused {path}: {error}", path=request.path, error=document)
        return jsonResponse(request, document, status)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("error handling {path}", failure, path=request.path)
        return jsonResponse(
            request, {"error": "Internal error", "code": "internal"}, 500
        )

    # Discovery and liveness

    @app.route("/nest/entry", methods=["GET", "POST"])
    @app.route("/entry", methods=["GET", "POST"])
    def entry(self, request: IRequest) -> bytes:
        fields = parseEntryForm(
            readBody(request, _ENTRY_BODY_MAX_BYTES), request.getHeader(b"content-type")
        )
        serial = deviceSerial(request)
        if serial is not None:
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
        if self.hub.closed:
            # Stopping: the store takes no more writes. Send the device to a
            # new connection, which the next server process will answer.
            _closeAfter(request)
            raise Unavailable("Server is shutting down")
        if _transportTail(rest) == "put":
            return self.put(request)
        return self.subscribe(request)

    @app.route("/nest/transport/<path:rest>", methods=["GET"])
    @app.route("/transport/<path:rest>", methods=["GET"])
    @app.route("/czfe/<path:rest>", methods=["GET"])
    def listing(self, request: IRequest, rest: str) -> bytes:
        """
        Keys, revisions and timestamps of a device's buckets, no values
        (PROTOCOL.md §8): C{device/SERIAL} or C{v7/device/device.SERIAL}.
        """
        named = normaliseSerial(_transportTail(rest).removeprefix("device."))
        caller = deviceSerial(request)
        if caller is not None and named is not None and caller != named:
            raise NotFound("No such device")
        serial = caller or named
        if serial is None:
            raise SerialRequired()
        self.state.presence.touch(serial)
        self._transportHeaders(request)
        return self._objects(request, self.state.listing(serial), withValues=False)

    def subscribe(self, request: IRequest) -> Deferred[bytes]:
        serial = self._callerSerial(request)
        self.metrics.subscribes.inc()
        body = wire.parseSubscribe(readBody(request, wire.MAX_BODY_BYTES))
        weaveId = _headerText(request, b"x-nl-weave-device-id")
        self.log.debug("subscribe from {serial}", serial=serial)
        return self.state.subscribe(serial, body.objects, weaveId).addCallback(
            self._answerSubscribe, request, serial, body.chunked
        )

    def _answerSubscribe(
        self, outcome: SubscribeOutcome, request: IRequest, serial: str, chunked: bool
    ) -> bytes | Deferred[bytes]:
        self._transportHeaders(request)
        if outcome.buckets or not chunked:
            if wire.touchesSetpoint(outcome.buckets):
                request.setHeader(
                    b"x-nl-disable-defer-window",
                    b"%d" % (self.settings.disableDeferWindowSeconds,),
                )
            body = self._objects(request, outcome.buckets)
            if not chunked:
                request.setHeader(b"content-length", b"%d" % (len(body),))
            return body
        request.setHeader(b"content-type", b"application/json")
        held = self.hub.hold(serial, _chunkWriter(request), outcome.replayFilter)
        if held is None:
            self.log.warn("{serial} holds too many subscribes", serial=serial)
            return self._objects(request, [])
        # Headers now, so the device may sleep while we hold (§6.3).
        request.write(b"")
        return held.addCallback(self._heldEnded, request)

    def _heldEnded(self, ignored: None, request: IRequest) -> bytes:
        if self.hub.closed:
            # A shutdown's end of the hold makes the device resubscribe at
            # once (PROTOCOL.md §12, tickle); on this connection it would
            # reach a server that no longer writes.
            _closeAfter(request)
        return b""

    def put(self, request: IRequest) -> Deferred[bytes]:
        serial = self._callerSerial(request)
        self.metrics.puts.inc()
        entries = wire.parsePut(readBody(request, wire.MAX_BODY_BYTES))
        weaveId = _headerText(request, b"x-nl-weave-device-id")

        def answer(receipts: list[Bucket]) -> bytes:
            self._transportHeaders(request)
            # Receipts never carry a value: the device would take it as
            # authoritative and lose edits made since (PROTOCOL.md §7.3).
            return self._objects(request, receipts, withValues=False)

        return self.state.put(serial, entries, weaveId).addCallback(answer)

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

    def _callerSerial(self, request: IRequest) -> str:
        serial = deviceSerial(request)
        if serial is None:
            raise SerialRequired()
        return serial

    def _objects(
        self, request: IRequest, buckets: Sequence[Bucket], withValues: bool = True
    ) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return wire.renderObjects(buckets, withValues)

    def _transportHeaders(self, request: IRequest) -> None:
        request.setHeader(b"x-nl-service-timestamp", b"%d" % (self.state.nowMs(),))
        request.setHeader(
            b"x-nl-suspend-time-max", b"%d" % (self.settings.suspendTimeMaxSeconds,)
        )
        request.setHeader(
            b"x-nl-defer-device-window",
            b"%d" % (self.settings.deferDeviceWindowSeconds,),
        )


def _headerText(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")[:128]


def _closeAfter(request: IRequest) -> None:
    """Close the connection once C{request}'s response is complete."""
    request.setHeader(b"connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False


def _chunkWriter(request: IRequest) -> Deliver:
    """
    Writes each pushed batch as one complete JSON chunk; raises when the
    client has gone, so the hub keeps the batch for the next subscribe.
    """
    gone: list[bool] = []
    # notifyFinish is on every twisted.web request, but not on IRequest.
    cast(Request, request).notifyFinish().addBoth(lambda result: gone.append(True))

    def deliver(batch: Sequence[Bucket]) -> None:
        if gone:
            raise ConnectionLost("subscriber left before the push")
        request.write(wire.renderObjects(batch))

    return deliver
