# -*- test-case-name: tests.test_service -*-
"""
Tests for L{nestproto.service}: options and the service tree.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import urllib.request
from typing import Any

from twisted.application.service import Application
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    capturedLogs,
    formatEvent,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from nestproto.collector import COLLECTOR_THRESHOLDS
from nestproto.datadir import DataLock
from nestproto.debuglog import SwitchedLogger
from nestproto.service import (
    LISTEN_BACKLOG,
    PER_REQUEST_NAMESPACES,
    Options,
    StartupError,
    _exitAfterTwistd,
    _levelFilter,
    _Listener,
    _ServerService,
    _site,
    makeService,
)

from .helpers import basicAuth, objectsBody
from .stub import StubClient
from .twistd import Twistd

TOKEN = "s3cret-token-value"


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

    def test_admissionOptions(self) -> None:
        """
        Pairing is not required and 20 new serials an hour are taken by
        default; the cap must be a whole number, 0 or more.
        """
        options = self.parse()
        self.assertFalse(options["pairing-required"])
        self.assertEqual(options["new-serials-per-hour"], 20)
        options = self.parse("--pairing-required", "--new-serials-per-hour", "0")
        self.assertTrue(options["pairing-required"])
        self.assertEqual(options["new-serials-per-hour"], 0)
        for bad in ["-1", "many", "1.5"]:
            self.assertRaises(
                usage.UsageError, self.parse, "--new-serials-per-hour", bad
            )

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

    def test_logLevel(self) -> None:
        """The log level is info unless given; an unknown one is refused."""
        self.assertEqual(self.parse()["log-level"], "info")
        self.assertEqual(self.parse("--log-level", "debug")["log-level"], "debug")
        error = self.assertRaises(
            usage.UsageError, self.parse, "--log-level", "verbose"
        )
        self.assertIn("--log-level", str(error))

    def test_missingCertificate(self) -> None:
        """A TLS endpoint whose key file is missing is refused, naming the file."""
        missing = os.path.abspath(self.mktemp())
        error = self.assertRaises(
            usage.UsageError, self.parse, "--device", f"ssl:0:privateKey={missing}"
        )
        self.assertIn(missing, str(error))
        self.assertIn("--device", str(error))

    def test_dataDirectoryNotADirectory(self) -> None:
        """A data path below a file is refused, naming it."""
        path = self.mktemp()
        with open(path, "w"):
            pass
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--data", path + "/data"]
        )
        self.assertIn("--data", str(error))

    def test_underTwistdOneLine(self) -> None:
        """
        As twistd's subcommand, a refused option ends the process with one
        line (C{SystemExit} with the message) instead of twistd's usage text.
        """
        options = Options()
        options.parent = usage.Options()
        error = self.assertRaises(
            SystemExit,
            options.parseOptions,
            ["--data", self.mktemp(), "--device", "tcp:notaport"],
        )
        self.assertIsInstance(error.code, str)
        self.assertTrue(str(error.code).startswith("nestproto: --device"))
        self.assertNotIn("\n", str(error.code))

    def test_tokenSource(self) -> None:
        """Options remember where the control token came from, not only it."""
        self.assertIsNone(self.parse().controlTokenSource)
        options = self.parse("--control-token", TOKEN)
        self.assertEqual(options.controlTokenSource, "--control-token")

    def test_allowOrigin(self) -> None:
        """
        C{--allow-origin} may be given several times; each origin is kept
        with its port; anything but an http(s) origin is refused.
        """
        options = self.parse(
            "--allow-origin",
            "http://Dashboard.home.arpa",
            "--allow-origin",
            "https://ha.example:8123",
        )
        self.assertEqual(
            options["allow-origin"],
            ["http://dashboard.home.arpa:80", "https://ha.example:8123"],
        )
        self.assertEqual(self.parse()["allow-origin"], [])
        for bad in ["*", "dashboard.home.arpa", "http://host/path", "null"]:
            self.assertRaises(usage.UsageError, self.parse, "--allow-origin", bad)

    def test_trustedNetwork(self) -> None:
        """
        C{--trusted-network} may be given several times, as networks or
        single addresses; anything else is refused.
        """
        options = self.parse(
            "--trusted-network", "192.168.1.0/24", "--trusted-network", "fd00::5"
        )
        self.assertEqual(
            [str(n) for n in options["trusted-network"]],
            ["192.168.1.0/24", "fd00::5/128"],
        )
        self.assertEqual(self.parse()["trusted-network"], [])
        for bad in ["home", "192.168.1.0/33", ""]:
            self.assertRaises(usage.UsageError, self.parse, "--trusted-network", bad)

    def test_helpHasNoMarkup(self) -> None:
        """The new options' help is plain text."""
        help = str(Options())
        for name in ["--allow-origin", "--trusted-network"]:
            self.assertIn(name, help)
        self.assertNotIn("C{", help)


