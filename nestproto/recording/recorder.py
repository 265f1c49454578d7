# -*- test-case-name: tests.test_fixtures -*-
"""
The recorder: wraps a server's Klein resources and writes every exchange,
as it happened on the server's clock, to redacted fixture files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, cast

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request
from zope.interface import implementer

from ..device.auth import deviceSerial, normaliseSerial
from ..device.jsonp import parseScript
from .format import CONTROL, DEVICE, KINDS, appendExchange, encodeBody, startFile
from .redaction import Redactor

#: Request headers kept in a recording (lowercase); all C{X-nl-*} too.
_REQUEST_HEADERS = ("host", "authorization", "content-type", "user-agent")
#: Response headers kept (lowercase); all C{X-nl-*} too.
_RESPONSE_HEADERS = ("content-type", "content-length", "transfer-encoding")


def _now(clock: IReactorTime) -> float:
    return clock.seconds()


def _offset(seconds: float, start: float) -> float:
    return round(seconds - start, 6)


def _selectHeaders(
    pairs: Iterable[tuple[bytes, Sequence[bytes]]], keep: Sequence[str]
) -> dict[str, str]:
    selected = {}
    for name, values in pairs:
        text = name.decode("latin-1")
        lowered = text.lower()
        if lowered in keep or lowered.startswith("x-nl-"):
            selected[text] = values[-1].decode("latin-1")
    return selected


@define(eq=False)
class _Exchange:
    """One request being recorded, until its response ends."""

    sequence: int
    kind: str
    started: float
    request: IRequest
    requestBody: bytes
    #: The request's headers as they came: a handler may add some (the
    #: JSONP subscribe's C{Authorization} from its query, §20.6).
    requestHeaders: dict[str, str]
    status: int | None = None
    headers: dict[str, str] = field(factory=dict)
    headersAt: float | None = None
    chunked: bool = False
    chunks: list[tuple[float, bytes]] = field(factory=list)
    ended: float | None = None
    lost: float | None = None


@define
class Recorder:
    """
    Writes every exchange of the resources it wraps to fixture files in
    C{directory}, one file per device serial per run.

    @ivar clock: the server's clock; every time in a fixture comes from it.
    @ivar raw: keep serials, MACs, passwords and entry codes as they were.
    @ivar oneFile: write every exchange to one file, whichever device it
        is about (a scenario of a thermostat and its apps, whose requests
        name no device, PROTOCOL.md §20.6).
    """

    log = Logger()

    directory: str
    clock: IReactorTime
    raw: bool = False
    oneFile: bool = False
    redactor: Redactor = field(init=False)
    _sequence: int = field(default=0, init=False)
    _files: dict[str, tuple[str, float]] = field(factory=dict, init=False)
    _closed: bool = field(default=False, init=False)
    _open: list[_Exchange] = field(factory=list, init=False)
    _paths: list[str] = field(factory=list, init=False)
    _codeSerials: dict[str, str] = field(factory=dict, init=False)
    _runName: str = field(default="", init=False)

    def __attrs_post_init__(self) -> None:
        self.redactor = Redactor(self.raw)
        os.makedirs(self.directory, exist_ok=True)
        self._runName = str(int(self.clock.seconds() * 1000))

    def wrap(self, resource: IResource, kind: str = DEVICE) -> IResource:
        """C{resource}, recording each exchange as one of C{kind}."""
        if kind not in KINDS:
            raise ValueError(f"unknown exchange kind {kind!r}")
        return RecordingResource(resource, self, kind)

    def paths(self) -> list[str]:
        """The fixture files written so far."""
        return sorted(self._paths)

    def close(self) -> None:
        """Write the exchanges still open (as open) and close every file."""
        for exchange in list(self._open):
            self._write(exchange)
        self._open.clear()
        self._closed = True

    # Called by RecordingResource

    def _begin(self, kind: str, anyRequest: IRequest) -> _Exchange:
        # The hooks below need twisted.web's Request, not only IRequest.
        request = cast(Request, anyRequest)
        self._sequence += 1
        body = b""
        if request.content is not None:
            request.content.seek(0)
            body = request.content.read()
            request.content.seek(0)
        exchange = _Exchange(
            self._sequence,
            kind,
            _now(self.clock),
            request,
            body or b"",
            _selectHeaders(request.requestHeaders.getAllRawHeaders(), _REQUEST_HEADERS),
        )
        self._open.append(exchange)
        original = request.write
        originalFinish = request.finish

        def write(data: bytes) -> None:
            first = not request.startedWriting
            original(data)
            if first and request.startedWriting:
                exchange.status = request.code
                exchange.chunked = bool(getattr(request, "chunked", False))
                exchange.headers = _selectHeaders(
                    request.responseHeaders.getAllRawHeaders(), _RESPONSE_HEADERS
                )
                exchange.headersAt = _now(self.clock)
            if data:
                exchange.chunks.append((_now(self.clock), bytes(data)))

        def finish() -> None:
            if not request.startedWriting:
                write(b"")
            originalFinish()
            exchange.ended = _now(self.clock)
            self._done(exchange)

        request.write = write  # type: ignore[method-assign]
        request.finish = finish  # type: ignore[method-assign]

        def lost(failure: Failure) -> None:
            if exchange.ended is None:
                exchange.lost = _now(self.clock)
                self._done(exchange)

        request.notifyFinish().addErrback(lost)
        return exchange

    def _done(self, exchange: _Exchange) -> None:
        if exchange in self._open and not self._closed:
            self._open.remove(exchange)
            try:
                self._write(exchange)
            except Exception:
                self.log.failure("could not record an exchange")

    def _serialOf(
        self, exchange: _Exchange, requestBody: Any, chunks: list[Any]
    ) -> str:
        if exchange.kind == DEVICE:
            serial = deviceSerial(exchange.request)
            if serial is not None:
                return serial
        candidates: list[Any] = []
        args = exchange.request.args or {}
        for value in args.get(b"serial", []):
            candidates.append(value.decode("latin-1"))
        for document in [requestBody, *chunks]:
            if isinstance(document, dict):
                candidates.append(document.get("serial"))
        for candidate in candidates:
            serial = normaliseSerial(candidate) if isinstance(candidate, str) else None
            if serial is not None:
                return serial
        if isinstance(requestBody, dict) and isinstance(requestBody.get("code"), str):
            # A claim that failed names no serial; its code says whose it is.
            return self._codeSerials.get(requestBody["code"].upper(), "")
        return ""

    def _write(self, exchange: _Exchange) -> None:
        redactor = self.redactor
        request = exchange.request
        requestBody = encodeBody(exchange.requestBody)
        chunkBodies = [encodeBody(data) for at, data in exchange.chunks]
        jsonChunks = [b["json"] for b in chunkBodies if b and "json" in b]
        for body in chunkBodies:
            # A JSONP answer's document names serials and MACs too (§20.6).
            script = parseScript(body["text"]) if body and "text" in body else None
            if script is not None:
                jsonChunks.append(script[1])
        requestJSON = requestBody.get("json") if requestBody else None
        serial = self._serialOf(exchange, requestJSON, jsonChunks)
        redactor.learnSerial(serial)
        if requestBody is not None and "text" in requestBody:
            # The entry form (PROTOCOL.md §4) names the MAC.
            for pair in requestBody["text"].split("&"):
                name, _, value = pair.partition("=")
                if name == "mac":
                    redactor.learnMAC(value)
        redactor.learnFrom(requestJSON)
        for document in jsonChunks:
            redactor.learnFrom(document)
        path = request.uri.decode("latin-1")
        if path.rstrip("/").endswith("passphrase"):
            for document in jsonChunks:
                if isinstance(document, dict):
                    redactor.learnCode(document.get("value"))
                    if isinstance(document.get("value"), str) and serial:
                        self._codeSerials[document["value"].upper()] = serial
        if exchange.kind == CONTROL and isinstance(requestJSON, dict):
            redactor.learnCode(requestJSON.get("code"))

        filePath, start = self._file(redactor.serial(serial), exchange.started)
        requestHeaders = exchange.requestHeaders
        line = {
            "seq": exchange.sequence,
            "kind": exchange.kind,
            "start": _offset(exchange.started, start),
            "request": {
                "method": request.method.decode("latin-1"),
                "path": redactor.path(path),
                "headers": {
                    name: redactor.header(name, value)
                    for name, value in requestHeaders.items()
                },
                "body": redactor.body(requestBody),
            },
            "response": {
                "status": exchange.status,
                "headers": {
                    name: redactor.header(name, value)
                    for name, value in exchange.headers.items()
                },
                "headersAt": None
                if exchange.headersAt is None
                else _offset(exchange.headersAt, start),
                "chunked": exchange.chunked,
                "chunks": [
                    {"at": _offset(at, start), "body": redactor.body(body)}
                    for (at, data), body in zip(
                        exchange.chunks, chunkBodies, strict=True
                    )
                ],
                "end": None
                if exchange.ended is None
                else _offset(exchange.ended, start),
                "lost": None
                if exchange.lost is None
                else _offset(exchange.lost, start),
            },
        }
        appendExchange(filePath, line)

    def _file(self, name: str, started: float) -> tuple[str, float]:
        key = "session" if self.oneFile else name or "unidentified"
        if key not in self._files:
            path = os.path.join(self.directory, f"{key}-{self._runName}.jsonl")
            self._paths.append(path)
            startFile(path, name or None, int(started * 1000), not self.raw)
            self._files[key] = (path, started)
        return self._files[key]


class RecorderService(Service):
    """Closes a L{Recorder}'s files when the server stops."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def stopService(self) -> None:
        Service.stopService(self)
        self.recorder.close()


@implementer(IResource)
class RecordingResource:
    """
    An L{IResource} that hands every request to the resource it wraps and
    records the exchange: the request as it came, the response as written,
    chunk by chunk, with the times from the recorder's clock.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, recorder: Recorder, kind: str) -> None:
        self._wrapped = wrapped
        self._recorder = recorder
        self._kind = kind

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("a recording wrapper has no children of its own")

    def render(self, request: IRequest) -> Any:
        self._recorder._begin(self._kind, request)
        return self._wrapped.render(request)
