# -*- test-case-name: tests.test_reactor -*-
"""
Tests for L{nestproto.reactor}: an epoll reactor that handles at most so
many ready connections a pass, loses none, and is found by name as
C{twistd --reactor nestproto}.

Trial has installed its own reactor in this process, so the reactor under
test is an instance driven one pass at a time, never installed; installing
it is shown in a subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.application.reactors import getReactorTypes
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from nestproto.reactor import MAX_READY_PER_PASS, describe

from .twistd import PROJECT_ROOT

if sys.platform == "linux":
    from nestproto.reactor import CappedEPollReactor


class _Reader:
    """
    One end of a socket pair as the reactor sees a connection: each time it
    is handled it notes its name in C{handled}, and reads its byte only if
    C{consume}, so it stays ready otherwise.
    """

    def __init__(
        self, name: int, sock: socket.socket, handled: list[int], consume: bool
    ) -> None:
        self.name = name
        self.sock = sock
        self.handled = handled
        self.consume = consume

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.handled.append(self.name)
        if self.consume:
            self.sock.recv(1)

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return f"reader {self.name}"


class CappedEPollReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        if sys.platform != "linux":
            raise SkipTest("epoll(7) is Linux's")

    def reactor(self, maxReady: int | None = None) -> CappedEPollReactor:
        """A capped reactor, not installed, taken apart when the test ends."""
        reactor = (
            CappedEPollReactor() if maxReady is None else CappedEPollReactor(maxReady)
        )

        def close() -> None:
            # The sockets are closed by now (cleanups run last first);
            # closing the epoll object forgets them.
            for reader in reactor._internalReaders:
                reactor.removeReader(reader)
                reader.connectionLost(None)
            reactor._poller.close()

        self.addCleanup(close)
        return reactor

    def socketPair(self) -> tuple[socket.socket, socket.socket]:
        """A connected pair of sockets, closed when the test ends."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        return ours, theirs

    def readyReaders(
        self, reactor: CappedEPollReactor, count: int, consume: bool
    ) -> list[int]:
        """
        Register C{count} connected socket pairs' ends, each with a byte
        waiting, so all are ready at once; the list their names go into when
        handled.
        """
        handled: list[int] = []
        for name in range(count):
            ours, theirs = self.socketPair()
            theirs.send(b"x")
            reactor.addReader(_Reader(name, ours, handled, consume))
        return handled

    def test_onePassHandlesAtMostMaxReady(self) -> None:
        """
        Of 25 ready connections, a reactor capped at 10 handles 10, then 10
        others, then the last 5: each once, none lost.
        """
        reactor = self.reactor(10)
        handled = self.readyReaders(reactor, 25, consume=True)
        sizes = []
        for _ in range(4):
            before = len(handled)
            reactor.doIteration(0)
            sizes.append(len(handled) - before)
        self.assertEqual(sizes, [10, 10, 5, 0])
        self.assertEqual(sorted(handled), list(range(25)))

    def test_stillReadyWaitsBehindNone(self) -> None:
        """
        Connections that stay ready (a client that keeps sending) do not keep
        the others waiting: the next pass handles those not handled yet.
        """
        reactor = self.reactor(10)
        handled = self.readyReaders(reactor, 25, consume=False)
        reactor.doIteration(0)
        first = set(handled)
        handled.clear()
        reactor.doIteration(0)
        self.assertEqual(len(handled), 10)
        self.assertEqual(first & set(handled), set())
        reactor.doIteration(0)
        self.assertEqual(len(first | set(handled)), 25)

    def test_removedDuringThePassIsSkipped(self) -> None:
        """
        A connection another one's handling removed earlier in the same pass
        is not handled.
        """
        reactor = self.reactor(10)
        handled: list[int] = []
        readers: list[_Reader] = []

        class Remover(_Reader):
            def doRead(self) -> None:
                super().doRead()
                for reader in readers:
                    reactor.removeReader(reader)

        for name in range(2):
            ours, theirs = self.socketPair()
            theirs.send(b"x")
            readers.append(Remover(name, ours, handled, consume=True))
            reactor.addReader(readers[-1])
        reactor.doIteration(0)
        self.assertEqual(len(handled), 1)

    def test_defaultCap(self) -> None:
        """Unless told otherwise, the reactor handles 250 a pass at most."""
        self.assertEqual(MAX_READY_PER_PASS, 250)
        self.assertEqual(self.reactor().maxReady, MAX_READY_PER_PASS)

    def test_capAtLeastOne(self) -> None:
        """A cap below 1 is refused."""
        self.assertRaises(ValueError, CappedEPollReactor, 0)

    def test_describeCapped(self) -> None:
        """The start-up log says the capped reactor runs, and its cap."""
        self.assertEqual(
            describe(self.reactor()),
            "epoll, at most 250 ready connections a pass",
        )


class DescribeTests(SynchronousTestCase):
    def test_describeOther(self) -> None:
        """
        Another reactor is named, with how a big install gets the capped one.
        """
        self.assertEqual(
            describe(MemoryReactorClock()),
            "MemoryReactorClock, which may pause for half a second or more when "
            "20,000 devices disconnect at once; with thousands of devices run "
            "twistd --reactor nestproto",
        )


class PluginTests(SynchronousTestCase):
    def test_foundByName(self) -> None:
        """twistd finds the reactor as C{nestproto}, in L{nestproto.reactor}."""
        found = {r.shortName: r for r in getReactorTypes()}
        self.assertIn("nestproto", found)
        self.assertEqual(
            getattr(found["nestproto"], "moduleName", None), "nestproto.reactor"
        )

    def test_installedByName(self) -> None:
        """
        Installed by its name, as twistd does, it is the reactor: nothing
        the module imports installs another first. Where there is no epoll,
        Twisted's default is installed instead.
        """
        code = (
            "from twisted.application.reactors import installReactor; "
            "installReactor('nestproto'); "
            "from twisted.internet import reactor; "
            "print(type(reactor).__module__, type(reactor).__name__)"
        )
        output = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, PYTHONPATH=PROJECT_ROOT),
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
        if sys.platform == "linux":
            self.assertEqual(output, "nestproto.reactor CappedEPollReactor")
        else:
            self.assertNotIn("nestproto", output)
