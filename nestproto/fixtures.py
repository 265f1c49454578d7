# -*- test-case-name: tests.test_fixtures,tests.test_replay_all -*-
"""
Fixtures: recorded exchanges between a thermostat (and its user) and
nestproto, and the replayer that checks a server against them.

A fixture file is JSON lines (fixtures/README.rst has the format): a header
line with the C{format} version, then one line per exchange. The
L{Recorder} writes them from a live server by wrapping its resources; the
L{Replayer} plays them against a fresh in-memory server or a running one
and compares every answer, with server-made timestamps, revisions and entry
codes matched symbolically.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from attrs import define, evolve, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request
from zope.interface import implementer

from ._version import __version__
from .buckets import SERIAL_KEYED_TYPES
from .device.auth import basicCredentials, deviceSerial, normaliseSerial

#: Version of the fixture format; the first line of every file names it.
FORMAT_VERSION = 1
#: File kinds of exchange.
DEVICE = "device"
CONTROL = "control"
KINDS = frozenset({DEVICE, CONTROL})

#: Request headers kept in a recording (lowercase); all C{X-nl-*} too.
_REQUEST_HEADERS = ("host", "authorization", "content-type", "user-agent")
#: Response headers kept (lowercase); all C{X-nl-*} too.
_RESPONSE_HEADERS = ("content-type", "content-length", "transfer-encoding")

#: Fields holding a time in ms made by the server's clock.
MS_FIELDS = frozenset(
    {"object_timestamp", "timestamp", "expires", "expiresAt", "claimedAt"}
)
#: Fields holding a time in seconds made by the server's clock (§10.2).
SECONDS_FIELDS = frozenset(
    {
        "manual_eco_timestamp",
        "fan_timer_timeout",
        "touched_at",
        "mode_update_timestamp",
    }
)
#: Fields holding a bucket revision; matched per object key.
REVISION_FIELDS = frozenset(
    {"object_revision", "if_object_revision", "base_object_revision"}
)
#: Fields whose value depends on the server build, not on the protocol.
ANY_STRING_FIELDS = frozenset({"server_version"})

#: What a redacted Basic password becomes.
REDACTED_PASSWORD = "redacted"
#: Synthetic serials: the invented range of PROTOCOL.md with another prefix.
_SYNTHETIC_SERIAL = "09AA01AC{:010d}"
#: Synthetic MACs: locally administered addresses.
_SYNTHETIC_MAC = "02005E{:06X}"
#: Synthetic entry codes, in the firmware's 3 digits + 4 letters form.
_SYNTHETIC_CODE = "{:03d}CODE"

_MAC_PLAIN = re.compile(r"^[0-9A-Fa-f]{12}$")
#: A bucket key whose id is a device serial (buckets.SERIAL_KEYED_TYPES).
_SERIAL_KEY = re.compile(
    r"^(?:" + "|".join(sorted(SERIAL_KEYED_TYPES)) + r")\.([A-Za-z0-9]{10,64})$"
)


class FixtureError(Exception):
    """
    A fixture file cannot be read: its message names the file and line.
    """

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


# Bodies


def encodeBody(data: bytes) -> dict[str, Any] | None:
    """
    A body as a fixture stores it: parsed JSON when it is JSON (object
    field order kept), else text when it is UTF-8, else base64.
    """
    if not data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}
    try:
        return {"json": json.loads(text)}
    except ValueError:
        return {"text": text}


def decodeBody(body: Mapping[str, Any] | None) -> bytes:
    """The bytes of a body stored by L{encodeBody}."""
    if body is None:
        return b""
    if "json" in body:
        return json.dumps(body["json"], separators=(",", ":")).encode("utf-8")
    if "text" in body:
        return str(body["text"]).encode("utf-8")
    return base64.b64decode(body["base64"])


# Redaction


@define
class Redactor:
    """
    Replaces secrets and identities consistently within one recorder run:
    serials and MACs by synthetic ones (inside keys, values, paths and
    headers too), Basic passwords by a fixed word, entry codes by
    synthetic codes. With C{raw}, changes nothing.
    """

    raw: bool = False
    _serials: dict[str, str] = field(factory=dict, init=False)
    _macs: dict[str, str] = field(factory=dict, init=False)
    _codes: dict[str, str] = field(factory=dict, init=False)
    _pattern: re.Pattern[str] | None = field(default=None, init=False)

    def learnSerial(self, serial: str | None) -> None:
        serial = normaliseSerial(serial)
        if self.raw or serial is None or serial in self._serials:
            return
        self._serials[serial] = _SYNTHETIC_SERIAL.format(len(self._serials) + 1)
        self._pattern = None

    def learnMAC(self, mac: object) -> None:
        if self.raw or not isinstance(mac, str):
            return
        plain = mac.replace(":", "").replace("-", "").upper()
        if not _MAC_PLAIN.match(plain) or plain in self._macs:
            return
        self._macs[plain] = _SYNTHETIC_MAC.format(len(self._macs) + 1)
        self._pattern = None

    def learnCode(self, code: object) -> None:
        if self.raw or not isinstance(code, str) or not code:
            return
        if code.upper() not in self._codes:
            self._codes[code.upper()] = _SYNTHETIC_CODE.format(len(self._codes) + 1)

    def serial(self, serial: str) -> str:
        """The name C{serial} has in the recording."""
        return self._serials.get(serial, serial)

    def _regex(self) -> re.Pattern[str] | None:
        if self._pattern is None:
            alternatives = sorted(self._serials, key=len, reverse=True)
            for mac in self._macs:
                alternatives.append(mac)
                alternatives.append(":".join(mac[i : i + 2] for i in range(0, 12, 2)))
            if not alternatives:
                return None
            self._pattern = re.compile(
                "|".join(re.escape(a) for a in alternatives), re.IGNORECASE
            )
        return self._pattern

    def text(self, text: str) -> str:
        """C{text} with every known serial and MAC replaced."""
        if self.raw:
            return text
        code = self._codes.get(text.upper())
        if code is not None:
            return code
        pattern = self._regex()
        if pattern is None:
            return text

        def substitute(match: re.Match[str]) -> str:
            found = match.group(0).upper()
            if found in self._serials:
                return self._serials[found]
            return self._macs[found.replace(":", "")]

        return pattern.sub(substitute, text)

    def document(self, document: Any) -> Any:
        """A JSON document with L{text} applied to every key and string."""
        if self.raw:
            return document
        if isinstance(document, dict):
            return {self.text(k): self.document(v) for k, v in document.items()}
        if isinstance(document, list):
            return [self.document(item) for item in document]
        if isinstance(document, str):
            return self.text(document)
        return document

    def body(self, body: dict[str, Any] | None) -> dict[str, Any] | None:
        if self.raw or body is None:
            return body
        if "json" in body:
            return {"json": self.document(body["json"])}
        if "text" in body:
            return {"text": self.text(body["text"])}
        return body

    def header(self, name: str, value: str) -> str:
        """A header value with its secrets and identities replaced."""
        if self.raw:
            return value
        lowered = name.lower()
        if lowered == "authorization":
            credentials = basicCredentials(value.encode("latin-1"))
            if credentials is None:
                # A control token (Bearer) or anything else: only its scheme.
                return value.split(" ", 1)[0] + " " + REDACTED_PASSWORD
            token = f"{self.text(credentials.username)}:{REDACTED_PASSWORD}"
            return "Basic " + base64.b64encode(token.encode("utf-8")).decode("ascii")
        if lowered == "x-nl-set-client-credentials":
            user = value.split(" ", 1)[0]
            return f"{self.text(user)} {REDACTED_PASSWORD}"
        return self.text(value)

    def learnFrom(self, document: Any) -> None:
        """
        Learn the serials and MACs a JSON document names: C{serial} and
        C{serial_number} fields, keys of serial-keyed buckets (also as
        field names and in lists), C{mac} and C{mac_address} fields.
        """
        stack = [document]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for key, value in item.items():
                    self._learnKey(key)
                    if key in ("mac", "mac_address"):
                        self.learnMAC(value)
                    elif key in ("serial", "serial_number") and isinstance(value, str):
                        self.learnSerial(value)
                    elif key == "session" and isinstance(value, str):
                        self._learnSession(value)
                    stack.append(value)
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, str):
                self._learnKey(item)

    def _learnKey(self, text: str) -> None:
        match = _SERIAL_KEY.match(text)
        if match is not None:
            self.learnSerial(match.group(1))

    def _learnSession(self, session: str) -> None:
        # The firmware's session is "<mac><serial>" (PROTOCOL.md §6.1).
        for serial in list(self._serials):
            if session.upper().endswith(serial) and len(session) == len(serial) + 12:
                self.learnMAC(session[:12])


# Recording


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
    """

    log = Logger()

    directory: str
    clock: IReactorTime
    raw: bool = False
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
            self._sequence, kind, _now(self.clock), request, body or b""
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
        requestHeaders = _selectHeaders(
            request.requestHeaders.getAllRawHeaders(), _REQUEST_HEADERS
        )
        line = {
            "seq": exchange.sequence,
            "kind": exchange.kind,
            "start": _offset(exchange.started, start),
            "request": {
                "method": request.method.decode("latin-1"),
                "path": redactor.text(path),
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
        # Opened for each line: a server may see thousands of devices, and
        # a line is on disk once written, whatever happens to the process.
        with open(filePath, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def _file(self, name: str, started: float) -> tuple[str, float]:
        key = name or "unidentified"
        if key not in self._files:
            path = os.path.join(self.directory, f"{key}-{self._runName}.jsonl")
            self._paths.append(path)
            header = {
                "format": FORMAT_VERSION,
                "serial": name or None,
                "startMs": int(started * 1000),
                "redacted": not self.raw,
                "server": f"nestproto {__version__}",
            }
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(header) + "\n")
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


# Reading


@frozen
class Chunk:
    """One write of a recorded answer: its time (offset, s) and its body."""

    at: float
    body: dict[str, Any] | None


@frozen
class Exchange:
    """One recorded exchange, as read from a fixture file."""

    number: int
    line: int
    kind: str
    start: float
    method: str
    path: str
    requestHeaders: dict[str, str]
    requestBody: dict[str, Any] | None
    status: int | None
    responseHeaders: dict[str, str]
    headersAt: float | None
    chunked: bool
    chunks: tuple[Chunk, ...]
    end: float | None
    lost: float | None


@frozen
class Fixture:
    """A fixture file: its header line and its exchanges in order of start."""

    path: str
    header: dict[str, Any]
    exchanges: tuple[Exchange, ...]

    @property
    def startSeconds(self) -> float:
        return float(self.header["startMs"]) / 1000


def _need(
    path: str, line: int, document: Mapping[str, Any], name: str, kinds: Any
) -> Any:
    if name not in document:
        raise FixtureError(path, line, f"missing field {name!r}")
    value = document[name]
    if (
        not isinstance(value, kinds)
        or isinstance(value, bool)
        and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))
    ):
        raise FixtureError(path, line, f"field {name!r} has the wrong type")
    return value


