# -*- test-case-name: tests.test_metrics -*-
"""
Operational metrics in Prometheus text format (C{GET /metrics} on the
control port).

Each server has its own C{CollectorRegistry}, not prometheus_client's
global one, so servers built side by side (the tests) count apart. Counters
and histograms are updated where things happen; gauges of state (held
subscribes, devices, readings) are read when scraped.

The readings are three samples per device: 60,000 at 20,000 devices, which
prometheus_client formats in about a second of the reactor's time. They are
written here instead, L{READINGS_PER_TURN} devices per reactor turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from attrs import define, field, frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .buckets import Bucket

#: The text format every Prometheus reads (0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Histogram buckets, in seconds: pushes and commits take milliseconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: Devices whose readings are written per reactor turn at a scrape.
READINGS_PER_TURN = 500
#: The per-device gauges: name, help, and the field of L{Reading}.
READING_GAUGES = (
    (
        "nestproto_device_temperature_celsius",
        "Current temperature a device reports.",
        "temperature",
    ),
    (
        "nestproto_device_target_temperature_celsius",
        "Target temperature of a device.",
        "target",
    ),
    (
        "nestproto_device_humidity_percent",
        "Relative humidity a device reports.",
        "humidity",
    ),
)


@frozen
class Reading:
    """One device's current numbers; C{None} when it has not sent them."""

    serial: str
    temperature: float | None
    target: float | None
    humidity: float | None


@frozen
class StateSources:
    """Where scraped gauges are read from, each called at every scrape."""

    held: Callable[[], int]
    #: The known devices...
    serials: Callable[[], Sequence[str]]
    #: ...how many of some of them are online...
    online: Callable[[Sequence[str]], int]
    #: ...and their readings.
    readings: Callable[[Sequence[str]], Iterable[Reading]]
    databaseBytes: Callable[[], Deferred[int]] | None = None


def _labelValue(text: str) -> str:
    # The text format's escapes inside a label value.
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _gauge(name: str, documentation: str) -> str:
    return f"# HELP {name} {documentation}\n# TYPE {name} gauge\n"


def _number(value: float) -> str:
    return repr(value) if math.isfinite(value) else floatToGoString(value)


@define(eq=False)
class Metrics:
    """
    A server's metrics: counters the APIs increment, latency histograms,
    and the state gauges of L{watch}.
    """

    log = Logger()

    clock: IReactorTime
    registry: CollectorRegistry = field(factory=CollectorRegistry)
    subscribes: Counter = field(init=False)
    puts: Counter = field(init=False)
    commands: Counter = field(init=False)
    pushSeconds: Histogram = field(init=False)
    commitSeconds: Histogram = field(init=False)
    _databaseBytes: Gauge = field(init=False)
    _sources: StateSources | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.subscribes = Counter(
            "nestproto_subscribes",
            "Subscribes received from devices.",
            registry=registry,
        )
        self.puts = Counter(
            "nestproto_puts", "Puts received from devices.", registry=registry
        )
        self.commands = Counter(
            "nestproto_commands",
            "Control commands accepted, by command.",
            ["command"],
            registry=registry,
        )
        self.pushSeconds = Histogram(
            "nestproto_push_latency_seconds",
            "From a change's transaction to its push onto a held subscribe.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commitSeconds = Histogram(
            "nestproto_store_commit_seconds",
            "From deciding a group commit to its being durable.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._databaseBytes = Gauge(
            "nestproto_database_bytes",
            "Size of the database, history included.",
            registry=registry,
        )

    def watch(self, sources: StateSources) -> None:
        """Report the state of C{sources} at every scrape (once per server)."""
        self._sources = sources

    def pushed(self, buckets: Sequence[Bucket]) -> None:
        """
        C{buckets} were written to a held subscribe: their latency is from
        the newest one's timestamp, the time its transaction decided.
        """
        newestMs = max(bucket.timestamp for bucket in buckets)
        self.pushSeconds.observe(max(0.0, self.clock.seconds() - newestMs / 1000))

    def render(self) -> Deferred[bytes]:
        """The text exposition of every metric, database size refreshed."""
        return ensureDeferred(self._render())

    async def _render(self) -> bytes:
        sources = self._sources
        if sources is not None and sources.databaseBytes is not None:
            try:
                self._databaseBytes.set(await sources.databaseBytes())
            except Exception:
                self.log.failure("reading the database size failed")
        head = generate_latest(self.registry)
        if sources is None:
            return head
        lines: list[list[str]] = [
            [_gauge(name, documentation)]
            for name, documentation, _field in READING_GAUGES
        ]
        serials = sources.serials()
        online = 0
        for start in range(0, len(serials), READINGS_PER_TURN):
            if start:
                # Let the reactor serve others between slices.
                await deferLater(self.clock, 0, lambda: None)
            some = serials[start : start + READINGS_PER_TURN]
            online += sources.online(some)
            for reading in sources.readings(some):
                label = f'{{serial="{_labelValue(reading.serial)}"}} '
                for (name, _documentation, field_), out in zip(
                    READING_GAUGES, lines, strict=True
                ):
                    value = getattr(reading, field_)
                    if value is not None:
                        out.append(f"{name}{label}{_number(value)}\n")
        devices = [
            _gauge("nestproto_held_subscribes", "Subscribes held open now.")
            + f"nestproto_held_subscribes {sources.held()}\n",
            _gauge("nestproto_devices_known", "Devices with buckets or an owner.")
            + f"nestproto_devices_known {len(serials)}\n",
            _gauge(
                "nestproto_devices_online",
                "Known devices holding a subscribe or heard from recently.",
            )
            + f"nestproto_devices_online {online}\n",
        ]
        body = "".join(devices) + "".join(line for out in lines for line in out)
        return head + body.encode("utf-8")
