"""
Tests for L{nestproto.channel}: a connection's addresses, asked of its
transport once.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

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


class _Addresses(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, object]] = []

    def render_GET(self, request: Request) -> bytes:
        self.seen.append((request.getHost(), request.getClientAddress()))
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

    def test_deviceChannelTolerant(self) -> None:
        """The device port's channel keeps its addresses too."""
        self.assertTrue(issubclass(TolerantHTTPChannel, AddressKeepingHTTPChannel))
