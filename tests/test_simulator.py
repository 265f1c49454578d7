# -*- test-case-name: tests.test_simulator -*-
"""
Tests for L{nestproto.simulator}: the simulated thermostat against a whole
nestproto in memory (StubTreq, task.Clock).
"""

from __future__ import annotations

import io
from typing import Any

from attrs import evolve
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from nestproto import simulator
from nestproto.simulator import (
    BACKOFF_FIRST_SECONDS,
    LocalBucket,
    SimulatedThermostat,
    makeThermostats,
)

from .helpers import CONTROL_URL, DEVICE_URL, SERIAL, START_SECONDS, makeServer

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"


class _Harness:
    """A server in memory and one simulated thermostat talking to it."""

    def __init__(self, changeSeconds: float = 3600.0) -> None:
        self.server = makeServer()
        self.shown: list[tuple[str, str]] = []
        self.thermostat = SimulatedThermostat(
            self.server.deviceClient,
            self.server.clock,
            DEVICE_URL,
            SERIAL,
            changeSeconds=changeSeconds,
            display=lambda serial, code: self.shown.append((serial, code)),
        )

    def pump(self) -> None:
        for _round in range(4):
            self.server.deviceClient.flush()
            self.server.controlClient.flush()

    def advance(self, seconds: float) -> None:
        self.server.clock.advance(seconds)
        self.pump()

    def control(self, path: str, document: dict[str, Any]) -> Any:
        results: list[Any] = []
        client: Any = self.server.controlClient
        client.post(CONTROL_URL + path, json=document).addCallback(results.append)
        self.pump()
        return results[0]

    def serverBucket(self, key: str) -> Any:
        return self.server.state.bucket(SERIAL, key)

    def inSync(self, key: str) -> bool:
        local = self.thermostat.buckets[key]
        stored = self.serverBucket(key)
        return (local.revision, local.timestamp, local.value) == (
            stored.revision,
            stored.timestamp,
            stored.value,
        )


class BootTests(SynchronousTestCase):
    """The simulated thermostat boots like firmware."""

    def setUp(self) -> None:
        self.harness = _Harness()
        self.harness.thermostat.start()
        self.harness.pump()
        self.addCleanup(self.harness.thermostat.stop)

    def test_showsEntryCode(self) -> None:
        """
        After entry the thermostat fetches an entry key and shows it as
        C{123-ABCD}, once.
        """
        code = self.harness.thermostat.code
        self.assertIsNotNone(code)
        assert code is not None
        self.assertEqual(self.harness.shown, [(SERIAL, f"{code[:3]}-{code[3:]}")])
        self.assertRegex(code, "^[0-9A-Z]{7}$")

    def test_firstSubscribeCarriesState(self) -> None:
        """
        The first subscribe carries the thermostat's state inline; the
        server stores it and the thermostat then holds the server's
        revision and timestamp for it.
        """
        stored = self.harness.serverBucket(DEVICE)
        self.assertEqual(stored.value["serial_number"], SERIAL)
        self.assertEqual(stored.value["current_temperature"], 20.0)
        self.assertTrue(self.harness.inSync(DEVICE))
        self.assertTrue(self.harness.inSync(SHARED))

    def test_heldAfterSync(self) -> None:
        """
        Once in sync the thermostat's subscribe is held: one subscription
        on the server, two subscribes made.
        """
        self.assertEqual(self.harness.server.hub.count(SERIAL), 1)
        self.assertEqual(self.harness.thermostat.subscribes, 2)
        self.assertEqual(self.harness.thermostat.errors, 0)

    def test_subscribesAgainAfterClose(self) -> None:
        """When the server ends an idle hold, the thermostat subscribes again."""
        self.harness.advance(290)
        self.assertEqual(self.harness.thermostat.subscribes, 3)
        self.assertEqual(self.harness.server.hub.count(SERIAL), 1)

    def test_stopLeavesNothing(self) -> None:
        """Stopping closes the held subscribe and cancels every timer."""
        self.harness.thermostat.stop()
        self.harness.pump()
        self.assertEqual(self.harness.server.hub.total(), 0)
        self.assertEqual(self.harness.server.clock.getDelayedCalls(), [])


