# -*- test-case-name: tests.test_e2e_transport,tests.test_e2e_pairing,tests.test_e2e_simulator -*-  # noqa: E501
"""
Shared scaffolding of the end-to-end tests: the real service
(C{makeService}) on loopback TCP ports with a real SQLite directory, an
HTTP connection pool to reach it, and the cleanup that closes the clients
and stops every service a test started.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

import treq
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IResponse

from nestproto.service import Options, makeService

from .helpers import basicAuth

#: What a thermostat with credentials sends with a JSON body.
DEVICE_HEADERS = {
    **basicAuth(),
    "X-nl-protocol-version": "1",
    "Content-Type": "application/json",
}


def sleep(seconds: float) -> Deferred[None]:
    """Fires after C{seconds} of real time."""
    return deferLater(reactor, seconds, lambda: None)


def boundPort(service: StreamServerEndpointService) -> Deferred[int]:
    """
    The port C{service} listens on, once it does. The service's own
    Deferred keeps its result: stopping the service needs it.
    """
    found: Deferred[int] = Deferred()

    def seen(port: IListeningPort) -> IListeningPort:
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        found.callback(address.port)
        return port

    waiting = service._waitingForPort
    assert waiting is not None, "the service has not started"
    waiting.addCallback(seen)
    return found


class BodyReader(Protocol):
    """
    Receives a response body as it arrives: each decoded chunk goes to a
    queue, and C{finished} fires when the body ends.
    """

    def __init__(self) -> None:
        self.chunks: DeferredQueue[bytes] = DeferredQueue()
        self.received: list[bytes] = []
        self.finished: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.chunks.put(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    async def document(self) -> Any:
        """The next complete JSON document of the body."""
        buffered = b""
        while True:
            buffered += await self.chunks.get()
            try:
                return json.loads(buffered)
            except ValueError:
                continue


class LiveServiceTestCase(TestCase):
    """
    Tests that start the real service on loopback ports and reach it over
    TCP through C{self.pool}.

    Cleanup runs in this order: L{closeConnections} (the clients go first),
    a moment for the server side to see them go, then every service in
    C{self.services} that still runs is stopped.

    @ivar data: the data directory L{start} uses unless told otherwise; it
        is the same path for every start of one test, so a restart finds
        what the previous service stored.
    @ivar persistentConnections: whether C{self.pool} keeps connections
        open between requests.
    """

    timeout = 60
    persistentConnections = False

    def setUp(self) -> None:
        self.data = self.mktemp()
        self.pool = HTTPConnectionPool(reactor, persistent=self.persistentConnections)
        self.pool.retryAutomatically = False
        self.services: list[IService] = []
        # Cleanups run last-added first.
        self.addCleanup(self.stopServices)
        self.addCleanup(sleep, 0.05)
        self.addCleanup(lambda: self.asDeferred(self.closeConnections()))

    def asDeferred(self, coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        return Deferred.fromCoroutine(coroutine)

    async def start(
        self, *extraOptions: str, data: str | None = None
    ) -> tuple[str, str]:
        """
        Start a service on loopback ports.

        @param extraOptions: more command-line options for the service.
        @param data: its data directory; C{self.data} when not given.

        @return: the device and control origins.
        """
        options = Options()
        options.parseOptions(
            [
                "--device",
                "tcp:0:interface=127.0.0.1",
                "--control",
                "tcp:0:interface=127.0.0.1",
                "--data",
                self.data if data is None else data,
                "--weather",
                "none",
                *extraOptions,
            ]
        )
        service = makeService(options)
        assert isinstance(service, MultiService)
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        service.startService()
        self.services.append(service)
        found = [boundPort(listener) for listener in listeners]
        devicePort, controlPort = [await d for d in found]
        return f"http://127.0.0.1:{devicePort}", f"http://127.0.0.1:{controlPort}"

    async def stop(self, service: IService) -> None:
        """Stop C{service} unless it is already stopped."""
        if service.running:
            await service.stopService()

    def stopServices(self) -> Deferred[None]:
        async def stopAll() -> None:
            for service in self.services:
                await self.stop(service)

        return self.asDeferred(stopAll())

    async def closeConnections(self) -> None:
        """
        Close the test's clients before the services stop: here the pool's
        cached connections; a test case with more clients extends this.
        """
        await self.pool.closeCachedConnections()

    async def request(self, method: str, url: str, **kwargs: Any) -> IResponse:
        """A request through C{self.pool}; its body is left unread."""
        response: IResponse = await treq.request(
            method, url, pool=self.pool, unbuffered=True, **kwargs
        )
        return response

    async def json(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        """A request's status code and its JSON body, decoded."""
        response = await self.request(method, url, **kwargs)
        body = await treq.content(response)
        return response.code, json.loads(body)
