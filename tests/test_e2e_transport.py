# -*- test-case-name: tests.test_e2e_transport -*-
"""
The transport end to end: the real service (C{makeService}) on loopback TCP
ports with a real SQLite file, a thermostat played by treq and by a raw
socket, a command through the control port, and a restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived

from .e2e import DEVICE_HEADERS, BodyReader, LiveServiceTestCase, sleep
from .helpers import SERIAL, basicAuth, clientObject, objectsBody

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"
ENTRY_FORM = (
    b"reset=FALSE&mac=18B430000001&model=Diamond-2.6&request_id=1"
    b"&software_version=5.9.3-5&wireless_reg_domain=US"
)


class RawClient(Protocol):
    """A socket that records every byte the server sends."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._waiting = self._waiting, []
        for predicate, d in waiting:
            if predicate(self.received):
                d.callback(self.received)
            else:
                self._waiting.append((predicate, d))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)

    def waitFor(self, predicate: Callable[[bytes], bool]) -> Deferred[bytes]:
        if predicate(self.received):
            return succeed(self.received)
        d: Deferred[bytes] = Deferred()
        self._waiting.append((predicate, d))
        return d.addTimeout(10, reactor)


class TransportEndToEndTests(LiveServiceTestCase):
    """
    A device against the real service over TCP.
    """

    persistentConnections = True

    def setUp(self) -> None:
        super().setUp()
        self.raw: list[RawClient] = []

    async def closeConnections(self) -> None:
        for client in self.raw:
            if client.transport is not None and not client.closed.called:
                client.transport.loseConnection()
                await client.closed
        await super().closeConnections()

    async def listing(self, origin: str) -> Any:
        code, body = await self.json("GET", f"{origin}/nest/transport/device/{SERIAL}")
        self.assertEqual(code, 200)
        return body

    async def setTemperature(self, controlOrigin: str, value: float) -> tuple[int, Any]:
        """A C{set_temperature} command on the control port: its code and answer."""
        return await self.json(
            "POST",
            f"{controlOrigin}/command",
            data=json.dumps(
                {"serial": SERIAL, "command": "set_temperature", "value": value}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )

    # The tests

    def test_bootSubscribePushRestart(self) -> Deferred[None]:
        """
        A device boots (entry), puts its state and holds a subscribe; a
        command on the control port arrives as a chunk on the open
        connection; stopping the service ends the hold cleanly; a new
        service on the same data directory lists identical revisions and
        timestamps.
        """
        return self.asDeferred(self.bootSubscribePushRestart())

    async def bootSubscribePushRestart(self) -> None:
        deviceOrigin, controlOrigin = await self.start()
        port = deviceOrigin.rsplit(":", 1)[1]

        code, entry = await self.json(
            "POST",
            f"{deviceOrigin}/nest/entry",
            data=ENTRY_FORM,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-nl-device-id": SERIAL,
            },
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            entry["transport_url"], f"http://127.0.0.1:{port}/nest/transport"
        )

        code, receipts = await self.json(
            "POST",
            f"{deviceOrigin}/nest/transport/v7/put",
            data=json.dumps(
                {
                    "session": "s",
                    "objects": [
                        {
                            "object_key": SHARED,
                            "value": {
                                "target_temperature": 20.0,
                                "target_temperature_type": "heat",
                                "can_heat": True,
                                "can_cool": False,
                            },
                        },
                        {"object_key": DEVICE, "value": {"current_humidity": 41}},
                    ],
                }
            ).encode(),
            headers=DEVICE_HEADERS,
        )
        self.assertEqual(code, 200)
        held = {o["object_key"]: o for o in receipts["objects"]}
        self.assertEqual(set(held), {SHARED, DEVICE})

        response = await self.request(
            "POST",
            f"{deviceOrigin}/nest/transport/v7/subscribe",
            data=objectsBody(held.values()),
            headers=DEVICE_HEADERS,
        )
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(response.headers.getRawHeaders("x-nl-service-timestamp"))
        reader = BodyReader()
        response.deliverBody(reader)
        await sleep(0.2)
        self.assertEqual(reader.received, [])
        self.assertFalse(reader.finished.called)

        code, answer = await self.setTemperature(controlOrigin, 21.5)
        self.assertEqual((code, answer["success"]), (200, True))
        pushed = await reader.document()
        [bucket] = pushed["objects"]
        self.assertEqual(
            list(bucket),
            ["object_revision", "object_timestamp", "object_key", "value"],
        )
        self.assertEqual(bucket["object_key"], SHARED)
        self.assertEqual(bucket["object_revision"], held[SHARED]["object_revision"] + 1)
        self.assertGreater(bucket["object_timestamp"], held[SHARED]["object_timestamp"])
        self.assertEqual(bucket["value"]["target_temperature"], 21.5)
        self.assertIs(bucket["value"]["target_change_pending"], True)
        self.assertIs(bucket["value"]["can_heat"], True)
        self.assertFalse(reader.finished.called)

        before = await self.listing(deviceOrigin)
        self.assertEqual(
            {o["object_key"]: o["object_revision"] for o in before["objects"]},
            {
                SHARED: bucket["object_revision"],
                DEVICE: held[DEVICE]["object_revision"],
            },
        )

        # Shutdown ends the held subscribe at once, cleanly.
        await self.stop(self.services[-1])
        await reader.finished
        await self.pool.closeCachedConnections()

        deviceOrigin, controlOrigin = await self.start()
        after = await self.listing(deviceOrigin)
        self.assertEqual(after, before)
        for listed in after["objects"]:
            self.assertNotIn("value", listed)

        # The restarted server answers a subscribe in sync by holding it.
        response = await self.request(
            "POST",
            f"{deviceOrigin}/nest/transport",
            data=objectsBody(
                clientObject(
                    o["object_key"], o["object_revision"], o["object_timestamp"]
                )
                for o in after["objects"]
            ),
            headers=DEVICE_HEADERS,
        )
        reader = BodyReader()
        response.deliverBody(reader)
        await sleep(0.1)
        self.assertEqual(reader.received, [])
        await self.stop(self.services[-1])
        await reader.finished

    def test_rawHeldSubscribe(self) -> Deferred[None]:
        """
        On the wire, a held subscribe's header block (with
        C{Transfer-Encoding: chunked} and the X-nl headers) arrives at once
        and alone; a push then arrives as one chunk.
        """
        return self.asDeferred(self.rawHeldSubscribe())

    async def rawHeldSubscribe(self) -> None:
        deviceOrigin, controlOrigin = await self.start()
        port = int(deviceOrigin.rsplit(":", 1)[1])

        body = objectsBody(
            [clientObject(SHARED, value={"can_heat": True, "target_temperature": 19.0})]
        )
        code, first = await self.json(
            "POST", f"{deviceOrigin}/nest/transport", data=body, headers=DEVICE_HEADERS
        )
        [stored] = first["objects"]

        client = RawClient()
        self.raw.append(client)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        held = objectsBody(
            [
                clientObject(
                    SHARED, stored["object_revision"], stored["object_timestamp"]
                )
            ]
        )
        assert client.transport is not None
        client.transport.write(
            b"POST /nest/transport HTTP/1.1\r\n"
            b"Host: 127.0.0.1:%d\r\n"
            b"Authorization: %s\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (port, basicAuth()["Authorization"].encode(), len(held), held)
        )
        received = await client.waitFor(lambda data: b"\r\n\r\n" in data)
        await sleep(0.2)
        head, _, rest = client.received.partition(b"\r\n\r\n")
        self.assertEqual(rest, b"")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 200 OK")
        headers = {
            name.lower(): value
            for name, _, value in (line.partition(b": ") for line in lines[1:])
        }
        self.assertEqual(headers[b"transfer-encoding"], b"chunked")
        self.assertNotIn(b"content-length", headers)
        self.assertEqual(headers[b"x-nl-suspend-time-max"], b"300")
        self.assertEqual(headers[b"x-nl-defer-device-window"], b"15")
        self.assertGreater(int(headers[b"x-nl-service-timestamp"]), 1_700_000_000_000)
        self.assertTrue(received)

        code, answer = await self.setTemperature(controlOrigin, 22.0)
        self.assertEqual(code, 200)

        def oneChunk(data: bytes) -> bool:
            body = data.partition(b"\r\n\r\n")[2]
            size, _, rest = body.partition(b"\r\n")
            return bool(size) and len(rest) >= int(size, 16) + 2

        data = await client.waitFor(oneChunk)
        body = data.partition(b"\r\n\r\n")[2]
        size, _, rest = body.partition(b"\r\n")
        document = json.loads(rest[: int(size, 16)])
        self.assertEqual(document["objects"][0]["value"]["target_temperature"], 22.0)

    def test_resubscribeDuringShutdown(self) -> Deferred[None]:
        """
        A device that resubscribes the moment shutdown ends its hold is
        never answered with a 500: its connection is closed after the hold
        ends, and a request that still gets through is a JSON 503.
        """
        return self.asDeferred(self.resubscribeDuringShutdown())

    async def resubscribeDuringShutdown(self) -> None:
        deviceOrigin, controlOrigin = await self.start()
        body = objectsBody([clientObject(SHARED, 1, 5)])
        url = f"{deviceOrigin}/nest/transport"
        response = await self.request("POST", url, data=body, headers=DEVICE_HEADERS)
        reader = BodyReader()
        response.deliverBody(reader)
        await sleep(0.1)
        stopping = self.services[-1].stopService()
        await reader.finished
        self.assertEqual(reader.received, [])
        try:
            again = await self.request("POST", url, data=body, headers=DEVICE_HEADERS)
        except (ConnectError, ResponseNeverReceived, RequestTransmissionFailed):
            pass
        else:
            self.assertEqual(again.code, 503)
            self.assertEqual(
                json.loads(await treq.content(again))["code"], "unavailable"
            )
        await stopping
        self.assertEqual(self.flushLoggedErrors(), [])