class PairingAndCommandTests(SynchronousTestCase):
    """Claimed and commanded, the thermostat converges to the server."""

    def setUp(self) -> None:
        self.harness = _Harness()
        self.harness.thermostat.start()
        self.harness.pump()
        self.addCleanup(self.harness.thermostat.stop)

    def test_claimed(self) -> None:
        """
        Claiming the shown code pushes the user bucket, whose name the
        thermostat takes as its owner; it subscribes to user and structure.
        """
        code = self.harness.thermostat.code
        self.harness.control("/api/register", {"code": code, "userId": "homeowner"})
        self.assertEqual(self.harness.thermostat.owner, "homeowner")
        self.harness.advance(3)
        self.assertIn("structure.homeowner", self.harness.thermostat.subscribeKeys())
        self.assertEqual(self.harness.server.hub.count(SERIAL), 1)

    def test_commandAppliedAndAcknowledged(self) -> None:
        """
        A pushed setpoint is applied; the thermostat acknowledges it with
        C{target_change_pending: false} and holds the server's revision and
        timestamp afterwards.
        """
        self.harness.control(
            "/command",
            {"serial": SERIAL, "command": "set_temperature", "value": 21.5},
        )
        self.harness.advance(3)
        shared = self.harness.thermostat.buckets[SHARED]
        self.assertEqual(shared.value["target_temperature"], 21.5)
        self.assertIs(shared.value["target_change_pending"], False)
        self.assertIs(
            self.harness.serverBucket(SHARED).value["target_change_pending"], False
        )
        self.assertTrue(self.harness.inSync(SHARED))

    def test_driftPut(self) -> None:
        """
        Its own changes (room temperature, heating) are PUT and both sides
        end with the same value, revision and timestamp.
        """
        self.harness.control(
            "/command",
            {"serial": SERIAL, "command": "set_temperature", "value": 25},
        )
        self.harness.advance(3)
        self.harness.thermostat.drift()
        self.harness.pump()
        self.assertIs(
            self.harness.serverBucket(SHARED).value["hvac_heater_state"], True
        )
        self.assertTrue(self.harness.inSync(SHARED))
        self.assertTrue(self.harness.inSync(DEVICE))

    def test_periodicChanges(self) -> None:
        """The thermostat PUTs its changes every C{changeSeconds}."""
        harness = _Harness(changeSeconds=30)
        harness.thermostat.start()
        harness.pump()
        self.addCleanup(harness.thermostat.stop)
        harness.advance(30)
        harness.advance(30)
        self.assertEqual(harness.thermostat.puts, 2)
        self.assertTrue(harness.inSync(DEVICE))

    def test_casRetry(self) -> None:
        """
        A PUT refused because the thermostat's shared revision is stale
        (two changes behind) keeps the edit and retries on the server's
        revision a second later.
        """
        thermostat = self.harness.thermostat
        current = thermostat.buckets[SHARED]
        thermostat.buckets[SHARED] = evolve(current, revision=current.revision - 2)
        thermostat.change(SHARED, {"hvac_heater_state": True})
        self.harness.pump()
        self.assertIs(
            self.harness.serverBucket(SHARED).value["hvac_heater_state"], False
        )
        self.harness.advance(1)
        self.assertIs(
            self.harness.serverBucket(SHARED).value["hvac_heater_state"], True
        )
        self.assertEqual(thermostat.puts, 2)
        self.assertTrue(self.harness.inSync(SHARED))


class ApplyTests(SynchronousTestCase):
    """What a thermostat takes from the server: newer timestamps only."""

    def setUp(self) -> None:
        self.thermostat = SimulatedThermostat(None, Clock(), DEVICE_URL, SERIAL)
        self.thermostat.buckets[SHARED] = LocalBucket(5, 1000, {"a": 1})

    def push(self, revision: int, timestamp: int, value: dict[str, Any]) -> None:
        self.thermostat.apply(
            {
                "objects": [
                    {
                        "object_revision": revision,
                        "object_timestamp": timestamp,
                        "object_key": SHARED,
                        "value": value,
                    }
                ]
            }
        )

    def test_olderIgnored(self) -> None:
        """A bucket with a timestamp not above the one held is ignored."""
        self.push(9, 1000, {"a": 2})
        self.push(9, 999, {"a": 3})
        self.assertEqual(
            self.thermostat.buckets[SHARED], LocalBucket(5, 1000, {"a": 1})
        )

    def test_newerTaken(self) -> None:
        """A newer bucket replaces the value, revision and timestamp."""
        self.push(6, 1001, {"b": 2})
        self.assertEqual(
            self.thermostat.buckets[SHARED], LocalBucket(6, 1001, {"b": 2})
        )

    def test_absentBucketDropped(self) -> None:
        """
        A bucket the server does not have (rev 0, ts 0, empty) is no longer
        subscribed to.
        """
        key = f"schedule.{SERIAL}"
        self.assertIn(key, self.thermostat.subscribeKeys())
        self.thermostat.apply(
            {
                "objects": [
                    {
                        "object_revision": 0,
                        "object_timestamp": 0,
                        "object_key": key,
                        "value": {},
                    }
                ]
            }
        )
        self.assertNotIn(key, self.thermostat.subscribeKeys())


