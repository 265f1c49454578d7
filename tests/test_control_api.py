# -*- test-case-name: tests.test_control_api -*-
"""
Tests for L{nestproto.control}: commands (PROTOCOL.md §14-§16.1; §19
scenarios 46-55), status and device list (§16.5, §16.6), the event
stream, all through the control port's resource. Who may use the API
(token, path prefix, trusted networks, origins, JSON only) is in
L{tests.test_access}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hypothesis import given
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from nestproto.buckets import Bucket
from nestproto.control.api import STATUSES_PER_TURN
from nestproto.control.commands import parseSchedule, safetyBounds
from nestproto.fields import NUMERIC_FIELDS
from nestproto.membership import GLOBAL_SCOPE
from nestproto.store import REPLAY_COMMITS

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    DroppableBody,
    basicAuth,
    completed,
    receiveDroppable,
    sseEvents,
)
from .strategies import controlCommands
from .test_pairing import ServerTestCase

SHARED = {
    "target_temperature": 20.0,
    "target_temperature_type": "heat",
    "target_temperature_low": 19.0,
    "target_temperature_high": 24.0,
    "target_change_pending": False,
    "can_heat": True,
    "can_cool": True,
    "current_temperature": 20.5,
    "hvac_heater_state": True,
    "name": "Hallway",
    "schedule_mode": "HEAT",
}
#: The structure L{SERIAL} has on its own while nobody has claimed it.
UNPAIRED = f"structure.unpaired-{SERIAL}"
DEVICE = {
    "current_humidity": 44,
    "has_fan": True,
    "has_emer_heat": False,
    "current_version": "5.9.3-5",
    "temperature_scale": "C",
    "away_temperature_low": 15.0,
    "away_temperature_high": 28.0,
    "eco": {"mode": "schedule", "touched_by": 1, "mode_update_timestamp": 1},
}
SCHEDULE = {
    "ver": 2,
    "name": "Weekdays",
    "schedule_mode": "HEAT",
    "days": {
        "0": {
            "0": {"type": "HEAT", "time": 25200, "temp": 21.0},
            "1": {"type": "HEAT", "time": 79200, "temp": 17.0},
        },
        "3": [{"type": "HEAT", "time": 30000, "temp": 20.5, "extra": "dropped"}],
    },
}


class ControlTestCase(ServerTestCase):
    """A server with one thermostat that has reported its buckets."""

    def setUp(self) -> None:
        super().setUp()
        self.connect()

    def connect(
        self,
        serial: str = SERIAL,
        shared: Mapping[str, Any] = SHARED,
        device: Mapping[str, Any] = DEVICE,
    ) -> None:
        """The thermostat PUTs its shared and device buckets."""
        objects = [
            {"object_key": f"shared.{serial}", "value": dict(shared)},
            {"object_key": f"device.{serial}", "value": dict(device)},
        ]
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/put",
            data=json.dumps({"session": "s", "objects": objects}).encode(),
            headers=basicAuth(serial),
        )
        status, document = self.answer(d, self.server.deviceClient)
        self.assertEqual(status, 200)

    def command(
        self, command: Any, value: Any, serial: Any = SERIAL
    ) -> tuple[int, Any]:
        return self.control(
            "POST",
            "/command",
            {"serial": serial, "command": command, "value": value},
        )

    def ok(self, command: str, value: Any, serial: str = SERIAL) -> dict[str, Any]:
        status, document = self.command(command, value, serial)
        self.assertEqual(status, 200, document)
        self.assertIs(document["success"], True)
        data = document["data"]
        assert isinstance(data, dict)
        return data

    def refused(
        self, command: Any, value: Any, status: int = 400, serial: Any = SERIAL
    ) -> str:
        """The command is refused with C{status}, nothing changed."""
        before = self.snapshot()
        code, document = self.command(command, value, serial)
        self.assertEqual(code, status, document)
        self.assertIs(document["success"], False)
        self.assertIsInstance(document["message"], str)
        self.assertEqual(self.snapshot(), before)
        message = document["message"]
        assert isinstance(message, str)
        return message

    def value(self, key: str, scope: str = SERIAL) -> dict[str, Any]:
        bucket = self.stored(key, scope)
        assert bucket is not None
        return bucket.value

    def status(self, serial: str = SERIAL) -> dict[str, Any]:
        code, document = self.control("GET", f"/status?serial={serial}")
        self.assertEqual(code, 200)
        assert isinstance(document, dict)
        return document


class TemperatureTests(ControlTestCase):
    """
    C{set_temperature} and C{set_eco_temperatures}.
    """

    def test_scenario46SetTemperature(self) -> None:
        """
        Scenario 46: C{set_temperature 21.5} writes shared
        C{target_temperature} 21.5 and C{target_change_pending} true, marks
        the change remote (touched_by 3), moves revision and timestamp, and
        pushes the bucket to the held subscribe.
        """
        before = self.stored(f"shared.{SERIAL}", SERIAL)
        assert before is not None
        held = self.held()
        self.server.clock.advance(1)
        data = self.ok("set_temperature", 21.5)
        now = self.server.nowMs()
        touched = {
            "touched_by": 3,
            "touched_at": now // 1000,
            "touched_user_id": "",
        }
        self.assertEqual(
            data,
            {
                "object_key": f"shared.{SERIAL}",
                "values": {
                    "target_temperature": 21.5,
                    "target_change_pending": True,
                    "touched_by": touched,
                },
            },
        )
        after = self.stored(f"shared.{SERIAL}", SERIAL)
        assert after is not None
        self.assertEqual(after.revision, before.revision + 1)
        self.assertEqual(after.timestamp, now)
        self.assertEqual(after.value["target_temperature"], 21.5)
        self.assertEqual(after.value["can_cool"], True)
        self.server.deviceClient.flush()
        [chunk] = held.documents()
        self.assertEqual(
            chunk["objects"],
            [
                {
                    "object_revision": after.revision,
                    "object_timestamp": now,
                    "object_key": f"shared.{SERIAL}",
                    "value": after.value,
                }
            ],
        )
        self.endHolds()

    def test_sameValueStillBumps(self) -> None:
        """
        A command repeating the stored value still moves the revision.
        """
        self.ok("set_temperature", 20.0)
        first = self.stored(f"shared.{SERIAL}", SERIAL)
        self.ok("set_temperature", 20.0)
        second = self.stored(f"shared.{SERIAL}", SERIAL)
        assert first is not None and second is not None
        self.assertEqual(second.revision, first.revision + 1)

    def test_scenario47Clamped(self) -> None:
        """
        Scenario 47: 50 °C is clamped to 35.0 and 2 °C to 7.222.
        """
        self.assertEqual(
            self.ok("set_temperature", 50)["values"]["target_temperature"], 35.0
        )
        self.ok("set_temperature", 2)
        self.assertEqual(self.value(f"shared.{SERIAL}")["target_temperature"], 7.222)

    def test_deviceSafetyTemperatures(self) -> None:
        """
        The device's enabled C{lower_safety_temp}/C{upper_safety_temp}
        narrow the clamp; disabled ones do not.
        """
        self.connect(
            device={
                **DEVICE,
                "lower_safety_temp": 10.0,
                "lower_safety_temp_enabled": True,
                "upper_safety_temp": 30.0,
                "upper_safety_temp_enabled": False,
            }
        )
        self.ok("set_temperature", 8)
        self.assertEqual(self.value(f"shared.{SERIAL}")["target_temperature"], 10.0)
        self.ok("set_temperature", 33)
        self.assertEqual(self.value(f"shared.{SERIAL}")["target_temperature"], 33.0)

    def test_safetyBoundsSentinel(self) -> None:
        """
        The firmware's disabled-sentinel C{upper_safety_temp} 1000 leaves
        the default maximum; crossed limits fall back to the defaults.
        """
        self.assertEqual(
            safetyBounds(
                {"upper_safety_temp": 1000.0, "upper_safety_temp_enabled": True}
            ),
            (7.222, 35.0),
        )
        self.assertEqual(
            safetyBounds(
                {
                    "lower_safety_temp": 30.0,
                    "lower_safety_temp_enabled": True,
                    "upper_safety_temp": 20.0,
                    "upper_safety_temp_enabled": True,
                }
            ),
            (7.222, 35.0),
        )

    def test_scenario48Range(self) -> None:
        """
        Scenario 48: C{{"high": 24, "low": 19}} writes
        C{target_temperature_high/low} and not C{target_temperature}.
        """
        values = self.ok("set_temperature", {"high": 24, "low": 19})["values"]
        self.assertEqual(
            (values["target_temperature_high"], values["target_temperature_low"]),
            (24.0, 19.0),
        )
        self.assertNotIn("target_temperature", values)
        stored = self.value(f"shared.{SERIAL}")
        self.assertEqual(stored["target_temperature"], 20.0)
        self.assertEqual(stored["target_temperature_low"], 19.0)

    def test_badTemperatures(self) -> None:
        """
        Strings, booleans, non-finite numbers, half or inverted ranges and
        unknown keys are refused with nothing changed.
        """
        for value in [
            "21",
            True,
            None,
            [],
            {"high": 24},
            {"high": 19, "low": 24},
            {"high": 24, "low": 19, "mid": 20},
            {"high": "x", "low": 1},
        ]:
            self.refused("set_temperature", value)
        self.refused("set_temperature", None)
        status, document = self.control(
            "POST",
            "/command",
            data=b'{"serial": "%s", "command": "set_temperature", "value": NaN}'
            % SERIAL.encode(),
        )
        self.assertEqual(status, 400)

    def test_ecoTemperatures(self) -> None:
        """
        C{set_eco_temperatures} writes the device's away temperatures,
        clamped.
        """
        data = self.ok("set_eco_temperatures", {"high": 40, "low": 12})
        self.assertEqual(data["object_key"], f"device.{SERIAL}")
        stored = self.value(f"device.{SERIAL}")
        self.assertEqual(
            (stored["away_temperature_high"], stored["away_temperature_low"]),
            (35.0, 12.0),
        )
        self.refused("set_eco_temperatures", 12)
        self.refused("set_eco_temperatures", {"high": 12, "low": 20})


class ModeTests(ControlTestCase):
    """
    C{set_mode} (PROTOCOL.md §15, §16.1).
    """

    def test_modes(self) -> None:
        """
        Each mode word writes the Nest value; heat-cool and auto are range;
        input is case-insensitive.
        """
        for word, nest in [
            ("off", "off"),
            ("HEAT", "heat"),
            ("cool", "cool"),
            ("heat-cool", "range"),
            ("auto", "range"),
            ("range", "range"),
        ]:
            self.ok("set_mode", word)
            self.assertEqual(
                self.value(f"shared.{SERIAL}")["target_temperature_type"], nest
            )
            self.assertEqual(self.status()["mode"], nest)

    def test_scenario49HeatCool(self) -> None:
        """
        Scenario 49: heat-cool writes range and no pending-change flag
        (PROTOCOL.md §11.6); eco is refused with 400.
        """
        self.assertEqual(
            self.ok("set_mode", "heat-cool")["values"],
            {"target_temperature_type": "range"},
        )
        self.assertIs(self.value(f"shared.{SERIAL}")["target_change_pending"], False)
        self.assertIn("set_away", self.refused("set_mode", "eco"))

    def test_scenario50Capabilities(self) -> None:
        """
        Scenario 50: cool on a device whose shared says C{can_cool: false} is
        refused, as is range; emergency needs C{has_emer_heat}.
        """
        self.connect(shared={**SHARED, "can_cool": False})
        self.refused("set_mode", "cool")
        self.refused("set_mode", "heat-cool")
        self.refused("set_mode", "emergency")
        self.ok("set_mode", "heat")
        self.connect(device={**DEVICE, "has_emer_heat": True})
        self.ok("set_mode", "emergency")

    def test_badModes(self) -> None:
        """
        Unknown words and non-strings are refused.
        """
        for value in ["warm", 1, None, {"mode": "heat"}]:
            self.refused("set_mode", value)


class AwayTests(ControlTestCase):
    """
    C{set_away} (PROTOCOL.md §14) and what status shows of it (§16.6).
    """

    def test_scenario51Unowned(self) -> None:
        """
        Scenario 51: away on an unclaimed device writes C{manual_eco_all}
        and a timestamp in seconds to the structure it has on its own,
        C{structure.unpaired-<serial>} (the anchor's C{structure.default}
        is every unclaimed device's), and status shows away at once.
        """
        data = self.ok("set_away", True)
        self.assertEqual(data["object_key"], UNPAIRED)
        structure = self.value(UNPAIRED, GLOBAL_SCOPE)
        self.assertIs(structure["manual_eco_all"], True)
        self.assertEqual(
            structure["manual_eco_timestamp"], int(self.server.clock.seconds())
        )
        self.assertEqual(len(str(structure["manual_eco_timestamp"])), 10)
        status = self.status()
        self.assertIs(status["away"], True)
        self.assertEqual(status["eco_mode"], "manual")
        self.assertEqual(status["structure_id"], f"unpaired-{SERIAL}")

    def test_unclaimedDevicesApart(self) -> None:
        """
        Away on one unclaimed device is not away on another: it is neither
        written to the other's structure nor pushed to it, and its status
        stays home.
        """
        self.connect(OTHER_SERIAL)
        other = self.held(serial=OTHER_SERIAL)
        self.server.clock.advance(1)
        self.ok("set_away", True)
        self.server.deviceClient.flush()
        self.assertEqual(other.chunks, [])
        self.assertIs(self.status(OTHER_SERIAL)["away"], False)
        self.assertIsNone(
            self.stored(f"structure.unpaired-{OTHER_SERIAL}", GLOBAL_SCOPE)
        )
        self.ok("set_away", True, serial=OTHER_SERIAL)
        self.assertEqual(
            sorted(
                bucket.key
                for bucket in self.server.store.buckets(GLOBAL_SCOPE)
                if bucket.value.get("manual_eco_all") is True
            ),
            sorted([UNPAIRED, f"structure.unpaired-{OTHER_SERIAL}"]),
        )
        self.endHolds()

    def test_claimMovesIntoOwnersStructure(self) -> None:
        """
        Claiming a device moves it from the structure it had on its own,
        which is emptied, into its owner's: status shows the owner's away.
        """
        self.ok("set_away", True)
        before = self.stored(UNPAIRED, GLOBAL_SCOPE)
        assert before is not None
        self.server.clock.advance(1)
        self.claim(self.passphrase()["value"])
        emptied = self.stored(UNPAIRED, GLOBAL_SCOPE)
        assert emptied is not None
        self.assertEqual(emptied.value, {})
        self.assertEqual(emptied.revision, before.revision + 1)
        self.assertGreater(emptied.timestamp, before.timestamp)
        self.assertEqual(
            self.value("structure.homeowner", GLOBAL_SCOPE)["devices"],
            [f"device.{SERIAL}"],
        )
        status = self.status()
        self.assertEqual(status["structure_id"], "homeowner")
        self.assertIs(status["away"], False)
        self.assertEqual(
            self.server.state.membership.linkedKeys(SERIAL),
            ["structure.homeowner", "user.homeowner"],
        )
        # Released, it is on its own again, at home.
        code, document = self.control("DELETE", f"/api/registered-devices/{SERIAL}", {})
        self.assertEqual(code, 200, document)
        released = self.status()
        self.assertEqual(released["structure_id"], f"unpaired-{SERIAL}")
        self.assertIs(released["away"], False)

    def test_removingUnclaimedDeletesItsStructure(self) -> None:
        """
        Deleting an unclaimed device deletes the structure it had on its
        own too.
        """
        self.ok("set_away", True)
        status, document = self.control("DELETE", "/api/device", {"serial": SERIAL})
        self.assertEqual(status, 200, document)
        self.assertIsNone(self.stored(UNPAIRED, GLOBAL_SCOPE))

    def test_scenario51Owned(self) -> None:
        """
        Scenario 51: a claimed device's away goes to its owner's structure,
        pushed to its held subscribe.
        """
        self.claim(self.passphrase()["value"])
        held = self.held()
        self.server.clock.advance(1)
        self.assertEqual(self.ok("set_away", True)["object_key"], "structure.homeowner")
        self.server.deviceClient.flush()
        self.assertEqual(held.keys(), ["structure.homeowner"])
        self.assertIs(self.status()["away"], True)
        self.endHolds()

    def test_leavingEco(self) -> None:
        """
        Leaving eco writes C{manual_eco_all: false}, C{away: false} and puts
        the device's C{eco} back to its schedule, remotely touched (NCPR 2.7,
        PROTOCOL.md §14), and status shows home.
        """
        self.ok("set_away", True)
        self.server.clock.advance(5)
        now = int(self.server.clock.seconds())
        self.ok("set_away", False)
        structure = self.value(UNPAIRED, GLOBAL_SCOPE)
        self.assertEqual(
            (structure["manual_eco_all"], structure["away"]), (False, False)
        )
        self.assertEqual(structure["manual_eco_timestamp"], now)
        self.assertEqual(
            self.value(f"device.{SERIAL}")["eco"],
            {"mode": "schedule", "touched_by": 3, "mode_update_timestamp": now},
        )
        status = self.status()
        self.assertIs(status["away"], False)
        self.assertEqual(status["eco_mode"], "off")

    def test_notBoolean(self) -> None:
        """
        Only true and false are accepted.
        """
        for value in ["true", 1, None]:
            self.refused("set_away", value)

    def test_deviceEcoReadAsOn(self) -> None:
        """
        The device's own C{manual-eco} is shown as C{manual}, which clients
        read as eco on.
        """
        self.connect(device={**DEVICE, "eco": {"mode": "manual-eco"}})
        self.assertEqual(self.status()["eco_mode"], "manual")
        self.connect(device={**DEVICE, "eco": {"mode": "auto-eco"}})
        self.assertEqual(self.status()["eco_mode"], "auto")


class FanTests(ControlTestCase):
    """
    C{set_fan} (PROTOCOL.md §16.1, §16.4).
    """

    def test_scenario52On(self) -> None:
        """
        Scenario 52: C{"on"} sets both the duration and the timeout, an hour
        from now; C{"auto"} sets the timeout to 0.
        """
        now = int(self.server.clock.seconds())
        self.assertEqual(
            self.ok("set_fan", "on")["values"],
            {"fan_timer_duration": 3600, "fan_timer_timeout": now + 3600},
        )
        self.assertIs(self.status()["fan_timer_active"], True)
        self.ok("set_fan", "auto")
        self.assertEqual(self.value(f"device.{SERIAL}")["fan_timer_timeout"], 0)
        self.assertIs(self.status()["fan_timer_active"], False)

    def test_seconds(self) -> None:
        """
        A number of seconds runs the fan that long.
        """
        now = int(self.server.clock.seconds())
        self.ok("set_fan", 900)
        stored = self.value(f"device.{SERIAL}")
        self.assertEqual(
            (stored["fan_timer_duration"], stored["fan_timer_timeout"]),
            (900, now + 900),
        )

    def test_scenario52NoFan(self) -> None:
        """
        Scenario 52: a device without C{has_fan} refuses the fan.
        """
        device = {name: v for name, v in DEVICE.items() if name != "has_fan"}
        self.connect(OTHER_SERIAL, device=device)
        self.refused("set_fan", "on", serial=OTHER_SERIAL)

    def test_badFanValues(self) -> None:
        """
        Other strings, negative, fractional or boolean values are refused.
        """
        for value in ["fast", -5, 1.5, True, None, 10**9]:
            self.refused("set_fan", value)

    def test_scenario53PutKeepsTimer(self) -> None:
        """
        Scenario 53: a device PUT that omits the fan fields while the timer
        runs keeps them.
        """
        self.ok("set_fan", "on")
        timer = self.value(f"device.{SERIAL}")["fan_timer_timeout"]
        self.connect(device={"current_humidity": 50})
        stored = self.value(f"device.{SERIAL}")
        self.assertEqual(
            (stored["fan_timer_timeout"], stored["fan_timer_duration"]),
            (timer, 3600),
        )
        self.assertEqual(stored["current_humidity"], 50)


class ScheduleTests(ControlTestCase):
    """
    C{set_schedule}, C{set_schedule_mode} and C{/api/schedule}.
    """

    def test_scenario54ValidReplaces(self) -> None:
        """
        Scenario 54: a valid schedule replaces C{schedule.S} whole, in the
        device's form: integer-string keys, every day, entries in time
        order, unknown entry fields dropped.
        """
        self.server.seed(
            SERIAL, Bucket(f"schedule.{SERIAL}", 3, 1000, {"old": True, "ver": 2})
        )
        held = self.held()
        self.server.clock.advance(1)
        self.ok("set_schedule", SCHEDULE)
        stored = self.stored(f"schedule.{SERIAL}", SERIAL)
        assert stored is not None
        self.assertEqual(stored.revision, 4)
        self.assertEqual(
            stored.value,
            {
                "ver": 2,
                "name": "Weekdays",
                "schedule_mode": "HEAT",
                "days": {
                    "0": {
                        "0": {
                            "type": "HEAT",
                            "time": 25200,
                            "temp": 21.0,
                            "entry_type": "setpoint",
                        },
                        "1": {
                            "type": "HEAT",
                            "time": 79200,
                            "temp": 17.0,
                            "entry_type": "setpoint",
                        },
                    },
                    "1": {},
                    "2": {},
                    "3": {
                        "0": {
                            "type": "HEAT",
                            "time": 30000,
                            "temp": 20.5,
                            "entry_type": "setpoint",
                        }
                    },
                    "4": {},
                    "5": {},
                    "6": {},
                },
            },
        )
        self.server.deviceClient.flush()
        self.assertEqual(held.keys(), [f"schedule.{SERIAL}"])
        status, document = self.control("GET", f"/api/schedule?serial={SERIAL}")
        self.assertEqual(
            document,
            {
                "serial": SERIAL,
                "schedule": stored.value,
                "object_revision": 4,
                "object_timestamp": stored.timestamp,
            },
        )
        self.endHolds()

    def test_scheduleModeFollows(self) -> None:
        """
        A schedule of another mode also sets shared's C{schedule_mode}, or
        the device would ignore it.
        """
        cool = {
            "ver": 2,
            "mode": "cool",
            "days": [[{"type": "cool", "time": 0, "temp": 25.0}]],
        }
        self.ok("set_schedule", cool)
        self.assertEqual(
            self.value(f"schedule.{SERIAL}")["days"]["0"]["0"]["type"], "COOL"
        )
        self.assertEqual(self.value(f"shared.{SERIAL}")["schedule_mode"], "COOL")
        self.assertEqual(self.value(f"schedule.{SERIAL}")["schedule_mode"], "COOL")

    def test_scenario54Invalid(self) -> None:
        """
        Scenario 54: ver 3, day key 7, time 86400, temp 40, a wrong entry
        type, a RANGE entry without temp-max, duplicate times, or no mode
        are refused with nothing changed.
        """
        entry = {"type": "HEAT", "time": 0, "temp": 20.0}
        for schedule in [
            {**SCHEDULE, "ver": 3},
            {**SCHEDULE, "days": {"7": {}}},
            {**SCHEDULE, "days": {"0": [{**entry, "time": 86400}]}},
            {**SCHEDULE, "days": {"0": [{**entry, "temp": 40}]}},
            {**SCHEDULE, "days": {"0": [{**entry, "type": "COOL"}]}},
            {
                **SCHEDULE,
                "schedule_mode": "RANGE",
                "days": {"0": [{"type": "RANGE", "time": 0, "temp-min": 18}]},
            },
            {**SCHEDULE, "days": {"0": [entry, entry]}},
            {"ver": 2, "days": {}},
            "weekly",
        ]:
            self.refused("set_schedule", schedule)

    def test_rangeSchedule(self) -> None:
        """
        A RANGE schedule takes temp-min and temp-max.
        """
        parsed = parseSchedule(
            {
                "ver": 2,
                "schedule_mode": "RANGE",
                "days": {
                    "2": {
                        "0": {
                            "type": "RANGE",
                            "time": 60,
                            "temp-min": 18,
                            "temp-max": 25,
                        }
                    }
                },
            },
            None,
        )
        self.assertEqual(
            parsed["days"]["2"]["0"],
            {
                "type": "RANGE",
                "time": 60,
                "temp-min": 18,
                "temp-max": 25,
                "entry_type": "setpoint",
            },
        )
        self.assertEqual(parsed["name"], "Default")

    def test_emptySchedule(self) -> None:
        """
        An empty C{days} (how a client clears a schedule), or days that are
        all empty, reads back as C{days: {}} from C{/api/schedule}: a client
        reading seven empty days takes the schedule for one in use.
        """
        self.ok("set_schedule", SCHEDULE)
        for days in [{}, {str(d): {} for d in range(7)}, [[], []]]:
            self.ok(
                "set_schedule",
                {"ver": 2, "days": days, "name": "Cleared", "schedule_mode": "HEAT"},
            )
            self.assertEqual(self.value(f"schedule.{SERIAL}")["days"], {})
            status, document = self.control("GET", f"/api/schedule?serial={SERIAL}")
            self.assertEqual(status, 200)
            self.assertEqual(
                document["schedule"],
                {"ver": 2, "name": "Cleared", "schedule_mode": "HEAT", "days": {}},
            )

    def test_scheduleMode(self) -> None:
        """
        C{set_schedule_mode} writes shared C{schedule_mode}, uppercase.
        """
        self.ok("set_schedule_mode", "range")
        self.assertEqual(self.value(f"shared.{SERIAL}")["schedule_mode"], "RANGE")
        self.assertEqual(self.status()["schedule_mode"], "RANGE")
        self.refused("set_schedule_mode", "WARM")

    def test_noSchedule(self) -> None:
        """
        A device without a schedule answers C{schedule: null}.
        """
        status, document = self.control("GET", f"/api/schedule?serial={SERIAL}")
        self.assertEqual(
            (status, document), (200, {"serial": SERIAL, "schedule": None})
        )
        status, document = self.control("GET", "/api/schedule")
        self.assertEqual(status, 400)


class SettingTests(ControlTestCase):
    """
    C{set_device_setting}.
    """

    def test_whitelisted(self) -> None:
        """
        Whitelisted fields are written to the device bucket; the anchor's
        C{temp_lock_*} names are written under the firmware's names.
        """
        self.ok(
            "set_device_setting",
            {"learning_mode": False, "temp_lock_on": True, "temperature_scale": "F"},
        )
        stored = self.value(f"device.{SERIAL}")
        self.assertEqual(
            (
                stored["learning_mode"],
                stored["temperature_lock"],
                stored["temperature_scale"],
            ),
            (False, True, "F"),
        )
        self.assertNotIn("temp_lock_on", stored)
        status = self.status()
        self.assertIs(status["temperature_lock_enabled"], True)
        self.assertEqual(status["temperature_scale"], "F")

    def test_scenario55NotWritable(self) -> None:
        """
        Scenario 55: C{current_temperature} is not writable (400), nor are
        other device-reported fields; a bad value type is refused too.
        """
        self.refused("set_device_setting", {"current_temperature": 20})
        self.refused("set_device_setting", {"time_to_target": 0})
        self.refused("set_device_setting", {"hot_water_active": True})
        self.refused("set_device_setting", {"learning_mode": "yes"})
        self.refused("set_device_setting", {"learning_mode": True, "has_fan": True})
        self.refused("set_device_setting", {})
        self.refused("set_device_setting", [])


class BadCommandTests(ControlTestCase):
    """
    Refused commands: clear 4xx JSON, nothing changed.
    """

    def test_unknownCommand(self) -> None:
        """
        An unknown or missing command is a 400.
        """
        self.refused("set_warp_speed", 9)
        self.refused(None, 9)
        before = self.snapshot()
        status, document = self.control("POST", "/command", {"serial": SERIAL})
        self.assertEqual((status, document["success"]), (400, False))
        self.assertEqual(self.snapshot(), before)

    def test_unknownSerial(self) -> None:
        """
        A device that has never connected is a 404; a missing serial a 400.
        """
        self.refused("set_temperature", 20, status=404, serial=OTHER_SERIAL)
        self.refused("set_temperature", 20, status=400, serial=None)
        self.refused("set_temperature", 20, status=400, serial="abc")

    def test_malformedJSON(self) -> None:
        """
        A body that is not a JSON object is a 400 with C{success: false}.
        """
        before = self.snapshot()
        for data in [b"{", b"[1]", b"\xff", b""]:
            status, document = self.control("POST", "/command", data=data)
            self.assertEqual(status, 400, data)
            self.assertEqual(
                (document["success"], document["message"] == document["error"]),
                (False, True),
            )
        self.assertEqual(self.snapshot(), before)


class StatusTests(ControlTestCase):
    """
    C{/status} and C{/api/devices} (PROTOCOL.md §16.5, §16.6).
    """

    def test_fields(self) -> None:
        """
        Status is flat: temperatures, mode, hvac, humidity, name, version,
        and capabilities both nested and at the top level.
        """
        status = self.status()
        expected = {
            "serial": SERIAL,
            "name": "Hallway",
            "current_temperature": 20.5,
            "target_temperature": 20.0,
            "target_temperature_low": 19.0,
            "target_temperature_high": 24.0,
            "humidity": 44,
            "mode": "heat",
            "software_version": "5.9.3-5",
            "temperature_scale": "C",
            "schedule_mode": "HEAT",
            "away": False,
            "eco_mode": "off",
            "eco_temperatures": {"high": 28.0, "low": 15.0},
            "can_heat": True,
            "can_cool": True,
            "has_fan": True,
            "has_emer_heat": False,
            "temperature_lock_enabled": False,
            "is_available": True,
            "is_online": True,
            "paired": False,
        }
        self.assertEqual({name: status[name] for name in expected}, expected)
        self.assertEqual(
            status["capabilities"],
            {
                "can_heat": True,
                "can_cool": True,
                "has_fan": True,
                "has_emer_heat": False,
                "has_humidifier": False,
                "has_dehumidifier": False,
            },
        )
        self.assertIs(status["hvac"]["heater"], True)
        self.assertIs(status["hvac"]["ac"], False)

    def test_reflectsPut(self) -> None:
        """
        Status and the device list show what the device just PUT.
        """
        self.connect(shared={"current_temperature": 18.25, "hvac_heater_state": False})
        self.assertEqual(self.status()["current_temperature"], 18.25)
        status, document = self.control("GET", "/api/devices")
        self.assertEqual(status, 200)
        [device] = document["devices"]
        self.assertEqual(document["total"], 1)
        self.assertEqual(device["current_temperature"], 18.25)
        self.assertIs(device["hvac"]["heater"], False)
        self.assertEqual((device["id"], device["serial"]), (SERIAL, SERIAL))
        self.assertEqual(device["subscription_count"], 0)

    def test_manyDevicesListedInSlices(self) -> None:
        """
        With more devices than L{STATUSES_PER_TURN}, the list is not made in
        the reactor turn that asked for it; once made, it holds every
        device, each as C{/status} shows it, in order.
        """
        now = self.server.nowMs()
        serials = sorted(
            f"02AA01AC{number:010d}" for number in range(STATUSES_PER_TURN + 3)
        )
        for number, serial in enumerate(serials):
            value = {"current_temperature": 15 + number / 100}
            self.server.seed(serial, Bucket(f"shared.{serial}", 1, now, value))
        client = self.server.controlClient
        requested = client.get(CONTROL_URL + "/api/devices")
        client.flush()
        self.assertNoResult(requested)
        self.server.clock.advance(0)
        response, body = completed(self, client, requested)
        self.assertEqual(response.code, 200)
        document = json.loads(body)
        self.assertEqual(document["total"], len(serials))
        self.assertEqual([d["serial"] for d in document["devices"]], serials)
        last = document["devices"][-1]
        del last["subscription_count"]
        self.assertEqual(last, self.status(serials[-1]))

    def test_storedNonNumbersShownAsNull(self) -> None:
        """
        A non-number stored where a number belongs (written before devices
        were held to numbers) is shown as C{null} by C{/status} and
        C{/api/devices}; a number in the other bucket is shown instead.
        """
        garbage: dict[str, Any] = {name: "bad" for name in NUMERIC_FIELDS}
        self.server.seed(
            SERIAL,
            Bucket(f"shared.{SERIAL}", 9, self.server.nowMs(), {**garbage, "x": 1}),
            Bucket(
                f"device.{SERIAL}",
                9,
                self.server.nowMs(),
                {**garbage, "current_temperature": 19.5, "target_humidity": True},
            ),
        )
        status, document = self.control("GET", "/api/devices")
        self.assertEqual(status, 200)
        for shown in (self.status(), document["devices"][0]):
            self.assertEqual(shown["current_temperature"], 19.5)
            for name in (
                "target_temperature",
                "target_temperature_low",
                "target_temperature_high",
                "humidity",
                "target_humidity",
                "fan_timer_duration",
                "time_to_target",
                "backplate_temperature",
            ):
                self.assertIsNone(shown[name], name)
            self.assertEqual(shown["eco_temperatures"], {"high": None, "low": None})
            self.assertEqual(shown["fan_timer_timeout"], 0)
            self.assertIs(shown["fan_timer_active"], False)

    def test_subscriptionCount(self) -> None:
        """
        The device list counts held subscribes.
        """
        self.held()
        status, document = self.control("GET", "/api/devices")
        self.assertEqual(document["devices"][0]["subscription_count"], 1)
        self.endHolds()

    def test_availability(self) -> None:
        """
        A device is available while it keeps talking, and unavailable after
        600 s of silence.
        """
        self.server.clock.advance(600)
        self.assertIs(self.status()["is_available"], True)
        self.server.clock.advance(1)
        status = self.status()
        self.assertEqual((status["is_available"], status["is_online"]), (False, False))
        self.connect()
        self.assertIs(self.status()["is_available"], True)

    def test_heldIsAvailable(self) -> None:
        """
        A device holding a subscribe is available however long ago it came.
        """
        self.server.clock.advance(500)
        self.held()
        self.server.clock.advance(200)
        self.assertIs(self.status()["is_available"], True)
        self.endHolds()

    def test_errors(self) -> None:
        """
        Without a serial the answer is 400, for an unknown one 404, each
        with an C{error} sentence.
        """
        status, document = self.control("GET", "/status")
        self.assertEqual(status, 400)
        self.assertEqual(document["error"], "Serial parameter required")
        status, document = self.control("GET", f"/status?serial={OTHER_SERIAL}")
        self.assertEqual(status, 404)
        self.assertEqual(document["error"], "Device not found")

    def test_invalidSerial(self) -> None:
        """
        A serial that is there but malformed (too short, too long, not a
        string) is answered 400 "invalid serial" on every route that takes
        one, not "Serial parameter required"; a missing or empty one is
        still "Serial parameter required". Nothing changes.
        """
        before = self.snapshot()
        for method, path, document in [
            ("GET", "/status?serial=abc", None),
            ("GET", "/status?serial=" + "9" * 100, None),
            ("GET", "/api/schedule?serial=--x--", None),
            ("POST", "/command", {"serial": "abc", "command": "set_mode"}),
            ("POST", "/command", {"serial": 12345678901, "command": "set_mode"}),
            ("POST", "/api/dismiss-pairing/abc", None),
            ("DELETE", "/api/registered-devices/abc", None),
            ("DELETE", "/api/device?serial=abc", None),
            ("DELETE", "/api/device", {"serial": ["x"]}),
        ]:
            status, answer = self.control(method, path, document)
            self.assertEqual(status, 400, path)
            self.assertEqual(answer["code"], "invalid_serial", path)
            self.assertIn("Invalid serial", answer["error"], path)
        for method, path, document in [
            ("GET", "/status?serial=", None),
            ("POST", "/command", {"command": "set_mode"}),
            ("DELETE", "/api/device", None),
            ("DELETE", "/api/device", {}),
        ]:
            status, answer = self.control(method, path, document)
            self.assertEqual(status, 400, path)
            self.assertEqual(answer["error"], "Serial parameter required", path)
        self.assertEqual(self.snapshot(), before)

    def test_lowercaseSerial(self) -> None:
        """
        A serial in lower case finds the device.
        """
        self.assertEqual(self.status(SERIAL.lower())["serial"], SERIAL)

    def test_pairedStatus(self) -> None:
        """
        A claimed device shows its owner and structure.
        """
        self.claim(self.passphrase()["value"])
        status = self.status()
        self.assertEqual(
            (status["paired"], status["owner"], status["structure_id"]),
            (True, "homeowner", "homeowner"),
        )

    def test_deleteDevice(self) -> None:
        """
        C{DELETE /api/device} removes the device's buckets, owner and key,
        and takes it out of its structure; it is then unknown.
        """
        self.claim(self.passphrase()["value"])
        status, document = self.control("DELETE", "/api/device", {"serial": SERIAL})
        self.assertEqual(status, 200)
        self.assertEqual((document["success"], document["serial"]), (True, SERIAL))
        self.assertEqual(self.server.store.buckets(SERIAL), [])
        self.assertIsNone(self.server.state.membership.ownerOf(SERIAL))
        self.assertEqual(self.value("structure.homeowner", GLOBAL_SCOPE)["devices"], [])
        self.assertEqual(self.control("GET", f"/status?serial={SERIAL}")[0], 404)
        status, document = self.control("DELETE", "/api/device", {"serial": SERIAL})
        self.assertEqual(status, 404)

    def test_deleteDeviceWithoutBody(self) -> None:
        """
        C{DELETE /api/device?serial=...} without a body removes the device.
        """
        status, document = self.control("DELETE", f"/api/device?serial={SERIAL}")
        self.assertEqual(status, 200, document)
        self.assertEqual((document["success"], document["serial"]), (True, SERIAL))
        self.assertEqual(self.server.store.buckets(SERIAL), [])
        self.assertEqual(self.control("GET", f"/status?serial={SERIAL}")[0], 404)


class EventTests(ControlTestCase):
    """
    C{GET /api/events} (Server-Sent Events).
    """

    def openStream(self) -> tuple[DroppableBody, list[bytes], Deferred[None]]:
        d = self.server.controlClient.get(CONTROL_URL + "/api/events")
        self.server.controlClient.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["text/event-stream"]
        )
        answer, stream = receiveDroppable(response)
        return stream, answer.chunks, answer.done

    def leave(self, stream: DroppableBody, done: Deferred[None]) -> None:
        """The client disconnects; nothing of it remains."""
        stream.disconnect()
        self.server.controlClient.flush()
        self.failureResultOf(done)
        self.assertEqual(self.server.control.events.count(), 0)
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def events(self, chunks: list[bytes]) -> list[dict[str, Any]]:
        """The data of each event received, as an EventSource reads them."""
        return [data for _id, kind, data in sseEvents(chunks) if kind == "message"]

    def test_onePerChange(self) -> None:
        """
        Each change produces exactly one event naming the device: a command,
        and a device's PUT.
        """
        d, chunks, done = self.openStream()
        self.assertEqual(self.events(chunks), [])
        self.ok("set_temperature", 22)
        self.server.controlClient.flush()
        self.assertEqual(self.events(chunks), [{"serial": SERIAL}])
        self.connect(OTHER_SERIAL)
        self.server.controlClient.flush()
        self.assertEqual(
            self.events(chunks), [{"serial": SERIAL}, {"serial": OTHER_SERIAL}]
        )
        self.assertNoResult(done)
        self.leave(d, done)

    def test_unchangedPutNoEvent(self) -> None:
        """
        A PUT that changes nothing is no event.
        """
        d, chunks, done = self.openStream()
        self.connect()
        self.server.controlClient.flush()
        self.assertEqual(self.events(chunks), [])
        self.leave(d, done)

    def test_clientLeaves(self) -> None:
        """
        A client that disconnects is forgotten at once, with its keep-alive
        timer.
        """
        self.assertEqual(self.server.clock.getDelayedCalls(), [])
        d, chunks, done = self.openStream()
        self.assertEqual(self.server.control.events.count(), 1)
        self.assertEqual(len(self.server.clock.getDelayedCalls()), 1)
        self.leave(d, done)
        self.ok("set_temperature", 22)
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def test_claimOneEvent(self) -> None:
        """
        A claim, which writes a user and a structure, is one event for the
        claimed device.
        """
        code = self.passphrase()["value"]
        d, chunks, done = self.openStream()
        self.claim(code)
        self.server.controlClient.flush()
        self.assertEqual(self.events(chunks), [{"serial": SERIAL}])
        self.leave(d, done)

    def test_keepAlive(self) -> None:
        """
        An idle stream gets a comment line every 25 s.
        """
        d, chunks, done = self.openStream()
        self.server.clock.advance(25)
        self.server.controlClient.flush()
        self.assertTrue(b"".join(chunks).endswith(b": keepalive\n\n"))
        self.leave(d, done)

    def reconnect(
        self, lastEventId: str | None
    ) -> tuple[DroppableBody, list[bytes], Deferred[None]]:
        headers = {} if lastEventId is None else {"Last-Event-ID": lastEventId}
        d = self.server.controlClient.get(CONTROL_URL + "/api/events", headers=headers)
        self.server.controlClient.flush()
        answer, stream = receiveDroppable(self.successResultOf(d))
        return stream, answer.chunks, answer.done

    def test_lastEventIdReplaysExactlyWhatWasMissed(self) -> None:
        """
        Each event carries the commit's sequence as its id; a client that
        reconnects with C{Last-Event-ID} gets exactly the events it missed,
        in order, and then live ones.
        """
        self.connect(OTHER_SERIAL)
        d, chunks, done = self.openStream()
        self.ok("set_temperature", 22)
        self.server.controlClient.flush()
        [(seenId, _kind, first)] = sseEvents(chunks)
        self.assertEqual(first, {"serial": SERIAL})
        self.assertEqual(seenId, str(self.server.store.lastSequence))
        self.leave(d, done)
        self.ok("set_temperature", 23)
        self.ok("set_mode", "cool", serial=OTHER_SERIAL)
        d, chunks, done = self.reconnect(seenId)
        replayed = sseEvents(chunks)
        self.assertEqual(
            [data for _id, _kind, data in replayed],
            [{"serial": SERIAL}, {"serial": OTHER_SERIAL}],
        )
        self.assertEqual(replayed[-1][0], str(self.server.store.lastSequence))
        self.ok("set_temperature", 24)
        self.server.controlClient.flush()
        self.assertEqual(self.events(chunks)[2:], [{"serial": SERIAL}])
        self.leave(d, done)

    def test_upToDateReconnectGetsNothing(self) -> None:
        """
        A fresh client is told where it stands (an id with no event); a
        client reconnecting with the latest id is sent no event.
        """
        d, chunks, done = self.openStream()
        self.assertIn(b"id: %d\n\n" % self.server.store.lastSequence, chunks[0])
        self.assertEqual(sseEvents(chunks), [])
        self.leave(d, done)
        d, chunks, done = self.reconnect(str(self.server.store.lastSequence))
        self.assertEqual(sseEvents(chunks), [])
        self.leave(d, done)

    def test_tooOldOrBadIdResets(self) -> None:
        """
        Missed events no longer kept, or an id this server never gave, are
        one C{reset} event: the client refetches everything.
        """
        for _ in range(REPLAY_COMMITS + 1):
            self.ok("set_temperature", 22)
        last = self.server.store.lastSequence
        for bad in ["0", "not-a-number", str(last + 5)]:
            d, chunks, done = self.reconnect(bad)
            [(resetId, kind, data)] = sseEvents(chunks)
            self.assertEqual((kind, data), ("reset", {"reset": True}), bad)
            self.assertEqual(resetId, str(last))
            self.leave(d, done)

    def test_shutdownEndsStreams(self) -> None:
        """At shutdown every event stream ends cleanly, leaving no timer."""
        d, chunks, done = self.openStream()
        self.server.control.events.endAll()
        self.server.controlClient.flush()
        self.successResultOf(done)
        self.assertEqual(self.server.control.events.count(), 0)
        self.assertEqual(self.server.clock.getDelayedCalls(), [])


class CommandPropertyTests(SynchronousTestCase):
    """
    Any command body, valid or nearly so.
    """

    @given(body=controlCommands(SERIAL))
    def test_appliedOrRefusedWhole(self, body: dict[str, Any]) -> None:
        """
        A command is either applied (200, success, every written bucket
        revision moved and pushed) or refused (4xx, a message, the store as
        it was): never a 500, never half done.
        """
        case = ControlTestCase()
        case.setUp()
        before = case.snapshot()
        status, document = case.control("POST", "/command", body)
        self.assertIn(status, (200, 400), document)
        if status != 200:
            self.assertIs(document["success"], False)
            self.assertIsInstance(document["message"], str)
            self.assertEqual(case.snapshot(), before)
            return
        self.assertIs(document["success"], True)
        key = document["data"]["object_key"]
        scope = GLOBAL_SCOPE if key.startswith("structure.") else SERIAL
        previous = {bucket.key: bucket for bucket in before[0].get(scope, [])}.get(key)
        written = case.stored(key, scope)
        assert written is not None
        if previous is not None:
            self.assertGreater(written.timestamp, previous.timestamp)
            self.assertNotEqual(written.revision, previous.revision)
        for name, value in document["data"]["values"].items():
            self.assertEqual(written.value[name], value)
