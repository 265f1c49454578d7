# -*- test-case-name: tests.test_metrics -*-
"""
Operational metrics in Prometheus text format (C{GET /metrics} on the
control port).

Each server has its own C{CollectorRegistry}, not prometheus_client's
global one, so servers built side by side (the tests) count apart. Counters
and histograms are updated where things happen; gauges of state (held
subscribes, devices, readings) are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from attrs import define, field, frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

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
    known: Callable[[], int]
    online: Callable[[], int]
    readings: Callable[[], Iterable[Reading]]
    databaseBytes: Callable[[], Deferred[int]] | None = None


@frozen
class _StateCollector:
    sources: StateSources

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "nestproto_held_subscribes",
            "Subscribes held open now.",
            value=self.sources.held(),
        )
        yield GaugeMetricFamily(
            "nestproto_devices_known",
            "Devices with buckets or an owner.",
            value=self.sources.known(),
        )
        yield GaugeMetricFamily(
            "nestproto_devices_online",
            "Known devices holding a subscribe or heard from recently.",
            value=self.sources.online(),
        )
        families = {
            name: GaugeMetricFamily(
                f"nestproto_device_{name}", documentation, labels=["serial"]
            )
            for name, documentation in [
                ("temperature_celsius", "Current temperature a device reports."),
                ("target_temperature_celsius", "Target temperature of a device."),
                ("humidity_percent", "Relative humidity a device reports."),
            ]
        }
        for reading in self.sources.readings():
            for name, value in [
                ("temperature_celsius", reading.temperature),
                ("target_temperature_celsius", reading.target),
                ("humidity_percent", reading.humidity),
            ]:
                if value is not None:
                    families[name].add_metric([reading.serial], value)
        yield from families.values()


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
        self.registry.register(_StateCollector(sources))

    def pushed(self, buckets: Sequence[Bucket]) -> None:
        """
        C{buckets} were written to a held subscribe: their latency is from
        the newest one's timestamp, the time its transaction decided.
        """
        newestMs = max(bucket.timestamp for bucket in buckets)
        self.pushSeconds.observe(max(0.0, self.clock.seconds() - newestMs / 1000))

    def render(self) -> Deferred[bytes]:
        """The text exposition of every metric, database size refreshed."""
        sources = self._sources
        if sources is None or sources.databaseBytes is None:
            sized: Deferred[int | None] = succeed(None)
        else:
            sized = sources.databaseBytes().addErrback(self._unsized)

        def render(size: int | None) -> bytes:
            if size is not None:
                self._databaseBytes.set(size)
            return generate_latest(self.registry)

        return sized.addCallback(render)

    def _unsized(self, failure: Failure) -> None:
        self.log.failure("reading the database size failed", failure)
        return None
