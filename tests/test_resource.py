# -*- test-case-name: tests.test_resource -*-
"""
Tests for L{nestproto.resource}, through a L{nestproto.router.Router}'s
resource: requests are freed by reference counting once they are over,
with the cyclic collector off (issue 10).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, ClassVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site
from zope.interface import implementer

from nestproto.errors import BadBody, ErrorShape
from nestproto.httpjson import jsonResponse
from nestproto.router import IGate, OpenGate, Route, Router


@implementer(IGate)
class _App:
    """An app with an answered, a held and a refused route, and no policy."""

    app: ClassVar[Router] = Router(ErrorShape.DEVICE)

    def __init__(self) -> None:
        self.held: list[Deferred[bytes]] = []
        self.cancelled = 0

    def enter(self, request: IRequest) -> bytes | None:
        return OpenGate().enter(request)

    def admit(self, request: IRequest, route: Route) -> None:
        OpenGate().admit(request, route)

    @app.route("/answer", methods=["GET"])
    def answer(self, request: IRequest) -> bytes:
        return jsonResponse(request, {"answered": True})

    @app.route("/held", methods=["POST"])
    def hold(self, request: IRequest) -> Deferred[bytes]:
        request.write(b"")
        d: Deferred[bytes] = Deferred(self._cancelled)
        self.held.append(d)
        return d

    def _cancelled(self, d: Deferred[bytes]) -> None:
        self.cancelled += 1

    @app.route("/", methods=["GET"])
    def root(self, request: IRequest) -> bytes:
        return jsonResponse(request, {"root": True})

    @app.route("/named/<name>", methods=["GET"])
    def named(self, request: IRequest, name: str) -> bytes:
        return jsonResponse(request, {"name": name})

    @app.route("/refused", methods=["GET"])
    def refuse(self, request: IRequest) -> bytes:
        raise BadBody("Refused on purpose")


class RequestFreedTests(SynchronousTestCase):
    """
    A request through the real resource is freed once it is over, without
    the cyclic collector: Klein's own render left each one in a reference
    cycle (its error-handling closure refers to itself and to the request).
    """

    def setUp(self) -> None:
        # The collector must not free what a cycle holds while we watch.
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        self.app = _App()
        self.site = Site(self.app.app.resource(), reactor=Clock())
        self.requests: list[weakref.ref[Request]] = []
        makeRequest = self.site.requestFactory

        def recorded(*args: Any, **kwargs: Any) -> Request:
            request = makeRequest(*args, **kwargs)
            self.requests.append(weakref.ref(request))
            return request

        self.site.requestFactory = recorded  # type: ignore[assignment]

    def connect(self) -> tuple[IProtocol, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def send(self, channel: IProtocol, method: bytes, path: bytes) -> None:
        channel.dataReceived(
            b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
            % (method, path)
        )

    def assertFreed(self) -> None:
        self.assertEqual(len(self.requests), 1)
        self.assertIsNone(self.requests[0](), "the request outlived its answer")

    def test_answeredRequestFreed(self) -> None:
        """
        A request answered at once is freed as soon as it is answered, its
        connection still open.
        """
        channel, transport = self.connect()
        self.send(channel, b"GET", b"/answer")
        self.assertIn(b"200 OK", transport.value())
        self.assertIn(b'{"answered":true}', transport.value())
        self.assertFreed()

    def test_refusedRequestFreed(self) -> None:
        """
        A request whose handler raises is answered by the router's error
        rendering and freed.
        """
        channel, transport = self.connect()
        self.send(channel, b"GET", b"/refused")
        self.assertIn(b"400 Bad Request", transport.value())
        self.assertIn(b"Refused on purpose", transport.value())
        self.assertFreed()

    def test_unroutedRequestFreed(self) -> None:
        """
        A request no route takes gets the router's JSON 404 and is freed.
        """
        channel, transport = self.connect()
        self.send(channel, b"GET", b"/nowhere")
        self.assertIn(b"404 Not Found", transport.value())
        self.assertFreed()

    def test_heldRequestFreedWhenClientLeaves(self) -> None:
        """
        A held request whose client disconnects has its handler's Deferred
        cancelled, and is freed with its connection.
        """
        channel, transport = self.connect()
        self.send(channel, b"POST", b"/held")
        self.assertNoResult(self.app.held[0])
        self.assertIsNotNone(self.requests[0]())
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.app.cancelled, 1)
        # As a reactor's transport does once the connection is lost; the
        # channel itself keeps its last requests.
        transport.unregisterProducer()
        del channel, transport
        self.app.held.clear()
        self.assertFreed()

    def test_heldRequestFreedWhenAnswered(self) -> None:
        """
        A held request answered later is freed once that answer is written.
        """
        channel, transport = self.connect()
        self.send(channel, b"POST", b"/held")
        [held] = self.app.held
        held.callback(b'{"late":true}')
        del held
        self.app.held.clear()
        self.assertIn(b'{"late":true}', transport.value())
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))
        self.assertFreed()


class RoutingTests(SynchronousTestCase):
    """
    The resource routes as Klein does, remembering werkzeug's matches.
    """

    def setUp(self) -> None:
        self.site = Site(_App().app.resource(), reactor=Clock())
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        assert channel is not None
        self.channel = channel
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def get(self, path: bytes, method: bytes = b"GET") -> bytes:
        self.transport.clear()
        self.channel.dataReceived(
            b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
            % (method, path)
        )
        answer: bytes = self.transport.value()
        return answer

    def test_argumentsOfEachPath(self) -> None:
        """
        Each path gets its own route arguments, the first time and again.
        """
        for _ in range(2):
            self.assertIn(b'{"name":"one"}', self.get(b"/named/one"))
            self.assertIn(b'{"name":"two"}', self.get(b"/named/two"))

    def test_methodIsPartOfTheMatch(self) -> None:
        """
        A path matched for one method is still refused for another.
        """
        self.assertIn(b"200 OK", self.get(b"/answer"))
        self.assertIn(b"405 Method Not Allowed", self.get(b"/answer", b"POST"))
        self.assertIn(b"200 OK", self.get(b"/answer"))

    def test_refusalsAreNotKept(self) -> None:
        """
        An unknown path is refused each time it is asked for.
        """
        for _ in range(2):
            self.assertIn(b"404 Not Found", self.get(b"/nowhere"))

    def test_rootPath(self) -> None:
        """
        C{/} is routed as Klein routes it (a path of one empty segment is
        C{/}, not the empty path werkzeug redirects), the first time and
        again.
        """
        for _ in range(2):
            self.assertIn(b'{"root":true}', self.get(b"/"))
