# -*- test-case-name: tests.test_cyclic_garbage -*-
"""
What a held subscribe leaves behind when it dies: nothing in a reference
cycle. The collector (L{nestproto.collector}) freezes every survivor of a
full collection, and a frozen object that later becomes cyclic garbage
stays until a thaw; so the objects of a subscribe, a put and a connection
must be freed by reference counting alone.

Real TCP on loopback: an in-memory transport (C{StringTransport}) keeps its
protocol as C{producer} and so makes a cycle of its own, which
C{tcp.Server} does not (it drops C{protocol} and C{producer} when the
connection is lost). The server is the device and control sites exactly as
C{service.py} builds them, over a real SQLite file, its hub on a
L{twisted.internet.task.Clock}. The client is a raw HTTP/1.1 protocol in
this process; it keeps no cycles either, so the garbage a run leaves is
asserted empty outright.
"""

from __future__ import annotations

import gc
import json
import socket
import struct
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConnector, IListeningPort
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.tcp import Server as TCPServer
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from nestproto.hub import BATCH_SECONDS
from nestproto.service import _site

from .helpers import basicAuth, clientObject, makeServer, objectsBody

#: Iterations run before measuring: caches, interned strings and lazily
#: built objects settle first.
WARMUP = 3
#: Iterations measured.
MEASURED = 20
HOLD_SECONDS = 290.0


def _sharedValue() -> dict[str, Any]:
    return {
        "name": "Hallway",
        "target_temperature": 20.0,
        "target_temperature_type": "heat",
        "target_temperature_low": 19.0,
        "target_temperature_high": 24.0,
        "current_temperature": 21.14,
        "can_heat": True,
        "can_cool": True,
    }