class _Failing(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[float] = []
        self.clock: Clock | None = None

    def render(self, request: Any) -> bytes:
        assert self.clock is not None
        self.requests.append(self.clock.seconds() - START_SECONDS)
        request.setResponseCode(500)
        return b'{"error":"broken"}'


class BackoffTests(SynchronousTestCase):
    """Errors make the thermostat back off, doubling up to a minute."""

    def test_backoff(self) -> None:
        """
        Against a server answering 500, the thermostat retries after 1, 2,
        4, ... seconds, never more than 60.
        """
        failing = _Failing()
        clock = Clock()
        clock.advance(START_SECONDS)
        failing.clock = clock
        client = StubTreq(failing)
        thermostat = SimulatedThermostat(client, clock, DEVICE_URL, SERIAL)
        thermostat.start()
        self.addCleanup(thermostat.stop)
        for _second in range(200):
            client.flush()
            clock.advance(BACKOFF_FIRST_SECONDS)
        client.flush()
        self.assertEqual(
            failing.requests[:8], [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 123.0]
        )
        self.assertEqual(thermostat.errors, len(failing.requests))
        thermostat.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class CommandLineTests(SynchronousTestCase):
    """C{python -m nestproto.simulator}."""

    def test_badCount(self) -> None:
        """A count below 1 is refused with exit status 2."""
        out = io.StringIO()
        self.assertEqual(simulator.main(["--count", "0"], out), 2)
        self.assertIn("--count must be at least 1", out.getvalue())

    def test_thermostats(self) -> None:
        """
        C{--count N} makes N thermostats with distinct serials and MACs,
        each showing its code on the output.
        """
        options = simulator.Options()
        options.parseOptions(["--count", "3", "--server", "http://h:8000"])
        out = io.StringIO()
        thermostats = makeThermostats(None, Clock(), options, out)
        self.assertEqual(len({t.serial for t in thermostats}), 3)
        self.assertEqual(len({t.mac for t in thermostats}), 3)
        thermostats[0].display(thermostats[0].serial, "123-ABCD")
        self.assertEqual(
            out.getvalue(), f"{thermostats[0].serial} shows entry code 123-ABCD\n"
        )
        self.assertEqual({t.server for t in thermostats}, {"http://h:8000"})

    def test_firmwareMixesFleet(self) -> None:
        """
        C{--firmware 4.3.3} makes key-list thermostats (PROTOCOL.md §20);
        a comma-separated list is handed out in turn; the default is v7.
        """
        options = simulator.Options()
        options.parseOptions(["--count", "3", "--firmware", "4.3.3,5.9.3-5"])
        thermostats = makeThermostats(None, Clock(), options, io.StringIO())
        self.assertEqual(
            [(t.firmware, t.keyList) for t in thermostats],
            [("4.3.3", True), ("5.9.3-5", False), ("4.3.3", True)],
        )
        device = thermostats[0].buckets[f"device.{thermostats[0].serial}"].value
        self.assertEqual(device["current_version"], "4.3.3")
        options = simulator.Options()
        options.parseOptions([])
        [thermostat] = makeThermostats(None, Clock(), options, io.StringIO())
        self.assertFalse(thermostat.keyList)

    def test_badFirmware(self) -> None:
        """A firmware that is not a version is refused with exit status 2."""
        out = io.StringIO()
        self.assertEqual(simulator.main(["--firmware", "latest"], out), 2)
        self.assertIn("--firmware takes versions", out.getvalue())
