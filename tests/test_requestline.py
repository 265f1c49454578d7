# -*- test-case-name: tests.test_requestline -*-
"""
Request lines with spaces inside the target (PROTOCOL.md §20.2, scenario
61): the pure rewrite, and raw sockets against the real service.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase

from nestproto.device.requestline import tolerantRequestLine

from .e2e import DEVICE_HEADERS, LiveServiceTestCase
from .helpers import SERIAL, basicAuth
from .test_e2e_transport import RawClient

SHARED = f"shared.{SERIAL}"


def dechunked(head: bytes, body: bytes) -> bytes:
    """C{body} without its chunked framing, when C{head} says it has one."""
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    data = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            return data
        data += rest[:length]
        body = rest[length + 2 :]


class RewriteTests(SynchronousTestCase):
    """L{tolerantRequestLine}."""

    def test_spacesInTargetEscaped(self) -> None:
        """The tokens between method and version are the target, spaces kept."""
        self.assertEqual(
            tolerantRequestLine(
                b"GET /nest/transport/v3/device/device.S ._sync HTTP/1.1"
            ),
            b"GET /nest/transport/v3/device/device.S%20._sync HTTP/1.1",
        )
        self.assertEqual(
            tolerantRequestLine(b"GET /d/device.S .$version .$version HTTP/1.0"),
            b"GET /d/device.S%20.$version%20.$version HTTP/1.0",
        )

    def test_otherLinesUntouched(self) -> None:
        """Well-formed request lines, headers and odd lines are left alone."""
        for line in [
            b"GET /nest/entry HTTP/1.1",
            b"Host: a b c HTTP/1.1",
            b"X-Thing: GET /a b HTTP/1.1",
            b" folded GET /a b HTTP/1.1",
            b"GET /a b HTTP/2.0",
            b"get /a b HTTP/1.1",
            b"",
        ]:
            self.assertEqual(tolerantRequestLine(line), line)


class RawSocketTests(LiveServiceTestCase):
    """A 4.x thermostat's odd request lines against the real listener."""

    async def raw(self, origin: str, request: bytes) -> bytes:
        """Send C{request} on a fresh socket; everything until it closes."""
        port = int(origin.rsplit(":", 1)[1])
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        assert client.transport is not None
        client.transport.write(request)
        await client.closed
        return client.received

    def test_scenario61SpacedBigGet(self) -> Deferred[None]:
        """
        Scenario 61: C{GET …/v3/device/device.S ._sync HTTP/1.1} is served
        with a 200 and the device's buckets, not refused with a 400.
        """
        return self.asDeferred(self.spacedBigGet())

    async def spacedBigGet(self) -> None:
        device, control = await self.start()
        code, _ = await self.json(
            "POST",
            f"{device}/nest/transport/v3/put",
            data=json.dumps({"shared": {SERIAL: {"target_temperature": 20}}}).encode(),
            headers=DEVICE_HEADERS,
        )
        self.assertEqual(code, 200)
        received = await self.raw(
            device,
            b"GET /nest/transport/v3/device/device.%s ._sync HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
            % (SERIAL.encode(), basicAuth()["Authorization"].encode()),
        )
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        document = json.loads(dechunked(head, body))
        self.assertEqual(document["shared"][SERIAL]["target_temperature"], 20)

    def test_spacedPutStoredCanonical(self) -> Deferred[None]:
        """
        A put whose request line is mutated is served, and its mangled key
        is stored under the canonical one (scenario 66).
        """
        return self.asDeferred(self.spacedPut())

    async def spacedPut(self) -> None:
        device, control = await self.start()
        body = b'{"shared":{"%s ._sync":{"target_temperature":21.5}}}' % (
            SERIAL.encode(),
        )
        received = await self.raw(
            device,
            b"POST /nest/transport/v3/put ._sync HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nAuthorization: %s\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (basicAuth()["Authorization"].encode(), len(body), body),
        )
        head, _, answer = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertNotIn(b"target_temperature", answer)
        code, listing = await self.json(
            "GET",
            f"{device}/nest/transport/v3/device/device.{SERIAL}",
            headers=basicAuth(),
        )
        self.assertEqual(listing["shared"][SERIAL]["target_temperature"], 21.5)
        self.assertEqual(list(listing["shared"]), [SERIAL])

    def test_controlPortStaysStrict(self) -> Deferred[None]:
        """Only the device port is tolerant: the control port answers 400."""
        return self.asDeferred(self.controlStrict())

    async def controlStrict(self) -> None:
        device, control = await self.start()
        received = await self.raw(
            control, b"GET /health x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 400 "), received)

    def test_wellFormedLineUnchanged(self) -> Deferred[None]:
        """A plain request line on the device port is served as before."""
        return self.asDeferred(self.wellFormed())

    async def wellFormed(self) -> None:
        device, control = await self.start()
        received = await self.raw(
            device,
            b"GET /nest/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertIn(b'"status":"ok"', received)
