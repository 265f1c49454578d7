# -*- test-case-name: tests.test_router -*-
"""
Tests for L{nestproto.router} and L{nestproto.errors}: one router per port
that runs its gate for every request and every route, and one mapping from
an error to an answer.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from typing import Any, ClassVar

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer
from zope.interface.verify import verifyObject

import nestproto
from nestproto import errors
from nestproto.errors import (
    BadBody,
    ErrorShape,
    NestError,
    TooManyAttempts,
    Unauthorized,
    refusal,
)
from nestproto.httpjson import jsonResponse
from nestproto.router import IGate, OpenGate, Route, Router

from .helpers import completed, makeServer
from .stub import StubClient

URL = "http://192.168.1.10:8082"


@implementer(IGate)
@define
class _Gated:
    """A tiny app whose gate records what it saw and refuses on demand."""

    app: ClassVar[Router] = Router(ErrorShape.CONTROL, secretPrefix=b"k")

    entered: list[bytes] = field(factory=list)
    admitted: list[Route] = field(factory=list)
    refuseEntry: bool = False
    refuseRoute: bool = False

    def enter(self, request: IRequest) -> bytes | None:
        self.entered.append(request.path)
        if self.refuseEntry:
            raise BadBody("refused at the door")
        return None

    def admit(self, request: IRequest, route: Route) -> None:
        self.admitted.append(route)
        if self.refuseRoute:
            raise Unauthorized()

    @app.route("/open", methods=["GET"])
    @app.public
    def open(self, request: IRequest) -> bytes:
        return jsonResponse(request, {"open": True})

    @app.route("/thing/<name>", methods=["GET", "POST"])
    def thing(self, request: IRequest, name: str) -> bytes:
        return jsonResponse(request, {"name": name})

    @app.route("/broken", methods=["GET"])
    def broken(self, request: IRequest) -> bytes:
        raise ZeroDivisionError("a bug")

    @app.route("/later", methods=["GET"])
    def later(self, request: IRequest) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        d.errback(KeyError("a late bug"))
        return d


class RefusalTests(SynchronousTestCase):
    """L{refusal}: the one mapping from an error to status, body and headers."""

    def test_nestErrorBothShapes(self) -> None:
        """
        A L{NestError} is its status; the device body is C{error} and
        C{code}, the control body adds C{success} and C{message}.
        """
        error = BadBody("Invalid JSON")
        device = refusal(error, ErrorShape.DEVICE)
        control = refusal(error, ErrorShape.CONTROL)
        self.assertEqual(
            (device.status, device.document, device.headers),
            (400, {"error": "Invalid JSON", "code": "bad_body"}, {}),
        )
        self.assertEqual(
            (control.status, control.document),
            (
                400,
                {
                    "success": False,
                    "error": "Invalid JSON",
                    "message": "Invalid JSON",
                    "code": "bad_body",
                },
            ),
        )

    def test_routingErrors(self) -> None:
        """werkzeug's routing errors keep their status; the code is the name."""
        self.assertEqual(
            refusal(NotFound(), ErrorShape.DEVICE).document,
            {"error": "Not Found", "code": "not_found"},
        )
        answer = refusal(MethodNotAllowed(), ErrorShape.CONTROL)
        self.assertEqual(
            (answer.status, answer.document["code"], answer.document["message"]),
            (405, "method_not_allowed", "Method Not Allowed"),
        )

    def test_bug(self) -> None:
        """Any other exception is a 500 that says nothing of it."""
        answer = refusal(KeyError("secret detail"), ErrorShape.CONTROL)
        self.assertEqual(answer.status, 500)
        self.assertEqual(answer.document["code"], "internal")
        self.assertNotIn("secret", json.dumps(answer.document))

    def test_headers(self) -> None:
        """Errors that need a header carry it: Retry-After, WWW-Authenticate."""
        self.assertEqual(
            refusal(TooManyAttempts(30), ErrorShape.CONTROL).headers,
            {b"retry-after": b"30"},
        )
        self.assertEqual(
            refusal(Unauthorized(), ErrorShape.CONTROL).headers,
            {b"www-authenticate": b'Bearer realm="nestproto"'},
        )