def _checkBody(path: str, line: int, body: Any) -> dict[str, Any] | None:
    if body is None:
        return None
    if not isinstance(body, dict) or len(body) != 1:
        raise FixtureError(path, line, "a body must be null or one of json/text/base64")
    (form,) = body
    if form == "text" and not isinstance(body[form], str):
        raise FixtureError(path, line, "a text body must be a string")
    if form == "base64":
        try:
            base64.b64decode(body[form], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise FixtureError(path, line, "a base64 body is not base64") from None
    elif form not in ("json", "text"):
        raise FixtureError(path, line, f"unknown body form {form!r}")
    return body


_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))


def _parseExchange(path: str, line: int, document: Any) -> tuple[int, Exchange]:
    if not isinstance(document, dict):
        raise FixtureError(path, line, "an exchange must be a JSON object")
    sequence = _need(path, line, document, "seq", int)
    kind = _need(path, line, document, "kind", str)
    if kind not in KINDS:
        raise FixtureError(path, line, f"unknown exchange kind {kind!r}")
    start = _need(path, line, document, "start", _NUMBER)
    request = _need(path, line, document, "request", dict)
    response = _need(path, line, document, "response", dict)
    method = _need(path, line, request, "method", str)
    requestPath = _need(path, line, request, "path", str)
    if not requestPath.startswith("/"):
        raise FixtureError(path, line, "a request path must start with /")
    headers = _need(path, line, request, "headers", dict)
    status = _need(path, line, response, "status", (int, type(None)))
    responseHeaders = _need(path, line, response, "headers", dict)
    for table in (headers, responseHeaders):
        if not all(isinstance(v, str) for v in table.values()):
            raise FixtureError(path, line, "header values must be strings")
    chunks = []
    for chunk in _need(path, line, response, "chunks", list):
        if not isinstance(chunk, dict):
            raise FixtureError(path, line, "a chunk must be a JSON object")
        chunks.append(
            Chunk(
                float(_need(path, line, chunk, "at", _NUMBER)),
                _checkBody(path, line, chunk.get("body")),
            )
        )
    end = _need(path, line, response, "end", _OPTIONAL_NUMBER)
    lost = response.get("lost")
    headersAt = response.get("headersAt")
    for name, moment in (("lost", lost), ("headersAt", headersAt)):
        if moment is not None and not _isNumber(moment):
            raise FixtureError(path, line, f"field {name!r} has the wrong type")
    return sequence, Exchange(
        0,
        line,
        kind,
        float(start),
        method,
        requestPath,
        dict(headers),
        _checkBody(path, line, request.get("body")),
        status,
        dict(responseHeaders),
        None if headersAt is None else float(headersAt),
        bool(response.get("chunked", False)),
        tuple(chunks),
        None if end is None else float(end),
        None if lost is None else float(lost),
    )


