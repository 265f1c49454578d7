# -*- test-case-name: tests.test_service -*-
"""
C{twistd nestproto}: options and the service tree.
"""

from __future__ import annotations

import gc
import os
import re
from functools import partial
from typing import Any

import treq
from attrs import define, field
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.web.http import Request
from twisted.web.resource import IResource
from twisted.web.server import Site

from .apps import AppSettings, buildApps
from .control.api import ControlSettings
from .device.api import TransportSettings
from .hub import SubscriberHub
from .pairing import MIN_REMAINING_SECONDS
from .recording.format import CONTROL, DEVICE
from .recording.recorder import Recorder, RecorderService
from .store import SQLiteStore
from .uploads import LogStore
from .weather import NoWeather, OpenMeteoSource

_ORIGIN_PATTERN = re.compile(
    r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$"
)
#: Queued connections per listener: a reconnect storm of every held device
#: at once must not be refused (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 4096
STORE_FILE = "nestproto.sqlite3"
#: A file in --data holding the control API's bearer token.
CONTROL_TOKEN_FILE = "control-token"
#: Shortest entry-key lifetime: a key is served only while 30 min of it
#: remain (pairing.MIN_REMAINING_SECONDS), so this leaves a code on the
#: screen for at least 10 minutes.
MIN_ENTRY_KEY_TTL = MIN_REMAINING_SECONDS + 600
#: The cyclic collector's thresholds while serving (CPython's are 700, 10,
#: 10). Every HTTP request's objects end in a reference cycle (Klein's
#: render closure refers to itself), so only the collector frees them. At
#: 700 allocations per young collection, the objects of requests still
#: waiting for their commit are promoted to the oldest generation, and
#: under 2,000 puts/s a full collection (200 ms with 20,000 devices stored)
#: ran every second: put p99 258 ms. At 10,000 it is 60 ms
#: (bench/bench_transport.py).
COLLECTOR_THRESHOLDS = (10_000, 10, 10)
WEATHER_SOURCES = {"open-meteo", "none"}


def _positiveNumber(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be above 0")
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
    ]

    def postOptions(self) -> None:
        for name in ("device", "control"):
            try:
                serverFromString(MemoryReactor(), self[name])
            except Exception as e:
                raise usage.UsageError(
                    f"--{name} {self[name]!r} is not a server endpoint: {e}"
                ) from None
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
        try:
            os.makedirs(self["data"], exist_ok=True)
        except OSError as e:
            raise usage.UsageError(
                f"--data {self['data']!r} cannot be created: {e.strerror}"
            ) from None
        if not MIN_ENTRY_KEY_TTL <= self["entry-key-ttl"] <= 7 * 24 * 3600:
            raise usage.UsageError(
                f"--entry-key-ttl must be {MIN_ENTRY_KEY_TTL}-604800 seconds: a "
                "code is shown only while 30 minutes of it remain"
            )
        self["control-token"] = self._controlToken()

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
        return str(token)


class _QuietSite(Site):
    """
    A Site without an access log: twistd prints every event, and a line per
    long-poll on a Raspberry Pi's SD card is all noise.
    """

    def log(self, request: Request) -> None:
        pass


@define
class _CollectorService(Service):
    """
    Sets the cyclic garbage collector's thresholds while the server runs,
    and puts the previous ones back when it stops.
    """

    thresholds: tuple[int, int, int] = COLLECTOR_THRESHOLDS
    _previous: tuple[int, int, int] | None = field(default=None, init=False)

    def startService(self) -> None:
        Service.startService(self)
        self._previous = gc.get_threshold()
        gc.set_threshold(*self.thresholds)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            self._previous = None


@define
class _StoreService(Service):
    """
    Starts the worker threads; at stop, ends held subscribes (so devices
    reconnect at once), commits what is pending, closes the file and stops
    the threads.
    """

    store: SQLiteStore
    pools: list[ThreadPool]
    hub: SubscriberHub

    def startService(self) -> None:
        Service.startService(self)
        for pool in self.pools:
            pool.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.hub.endAll()

        def stopPools(result: object) -> object:
            for pool in self.pools:
                pool.stop()
            return result

        return self.store.close().addBoth(stopPools)


def _site(resource: IResource) -> Site:
    # Bodies are parsed by nestproto (wire, the entry form, uploads); Twisted's
    # own form parsing would run the Content-Type of every POST through the
    # email package (a tenth of the server's time under a reconnect storm)
    # and copy form and multipart bodies into request.args.
    site = _QuietSite(resource, parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    return site


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """
    Build the service tree: store, hub, state and both HTTP listeners.

    @param reactor: defaults to the global reactor; tests pass a fake.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    # One thread owns the SQLite connection; blocking work of requests
    # (log uploads) gets its own threads so it never delays a commit.
    pool = ThreadPool(minthreads=1, maxthreads=1, name="nestproto-store")
    ioPool = ThreadPool(minthreads=0, maxthreads=2, name="nestproto-io")
    store = SQLiteStore.open(
        os.path.join(options["data"], STORE_FILE),
        partial(deferToThreadPool, reactor, pool),
    )
    weatherSource = (
        NoWeather() if options["weather"] == "none" else OpenMeteoSource(treq, reactor)
    )
    keepLogs = options["keep-logs"]
    apps = buildApps(
        store,
        reactor,
        runInThread=partial(deferToThreadPool, reactor, ioPool),
        settings=AppSettings(
            holdSeconds=options["hold-timeout"],
            transport=TransportSettings(
                origin=options["origin"],
                suspendTimeMaxSeconds=int(options["suspend-time-max"]),
            ),
            control=ControlSettings(
                token=options["control-token"],
                unavailableAfterSeconds=options["unavailable-after"],
            ),
            entryKeyTtlSeconds=options["entry-key-ttl"],
            weatherTtlSeconds=options["weather-ttl"],
        ),
        weatherSource=weatherSource,
        logs=LogStore(None if keepLogs is None else FilePath(keepLogs), reactor),
    )

    root = MultiService()
    _CollectorService().setServiceParent(root)
    _StoreService(store, [pool, ioPool], apps.hub).setServiceParent(root)
    deviceResource: IResource = apps.device.app.resource()
    controlResource: IResource = apps.control.app.resource()
    if options["record"] is not None:
        recorder = Recorder(options["record"], reactor, raw=bool(options["record-raw"]))
        RecorderService(recorder).setServiceParent(root)
        deviceResource = recorder.wrap(deviceResource, DEVICE)
        controlResource = recorder.wrap(controlResource, CONTROL)
    for description, resource in [
        (options["device"], deviceResource),
        (options["control"], controlResource),
    ]:
        endpoint = serverFromString(reactor, _withBacklog(description))
        StreamServerEndpointService(endpoint, _site(resource)).setServiceParent(root)
    return root
