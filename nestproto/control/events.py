# -*- test-case-name: tests.test_control_api -*-
"""
Server-Sent Events for control clients: one C{data: {"serial": S}} event
each time a change to device S is committed (PROTOCOL.md §16.5, §16.6), so
clients refetch its status instead of polling.

Events come from the store's change feed. The last event of each commit
carries the commit's sequence as its C{id}, so a client that reconnects
with C{Last-Event-ID} is sent exactly the events it missed; when they are
no longer kept it is sent one C{reset} event and refetches everything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from ..membership import GLOBAL_SCOPE, OWNER_RECORD
from ..model import Commit
from ..pairing import ENTRY_KEY_RECORD
from ..store import IChangeFeed

#: A comment line this often keeps proxies from closing an idle stream and
#: finds clients that left without a word.
KEEPALIVE_SECONDS = 25.0
MAX_CLIENTS = 64
#: Sent in place of missed events that are no longer kept.
RESET_EVENT = b'event: reset\ndata: {"reset": true}\n\n'


def serialsChangedBy(
    commit: Commit,
    devicesSeeing: Callable[[str, str], Iterable[str]],
    hidden: Callable[[str], bool],
) -> list[str]:
    """
    The devices whose status C{commit} changed, in a stable order, except
    those the control side hides (L{Admission.hidden}) unless the commit
    changed their owner: a client learns of a device that stops being
    shown (unclaimed or removed), never of one it was never shown.
    """
    serials: dict[str, None] = {}
    for change in commit.buckets:
        if change.scope == GLOBAL_SCOPE:
            serials.update(dict.fromkeys(devicesSeeing(change.scope, change.key)))
        else:
            serials[change.scope] = None
    owned = set()
    for record in commit.records:
        if record.kind in (OWNER_RECORD, ENTRY_KEY_RECORD):
            serials[record.name] = None
        if record.kind == OWNER_RECORD:
            owned.add(record.name)
    return [serial for serial in serials if serial in owned or not hidden(serial)]


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
    feed: IChangeFeed
    devicesSeeing: Callable[[str, str], Iterable[str]]
    #: Whether the control side hides a known serial (with pairing required,
    #: an unclaimed one): events do not name it.
    hidden: Callable[[str], bool]
    keepAliveSeconds: float = KEEPALIVE_SECONDS
    maxClients: int = MAX_CLIENTS
    _clients: list[_Client] = field(factory=list, init=False)

    def count(self) -> int:
        """How many clients are connected now."""
        return len(self._clients)

    def attach(
        self, request: IRequest, lastEventId: str | None = None
    ) -> Deferred[None] | None:
        """
        Stream events to C{request} until the client leaves, first those it
        missed after C{lastEventId} (its C{Last-Event-ID} header).

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
        catchUp = b": connected\n\n" + self._missed(lastEventId)
        self._write(client, catchUp)
        return client.done

    def _missed(self, lastEventId: str | None) -> bytes:
        if lastEventId is None:
            # An id alone sets where a reconnect resumes without an event.
            return b"id: %d\n\n" % (self.feed.lastSequence,)
        try:
            missed = self.feed.since(int(lastEventId))
        except ValueError:
            missed = None
        if missed is None:
            return b"id: %d\n" % (self.feed.lastSequence,) + RESET_EVENT
        return b"".join(self._events(commit) for commit in missed)

    def _events(self, commit: Commit) -> bytes:
        serials = serialsChangedBy(commit, self.devicesSeeing, self.hidden)
        events = [b"data: " + json.dumps({"serial": s}).encode() for s in serials]
        if events:
            events[-1] = b"id: %d\n" % (commit.sequence,) + events[-1]
        return b"".join(event + b"\n\n" for event in events)

    def publish(self, commit: Commit) -> None:
        """Send C{commit}'s events to every client (a feed listener)."""
        if not self._clients:
            # Nobody watches: every commit came here, so skip rendering.
            return
        events = self._events(commit)
        if not events:
            return
        for client in list(self._clients):
            self._write(client, events)

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
