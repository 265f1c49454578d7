# -*- test-case-name: tests.test_control_api -*-
"""
The user-facing HTTP API: reading and changing thermostats.
"""

from __future__ import annotations

from typing import ClassVar

from attrs import frozen
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from ..errors import NestError
from ..httpjson import errorDocument, jsonResponse
from ..state import DeviceState


@frozen(kw_only=True, eq=False)
class ControlAPI:
    """The control port's Klein app."""

    app: ClassVar[Klein] = Klein()
    log: ClassVar[Logger] = Logger()

    state: DeviceState

    @app.handle_errors(NestError, HTTPException)
    def refused(self, request: IRequest, failure: Failure) -> bytes:
        status, document = errorDocument(failure)
        return jsonResponse(request, document, status)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("error handling {path}", failure, path=request.path)
        return jsonResponse(
            request, {"error": "Internal error", "code": "internal"}, 500
        )

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return jsonResponse(
            request,
            {
                "status": "ok",
                "timestamp": self.state.nowMs(),
                "devices": len(self.state.knownSerials()),
                "subscriptions": self.state.hub.total(),
            },
        )