def loadFixture(path: str) -> Fixture:
    """
    Read and check a fixture file.

    @raise FixtureError: naming the file and line of the first problem:
        not JSON, a missing or unknown C{format}, a malformed exchange.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except OSError as e:
        raise FixtureError(path, 0, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise FixtureError(path, 0, "not UTF-8 text") from None
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        # A last line without its newline: the writer was interrupted.
        try:
            json.loads(lines[-1])
        except ValueError:
            raise FixtureError(
                path, len(lines), "truncated line (not JSON, no newline)"
            ) from None
    if not lines:
        raise FixtureError(path, 1, "empty file, no format line")
    documents = []
    for number, text in enumerate(lines, 1):
        try:
            documents.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise FixtureError(path, number, f"not JSON: {e.msg}") from None
    header = documents[0]
    if not isinstance(header, dict) or "format" not in header:
        raise FixtureError(path, 1, "first line must be a header with a format field")
    if header["format"] != FORMAT_VERSION:
        raise FixtureError(
            path,
            1,
            f"format version {header['format']!r} is not {FORMAT_VERSION}",
        )
    if not isinstance(header.get("startMs"), int) or isinstance(
        header.get("startMs"), bool
    ):
        raise FixtureError(path, 1, "header field 'startMs' must be an integer")
    parsed = [
        _parseExchange(path, number, document)
        for number, document in enumerate(documents[1:], 2)
    ]
    parsed.sort(key=lambda pair: (pair[1].start, pair[0]))
    exchanges = tuple(
        evolve(exchange, number=number)
        for number, (seq, exchange) in enumerate(parsed, 1)
    )
    return Fixture(path, header, exchanges)


# Matching


@frozen
class Mismatch:
    """One difference between a recording and a replay."""

    exchange: int
    where: str
    recorded: Any
    replayed: Any

    def describe(self, path: str) -> str:
        return (
            f"{path}: exchange {self.exchange}: {self.where}: "
            f"recorded {_show(self.recorded)}, replayed {_show(self.replayed)}"
        )


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


@define
class Bindings:
    """
    Values a server makes up, recorded on one side, replayed on the other:
    each recorded value binds to the first replayed value seen in its place,
    and must be the same everywhere after. Times and revisions keep their
    order: a value recorded higher than another must replay higher too.
    """

    shiftMs: int = 0
    milliseconds: dict[int, int] = field(factory=dict)
    seconds: dict[int, int] = field(factory=dict)
    revisions: dict[str, dict[int, int]] = field(factory=dict)
    codes: dict[str, str] = field(factory=dict)

    def bindOrdered(
        self, table: dict[int, int], recorded: int, replayed: int
    ) -> str | None:
        """Bind C{recorded} to C{replayed}; a reason when that is inconsistent."""
        if (recorded == 0) != (replayed == 0):
            return "zero on one side only"
        if recorded in table:
            if table[recorded] != replayed:
                return f"earlier bound to {table[recorded]}"
            return None
        for otherRecorded, otherReplayed in table.items():
            if _sign(recorded - otherRecorded) != _sign(replayed - otherReplayed):
                return (
                    f"order differs from recorded {otherRecorded} "
                    f"(replayed {otherReplayed})"
                )
        table[recorded] = replayed
        return None

    def requestValue(self, name: str, value: Any, objectKey: str | None) -> Any:
        """What a recorded request field becomes in the replay."""
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.upper() in self.codes:
                return self.codes[value.upper()]
            return value
        if name in MS_FIELDS:
            if value == 0:
                return 0
            return self.milliseconds.get(value, value + self.shiftMs)
        if name in SECONDS_FIELDS:
            if value == 0:
                return 0
            return self.seconds.get(value, value + self.shiftMs // 1000)
        if name in REVISION_FIELDS and objectKey is not None:
            return self.revisions.get(objectKey, {}).get(value, value)
        return value

    def request(self, document: Any, objectKey: str | None = None) -> Any:
        """A recorded request body with every bound value replaced."""
        if isinstance(document, dict):
            key = document.get("object_key")
            key = key if isinstance(key, str) else objectKey
            return {
                name: self.requestValue(name, self.request(value, key), key)
                for name, value in document.items()
            }
        if isinstance(document, list):
            return [self.request(item, objectKey) for item in document]
        return self.requestValue("", document, objectKey)


def _sign(number: int) -> int:
    return (number > 0) - (number < 0)


def _isNumber(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compareDocuments(
    recorded: Any,
    replayed: Any,
    bindings: Bindings,
    where: str = "$",
    name: str = "",
    objectKey: str | None = None,
    codeField: bool = False,
) -> list[tuple[str, Any, Any]]:
    """
    The differences between a recorded and a replayed JSON document: types,
    object field names and their order, list lengths and scalars, with
    server-made values matched through C{bindings}.

    @param codeField: C{recorded} is an entry code (a passphrase answer's
        C{value}): bind it rather than compare it.
    @return: C{(where, recorded, replayed)} for each difference.
    """
    if isinstance(recorded, dict):
        if not isinstance(replayed, dict):
            return [(where, recorded, replayed)]
        if list(recorded) != list(replayed):
            return [(where + " (fields)", list(recorded), list(replayed))]
        key = recorded.get("object_key")
        key = key if isinstance(key, str) else objectKey
        problems = []
        for field_ in recorded:
            problems.extend(
                compareDocuments(
                    recorded[field_],
                    replayed[field_],
                    bindings,
                    f"{where}.{field_}",
                    field_,
                    key,
                    codeField and field_ == "value",
                )
            )
        return problems
    if isinstance(recorded, list):
        if not isinstance(replayed, list):
            return [(where, recorded, replayed)]
        if len(recorded) != len(replayed):
            return [(where + " (length)", len(recorded), len(replayed))]
        problems = []
        for index, (a, b) in enumerate(zip(recorded, replayed, strict=True)):
            problems.extend(
                compareDocuments(a, b, bindings, f"{where}[{index}]", name, objectKey)
            )
        return problems
    if codeField and isinstance(recorded, str):
        if not isinstance(replayed, str):
            return [(where, recorded, replayed)]
        bound = bindings.codes.setdefault(recorded.upper(), replayed)
        if bound != replayed:
            return [(where + f" (entry code bound to {bound!r})", recorded, replayed)]
        return []
    if name in ANY_STRING_FIELDS and isinstance(recorded, str):
        return [] if isinstance(replayed, str) else [(where, recorded, replayed)]
    table: dict[int, int] | None = None
    if name in MS_FIELDS:
        table = bindings.milliseconds
    elif name in SECONDS_FIELDS:
        table = bindings.seconds
    elif name in REVISION_FIELDS and objectKey is not None:
        table = bindings.revisions.setdefault(objectKey, {})
    if (
        table is not None
        and isinstance(recorded, int)
        and not isinstance(recorded, bool)
    ):
        if not isinstance(replayed, int) or isinstance(replayed, bool):
            return [(where, recorded, replayed)]
        reason = bindings.bindOrdered(table, recorded, replayed)
        return [] if reason is None else [(f"{where} ({reason})", recorded, replayed)]
    if _isNumber(recorded) and _isNumber(replayed):
        return [] if recorded == replayed else [(where, recorded, replayed)]
    if type(recorded) is not type(replayed) or recorded != replayed:
        return [(where, recorded, replayed)]
    return []


def splitDocuments(data: bytes) -> tuple[list[Any], bytes]:
    """
    The complete JSON documents at the start of C{data}, and what is left:
    a chunked answer is a sequence of documents, whatever the TCP reads.
    """
    decoder = json.JSONDecoder()
    text = data.decode("utf-8", errors="replace")
    documents: list[Any] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return documents, b""
        try:
            document, position = decoder.raw_decode(text, position)
        except ValueError:
            return documents, text[position:].encode("utf-8")
        documents.append(document)


# Replaying


@frozen
class ReplayResult:
    """The outcome of replaying one fixture."""

    path: str
    replayed: int
    matched: int
    mismatches: tuple[Mismatch, ...]

    @property
    def failed(self) -> int:
        return self.replayed - self.matched

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.failed == 0

    def describe(self) -> list[str]:
        """One line per mismatch."""
        return [mismatch.describe(self.path) for mismatch in self.mismatches]


@define(eq=False)
class _Live:
    """One exchange being replayed."""

    exchange: Exchange
    request: Deferred[Any] | None = None
    response: Any = None
    headersAt: float | None = None
    buffer: bytes = b""
    raw: bytes = b""
    documents: list[tuple[float, Any]] = field(factory=list)
    end: float | None = None
    failure: str | None = None
    headersChecked: bool = False
    checked: int = 0

    @property
    def finished(self) -> bool:
        return self.end is not None or self.failure is not None


class ReplayTarget:
    """
    Where a replay sends its requests: L{MemoryTarget} or L{TCPTarget}.

    @ivar clock: the replay's clock; times are measured on it.
    """

    clock: IReactorTime

    def request(
        self, kind: str, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Deferred[Any]:
        """Send a request; fires with an unbuffered treq response."""
        raise NotImplementedError()

    def settle(self, untilSeconds: float) -> Deferred[None]:
        """Let time pass until C{untilSeconds} on L{clock}, delivering data."""
        raise NotImplementedError()

    def flush(self) -> None:
        """Deliver what the server wrote meanwhile."""

    def awaitAll(
        self, conditions: Sequence[Callable[[], bool]], timeoutSeconds: float
    ) -> Deferred[None]:
        """
        Wait until each of C{conditions} holds, or the timeout passed: a
        running server needs time to answer.
        """
        return succeed(None)

    def close(self) -> None:
        """Release what the target holds."""


#: A server factory for L{MemoryTarget}: (clock) -> (device, control) resources.
ServerFactory = Callable[[Any], tuple[IResource, IResource]]


def memoryServer(
    clock: Any, deviceClass: type[Any] | None = None, controlToken: str | None = None
) -> tuple[IResource, IResource]:
    """
    A whole nestproto in memory on C{clock}: SQLite in memory with commits
    made inline.

    @param deviceClass: a L{DeviceAPI} subclass to serve instead.
    @param controlToken: the control port's Bearer token, if it has one.
    """
    from .apps import AppSettings, buildApps
    from .control.api import ControlSettings
    from .device.api import DeviceAPI
    from .store import SQLiteStore, runInline

    apps = buildApps(
        SQLiteStore.open(":memory:", runInline),
        clock,
        runInThread=runInline,
        settings=AppSettings(control=ControlSettings(token=controlToken)),
        deviceClass=deviceClass or DeviceAPI,
    )
    return apps.device.app.resource(), apps.control.app.resource()


#: Nudge past a step's instant, so a timer due exactly then has fired
#: whatever the float rounding of the offsets.
_STEP_EPSILON = 1e-4


class MemoryTarget(ReplayTarget):
    """
    A fresh server in memory, on a L{Clock} the replay advances: hold
    timeouts and batch windows replay exactly and at once.
    """

    def __init__(
        self, startSeconds: float, serverFactory: ServerFactory = memoryServer
    ) -> None:
        from treq.testing import StubTreq
        from twisted.internet.task import Clock

        clock = Clock()
        clock.advance(startSeconds)
        self.clock = clock
        device, control = serverFactory(clock)
        self._clients: dict[str, Any] = {
            DEVICE: StubTreq(device),
            CONTROL: StubTreq(control),
        }

    def request(
        self, kind: str, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Deferred[Any]:
        host = headers.get("host") or (
            "127.0.0.1:8000" if kind == DEVICE else "127.0.0.1:8082"
        )
        sent = {k: v for k, v in headers.items() if k != "host"}
        d: Deferred[Any] = self._clients[kind].request(
            method,
            f"http://{host}{path}",
            headers=sent,
            data=body if body else None,
            unbuffered=True,
        )
        return d

    def settle(self, untilSeconds: float) -> Deferred[None]:
        self.flush()
        delta = untilSeconds + _STEP_EPSILON - self.clock.seconds()
        if delta > 0:
            self.clock.advance(delta)  # type: ignore[attr-defined]
        self.flush()
        return succeed(None)

    def flush(self) -> None:
        # A push made through one port is written on the other: pump both
        # until nothing moves.
        for _round in range(3):
            for client in self._clients.values():
                client.flush()


class TCPTarget(ReplayTarget):
    """
    A running server reached over TCP: recorded offsets are waited out in
    real time, so hold timeouts take as long as the server's are.
    """

    def __init__(self, reactor: Any, deviceURL: str, controlURL: str | None) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self.clock = reactor
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._client = HTTPClient(Agent(reactor, pool=self._pool))
        self._urls = {
            DEVICE: deviceURL.rstrip("/"),
            CONTROL: (controlURL or "").rstrip("/"),
        }

    def request(
        self, kind: str, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Deferred[Any]:
        base = self._urls[kind]
        if not base:
            raise ValueError("a control exchange needs the control API's URL")
        sent: dict[bytes | str, bytes | str] = {k: v for k, v in headers.items()}
        d: Deferred[Any] = self._client.request(
            method,
            base + path,
            headers=sent,
            data=body if body else None,
            unbuffered=True,
        )
        return d

    def settle(self, untilSeconds: float) -> Deferred[None]:
        from twisted.internet.task import deferLater

        delay = max(0.0, untilSeconds - self._reactor.seconds())
        return deferLater(self._reactor, delay, lambda: None)

    def awaitAll(
        self, conditions: Sequence[Callable[[], bool]], timeoutSeconds: float
    ) -> Deferred[None]:
        from twisted.internet.task import deferLater

        deadline = self._reactor.seconds() + timeoutSeconds

        async def poll() -> None:
            while not all(condition() for condition in conditions):
                if self._reactor.seconds() >= deadline:
                    return
                await deferLater(self._reactor, 0.02, lambda: None)

        return Deferred.fromCoroutine(poll())

    def close(self) -> None:
        self._pool.closeCachedConnections()


def _finished(live: _Live) -> bool:
    return live.finished


def _happenedBy(live: _Live, moment: float) -> list[Callable[[], bool]]:
    """What of C{live}'s recorded answer had happened by C{moment}."""
    exchange = live.exchange
    if exchange.end is not None and exchange.end <= moment:
        return [partial(_finished, live)]
    conditions: list[Callable[[], bool]] = []
    if exchange.headersAt is not None and exchange.headersAt <= moment:
        conditions.append(lambda: live.response is not None or live.finished)
    arrived = len([chunk for chunk in exchange.chunks if chunk.at <= moment])
    if arrived:
        conditions.append(lambda: len(live.documents) >= arrived or live.finished)
    return conditions


