# -*- test-case-name: tests.test_service -*-
"""
C{twistd nestproto}: options and the service tree.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any, NoReturn

import treq
from attrs import define, evolve, field
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.copyright import version as twistedVersion
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
)
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.web.http import Request, _GenericHTTPChannelProtocol
from twisted.web.resource import IResource
from twisted.web.server import Site

from ._version import __version__
from .admission import DEFAULT_NEW_SERIALS_PER_HOUR, AdmissionSettings
from .apps import AppSettings, buildApps
from .channel import AddressKeepingHTTPChannel
from .collector import CollectorService
from .control.access import normaliseOrigin, parseNetwork
from .control.api import ControlSettings
from .control.events import EventStream
from .datadir import STORE_FILE, DataDirectoryInUse, DataLock
from .debuglog import SwitchedLogger
from .device.api import TransportSettings
from .device.requestline import TolerantHTTPChannel
from .history import (
    DEFAULT_HOURLY_DAYS,
    DEFAULT_RAW_DAYS,
    HistoryService,
    HistorySettings,
)
from .hub import SubscriberHub
from .mqtt import BrokerSettings, MQTTSettings, bridgeService
from .pairing import MIN_REMAINING_SECONDS
from .presence import IPresence
from .reactor import describe as describeReactor
from .recording.format import CONTROL, DEVICE
from .recording.recorder import Recorder, RecorderService
from .store import IBucketStore, SchemaTooNew, SQLiteStore
from .uploads import LogStore
from .weather import NoWeather, OpenMeteoSource

log = Logger()

_ORIGIN_PATTERN = re.compile(
    r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$"
)
#: Queued connections per listener: a reconnect storm of every held device
#: at once must not be refused (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 4096
#: A file in --data holding the control API's bearer token.
CONTROL_TOKEN_FILE = "control-token"
#: A file in --data holding the MQTT password, when --mqtt names a user
#: but no password.
MQTT_PASSWORD_FILE = "mqtt-password"
#: Shortest entry-key lifetime: a key is served only while 30 min of it
#: remain (pairing.MIN_REMAINING_SECONDS), so this leaves a code on the
#: screen for at least 10 minutes.
MIN_ENTRY_KEY_TTL = MIN_REMAINING_SECONDS + 600
WEATHER_SOURCES = {"open-meteo", "none"}
#: Longest history retention accepted (ten years).
MAX_HISTORY_DAYS = 3650
LOG_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
#: Namespaces that log a line per request at info; they are shown only at
#: debug. Treq's connection pool starts a client factory per connection (the
#: weather fetches).
PER_REQUEST_NAMESPACES = ("twisted.web.client._HTTP11ClientFactory",)


class StartupError(Exception):
    """
    The server cannot start; the message says why, in one sentence that
    names what to change.
    """


def _fail(options: usage.Options, error: Exception) -> NoReturn:
    """
    Refuse to start because of C{error}.

    Under twistd (the options are its subcommand's) the process ends with
    status 1 and the one line on stderr, before any logging starts: no
    traceback and no usage text, which would bury the line. Called from
    code, C{error} is raised as it is.
    """
    if options.parent is None:
        raise error
    raise SystemExit(f"nestproto: {error}")


def _positiveNumber(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be above 0")
    return value


def _nonNegativeInteger(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _withBacklog(description: str) -> str:
    """
    C{description} with a large listen backlog unless it names one; only
    TCP-based endpoints (tcp, ssl) take the argument.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in {"tcp", "tcp6", "ssl"} and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


class Options(usage.Options):
    """Command-line options of C{twistd nestproto}."""

    synopsis = "[options]"
    longdesc = (
        "Serve the Nest thermostat device protocol and a control API. "
        "Point a thermostat's cloudregisterurl at <origin>/entry."
    )
    optFlags: list[list[Any]] = [
        [
            "record-raw",
            None,
            "With --record: keep serials, MACs, passwords and entry codes.",
        ],
        [
            "pairing-required",
            None,
            "Serve only devices a user claimed: an unclaimed one may show its "
            "pairing code and subscribe, its puts are dropped, and the control "
            "API does not list it (PROTOCOL.md section 2.3).",
        ],
        ["no-history", None, "Keep no history of temperatures and heating."],
    ]
    optParameters: list[list[Any]] = [
        [
            "record",
            None,
            None,
            "Directory to record every exchange to, as fixtures (see "
            "fixtures/README.rst); secrets redacted unless --record-raw.",
        ],
        [
            "device",
            None,
            "tcp:8000",
            "Endpoint thermostats connect to (ssl:... for TLS).",
        ],
        ["control", None, "tcp:8082", "Endpoint of the user-facing control API."],
        [
            "data",
            None,
            "./nestproto-data",
            "Directory of the state; created if missing.",
        ],
        [
            "store",
            None,
            None,
            "Keep the state in PostgreSQL, shared by every process given the "
            "same URL: postgresql://USER@HOST/DB (default: SQLite in --data).",
        ],
        [
            "origin",
            None,
            None,
            "Origin handed to devices, e.g. http://192.168.1.10:8000 "
            "(default: from each request's Host).",
        ],
        [
            "hold-timeout",
            None,
            290.0,
            "Seconds an idle subscribe is held (below --suspend-time-max).",
            _positiveNumber,
        ],
        [
            "suspend-time-max",
            None,
            300.0,
            "Seconds a device may sleep before it wakes by itself (5-350).",
            _positiveNumber,
        ],
        ["weather", None, "open-meteo", "Weather source: open-meteo (online) or none."],
        [
            "weather-ttl",
            None,
            600.0,
            "Seconds a weather answer is reused.",
            _positiveNumber,
        ],
        [
            "keep-logs",
            None,
            None,
            "Directory to keep device log uploads in (default: discard them).",
        ],
        [
            "entry-key-ttl",
            None,
            3600,
            f"Seconds a pairing code is valid (at least {MIN_ENTRY_KEY_TTL}).",
            int,
        ],
        [
            "control-token",
            None,
            None,
            "Require 'Authorization: Bearer TOKEN' on the control API (default: "
            f"the file {CONTROL_TOKEN_FILE} in --data if present, else open).",
        ],
        [
            "unavailable-after",
            None,
            600.0,
            "Seconds of silence after which a device is shown unavailable.",
            _positiveNumber,
        ],
        [
            "new-serials-per-hour",
            None,
            DEFAULT_NEW_SERIALS_PER_HOUR,
            "New device serials one client address may bring per hour (0: no limit).",
            _nonNegativeInteger,
        ],
        [
            "history-days",
            None,
            DEFAULT_RAW_DAYS,
            "Days every sample and HVAC transition is kept.",
            int,
        ],
        [
            "history-hourly-days",
            None,
            DEFAULT_HOURLY_DAYS,
            "Days hourly aggregates of the history are kept.",
            int,
        ],
        [
            "mqtt",
            None,
            None,
            "Publish to an MQTT broker, with Home Assistant discovery: "
            "mqtt://[USER[:PASSWORD]@]HOST[:PORT], or mqtts://... for TLS "
            f"(default: off). A password may instead be in {MQTT_PASSWORD_FILE} "
            "in --data.",
        ],
        [
            "mqtt-prefix",
            None,
            "nestproto",
            "Topic prefix of the MQTT bridge; nolongerevil gives the topics "
            "and entity ids of the NoLongerEvil server.",
        ],
        [
            "mqtt-discovery-prefix",
            None,
            "homeassistant",
            "Home Assistant's MQTT discovery prefix.",
        ],
        [
            "log-level",
            None,
            "info",
            "Least severe log events shown: debug (a line per request), info, "
            "warn or error.",
        ],
    ]

    #: Where the control token came from: C{"--control-token"}, the path of
    #: the token file, or C{None} (the API is open).
    controlTokenSource: str | None = None
    #: The broker of C{--mqtt} with its password, or C{None} (MQTT is off).
    mqttBroker: BrokerSettings | None = None

    def __init__(self) -> None:
        super().__init__()
        self["allow-origin"] = []
        self["trusted-network"] = []

    def opt_allow_origin(self, origin: str) -> None:
        """
        Let browser pages of ORIGIN (http(s)://HOST[:PORT]) call the control
        API, with CORS (repeatable; default: only the API's own origin).
        """
        normal = normaliseOrigin(origin)
        if normal is None:
            raise usage.UsageError(
                f"--allow-origin {origin!r} must be http(s)://HOST or "
                "http(s)://HOST:PORT, with no path"
            )
        self["allow-origin"].append(normal)

    def opt_trusted_network(self, network: str) -> None:
        """
        Let control API clients from the addresses of CIDR (e.g.
        192.168.1.0/24) in without the control token (repeatable).
        """
        try:
            self["trusted-network"].append(parseNetwork(network))
        except ValueError:
            raise usage.UsageError(
                f"--trusted-network {network!r} must be an address or a "
                "network such as 192.168.1.0/24"
            ) from None

    def opt_version(self) -> NoReturn:
        """Display nestproto's version and exit."""
        print(f"nestproto {__version__} (Twisted {twistedVersion})")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self._check()
        except usage.UsageError as e:
            _fail(self, e)

    def _check(self) -> None:
        for name in ("device", "control"):
            _checkEndpoint(name, self[name])
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}"
            )
        origin = self["origin"]
        if origin is not None:
            origin = origin.rstrip("/")
            if not _ORIGIN_PATTERN.match(origin):
                raise usage.UsageError(
                    f"--origin {origin!r} must be http(s)://HOST:PORT "
                    "with an explicit port"
                )
            self["origin"] = origin
        if self["weather"] not in WEATHER_SOURCES:
            raise usage.UsageError(
                f"--weather must be one of {', '.join(sorted(WEATHER_SOURCES))}"
            )
        suspend = self["suspend-time-max"]
        if not 5 <= suspend <= 350:
            raise usage.UsageError(
                "--suspend-time-max must be between 5 and 350 seconds"
            )
        if not self["hold-timeout"] < suspend:
            raise usage.UsageError(
                "--hold-timeout must be below --suspend-time-max, or devices wake "
                "before the server answers"
            )
        _checkDataDirectory(self["data"])
        _checkStore(self["store"])
        if not 1 <= self["history-days"] <= MAX_HISTORY_DAYS:
            raise usage.UsageError(
                f"--history-days must be between 1 and {MAX_HISTORY_DAYS}"
            )
        if not self["history-days"] <= self["history-hourly-days"] <= MAX_HISTORY_DAYS:
            raise usage.UsageError(
                "--history-hourly-days must be at least --history-days and at "
                f"most {MAX_HISTORY_DAYS}: days past the raw history are counted "
                "from hourly aggregates"
            )
        if not MIN_ENTRY_KEY_TTL <= self["entry-key-ttl"] <= 7 * 24 * 3600:
            raise usage.UsageError(
                f"--entry-key-ttl must be {MIN_ENTRY_KEY_TTL}-604800 seconds: a "
                "code is shown only while 30 minutes of it remain"
            )
        self["control-token"] = self._controlToken()
        self.mqttBroker = self._mqttBroker()

    def _mqttBroker(self) -> BrokerSettings | None:
        for name in ("mqtt-prefix", "mqtt-discovery-prefix"):
            prefix = self[name]
            levels = prefix.split("/")
            if not all(levels) or any(c in prefix for c in "+#\0"):
                raise usage.UsageError(
                    f"--{name} {prefix!r} must be topic levels separated by /, "
                    "without + or #, not starting or ending with /"
                )
        url = self["mqtt"]
        if url is None:
            return None
        try:
            broker = BrokerSettings.fromURL(url)
        except ValueError as e:
            raise usage.UsageError(f"--mqtt: {e}") from None
        path = os.path.join(self["data"], MQTT_PASSWORD_FILE)
        if broker.password is not None or not os.path.exists(path):
            return broker
        if broker.username is None:
            raise usage.UsageError(
                f"{path} holds an MQTT password, but --mqtt names no user "
                "(mqtt://USER@HOST)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                password = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"{path} cannot be read: {e}") from None
        return evolve(broker, password=password)

    def _controlToken(self) -> str | None:
        token = self["control-token"]
        where = "--control-token"
        if token is None:
            path = os.path.join(self["data"], CONTROL_TOKEN_FILE)
            try:
                with open(path, encoding="utf-8") as f:
                    token = f.read().strip()
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError(f"{path} cannot be read: {e}") from None
            where = path
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise usage.UsageError(
                f"{where}: the control token must be non-empty, printable, "
                "without spaces"
            )
        self.controlTokenSource = where
        return str(token)


def _checkEndpoint(name: str, description: str) -> None:
    """
    Refuse an endpoint string Twisted cannot build a server from; for
    C{ssl:} that includes a certificate or key file it cannot read.
    """
    try:
        serverFromString(MemoryReactor(), description)
    except OSError as e:
        if e.filename is None:
            raise usage.UsageError(
                f"--{name} {description!r} is not a server endpoint: {e}"
            ) from None
        raise usage.UsageError(
            f"--{name} {description!r}: the certificate or key file "
            f"{e.filename} cannot be read: {e.strerror}"
        ) from None
    except Exception as e:
        raise usage.UsageError(
            f"--{name} {description!r} is not a server endpoint: {e}"
        ) from None


def _checkStore(url: str | None) -> None:
    """A C{--store} must be a PostgreSQL URL, and psycopg installed."""
    if url is None:
        return
    if not url.startswith(("postgresql://", "postgres://")):
        raise usage.UsageError("--store must be a postgresql://USER@HOST/DATABASE URL")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise usage.UsageError(
            "--store postgresql:// needs psycopg: pip install 'nestproto[postgresql]'"
        ) from None


def _checkDataDirectory(path: str) -> None:
    """Create the data directory if missing, and make sure it can be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise usage.UsageError(
            f"--data {path!r} cannot be created: {e.strerror}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".nestproto-write-test-"):
            pass
    except OSError as e:
        raise usage.UsageError(
            f"--data {path!r} cannot be written: {e.strerror}"
        ) from None


class _QuietSite(Site):
    """
    A Site without an access log: twistd prints every event, and a line per
    long-poll on a Raspberry Pi's SD card is all noise. Its channels ask
    their transport for its addresses once (L{AddressKeepingHTTPChannel}).
    """

    def log(self, request: Request) -> None:
        pass

    def protocol(self) -> _GenericHTTPChannelProtocol:
        # As twisted.web.http's own factory builds it, around our channel.
        return _GenericHTTPChannelProtocol(AddressKeepingHTTPChannel())


class _TolerantSite(_QuietSite):
    """
    The device port's site: 4.x thermostats may send spaces inside the
    request target (PROTOCOL.md §20.2).
    """

    def protocol(self) -> _GenericHTTPChannelProtocol:
        # As twisted.web.http's own factory builds it, around our channel.
        return _GenericHTTPChannelProtocol(TolerantHTTPChannel())


@define
class _StoreService(Service):
    """
    Starts the worker threads; at stop, ends held subscribes (so devices
    reconnect at once) and event streams, commits what is pending, closes
    the file, stops the threads and lets the data directory go.
    """

    store: IBucketStore
    pools: list[ThreadPool]
    hub: SubscriberHub
    events: EventStream
    lock: DataLock | None = None

    def startService(self) -> None:
        Service.startService(self)
        if self.lock is not None:
            # twistd has forked into the background by now: a new pid.
            self.lock.writePid()
        for pool in self.pools:
            pool.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.hub.endAll()
        self.events.endAll()

        def stopPools(result: object) -> object:
            for pool in self.pools:
                pool.stop()
            if self.lock is not None:
                self.lock.release()
            return result

        return self.store.close().addBoth(stopPools)


def _exitAfterTwistd(status: int) -> None:
    """
    End the process with C{status} once twistd has finished its own
    shutdown (removed its pidfile, logged "Server Shut Down."): twistd
    itself always exits with 0.
    """

    def exitNow() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(exitNow)


@define
class _StopOnFailure:
    """
    Stops the server for good: the reactor stops and, once it has shut
    down, the process is made to exit with status 1, so a service manager
    sees a failure (and may restart it) instead of a server that runs with a
    port missing.

    @ivar exit: called with the status after the reactor's shutdown.
    """

    reactor: Any
    exit: Callable[[int], object] = _exitAfterTwistd
    stopping: bool = field(default=False, init=False)

    def __call__(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.reactor.addSystemEventTrigger("after", "shutdown", self.exit, 1)
        # A listen fails before the reactor runs (twistd listens first).
        self.reactor.callWhenRunning(self.reactor.stop)


def _describeAddress(address: object) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(address, "name", None)
    return str(address) if name is None else str(name)


def _listenFailureReason(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        socketError = error.socketError
        reason = socketError.strerror or str(socketError)
        port = error.port
        if socketError.errno == errno.EACCES and isinstance(port, int) and port < 1024:
            reason += (
                " (a privileged port, below 1024 by default, needs root or "
                "CAP_NET_BIND_SERVICE)"
            )
        return reason
    return failure.getErrorMessage()


class _Listener(StreamServerEndpointService):
    """
    One named listener (C{device} or C{control}): says where it listens
    once it does, and stops the server when it cannot.
    """

    def __init__(
        self,
        name: str,
        description: str,
        endpoint: Any,
        factory: Site,
        onFailure: Callable[[], None],
        onListening: Callable[[IListeningPort], None] = lambda port: None,
    ) -> None:
        super().__init__(endpoint, factory)
        self.name = name
        self.description = description
        self.onFailure = onFailure
        self.onListening = onListening

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._waitingForPort = self.endpoint.listen(self.factory).addCallbacks(
            self._listening, self._failed
        )

    def _listening(self, port: IListeningPort) -> IListeningPort:
        log.info(
            "{name} endpoint listening on {address} ({endpoint})",
            name=self.name,
            address=_describeAddress(port.getHost()),
            endpoint=self.description,
        )
        self.onListening(port)
        return port

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return None
        log.critical(
            "{name} endpoint {endpoint} cannot listen: {reason}; stopping",
            name=self.name,
            endpoint=self.description,
            reason=_listenFailureReason(failure),
        )
        self.onFailure()
        return None


@define
class _Announce(Service):
    """Says, once, at start-up, what this server is and what it serves."""

    lines: list[tuple[str, dict[str, object]]]
    _done: bool = field(default=False, init=False)

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._announce()

    def startService(self) -> None:
        Service.startService(self)
        self._announce()

    def _announce(self) -> None:
        if self._done:
            return
        self._done = True
        for format, fields in self.lines:
            log.info(format, **fields)


def _startupLines(
    options: usage.Options, storePath: str, devices: int
) -> list[tuple[str, dict[str, object]]]:
    """
    What the server says at start-up: never the token itself, only where
    it came from.
    """
    lines = _startupLinesSQLite(options, storePath, devices)
    if options.get("store") is not None:
        lines[1] = (
            "store: PostgreSQL {where}; devices loaded: {devices}",
            {"where": storePath, "devices": devices},
        )
    return lines


def _startupLinesSQLite(
    options: usage.Options, storePath: str, devices: int
) -> list[tuple[str, dict[str, object]]]:
    """
    What the server says at start-up: never the token itself, only where
    it came from.
    """
    source = getattr(options, "controlTokenSource", None)
    if options["control-token"] is None:
        protection = "open: no token, anyone who can reach it may use it"
    else:
        where = (
            "--control-token" if source == "--control-token" else f"the file {source}"
        )
        protection = (
            f"bearer token from {where} (Authorization header or the /k/<token>/ "
            "path prefix)"
        )
        networks = options.get("trusted-network") or []
        if networks:
            protection += "; no token needed from " + ", ".join(map(str, networks))
    origins = ", ".join(options.get("allow-origin") or [])
    protection += f"; browser pages allowed from {origins or 'its own origin only'}"
    perHour = options["new-serials-per-hour"]
    admission = (
        "pairing required: only claimed devices are served"
        if options["pairing-required"]
        else "open: any device may connect"
    )
    admission += (
        "; passwords bound on first use; new serials per address and hour: "
        + (str(perHour) if perHour else "no limit")
    )
    record = options["record"]
    if record is None:
        recording = "off"
    else:
        redaction = "raw" if options["record-raw"] else "secrets redacted"
        recording = f"to {os.path.abspath(record)} ({redaction})"
    if options["no-history"]:
        history = "off"
    else:
        history = (
            f"samples and HVAC transitions kept {options['history-days']} days, "
            f"hourly aggregates {options['history-hourly-days']} days"
        )
    return [
        (
            "nestproto {version} (Twisted {twistedVersion}) starting",
            {"version": __version__, "twistedVersion": twistedVersion},
        ),
        (
            "store: SQLite database {path}; devices loaded: {devices}",
            {"path": storePath, "devices": devices},
        ),
        ("control API access: {protection}", {"protection": protection}),
        ("device admission: {admission}", {"admission": admission}),
        ("recording exchanges: {recording}", {"recording": recording}),
        ("history: {history}", {"history": history}),
        ("MQTT: {mqtt}", {"mqtt": _mqttLine(options)}),
    ]


def _mqttLine(options: usage.Options) -> str:
    broker = getattr(options, "mqttBroker", None)
    if broker is None:
        return "off"
    return (
        f"{broker.describe()}, topics under {options['mqtt-prefix']}/, "
        f"discovery under {options['mqtt-discovery-prefix']}/"
    )


def _levelFilter(level: LogLevel) -> LogLevelFilterPredicate:
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    if level > LogLevel.debug:
        for namespace in PER_REQUEST_NAMESPACES:
            predicate.setLogLevelForNamespace(namespace, max(level, LogLevel.warn))
    return predicate


class _ServerService(MultiService):
    """
    The root of the service tree. Under twistd it also gives the
    application the log observer, so C{--log-level} applies to twistd's
    output (stdout, C{--logfile} or C{--syslog}); a C{--logger} given to
    twistd takes precedence and is not filtered.
    """

    def __init__(self, level: LogLevel, twistdOptions: usage.Options | None) -> None:
        super().__init__()
        self.level = level
        self.twistdOptions = twistdOptions

    def setServiceParent(self, parent: Any) -> None:
        if (
            self.twistdOptions is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            # The observer twistd would make from its own options, filtered.
            # twistd asks the application for one before making its own.
            from twisted.scripts._twistd_unix import UnixAppLogger

            observer = UnixAppLogger(self.twistdOptions)._getLogObserver()
            if not ILogObserver.providedBy(observer):
                observer = LegacyLogObserverWrapper(observer)  # --syslog
            parent.setComponent(
                ILogObserver,
                FilteringLogObserver(observer, [_levelFilter(self.level)]),
            )
            # Debug events this observer drops are not emitted at all.
            SwitchedLogger.debugOn = self.level <= LogLevel.debug
        super().setServiceParent(parent)


def _site(resource: IResource, tolerant: bool = False) -> Site:
    # Bodies are parsed by nestproto (wire, the entry form, uploads); Twisted's
    # own form parsing would run the Content-Type of every POST through the
    # email package (a tenth of the server's time under a reconnect storm)
    # and copy form and multipart bodies into request.args.
    site = (_TolerantSite if tolerant else _QuietSite)(
        resource, parsePOSTFormSubmission=False
    )
    site.displayTracebacks = False
    # The listener says where it listens; "Starting factory" says nothing more.
    site.noisy = False
    return site


def _openStore(
    options: usage.Options, runInThread: Any, clock: IReactorTime
) -> tuple[DataLock, IBucketStore, str]:
    """
    Take the data directory (one server per directory), then open the
    store in it.

    @raise StartupError: another process holds the directory, or the store
        cannot be opened.
    """
    data = options["data"]
    try:
        lock = DataLock.acquire(data)
    except DataDirectoryInUse as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(
            f"the data directory {os.path.abspath(data)} cannot be written: "
            f"{e.strerror}"
        ) from None
    if options.get("store") is not None:
        try:
            shared, described = _openPostgreSQL(options["store"], runInThread, clock)
            return lock, shared, described
        except BaseException:
            lock.release()
            raise
    storePath = os.path.abspath(os.path.join(data, STORE_FILE))
    try:
        store = SQLiteStore.open(storePath, runInThread, clock)
    except (sqlite3.Error, SchemaTooNew) as e:
        lock.release()
        raise StartupError(f"the store {storePath} cannot be opened: {e}") from None
    except BaseException:
        lock.release()
        raise
    return lock, store, storePath


def _openPostgreSQL(
    url: str, runInThread: Any, clock: IReactorTime
) -> tuple[IBucketStore, str]:
    """
    Open the PostgreSQL store at C{url}; also say where it is, without a
    password.

    @raise StartupError: it cannot be reached or read.
    """
    import psycopg

    from .store_pg import PostgreSQLStore

    try:
        where = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise StartupError(f"--store is not a PostgreSQL URL: {e}") from None
    described = "{}@{}:{}/{}".format(
        where.get("user", ""),
        where.get("host", "localhost"),
        where.get("port", 5432),
        where.get("dbname", ""),
    )
    try:
        store = PostgreSQLStore.open(url, runInThread, clock)
    except (psycopg.Error, SchemaTooNew) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise StartupError(
            f"the PostgreSQL store {described} cannot be opened: {reason}"
        ) from None
    return store, described


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """
    Build the service tree: store, hub, state and both HTTP listeners.

    The data directory is locked from here until the service stops.

    @param reactor: defaults to the global reactor; tests pass a fake.

    @raise StartupError: the server cannot start (under twistd: the
        process exits with the one line instead).
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    # One thread owns the SQLite connection; blocking work of requests
    # (log uploads) gets its own threads so it never delays a commit.
    pool = ThreadPool(minthreads=1, maxthreads=1, name="nestproto-store")
    ioPool = ThreadPool(minthreads=0, maxthreads=2, name="nestproto-io")
    try:
        lock, store, storePath = _openStore(
            options, partial(deferToThreadPool, reactor, pool), reactor
        )
    except StartupError as e:
        _fail(options, e)
    pools = [pool, ioPool]
    presence: IPresence | None = None
    shared: list[IService] = []
    if options.get("store") is not None:
        # The PostgreSQL engine's listening connection waits in a thread
        # of its own. The history has a thread (and connection) of its own
        # too, so that a flush, a roll-up, a metrics scrape's size query
        # (history on or off) or a presence sync never delays a commit.
        # Its pool is made here, as the feed's, so that _StoreService
        # starts and stops it with the others: stopped after the store's
        # close, which closes the history's connection once its jobs (the
        # last flush among them) are done.
        from .store_pg import PRESENCE_SYNC_SECONDS, PostgreSQLStore, SharedPresence

        feedPool = ThreadPool(minthreads=1, maxthreads=1, name="nestproto-feed")
        pools.append(feedPool)
        assert isinstance(store, PostgreSQLStore)
        store.follow(partial(deferToThreadPool, reactor, feedPool))
        historyPool = ThreadPool(minthreads=1, maxthreads=1, name="nestproto-history")
        pools.append(historyPool)
        store.runHistoryIn(partial(deferToThreadPool, reactor, historyPool))
        sharedPresence = SharedPresence(store, reactor)
        presence = sharedPresence
        syncing = TimerService(PRESENCE_SYNC_SECONDS, sharedPresence.sync)
        syncing.clock = reactor
        shared.append(syncing)
    weatherSource = (
        NoWeather() if options["weather"] == "none" else OpenMeteoSource(treq, reactor)
    )
    keepLogs = options["keep-logs"]
    apps = buildApps(
        store,
        reactor,
        presence=presence,
        sharedThrottles=options.get("store") is not None,
        runInThread=partial(deferToThreadPool, reactor, ioPool),
        settings=AppSettings(
            holdSeconds=options["hold-timeout"],
            transport=TransportSettings(
                origin=options["origin"],
                suspendTimeMaxSeconds=int(options["suspend-time-max"]),
            ),
            control=ControlSettings(
                token=options["control-token"],
                allowOrigins=frozenset(options["allow-origin"]),
                trustedNetworks=tuple(options["trusted-network"]),
                unavailableAfterSeconds=options["unavailable-after"],
            ),
            admission=AdmissionSettings(
                pairingRequired=bool(options["pairing-required"]),
                newSerialsPerHour=options["new-serials-per-hour"],
            ),
            entryKeyTtlSeconds=options["entry-key-ttl"],
            weatherTtlSeconds=options["weather-ttl"],
            history=None
            if options["no-history"]
            else HistorySettings(
                rawDays=options["history-days"],
                hourlyDays=options["history-hourly-days"],
            ),
        ),
        weatherSource=weatherSource,
        logs=LogStore(None if keepLogs is None else FilePath(keepLogs), reactor),
    )

    root = _ServerService(LOG_LEVELS[options["log-level"]], options.parent)
    devices = sum(1 for scope in store.scopes() if scope)
    lines = _startupLines(options, storePath, devices)
    lines.insert(1, ("reactor: {reactor}", {"reactor": describeReactor(reactor)}))
    _Announce(lines).setServiceParent(root)
    CollectorService(reactor).setServiceParent(root)
    _StoreService(store, pools, apps.hub, apps.events, lock).setServiceParent(root)
    for service in shared:
        service.setServiceParent(root)
    if apps.history is not None:
        # Stopped before the store (services stop in reverse order), so its
        # last rows are written before the store closes.
        HistoryService(apps.history).setServiceParent(root)
    broker = getattr(options, "mqttBroker", None)
    if broker is not None:
        # After the store's service, so it stops (and says offline) first.
        bridgeService(
            apps.state,
            apps.hub,
            MQTTSettings(
                broker=broker,
                prefix=options["mqtt-prefix"],
                discoveryPrefix=options["mqtt-discovery-prefix"],
                unavailableAfterSeconds=options["unavailable-after"],
            ),
            reactor,
            apps.control.admission,
        ).setServiceParent(root)
    deviceResource: IResource = apps.device.app.resource()
    controlResource: IResource = apps.control.app.resource()
    if options["record"] is not None:
        recorder = Recorder(options["record"], reactor, raw=bool(options["record-raw"]))
        RecorderService(recorder).setServiceParent(root)
        deviceResource = recorder.wrap(deviceResource, DEVICE)
        controlResource = recorder.wrap(controlResource, CONTROL)
    stop = _StopOnFailure(reactor)
    # The dashboard shows thermostats the entry URL: --origin, or the device
    # port as the page's host reaches it.
    dashboard = apps.control.dashboard
    dashboard.deviceOrigin = options["origin"]
    deviceSecure = options["device"].startswith("ssl:")
    for name, description, resource, onListening in [
        (
            "device",
            options["device"],
            deviceResource,
            lambda port: dashboard.deviceListening(port, deviceSecure),
        ),
        ("control", options["control"], controlResource, lambda port: None),
    ]:
        endpoint = serverFromString(reactor, _withBacklog(description))
        site = _site(resource, tolerant=name == "device")
        _Listener(
            name, description, endpoint, site, stop, onListening
        ).setServiceParent(root)
    return root
