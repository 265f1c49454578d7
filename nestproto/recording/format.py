# -*- test-case-name: tests.test_fixtures -*-
"""
The fixture file format: JSON lines, a header line naming the C{format}
version, then one line per exchange (fixtures/README.rst has the fields).

Here are the version, the kinds of exchange, how a body is stored,
writing a file's lines, the values a file reads into and L{loadFixture},
which checks a file and names the file and line of the first problem.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from attrs import evolve, frozen

from .._version import __version__

#: Version of the fixture format; the first line of every file names it.
FORMAT_VERSION = 1
#: File kinds of exchange.
DEVICE = "device"
CONTROL = "control"
KINDS = frozenset({DEVICE, CONTROL})


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


# Writing


def startFile(path: str, serial: str | None, startMs: int, redacted: bool) -> None:
    """
    Create the fixture file C{path} holding only its header line.

    @param startMs: the server's time at the first exchange; every time in
        the file is an offset from it.
    """
    header = {
        "format": FORMAT_VERSION,
        "serial": serial,
        "startMs": startMs,
        "redacted": redacted,
        "server": f"nestproto {__version__}",
    }
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(header) + "\n")


def appendExchange(path: str, document: dict[str, Any]) -> None:
    """Add one exchange line, C{document}, to the fixture file C{path}."""
    # Opened for each line: a server may see thousands of devices, and
    # a line is on disk once written, whatever happens to the process.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(document) + "\n")


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


def isNumber(value: Any) -> bool:
    """A JSON number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        if moment is not None and not isNumber(moment):
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