def _lowerHeaders(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


@define
class Replayer:
    """
    Plays one fixture against a L{ReplayTarget} and compares each answer
    with the recording.

    @ivar tolerance: seconds by which a chunk or an end may be early or late.
    @ivar controlToken: sent as C{Authorization: Bearer} on control
        exchanges recorded with a (redacted) token.
    """

    target: ReplayTarget
    fixture: Fixture
    tolerance: float = 0.01
    bindings: Bindings = field(factory=Bindings)
    controlToken: str | None = None
    _start: float = field(default=0.0, init=False)
    _lives: list[_Live] = field(factory=list, init=False)
    _mismatches: list[Mismatch] = field(factory=list, init=False)

    def run(self) -> Deferred[ReplayResult]:
        """Replay the whole fixture; fires with the result."""
        return Deferred.fromCoroutine(self._run())

    def _now(self) -> float:
        return self.target.clock.seconds() - self._start

    async def _run(self) -> ReplayResult:
        self._start = self.target.clock.seconds()
        self.bindings.shiftMs = int(round(self._start * 1000)) - int(
            self.fixture.header["startMs"]
        )
        exchanges = self.fixture.exchanges
        times = set()
        for exchange in exchanges:
            times.add(exchange.start)
            times.update(chunk.at for chunk in exchange.chunks)
            for moment in (exchange.end, exchange.lost, exchange.headersAt):
                if moment is not None:
                    times.add(moment)
        livesByNumber: dict[int, _Live] = {}
        try:
            for moment in sorted(times):
                await self.target.settle(self._start + moment)
                self._check()
                for exchange in exchanges:
                    if exchange.start == moment:
                        await self._before(exchange)
                        live = self._issue(exchange)
                        livesByNumber[exchange.number] = live
                        self.target.flush()
                        self._check()
                    if exchange.lost == moment and exchange.number in livesByNumber:
                        self._lose(livesByNumber[exchange.number])
                        self.target.flush()
            ending = [
                partial(_finished, live)
                for live in self._lives
                if live.exchange.end is not None or live.exchange.lost is not None
            ]
            await self.target.awaitAll(ending, self.tolerance + 5)
            self.target.flush()
            self._check()
            for live in self._lives:
                self._checkEnd(live)
        finally:
            for live in self._lives:
                if not live.finished:
                    self._lose(live)
            self.target.flush()
            self.target.close()
        failed = {mismatch.exchange for mismatch in self._mismatches}
        return ReplayResult(
            self.fixture.path,
            len(self._lives),
            len([live for live in self._lives if live.exchange.number not in failed]),
            tuple(self._mismatches),
        )

    async def _before(self, exchange: Exchange) -> None:
        # What had happened when this request started in the recording must
        # have happened in the replay too: answers ended (a device
        # resubscribes after an answer), headers sent (a subscribe is held
        # before the command that pushes to it), chunks received.
        conditions = [
            condition
            for live in self._lives
            for condition in _happenedBy(live, exchange.start)
        ]
        await self.target.awaitAll(conditions, self.tolerance + 5)
        self._check()

    def _mismatch(
        self, exchange: Exchange, where: str, recorded: Any, replayed: Any
    ) -> None:
        self._mismatches.append(Mismatch(exchange.number, where, recorded, replayed))

    def _issue(self, exchange: Exchange) -> _Live:
        live = _Live(exchange)
        self._lives.append(live)
        body = exchange.requestBody
        if body is not None and "json" in body:
            data = json.dumps(
                self.bindings.request(body["json"]), separators=(",", ":")
            ).encode("utf-8")
        else:
            data = decodeBody(body)
        headers = {
            name.lower(): value
            for name, value in exchange.requestHeaders.items()
            if name.lower() != "content-length"
        }
        if headers.get("authorization") == f"Bearer {REDACTED_PASSWORD}":
            if self.controlToken is None:
                del headers["authorization"]
            else:
                headers["authorization"] = f"Bearer {self.controlToken}"
        try:
            d = self.target.request(
                exchange.kind, exchange.method, exchange.path, headers, data
            )
        except Exception as e:
            live.failure = str(e)
            self._mismatch(exchange, "request", "sent", str(e))
            return live
        live.request = d

        def arrived(response: Any) -> Deferred[None]:
            import treq

            live.response = response
            live.headersAt = self._now()

            def collect(data: bytes) -> None:
                live.raw += data
                documents, live.buffer = splitDocuments(live.buffer + data)
                at = self._now()
                live.documents.extend((at, document) for document in documents)

            return treq.collect(response, collect)

        def ended(ignored: None) -> None:
            live.end = self._now()

        def failed(failure: Failure) -> None:
            live.failure = failure.getErrorMessage() or repr(failure.value)

        d.addCallback(arrived).addCallbacks(ended, failed)
        return live

    def _lose(self, live: _Live) -> None:
        if live.finished:
            return
        if live.response is None:
            if live.request is not None:
                live.request.cancel()
            return
        original = getattr(live.response, "original", live.response)
        transport = getattr(original, "_transport", None)
        if transport is not None:
            transport.loseConnection()
        else:
            live.failure = "lost"

    def _check(self) -> None:
        for live in self._lives:
            self._checkLive(live)

    def _checkLive(self, live: _Live) -> None:
        exchange = live.exchange
        if live.response is not None and not live.headersChecked:
            live.headersChecked = True
            self._checkHeaders(live)
        if not self._jsonBodies(exchange):
            return
        while live.checked < len(live.documents):
            index = live.checked
            live.checked += 1
            at, document = live.documents[index]
            label = f"chunk {index + 1}"
            if index >= len(exchange.chunks):
                self._mismatch(exchange, f"{label} (unexpected)", None, document)
                continue
            chunk = exchange.chunks[index]
            assert chunk.body is not None
            for where, recorded, replayed in compareDocuments(
                chunk.body["json"],
                document,
                self.bindings,
                codeField=exchange.path.split("?")[0]
                .rstrip("/")
                .endswith("passphrase"),
            ):
                self._mismatch(exchange, f"{label} {where}", recorded, replayed)
            if abs(at - chunk.at) > self.tolerance:
                self._mismatch(exchange, f"{label} time (s)", chunk.at, round(at, 6))

    @staticmethod
    def _jsonBodies(exchange: Exchange) -> bool:
        return all(c.body is not None and "json" in c.body for c in exchange.chunks)

    def _checkHeaders(self, live: _Live) -> None:
        exchange = live.exchange
        response = live.response
        if exchange.status is not None and response.code != exchange.status:
            self._mismatch(exchange, "status", exchange.status, response.code)
        recorded = _lowerHeaders(exchange.responseHeaders)
        replayed = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        for name in sorted(set(recorded) | set(replayed)):
            if not (name.startswith("x-nl-") or name == "content-type"):
                continue
            if name not in replayed:
                self._mismatch(exchange, f"header {name}", recorded[name], None)
            elif name not in recorded:
                self._mismatch(exchange, f"header {name}", None, replayed[name])
            elif name == "x-nl-service-timestamp":
                self._checkServiceTimestamp(live, replayed[name])
            elif recorded[name] != replayed[name]:
                self._mismatch(
                    exchange, f"header {name}", recorded[name], replayed[name]
                )
        chunked = response.length is _unknownLength()
        if exchange.status is not None and exchange.chunked != chunked:
            self._mismatch(exchange, "chunked", exchange.chunked, chunked)
        if exchange.headersAt is not None and live.headersAt is not None:
            if abs(live.headersAt - exchange.headersAt) > self.tolerance:
                self._mismatch(
                    exchange,
                    "headers time (s)",
                    exchange.headersAt,
                    round(live.headersAt, 6),
                )

    def _checkServiceTimestamp(self, live: _Live, value: str) -> None:
        assert live.headersAt is not None
        nowMs = (self._start + live.headersAt) * 1000
        try:
            replayed = int(value)
        except ValueError:
            self._mismatch(live.exchange, "header x-nl-service-timestamp", "ms", value)
            return
        if abs(replayed - nowMs) > 1000 + self.tolerance * 1000:
            self._mismatch(
                live.exchange,
                "header x-nl-service-timestamp (not near the replay clock)",
                int(nowMs),
                replayed,
            )

    def _checkEnd(self, live: _Live) -> None:
        exchange = live.exchange
        if exchange.lost is not None:
            return
        if live.failure is not None and exchange.end is not None:
            self._mismatch(exchange, "response", "complete", live.failure)
            return
        if self._jsonBodies(exchange):
            if live.buffer.strip():
                self._mismatch(
                    exchange,
                    "body (trailing bytes)",
                    None,
                    live.buffer.decode("utf-8", "replace"),
                )
            for index in range(len(live.documents), len(exchange.chunks)):
                chunk = exchange.chunks[index]
                assert chunk.body is not None
                self._mismatch(
                    exchange, f"chunk {index + 1} (missing)", chunk.body["json"], None
                )
        else:
            recorded = b"".join(decodeBody(chunk.body) for chunk in exchange.chunks)
            if recorded != live.raw:
                self._mismatch(
                    exchange,
                    "body",
                    recorded.decode("utf-8", "replace"),
                    live.raw.decode("utf-8", "replace"),
                )
        if exchange.end is None:
            if live.end is not None:
                self._mismatch(
                    exchange, "end (recorded still open)", None, round(live.end, 6)
                )
        elif live.end is None:
            self._mismatch(exchange, "end (s)", exchange.end, None)
        elif abs(live.end - exchange.end) > self.tolerance:
            self._mismatch(exchange, "end (s)", exchange.end, round(live.end, 6))


def _unknownLength() -> Any:
    from twisted.web.iweb import UNKNOWN_LENGTH

    return UNKNOWN_LENGTH


def replayInMemory(
    fixture: Fixture,
    serverFactory: ServerFactory = memoryServer,
    startSeconds: float | None = None,
    tolerance: float = 0.01,
) -> ReplayResult:
    """
    Replay C{fixture} against a fresh in-memory server, synchronously.

    @param startSeconds: the replay clock's start; by default the
        recording's, so device-supplied times mean what they meant.
    """
    start = fixture.startSeconds if startSeconds is None else startSeconds
    target = MemoryTarget(start, serverFactory)
    d = Replayer(target, fixture, tolerance).run()
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError(f"{fixture.path}: the in-memory replay did not finish")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    result: ReplayResult = results[0]
    return result
