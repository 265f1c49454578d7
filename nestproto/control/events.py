# -*- test-case-name: tests.test_control_api -*-
"""
Server-Sent Events for control clients: one C{data: {"serial": S}} event
each time a change to device S is durable (PROTOCOL.md §16.5, §16.6), so
clients refetch its status instead of polling.
"""

from __future__ import annotations

import json

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

#: A comment line this often keeps proxies from closing an idle stream and
#: finds clients that left without a word.
KEEPALIVE_SECONDS = 25.0
MAX_CLIENTS = 64


@define(eq=False)
class _Client:
    request: IRequest
    done: Deferred[None]
    timer: IDelayedCall | None = None


@define
class EventStream:
    """The connected event-stream clients."""

    log = Logger()

    clock: IReactorTime
    keepAliveSeconds: float = KEEPALIVE_SECONDS
    maxClients: int = MAX_CLIENTS
    _clients: list[_Client] = field(factory=list, init=False)

    def count(self) -> int:
        """How many clients are connected now."""
        return len(self._clients)

    def attach(self, request: IRequest) -> Deferred[None] | None:
        """
        Stream events to C{request} until the client leaves.

        @return: a Deferred that fires when the stream ends (at L{endAll});
            cancelling it (the client left) forgets the client at once.
            C{None} when C{maxClients} are connected already.
        """
        if len(self._clients) >= self.maxClients:
            return None

        def cancel(d: Deferred[None]) -> None:
            self._forget(client)

        client = _Client(request, Deferred(cancel))
        self._clients.append(client)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        # The headers and a comment now: the client knows it is connected.
        self._write(client, b": connected\n\n")
        return client.done

    def publish(self, serial: str) -> None:
        """Send one change event for C{serial} to every client."""
        event = b"data: " + json.dumps({"serial": serial}).encode() + b"\n\n"
        for client in list(self._clients):
            self._write(client, event)

    def endAll(self) -> None:
        """End every stream cleanly (at shutdown)."""
        for client in list(self._clients):
            self._forget(client)
            client.done.callback(None)

    def _write(self, client: _Client, data: bytes) -> None:
        try:
            client.request.write(data)
        except Exception:
            self.log.debug("event stream client gone")
            self._forget(client)
            return
        if client.timer is not None and client.timer.active():
            client.timer.cancel()
        client.timer = self.clock.callLater(
            self.keepAliveSeconds, self._write, client, b": keepalive\n\n"
        )

    def _forget(self, client: _Client) -> None:
        if client.timer is not None and client.timer.active():
            client.timer.cancel()
        client.timer = None
        if client in self._clients:
            self._clients.remove(client)
