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

from nestproto.metrics import CONTENT_TYPE

from .helpers import CONTROL_URL, SERIAL
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
