"""
Tests for L{nestproto.channel}: a connection's addresses, asked of its
transport once.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import directlyProvides

from nestproto.channel import AddressKeepingHTTPChannel
from nestproto.device.requestline import TolerantHTTPChannel
from nestproto.service import _site

HOST = IPv4Address("TCP", "192.168.1.10", 8000)
PEER = IPv4Address("TCP", "192.168.1.20", 4242)


class CountingTransport(StringTransport):
    """A StringTransport that counts the questions about its addresses."""

    def __init__(self) -> None:
        super().__init__(hostAddress=HOST, peerAddress=PEER)
        self.asked = {"host": 0, "peer": 0}

    def getHost(self) -> IPv4Address:
        self.asked["host"] += 1
        return HOST

    def getPeer(self) -> IPv4Address:
        self.asked["peer"] += 1
        return PEER


class NoDelayTransport(StringTransport):
    """A StringTransport that a TLS one can be said to be."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class _Addresses(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, object]] = []
        self.secure: list[bool] = []
        self.paths: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        self.seen.append((request.getHost(), request.getClientAddress()))
        self.secure.append(request.isSecure())
        self.paths.append(request.path)
        return b"ok"


class AddressKeepingTests(SynchronousTestCase):
    def test_addressesAskedOncePerConnection(self) -> None:
        """
        Three requests on one connection see its addresses; the transport
        is asked for each once.
        """
        for tolerant in (False, True):
            resource = _Addresses()
            site = _site(resource, tolerant=tolerant)
            site.timeOut = None
            channel = site.buildProtocol(PEER)
            assert channel is not None
            transport = CountingTransport()
            channel.makeConnection(transport)
            for _ in range(3):
                channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            self.assertEqual(resource.seen, [(HOST, PEER)] * 3)
            self.assertEqual(transport.asked, {"host": 1, "peer": 1})
            self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)

    def serve(
        self, transport: StringTransport, requests: list[bytes], tolerant: bool
    ) -> _Addresses:
        resource = _Addresses()
        site = _site(resource, tolerant=tolerant)
        site.timeOut = None
        channel = site.buildProtocol(PEER)
        assert channel is not None
        channel.makeConnection(transport)
        for request in requests:
            channel.dataReceived(request)
        return resource

    def test_secureAsTheTransportIs(self) -> None:
        """
        Every request on a connection is secure when its transport is a TLS
        one, and not otherwise.
        """
        for secure in (False, True):
            transport = NoDelayTransport(hostAddress=HOST, peerAddress=PEER)
            if secure:
                directlyProvides(transport, ISSLTransport)
            request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
            resource = self.serve(transport, [request] * 2, tolerant=True)
            self.assertEqual(resource.secure, [secure] * 2)

    def test_deviceChannelTolerant(self) -> None:
        """
        The device port's channel keeps its addresses too, and still reads a
        request line with spaces in its target, whose header lines may end
        as a request line does.
        """
        self.assertTrue(issubclass(TolerantHTTPChannel, AddressKeepingHTTPChannel))
        resource = self.serve(
            StringTransport(hostAddress=HOST, peerAddress=PEER),
            [
                b"GET /d/device.S ._sync HTTP/1.1\r\n"
                b"Host: h\r\nX-Note: GET /a b HTTP/1.1\r\n\r\n"
            ],
            tolerant=True,
        )
        self.assertEqual(resource.paths, [b"/d/device.S%20._sync"])
