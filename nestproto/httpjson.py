# -*- test-case-name: tests.test_router -*-
"""
JSON in and out of HTTP, shared by the device and control APIs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.web.iweb import IRequest

from .errors import BodyTooLarge

#: json.dumps with arguments builds an encoder per call; this one is kept.
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_HOST_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?$")


def jsonResponse(request: IRequest, document: Any, status: int = 200) -> bytes:
    """Set the status and JSON content type, and return the encoded body."""
    return encodedResponse(request, _COMPACT.encode(document), status)


def encodedResponse(request: IRequest, text: str, status: int = 200) -> bytes:
    """L{jsonResponse} of a document already encoded with L{compactJSON}."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return text.encode("utf-8")


def compactJSON(document: Any) -> str:
    """C{document} as L{jsonResponse} encodes it."""
    return _COMPACT.encode(document)


def readBody(request: IRequest, limit: int) -> bytes:
    """
    The request body, refused past C{limit} bytes.

    @raise BodyTooLarge: when the body is longer than C{limit}.
    """
    request.content.seek(0)
    body: bytes = request.content.read(limit + 1)
    if len(body) > limit:
        raise BodyTooLarge(f"Body larger than {limit} bytes")
    return body


def requestOrigin(request: IRequest) -> str:
    """
    C{scheme://host:port} as the client reached us, always with an explicit
    port: without one the firmware mis-parses the port and push can no
    longer wake it (PROTOCOL.md §1). A Host header without a port means the
    scheme's default port. On the control port this is the API's own
    origin, the one its browser pages may call it from.
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
