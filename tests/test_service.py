# -*- test-case-name: tests.test_service -*-
"""
Tests for L{nestproto.service}: options and the service tree.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import urllib.request

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from nestproto.service import (
    COLLECTOR_THRESHOLDS,
    LISTEN_BACKLOG,
    Options,
    _site,
    makeService,
)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: twistd as a Python program, so the test runs the source tree's plugin.
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--data", self.mktemp(), *argv])
        return options

    def test_defaults(self) -> None:
        """Without options the device port is 8000 and the control port 8082."""
        options = self.parse()
        self.assertEqual(options["device"], "tcp:8000")
        self.assertEqual(options["control"], "tcp:8082")
        self.assertEqual(options["hold-timeout"], 290.0)
        self.assertEqual(options["suspend-time-max"], 300.0)
        self.assertIsNone(options["origin"])

    def test_dataDirectoryCreated(self) -> None:
        """The data directory is created when missing."""
        path = self.mktemp()
        Options().parseOptions(["--data", path])
        self.assertTrue(os.path.isdir(path))

    def test_holdTimeoutBelowSuspend(self) -> None:
        """A hold timeout not below suspend-time-max is a usage error."""
        error = self.assertRaises(
            usage.UsageError,
            self.parse,
            "--hold-timeout",
            "300",
            "--suspend-time-max",
            "300",
        )
        self.assertIn("--hold-timeout", str(error))

    def test_suspendRange(self) -> None:
        """suspend-time-max outside 5-350 s is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--suspend-time-max", "900")
        self.assertRaises(usage.UsageError, self.parse, "--suspend-time-max", "4")

    def test_badNumbers(self) -> None:
        """Non-numbers and non-positive numbers are usage errors."""
        self.assertRaises(usage.UsageError, self.parse, "--hold-timeout", "soon")
        self.assertRaises(usage.UsageError, self.parse, "--hold-timeout", "-1")

    def test_badEndpoint(self) -> None:
        """An endpoint string Twisted cannot parse is a usage error naming it."""
        error = self.assertRaises(
            usage.UsageError, self.parse, "--device", "tcp:notaport"
        )
        self.assertIn("--device", str(error))

    def test_originNeedsPort(self) -> None:
        """An origin without an explicit port is refused (PROTOCOL.md §1)."""
        self.assertRaises(
            usage.UsageError, self.parse, "--origin", "http://192.168.1.10"
        )
        options = self.parse("--origin", "http://192.168.1.10:8000/")
        self.assertEqual(options["origin"], "http://192.168.1.10:8000")


class MakeServiceTests(SynchronousTestCase):
    def test_listensOnBothEndpoints(self) -> None:
        """
        Starting the service listens on the device and control endpoints,
        each with a backlog sized for a reconnect storm.
        """
        options = Options()
        options.parseOptions(
            ["--data", self.mktemp(), "--device", "tcp:18000", "--control", "tcp:18082"]
        )
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        service.startService()
        try:
            ports = sorted(
                (port, backlog) for port, _, backlog, _ in reactor.tcpServers
            )
            self.assertEqual(ports, [(18000, LISTEN_BACKLOG), (18082, LISTEN_BACKLOG)])
        finally:
            service.stopService()

    def test_collectorTunedWhileRunning(self) -> None:
        """
        While the service runs the garbage collector uses
        L{COLLECTOR_THRESHOLDS}; stopping puts the previous thresholds back.
        """
        options = Options()
        options.parseOptions(["--data", self.mktemp()])
        previous = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *previous)
        service = makeService(options, MemoryReactorClock())
        self.assertEqual(gc.get_threshold(), previous)
        service.startService()
        try:
            self.assertEqual(gc.get_threshold(), COLLECTOR_THRESHOLDS)
        finally:
            service.stopService()
        self.assertEqual(gc.get_threshold(), previous)

    def test_explicitBacklogKept(self) -> None:
        """A backlog given in the endpoint string is left alone."""
        options = Options()
        options.parseOptions(
            ["--data", self.mktemp(), "--device", "tcp:18000:backlog=7"]
        )
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        service.startService()
        try:
            backlogs = {port: backlog for port, _, backlog, _ in reactor.tcpServers}
            self.assertEqual(backlogs[18000], 7)
        finally:
            service.stopService()


class _ArgsRecorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[bytes, list[bytes]]] = []

    def render_POST(self, request: Request) -> bytes:
        self.seen.append(dict(request.args))
        return b"ok"


class SiteTests(SynchronousTestCase):
    def test_formBodiesLeftToHandlers(self) -> None:
        """
        A POST's query arguments reach C{request.args}; its form body does
        not (handlers parse bodies themselves).
        """
        recorder = _ArgsRecorder()
        site = _site(recorder)
        clock = Clock()
        site.reactor = clock
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert channel is not None
        channel.makeConnection(StringTransport())
        body = b"serial=02AA01AC0000000002&mac=18B430000001"
        channel.dataReceived(
            b"POST /nest/entry?serial=02AA01AC0000000001 HTTP/1.1\r\n"
            b"Host: h\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(recorder.seen, [{b"serial": [b"02AA01AC0000000001"]}])
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])


class TwistdTests(SynchronousTestCase):
    def test_twistdStartsAnswersAndStops(self) -> None:
        """
        C{twistd -n nestproto} starts in under 2 s, answers /nest/entry and
        /nest/ping, and stops cleanly on SIGTERM.
        """
        data = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        port = 18000 + os.getpid() % 1000
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                TWISTD,
                "--pidfile=",
                "-n",
                "nestproto",
                "--device",
                f"tcp:{port}:interface=127.0.0.1",
                "--control",
                f"tcp:{port + 1000}:interface=127.0.0.1",
                "--data",
                data,
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            started = time.monotonic()
            ping = None
            while time.monotonic() - started < 10:
                try:
                    ping = urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/nest/ping"
                    ).read()
                    break
                except OSError:
                    time.sleep(0.05)
            elapsed = time.monotonic() - started
            self.assertIsNotNone(ping, "server never answered")
            self.assertLess(elapsed, 2.0)
            entry = urllib.request.urlopen(
                f"http://127.0.0.1:{port}/nest/entry", data=b"reset=FALSE"
            ).read()
            self.assertIn(f"http://127.0.0.1:{port}/nest/transport".encode(), entry)
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=10)
        # twistd re-raises the signal it stopped for once shutdown is done.
        self.assertIn(process.returncode, (0, -signal.SIGTERM), output.decode())
        self.assertIn(b"Server Shut Down", output)
        self.assertNotIn(b"Traceback", output)