def _head(data: bytes) -> tuple[int, dict[bytes, bytes], bytes] | None:
    """Status, headers (lower-case names) and the rest; C{None} if incomplete."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(b" ", 2)[1]), headers, rest


def _chunks(data: bytes) -> list[bytes]:
    """The complete chunks at the start of a chunked body (the last one empty)."""
    found: list[bytes] = []
    while True:
        size, sep, rest = data.partition(b"\r\n")
        if not sep:
            return found
        length = int(size, 16)
        if len(rest) < length + 2:
            return found
        found.append(rest[:length])
        data = rest[length + 2 :]
        if length == 0:
            return found


def complete(data: bytes) -> bool:
    """Whether C{data} holds one whole response."""
    parsed = _head(data)
    if parsed is None:
        return False
    _, headers, rest = parsed
    if headers.get(b"transfer-encoding") == b"chunked":
        return _chunks(rest)[-1:] == [b""]
    return len(rest) >= int(headers[b"content-length"])


def held(data: bytes) -> bool:
    """Whether C{data} holds a whole response head: all a held answer sends."""
    return _head(data) is not None


def chunkArrived(data: bytes) -> bool:
    """Whether C{data} holds a whole chunk (C{data} has no head)."""
    return len(_chunks(data)) >= 1


def ended(data: bytes) -> bool:
    """Whether C{data} is the last, empty chunk (C{data} has no head)."""
    return _chunks(data)[-1:] == [b""]


def body(data: bytes) -> tuple[int, Any]:
    """The status and JSON body of one whole response."""
    parsed = _head(data)
    assert parsed is not None
    status, headers, rest = parsed
    if headers.get(b"transfer-encoding") == b"chunked":
        rest = b"".join(_chunks(rest))
    return status, json.loads(rest)


def later(seconds: float) -> Deferred[None]:
    """
    Fires after C{seconds}, on a later turn of the reactor. Unlike
    C{deferLater}, whose Deferred and timed call refer to each other, this
    leaves no cycle behind.
    """
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class RawClient(Protocol):
    """
    An HTTP/1.1 client on one connection: writes requests as bytes, keeps
    what arrives. It holds no Deferred between requests and no reference
    back from its transport once the connection is lost, so it makes no
    cycle.
    """

    def __init__(self) -> None:
        self.received = b""
        self.ready: Deferred[None] = Deferred()
        self.closed = False
        self._predicate: Callable[[bytes], bool] | None = None
        self._waiting: Deferred[bytes] | None = None

    def connectionMade(self) -> None:
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._check()

    def _check(self) -> None:
        if self._waiting is None or self._predicate is None:
            return
        if self.closed or self._predicate(self.received):
            waiting, self._waiting, self._predicate = self._waiting, None, None
            data, self.received = self.received, b""
            waiting.callback(data)

    def request(
        self, method: bytes, path: bytes, headers: dict[str, str], content: bytes
    ) -> None:
        assert self.transport is not None
        lines = b"".join(
            b"%s: %s\r\n" % (name.encode(), value.encode())
            for name, value in headers.items()
        )
        self.transport.write(
            b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % (method, path, lines, len(content), content)
        )

    def take(self, predicate: Callable[[bytes], bool]) -> Deferred[bytes]:
        """What has arrived once C{predicate} holds of it (or the connection ends)."""
        assert self._waiting is None
        waiting: Deferred[bytes] = Deferred()
        self._waiting, self._predicate = waiting, predicate
        self._check()
        return waiting

    def drop(self, reset: bool) -> Deferred[bytes]:
        """Close the connection; C{reset} sends a TCP RST (no FIN)."""
        transport: Any = self.transport
        if reset:
            transport.getHandle().setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            transport.abortConnection()
        else:
            transport.loseConnection()
        return self.take(lambda data: False)


class OneClient(ClientFactory):
    """
    Connects one L{RawClient}. (C{connectProtocol} defines a new factory
    class per call: a class is always in a cycle of its own.)
    """

    def __init__(self, client: RawClient) -> None:
        self.client = client

    def buildProtocol(self, addr: object) -> RawClient:
        return self.client

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.client.ready.errback(reason)


#: Types whose instances are clearly the server's side of a connection.
_SERVER_TYPES = ("twisted.web.server.Request", "twisted.web.http.HTTPChannel")


def serverSide(obj: object) -> bool:
    """Whether C{obj} belongs to the server: nestproto, its requests, channels."""
    kind = type(obj)
    if kind.__module__.startswith("nestproto"):
        return True
    names = {f"{base.__module__}.{base.__qualname__}" for base in kind.__mro__}
    return bool(
        names.intersection(_SERVER_TYPES)
        or "twisted.web.http._GenericHTTPChannelProtocol" in names
        or isinstance(obj, TCPServer)
    )


def describe(garbage: list[object]) -> str:
    """The types of C{garbage} and how many of each, most first."""
    counts = Counter(
        f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in garbage
    )
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common())


class CyclicGarbageTests(TestCase):
    """
    The server side of a subscribe, a put and a dropped connection leaves
    no object in a reference cycle, over real TCP.
    """

    timeout = 10

    def setUp(self) -> None:
        self.server = makeServer(path=self.mktemp() + ".db", holdSeconds=HOLD_SECONDS)
        self.addCleanup(self.server.store.close)
        self.clock = self.server.clock
        # The sites as service.py builds them, on the global reactor (their
        # connection timeouts are real time); the hub keeps to its Clock.
        self.ports: list[IListeningPort] = [
            # Twisted's annotations want Site's protocol type as a parameter.
            reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
            for site in [
                _site(self.server.device.app.resource(), tolerant=True),
                _site(self.server.control.app.resource()),
            ]
        ]
        numbers = []
        for port in self.ports:
            self.addCleanup(port.stopListening)
            address = port.getHost()
            assert isinstance(address, IPv4Address)
            numbers.append(address.port)
        self.devicePort, self.controlPort = numbers
        self.clients: list[RawClient] = []
        self.connectors: list[IConnector] = []
        self.addCleanup(self.closeClients)

    async def closeClients(self) -> None:
        for client in self.clients:
            if not client.closed:
                await client.drop(reset=False)
        await self.serverConnectionsGone()

    async def serverConnectionsGone(self) -> None:
        """Wait until the reactor watches no server connection of ours."""
        ours = set(self.ports)
        while any(
            isinstance(selectable, TCPServer) and selectable.server in ours
            for selectable in reactor.getReaders() + reactor.getWriters()
        ):
            await later(0.001)

    async def connect(self, port: int) -> RawClient:
        client = RawClient()
        connector = reactor.connectTCP("127.0.0.1", port, OneClient(client))
        # Kept to the end of the test: a Connector and its tcp.Client refer
        # to each other for good, a cycle of the client's, not the server's.
        self.connectors.append(connector)
        await client.ready
        self.clients.append(client)
        return client

    def noCyclicGarbage(
        self, iteration: Callable[[], Coroutine[Any, Any, None]]
    ) -> Deferred[None]:
        """
        Run C{iteration} L{WARMUP} times, then L{MEASURED} times with the
        collector off, and assert a full collection then finds nothing
        unreachable.
        """
        return Deferred.fromCoroutine(self._noCyclicGarbage(iteration))

    async def _noCyclicGarbage(
        self, iteration: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        for _ in range(WARMUP):
            await iteration()
        gc.collect()
        self.addCleanup(gc.set_debug, gc.get_debug())
        if gc.isenabled():
            self.addCleanup(gc.enable)
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(MEASURED):
                await iteration()
            gc.collect()
            garbage = list(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        server = [obj for obj in garbage if serverSide(obj)]
        if server:
            self.fail(
                f"server objects in cycles after {MEASURED} iterations: "
                f"{describe(server)} (all unreachable: {describe(garbage)})"
            )
        # The client keeps no cycle either, so nothing at all is unreachable.
        if garbage:
            self.fail(f"client objects in cycles: {describe(garbage)}")

    # A thermostat

    def auth(self, serial: str) -> dict[str, str]:
        return {
            **basicAuth(serial),
            "Content-Type": "application/json",
            "X-nl-protocol-version": "1",
        }

    def subscribe(
        self, client: RawClient, serial: str, objects: list[dict[str, Any]]
    ) -> None:
        """Send a v7 subscribe naming C{objects}."""
        client.request(
            b"POST",
            b"/nest/transport/v7/subscribe",
            self.auth(serial),
            objectsBody(objects, session="s" + serial),
        )

    async def boot(self, serial: str) -> tuple[RawClient, dict[str, tuple[int, int]]]:
        """
        A thermostat's first subscribe, carrying its shared bucket: the
        connection and the revisions and timestamps it learnt.
        """
        client = await self.connect(self.devicePort)
        key = "shared." + serial
        self.subscribe(client, serial, [clientObject(key, value=_sharedValue())])
        status, answer = body(await client.take(complete))
        self.assertEqual(status, 200, answer)
        known = {
            entry["object_key"]: (entry["object_revision"], entry["object_timestamp"])
            for entry in answer["objects"]
        }
        self.assertIn(key, known)
        return client, known

    async def hold(
        self, client: RawClient, serial: str, known: dict[str, tuple[int, int]]
    ) -> None:
        """A subscribe naming what the thermostat knows: held."""
        self.subscribe(
            client,
            serial,
            [
                clientObject(key, revision, timestamp)
                for key, (revision, timestamp) in known.items()
            ],
        )
        parsed = _head(await client.take(held))
        assert parsed is not None
        status, headers, rest = parsed
        self.assertEqual((status, rest), (200, b""))
        self.assertEqual(headers.get(b"transfer-encoding"), b"chunked")
        self.assertEqual(self.server.hub.count(serial), 1)

    # The tests

    def test_commandPushAndRenewal(self) -> Deferred[None]:
        """
        A command's push to a held subscribe, the end of that answer after
        the batch window, and the renewal that is held again, leave no
        object in a cycle.
        """
        serial = "02BB01AC00000001"
        key = "shared." + serial
        state: dict[str, Any] = {"n": 0}

        async def iteration() -> None:
            if "device" not in state:
                state["device"], state["known"] = await self.boot(serial)
                await self.hold(state["device"], serial, state["known"])
                state["control"] = await self.connect(self.controlPort)
            device: RawClient = state["device"]
            control: RawClient = state["control"]
            state["n"] += 1
            value = 16.0 + state["n"] / 10
            control.request(
                b"POST",
                b"/command",
                {"Content-Type": "application/json"},
                json.dumps(
                    {"serial": serial, "command": "set_temperature", "value": value}
                ).encode(),
            )
            status, answer = body(await control.take(complete))
            self.assertEqual((status, answer.get("success")), (200, True), answer)
            (pushed,) = _chunks(await device.take(chunkArrived))
            objects = json.loads(pushed)["objects"]
            self.assertEqual(objects[0]["object_key"], key)
            self.assertEqual(objects[0]["value"]["target_temperature"], value)
            for entry in objects:
                state["known"][entry["object_key"]] = (
                    entry["object_revision"],
                    entry["object_timestamp"],
                )
            self.clock.advance(BATCH_SECONDS + 0.001)
            self.assertEqual(await device.take(ended), b"0\r\n\r\n")
            await self.hold(device, serial, state["known"])

        return self.noCyclicGarbage(iteration)

    def test_putWithRevision(self) -> Deferred[None]:
        """
        A put with C{if_object_revision} and its receipt leave no object in
        a cycle.
        """
        serial = "02CC01AC00000001"
        key = "shared." + serial
        state: dict[str, Any] = {"n": 0}

        async def iteration() -> None:
            if "device" not in state:
                state["device"], known = await self.boot(serial)
                state["revision"] = known[key][0]
            device: RawClient = state["device"]
            state["n"] += 1
            device.request(
                b"POST",
                b"/nest/transport/v7/put",
                self.auth(serial),
                json.dumps(
                    {
                        "session": "s" + serial,
                        "objects": [
                            {
                                "object_key": key,
                                "if_object_revision": state["revision"],
                                "value": {"target_temperature": 16 + state["n"] / 10},
                            }
                        ],
                    }
                ).encode(),
            )
            status, answer = body(await device.take(complete))
            self.assertEqual(status, 200, answer)
            receipt = answer["objects"][0]
            self.assertEqual(receipt["object_revision"], state["revision"] + 1)
            state["revision"] = receipt["object_revision"]
            self.clock.advance(0.01)

        return self.noCyclicGarbage(iteration)

    def dropWhileHeld(self, reset: bool) -> Deferred[None]:
        serial = "02DD01AC00000001"
        state: dict[str, Any] = {}

        async def iteration() -> None:
            if "known" not in state:
                client, state["known"] = await self.boot(serial)
                await client.drop(reset=False)
            client = await self.connect(self.devicePort)
            await self.hold(client, serial, state["known"])
            await client.drop(reset=reset)
            await self.serverConnectionsGone()
            self.assertEqual(self.server.hub.count(serial), 0)
            self.clients.remove(client)

        return self.noCyclicGarbage(iteration)

    def test_resetWhileHeld(self) -> Deferred[None]:
        """
        A held subscribe whose thermostat resets the connection (RST) leaves
        no object in a cycle: not the request, the channel nor the
        connection.
        """
        return self.dropWhileHeld(reset=True)

    def test_closeWhileHeld(self) -> Deferred[None]:
        """
        A held subscribe whose thermostat closes the connection (FIN) leaves
        no object in a cycle.
        """
        return self.dropWhileHeld(reset=False)

    def test_holdTimeout(self) -> Deferred[None]:
        """
        A held subscribe that the hold timeout ends, and the renewal held
        after it, leave no object in a cycle.
        """
        serial = "02EE01AC00000001"
        state: dict[str, Any] = {}

        async def iteration() -> None:
            if "device" not in state:
                state["device"], state["known"] = await self.boot(serial)
                await self.hold(state["device"], serial, state["known"])
            device: RawClient = state["device"]
            self.clock.advance(HOLD_SECONDS + 1)
            self.assertTrue(ended(await device.take(ended)))
            self.assertEqual(self.server.hub.count(serial), 0)
            await self.hold(device, serial, state["known"])

        return self.noCyclicGarbage(iteration)
