# -*- test-case-name: tests.test_metrics -*-
"""
Tests for L{nestproto.metrics}: C{GET /metrics} read with prometheus_client's
own parser while a simulated thermostat works against a server in memory.
"""

from __future__ import annotations

from typing import Any

import treq
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from nestproto.buckets import Bucket
from nestproto.metrics import CONTENT_TYPE, READINGS_PER_TURN
from nestproto.store import BucketWrite, Write

from .helpers import CONTROL_URL, SERIAL, makeServer
from .test_simulator import _Harness

SHARED = f"shared.{SERIAL}"


def scrape(harness: _Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of C{/metrics}, by name and labels, parsed as Prometheus does."""
    client = harness.server.controlClient
    responses: list[Any] = []
    client.get(CONTROL_URL + "/metrics").addCallback(responses.append)
    harness.pump()
    (response,) = responses
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [CONTENT_TYPE]
    bodies: list[bytes] = []
    treq.content(response).addCallback(bodies.append)
    harness.pump()
    samples = {}
    for family in text_string_to_metric_families(bodies[0].decode("utf-8")):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


class MetricsTests(SynchronousTestCase):
    """The counters move as a simulated thermostat works."""

    def setUp(self) -> None:
        self.harness = _Harness(changeSeconds=60)
        self.harness.thermostat.start()
        self.harness.pump()
        self.addCleanup(self.harness.thermostat.stop)

    def test_countersMove(self) -> None:
        """
        Subscribes and puts count the thermostat's requests, commands the
        control API's, by command; a command's push and every commit land
        in the latency histograms.
        """
        before = scrape(self.harness)
        self.harness.advance(60)
        self.harness.control(
            "/command", {"serial": SERIAL, "command": "set_temperature", "value": 22}
        )
        self.harness.advance(3)
        after = scrape(self.harness)
        thermostat = self.harness.thermostat
        self.assertEqual(after["nestproto_subscribes_total", ()], thermostat.subscribes)
        self.assertEqual(after["nestproto_puts_total", ()], thermostat.puts)
        self.assertGreater(after["nestproto_puts_total", ()], 0)
        self.assertEqual(
            after["nestproto_commands_total", (("command", "set_temperature"),)], 1
        )
        self.assertNotIn(
            ("nestproto_commands_total", (("command", "set_temperature"),)), before
        )
        self.assertEqual(before["nestproto_push_latency_seconds_count", ()], 0)
        self.assertEqual(after["nestproto_push_latency_seconds_count", ()], 1)
        # The clock stood still while the command was pushed.
        self.assertEqual(
            after["nestproto_push_latency_seconds_bucket", (("le", "0.001"),)], 1
        )
        self.assertGreater(
            after["nestproto_store_commit_seconds_count", ()],
            before["nestproto_store_commit_seconds_count", ()],
        )

    def test_state(self) -> None:
        """
        Gauges show the held subscribe, the device known and online, its
        readings as stored, and the database's size.
        """
        self.harness.advance(60)
        samples = scrape(self.harness)
        self.assertEqual(samples["nestproto_held_subscribes", ()], 1)
        self.assertEqual(samples["nestproto_devices_known", ()], 1)
        self.assertEqual(samples["nestproto_devices_online", ()], 1)
        shared = self.harness.serverBucket(SHARED).value
        labels = (("serial", SERIAL),)
        self.assertEqual(
            samples["nestproto_device_temperature_celsius", labels],
            shared["current_temperature"],
        )
        self.assertEqual(
            samples["nestproto_device_target_temperature_celsius", labels],
            shared["target_temperature"],
        )
        self.assertEqual(samples["nestproto_device_humidity_percent", labels], 40)
        self.assertGreater(samples["nestproto_database_bytes", ()], 0)
        self.harness.thermostat.stop()
        self.harness.advance(601)
        samples = scrape(self.harness)
        self.assertEqual(samples["nestproto_held_subscribes", ()], 0)
        self.assertEqual(samples["nestproto_devices_online", ()], 0)

    def test_ownRegistry(self) -> None:
        """
        Each server counts in its own registry: another server's thermostat
        moves nothing here, and prometheus_client's global registry holds
        none of it.
        """
        before = scrape(self.harness)
        other = _Harness()
        other.thermostat.start()
        other.pump()
        self.addCleanup(other.thermostat.stop)
        self.assertEqual(
            scrape(self.harness)["nestproto_subscribes_total", ()],
            before["nestproto_subscribes_total", ()],
        )
        self.assertIsNone(REGISTRY.get_sample_value("nestproto_subscribes_total"))


class ManyDevicesTests(SynchronousTestCase):
    """A scrape of many devices leaves the reactor to others between slices."""

    def test_readingsInSlices(self) -> None:
        """
        With more devices than L{READINGS_PER_TURN}, a scrape does not end
        in the reactor turn it began in; once done, it shows every device's
        readings, and the device counts, as Prometheus parses them.
        """
        server = makeServer()
        now = server.nowMs()
        count = READINGS_PER_TURN + 7
        serials = [f"02AA01AC{number:010d}" for number in range(count)]
        writes: list[Write] = []
        for number, serial in enumerate(serials):
            shared = {
                "current_temperature": 20 + number / 1000,
                "target_temperature": 21.5,
            }
            writes.append(
                BucketWrite(serial, Bucket(f"shared.{serial}", 1, now, shared))
            )
            device = {"current_humidity": number % 100}
            writes.append(
                BucketWrite(serial, Bucket(f"device.{serial}", 1, now, device))
            )
        server.store.write(writes)
        d = server.control.metrics.render()
        self.assertNoResult(d)
        server.clock.advance(0)
        text = self.successResultOf(d).decode("utf-8")
        samples = {
            (sample.name, sample.labels.get("serial")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        self.assertEqual(samples["nestproto_devices_known", None], count)
        self.assertEqual(samples["nestproto_devices_online", None], 0)
        for number, serial in enumerate(serials):
            self.assertEqual(
                samples["nestproto_device_temperature_celsius", serial],
                20 + number / 1000,
            )
            self.assertEqual(
                samples["nestproto_device_target_temperature_celsius", serial], 21.5
            )
            self.assertEqual(
                samples["nestproto_device_humidity_percent", serial], number % 100
            )
