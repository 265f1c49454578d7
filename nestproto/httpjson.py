# -*- test-case-name: tests.test_device_api -*-
"""
JSON in and out of HTTP, shared by the device and control APIs.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from klein.resource import KleinResource
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from .errors import BodyTooLarge, NestError


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


def errorDocument(failure: Failure) -> tuple[int, dict[str, str]]:
    """
    The status and JSON body for a refused request: a L{NestError} or a
    routing error (unknown path, wrong method).

    The device side's error bodies carry the human sentence under C{error}
    (PROTOCOL.md §2.3, e.g. C{{"error": "Device serial required"}}) and the
    machine word under C{code}.
    """
    error = failure.value
    if isinstance(error, NestError):
        return error.status, {"error": str(error), "code": error.code}
    if isinstance(error, HTTPException):
        status = error.code or 400
        words = (error.name or "error").lower().replace(" ", "_")
        return status, {"error": error.name, "code": words}
    raise TypeError(f"not a request error: {error!r}")


class JSONKlein(Klein):
    """
    A Klein app whose every answer is JSON from the app's own handlers.

    Its resource answers a URL that is not UTF-8 with a JSON 400: Klein
    itself answers it with a text body and logs an error, before any of the
    app's error handlers can run. Its routes do not merge repeated slashes:
    werkzeug answers C{/nest//entry} with a 308 that, rendered by an error
    handler, carries no C{Location} and so leads nowhere; such a path is
    simply not found.
    """

    def __init__(self) -> None:
        super().__init__()
        self.url_map.merge_slashes = False

    def resource(self) -> KleinResource:
        return _JSONKleinResource(self)


class _JSONKleinResource(KleinResource):
    def render(self, request: IRequest) -> Any:
        try:
            request.getRequestHostname().decode("utf-8")
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            # Both ports' clients read "error" or "message" (PROTOCOL.md
            # §16.6); the device ignores error bodies.
            message = "URL is not UTF-8"
            return jsonResponse(
                request,
                {
                    "success": False,
                    "error": message,
                    "message": message,
                    "code": "bad_url",
                },
                400,
            )
        return super().render(request)
