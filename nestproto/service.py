# -*- test-case-name: tests.test_service -*-
"""
C{twistd nestproto}: options and the service tree.
"""

from __future__ import annotations

import os
import re
from functools import partial
from typing import Any

from attrs import define
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from .control.api import ControlAPI
from .device.api import DeviceAPI, TransportSettings
from .hub import SubscriberHub
from .state import DeviceState
from .store import SQLiteStore

_ORIGIN_PATTERN = re.compile(
    r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$"
)
#: Queued connections per listener: a reconnect storm of every held device
#: at once must not be refused (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 4096
STORE_FILE = "nestproto.sqlite3"


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
    optParameters: list[list[Any]] = [
        [
            "device",
            None,
            "tcp:8000",
            "Endpoint thermostats connect to (any Twisted server endpoint; ssl:... for TLS).",
        ],
        ["control", None, "tcp:8082", "Endpoint of the user-facing control API."],
        [
            "data",
            None,
            "./nestproto-data",
            "Directory holding the state (created if missing).",
        ],
        [
            "origin",
            None,
            None,
            "Public origin handed to devices, e.g. http://192.168.1.10:8000 (default: from each request's Host).",
        ],
        [
            "hold-timeout",
            None,
            290.0,
            "Seconds an idle subscribe is held before it ends (below --suspend-time-max).",
            _positiveNumber,
        ],
        [
            "suspend-time-max",
            None,
            300.0,
            "Seconds a device may sleep before it wakes by itself (X-nl-suspend-time-max, 5-350).",
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
                    f"--origin {origin!r} must be http(s)://HOST:PORT with an explicit port"
                )
            self["origin"] = origin
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


class _QuietSite(Site):
    """
    A Site without an access log: twistd prints every event, and a line per
    long-poll on a Raspberry Pi's SD card is all noise.
    """

    def log(self, request: Request) -> None:
        pass


@define
class _StoreService(Service):
    """
    Starts the store's thread; at stop, ends held subscribes (so devices
    reconnect at once), commits what is pending and closes the file.
    """

    store: SQLiteStore
    pool: ThreadPool
    hub: SubscriberHub

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.hub.endAll()

        def stopPool(result: object) -> object:
            self.pool.stop()
            return result

        return self.store.close().addBoth(stopPool)


def _site(resource: IResource) -> Site:
    site = _QuietSite(resource)
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
    pool = ThreadPool(minthreads=1, maxthreads=1, name="nestproto-store")
    store = SQLiteStore.open(
        os.path.join(options["data"], STORE_FILE),
        partial(deferToThreadPool, reactor, pool),
    )
    hub = SubscriberHub(
        reactor,
        holdSeconds=options["hold-timeout"],
    )
    state = DeviceState(store, hub, reactor)
    settings = TransportSettings(
        origin=options["origin"],
        suspendTimeMaxSeconds=int(options["suspend-time-max"]),
    )
    device = DeviceAPI(state=state, hub=hub, settings=settings)
    control = ControlAPI(state=state)

    root = MultiService()
    _StoreService(store, pool, hub).setServiceParent(root)
    for description, resource in [
        (options["device"], device.app.resource()),
        (options["control"], control.app.resource()),
    ]:
        endpoint = serverFromString(reactor, _withBacklog(description))
        StreamServerEndpointService(endpoint, _site(resource)).setServiceParent(root)
    return root