class _RefusingReactor(MemoryReactorClock):
    """A reactor where listening on C{port} fails as a port in use does."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.refused = port

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        if port == self.refused:
            raise CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        return super().listenTCP(port, factory, backlog, interface)


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

    def test_oneServicePerDataDirectory(self) -> None:
        """
        While a service built on a data directory runs, building another on
        it fails with a L{StartupError} naming the directory and this
        process; once the first stops, the directory is free.
        """
        options = Options()
        options.parseOptions(["--data", self.mktemp()])
        first = makeService(options, MemoryReactorClock())
        first.startService()
        error = self.assertRaises(
            StartupError, makeService, options, MemoryReactorClock()
        )
        self.assertIn(os.path.abspath(options["data"]), str(error))
        self.assertIn(f"process {os.getpid()}", str(error))
        first.stopService()
        DataLock.acquire(options["data"]).release()

    def test_pairingRequiredServed(self) -> None:
        """
        With C{--pairing-required} the device port the service serves
        refuses a subscribe from a device nobody claimed (PROTOCOL.md §19
        scenario 59).
        """
        options = Options()
        options.parseOptions(
            ["--data", self.mktemp(), "--pairing-required", "--device", "tcp:18000"]
        )
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        service.startService()
        try:
            [site] = [f for port, f, _, _ in reactor.tcpServers if port == 18000]
            assert isinstance(site, Site)
            client = StubClient(site.resource)
            d = client.post(
                "http://127.0.0.1:18000/nest/transport",
                data=objectsBody([]),
                headers=basicAuth(),
            )
            client.flush()
            self.assertEqual(self.successResultOf(d).code, 401)
        finally:
            service.stopService()

    def test_listenFailureStopsTheServer(self) -> None:
        """
        A listener that cannot listen logs one critical line naming its
        endpoint and the reason, stops the reactor, and arranges a failure
        exit status for after the shutdown.
        """
        options = Options()
        options.parseOptions(
            ["--data", self.mktemp(), "--device", "tcp:18000", "--control", "tcp:18082"]
        )
        reactor = _RefusingReactor(18000)
        service = makeService(options, reactor)
        with capturedLogs() as events:
            service.startService()
        try:
            critical = [e for e in events if e["log_level"] == LogLevel.critical]
            self.assertEqual(len(critical), 1)
            self.assertEqual(
                formatEvent(critical[0]),
                "device endpoint tcp:18000 cannot listen: Address already in use; "
                "stopping",
            )
            self.assertFalse(reactor.hasStopped)
            reactor.run()
            self.assertTrue(reactor.hasStopped)
            self.assertEqual(
                reactor.triggers["after"]["shutdown"], [(_exitAfterTwistd, (1,), {})]
            )
            listening = [
                formatEvent(e) for e in events if "listening on" in formatEvent(e)
            ]
            self.assertEqual(
                listening, ["control endpoint listening on 0.0.0.0:18082 (tcp:18082)"]
            )
        finally:
            service.stopService()

    def test_startupSaysWhatItDoes(self) -> None:
        """
        Starting logs the version, the reactor (and how to get nestproto's
        when it is another), the store and its devices, how the control API
        is protected and whether recording is on; the token itself appears
        in no event.
        """
        options = Options()
        options.parseOptions(["--data", self.mktemp(), "--control-token", TOKEN])
        service = makeService(options, MemoryReactorClock())
        with capturedLogs() as events:
            service.startService()
        service.stopService()
        text = [formatEvent(e) for e in events]
        self.assertIn(
            "control API access: bearer token from --control-token (Authorization "
            "header or the /k/<token>/ path prefix); browser pages allowed from "
            "its own origin only",
            text,
        )
        self.assertIn("recording exchanges: off", text)
        self.assertIn(
            "reactor: MemoryReactorClock, which may pause for half a second or more "
            "when 20,000 devices disconnect at once; with thousands of devices run "
            "twistd --reactor nestproto",
            text,
        )
        self.assertIn(
            "device admission: open: any device may connect; passwords bound on "
            "first use; new serials per address and hour: 20",
            text,
        )
        self.assertTrue(any(line.startswith("nestproto ") for line in text))
        path = os.path.join(os.path.abspath(options["data"]), "nestproto.sqlite3")
        self.assertIn(f"store: SQLite database {path}; devices loaded: 0", text)
        for event in events:
            self.assertNotIn(TOKEN, repr(event))

    def test_accessOptionsReachTheControlAPI(self) -> None:
        """
        The control API that makeService serves lets a trusted network in
        without the token and answers an allowed origin with CORS; the
        start-up line says both, and not the token.
        """
        options = Options()
        options.parseOptions(
            [
                "--data",
                self.mktemp(),
                "--control-token",
                TOKEN,
                "--trusted-network",
                "127.0.0.0/8",
                "--allow-origin",
                "http://dash.home.arpa",
            ]
        )
        service: Any = makeService(options, MemoryReactorClock())
        with capturedLogs() as events:
            service.startService()
        try:
            (control,) = [
                s.factory.resource
                for s in service
                if isinstance(s, _Listener) and s.name == "control"
            ]
            client = StubClient(control)
            d = client.get(
                "http://127.0.0.1:8082/api/devices",
                headers={"Origin": "http://dash.home.arpa"},
            )
            client.flush()
            response = self.successResultOf(d)
            self.assertEqual(response.code, 200)
            self.assertEqual(
                response.headers.getRawHeaders("access-control-allow-origin"),
                ["http://dash.home.arpa"],
            )
        finally:
            service.stopService()
        text = [formatEvent(e) for e in events]
        (line,) = [t for t in text if t.startswith("control API access")]
        self.assertIn("no token needed from 127.0.0.0/8", line)
        self.assertIn("browser pages allowed from http://dash.home.arpa:80", line)
        self.assertNotIn(TOKEN, repr(events))

    def test_listenersNamed(self) -> None:
        """The two listeners are named device and control."""
        options = Options()
        options.parseOptions(["--data", self.mktemp()])
        service: Any = makeService(options, MemoryReactorClock())
        names = [s.name for s in service if isinstance(s, _Listener)]
        self.assertEqual(names, ["device", "control"])
        service.startService()
        service.stopService()


def _shownAt(level: LogLevel) -> set[str]:
    """Which of three events pass the filter of C{level}."""
    seen: list[str] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        seen.append(event["log_format"])

    publisher = LogPublisher()
    publisher.addObserver(FilteringLogObserver(observe, [_levelFilter(level)]))
    Logger(namespace="nestproto.x", observer=publisher).debug("debug")
    Logger(namespace="nestproto.x", observer=publisher).info("info")
    Logger(namespace=PER_REQUEST_NAMESPACES[0], observer=publisher).info("request")
    return set(seen)


class LogLevelTests(SynchronousTestCase):
    def test_levelFilter(self) -> None:
        """
        Events below the level are dropped; the per-request lines of
        Twisted's HTTP client show only at debug.
        """
        self.assertEqual(_shownAt(LogLevel.debug), {"debug", "info", "request"})
        self.assertEqual(_shownAt(LogLevel.info), {"info"})
        self.assertEqual(_shownAt(LogLevel.warn), set())

    def test_debugOffAtTheSource(self) -> None:
        """
        Under twistd, the level's observer decides whether per-request debug
        events are emitted at all: not above debug, where it drops them.
        """
        self.addCleanup(setattr, SwitchedLogger, "debugOn", SwitchedLogger.debugOn)
        twistdOptions = ServerOptions()
        twistdOptions.parseOptions(["--logfile", self.mktemp(), "--nodaemon"])
        for level, on in [(LogLevel.info, False), (LogLevel.debug, True)]:
            application = Application("nestproto")
            _ServerService(level, twistdOptions).setServiceParent(application)
            self.assertEqual(SwitchedLogger.debugOn, on)
            self.assertIsNotNone(application.getComponent(ILogObserver))

    def test_switchedDebug(self) -> None:
        """
        A L{SwitchedLogger}'s debug events are emitted only while debug is
        on; its other events always.
        """
        self.addCleanup(setattr, SwitchedLogger, "debugOn", SwitchedLogger.debugOn)
        seen: list[str] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            seen.append(event["log_format"])

        log = SwitchedLogger(namespace="nestproto.x", observer=observe)
        SwitchedLogger.debugOn = False
        log.debug("off")
        log.info("info")
        SwitchedLogger.debugOn = True
        log.debug("on")
        self.assertEqual(seen, ["info", "on"])


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
        C{twistd -n nestproto} starts, answers /nest/entry and
        /nest/ping, and stops cleanly on SIGTERM.
        """
        server = Twistd(
            self,
            "--device",
            "tcp:0:interface=127.0.0.1",
            "--control",
            "tcp:0:interface=127.0.0.1",
            "--data",
            os.path.abspath(self.mktemp()),
            "--weather",
            "none",
        )
        port = server.ports()["device"]
        ping = urllib.request.urlopen(f"http://127.0.0.1:{port}/nest/ping").read()
        self.assertIsNotNone(ping)
        entry = urllib.request.urlopen(
            f"http://127.0.0.1:{port}/nest/entry", data=b"reset=FALSE"
        ).read()
        self.assertIn(f"http://127.0.0.1:{port}/nest/transport".encode(), entry)
        status = server.stop()
        # twistd re-raises the signal it stopped for once shutdown is done.
        self.assertIn(status, (0, -signal.SIGTERM), server.output)
        self.assertIn("Server Shut Down", server.output)
        self.assertNotIn("Traceback", server.output)