class HierarchyTests(SynchronousTestCase):
    """Every error nestproto answers with is one of L{nestproto.errors}."""

    def test_oneModule(self) -> None:
        """
        Every L{NestError} subclass in the package is defined in
        C{nestproto.errors}, where the mapping is.
        """
        found: dict[str, str] = {}
        for module in pkgutil.walk_packages(nestproto.__path__, "nestproto."):
            if module.name.endswith("__main__"):
                continue
            loaded = importlib.import_module(module.name)
            for name, value in vars(loaded).items():
                if inspect.isclass(value) and issubclass(value, NestError):
                    found[name] = value.__module__
        self.assertIn("CommandError", found)
        self.assertIn("TooManyAttempts", found)
        self.assertEqual(
            {name for name, module in found.items() if module != errors.__name__},
            set(),
        )


class RouterTests(SynchronousTestCase):
    """L{Router}: its gate for every request and route, its errors as JSON."""

    def setUp(self) -> None:
        self.app = _Gated()
        self.client = StubClient(self.app.app.resource())

    def get(self, path: str, method: str = "GET") -> tuple[int, Any]:
        d = self.client.request(method, URL + path)
        response, body = completed(self, self.client, d)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        return response.code, json.loads(body)

    def test_gateProvided(self) -> None:
        """Both ports' apps provide the gate their router asks for."""
        server = makeServer()
        verifyObject(IGate, server.device)
        verifyObject(IGate, server.control)
        verifyObject(IGate, OpenGate())
        self.assertIs(server.control.app.gate(), server.control)

    def test_enterEveryRequest(self) -> None:
        """
        The gate's C{enter} runs for every request, routed or not; C{admit}
        only for routes, with the route's name.
        """
        self.assertEqual(self.get("/thing/a"), (200, {"name": "a"}))
        self.assertEqual(self.get("/nowhere")[0], 404)
        self.assertEqual(self.get("/open", "POST")[0], 405)
        self.assertEqual(self.app.entered, [b"/thing/a", b"/nowhere", b"/open"])
        self.assertEqual(self.app.admitted, [Route("thing")])

    def test_public(self) -> None:
        """A route marked public is told so to its gate."""
        self.get("/open")
        self.assertEqual(self.app.admitted, [Route("open", public=True)])
        self.assertTrue(_Gated.app.isPublic("open"))
        self.assertFalse(_Gated.app.isPublic("thing"))

    def test_refusedAtEntry(self) -> None:
        """A refusal at C{enter} is answered before routing, as JSON."""
        self.app.refuseEntry = True
        status, document = self.get("/thing/a")
        self.assertEqual((status, document["code"]), (400, "bad_body"))
        self.assertEqual(self.app.admitted, [])

    def test_refusedAtRoute(self) -> None:
        """A refusal at C{admit} keeps the handler from running."""
        self.app.refuseRoute = True
        d = self.client.get(URL + "/thing/a")
        response, body = completed(self, self.client, d)
        self.assertEqual(response.code, 401)
        self.assertEqual(
            response.headers.getRawHeaders("www-authenticate"),
            ['Bearer realm="nestproto"'],
        )
        self.assertEqual(json.loads(body)["code"], "unauthorized")

    def test_secretPrefix(self) -> None:
        """
        Every route is served under C{/k/<secret>/} too; the route matched is
        the same and the gate gets the secret.
        """
        self.assertEqual(self.get("/k/s3cret/thing/b"), (200, {"name": "b"}))
        self.assertEqual(self.app.admitted, [Route("thing", False, b"s3cret")])
        self.assertEqual(self.get("/k/s3cret")[0], 404)
        self.assertEqual(self.get("/k")[0], 404)

    def test_bugsLoggedWithoutSecret(self) -> None:
        """
        A handler's bug, raised or late, is a JSON 500 and a logged failure
        whose path does not carry a path secret.
        """
        with capturedLogs() as events:
            status, document = self.get("/k/s3cret/broken")
            self.assertEqual((status, document["code"]), (500, "internal"))
            status, document = self.get("/later")
            self.assertEqual((status, document["success"]), (500, False))
        failures = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(
            [e["path"] for e in failures], ["/k/redacted/broken", "/later"]
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertNotIn("s3cret", repr(events))

    def test_badURL(self) -> None:
        """A URL that is not UTF-8 is a JSON 400 in the port's shape."""
        status, document = self.get("/thing/%ff")
        self.assertEqual(
            (status, document["code"], document["success"]), (400, "bad_url", False)
        )
        self.assertEqual(self.app.entered, [])
