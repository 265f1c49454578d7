# -*- test-case-name: tests.test_fixtures,tests.test_replay_all -*-
"""
Where a replay sends its requests: a fresh nestproto in memory on a clock
the replay advances, or a running server over TCP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource

from ..apps import AppSettings, buildApps
from ..control.api import ControlSettings
from ..device.api import DeviceAPI
from ..store import SQLiteStore, runInline
from .format import CONTROL, DEVICE


class ReplayTarget:
    """
    Where a replay sends its requests: L{MemoryTarget} or L{TCPTarget}.

    @ivar clock: the replay's clock; times are measured on it.
    """

    clock: IReactorTime

    def request(
        self, kind: str, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Deferred[Any]:
        """Send a request; fires with an unbuffered treq response."""
        raise NotImplementedError()

    def settle(self, untilSeconds: float) -> Deferred[None]:
        """Let time pass until C{untilSeconds} on L{clock}, delivering data."""
        raise NotImplementedError()

    def flush(self) -> None:
        """Deliver what the server wrote meanwhile."""

    def awaitAll(
        self, conditions: Sequence[Callable[[], bool]], timeoutSeconds: float
    ) -> Deferred[None]:
        """
        Wait until each of C{conditions} holds, or the timeout passed: a
        running server needs time to answer.
        """
        return succeed(None)

    def close(self) -> None:
        """Release what the target holds."""


#: A server factory for L{MemoryTarget}: (clock) -> (device, control) resources.
ServerFactory = Callable[[Any], tuple[IResource, IResource]]


def memoryServer(
    clock: Any, deviceClass: type[Any] | None = None, controlToken: str | None = None
) -> tuple[IResource, IResource]:
    """
    A whole nestproto in memory on C{clock}: SQLite in memory with commits
    made inline.

    @param deviceClass: a L{DeviceAPI} subclass to serve instead.
    @param controlToken: the control port's Bearer token, if it has one.
    """
    apps = buildApps(
        SQLiteStore.open(":memory:", runInline, clock),
        clock,
        runInThread=runInline,
        settings=AppSettings(control=ControlSettings(token=controlToken)),
        deviceClass=deviceClass or DeviceAPI,
    )
    return apps.device.app.resource(), apps.control.app.resource()


#: Nudge past a step's instant, so a timer due exactly then has fired
#: whatever the float rounding of the offsets.
_STEP_EPSILON = 1e-4


class MemoryTarget(ReplayTarget):
    """
    A fresh server in memory, on a L{Clock} the replay advances: hold
    timeouts and batch windows replay exactly and at once.
    """

    def __init__(
        self, startSeconds: float, serverFactory: ServerFactory = memoryServer
    ) -> None:
        clock = Clock()
        clock.advance(startSeconds)
        self.clock = clock
        device, control = serverFactory(clock)
        self._clients: dict[str, Any] = {
            DEVICE: StubTreq(device),
            CONTROL: StubTreq(control),
        }

    def request(
        self, kind: str, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Deferred[Any]:
        host = headers.get("host") or (
            "127.0.0.1:8000" if kind == DEVICE else "127.0.0.1:8082"
        )
        sent = {k: v for k, v in headers.items() if k != "host"}
        d: Deferred[Any] = self._clients[kind].request(
            method,
            f"http://{host}{path}",
            headers=sent,
            data=body if body else None,
            unbuffered=True,
        )
        return d

    def settle(self, untilSeconds: float) -> Deferred[None]:
        self.flush()
        delta = untilSeconds + _STEP_EPSILON - self.clock.seconds()
        if delta > 0:
            self.clock.advance(delta)  # type: ignore[attr-defined]
        self.flush()
        return succeed(None)

    def flush(self) -> None:
        # A push made through one port is written on the other: pump both
        # until nothing moves.
        for _round in range(3):
            for client in self._clients.values():
                client.flush()


class TCPTarget(ReplayTarget):
    """
    A running server reached over TCP: recorded offsets are waited out in
    real time, so hold timeouts take as long as the server's are.
    """

    def __init__(self, reactor: Any, deviceURL: str, controlURL: str | None) -> None:
        self.clock = reactor
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._client = HTTPClient(Agent(reactor, pool=self._pool))
        self._urls = {
            DEVICE: deviceURL.rstrip("/"),
            CONTROL: (controlURL or "").rstrip("/"),
        }

    def request(
        self, kind: str, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Deferred[Any]:
        base = self._urls[kind]
        if not base:
            raise ValueError("a control exchange needs the control API's URL")
        sent: dict[bytes | str, bytes | str] = {k: v for k, v in headers.items()}
        d: Deferred[Any] = self._client.request(
            method,
            base + path,
            headers=sent,
            data=body if body else None,
            unbuffered=True,
        )
        return d

    def settle(self, untilSeconds: float) -> Deferred[None]:
        delay = max(0.0, untilSeconds - self._reactor.seconds())
        return deferLater(self._reactor, delay, lambda: None)

    def awaitAll(
        self, conditions: Sequence[Callable[[], bool]], timeoutSeconds: float
    ) -> Deferred[None]:
        deadline = self._reactor.seconds() + timeoutSeconds

        async def poll() -> None:
            while not all(condition() for condition in conditions):
                if self._reactor.seconds() >= deadline:
                    return
                await deferLater(self._reactor, 0.02, lambda: None)

        return Deferred.fromCoroutine(poll())

    def close(self) -> None:
        self._pool.closeCachedConnections()
