# -*- test-case-name: tests.test_router -*-
"""
JSON in and out of HTTP, shared by the device and control APIs.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

from .errors import BodyTooLarge


def jsonResponse(request: IRequest, document: Any, status: int = 200) -> bytes:
    """Set the status and JSON content type, and return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


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
