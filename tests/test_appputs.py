# -*- test-case-name: tests.test_appputs -*-
"""
An app's put is a user command (PROTOCOL.md §20.4, scenarios 69 and 70):
checked as C{/command}, pushed to the thermostat's held subscribes and the
event stream, and only ever inside the token's account.
"""

from __future__ import annotations

import json
from typing import Any

from nestproto.membership import GLOBAL_SCOPE

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    basicAuth,
    parseChunks,
    receive,
    receiveDroppable,
    sseEvents,
)
from .test_accounts import AccountTestCase

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"


class AppPutTestCase(AccountTestCase):
    """An owner with a claimed thermostat, a neighbour with another."""

    def setUp(self) -> None:
        super().setUp()
        for name in ["homeowner", "neighbour"]:
            self.createUser(name)
        for serial, owner in [(SERIAL, "homeowner"), (OTHER_SERIAL, "neighbour")]:
            self.devicePut(
                serial,
                {
                    "shared": {
                        serial: {
                            "current_temperature": 20.5,
                            "target_temperature": 20.0,
                            "target_temperature_type": "heat",
                            "can_heat": True,
                            "can_cool": False,
                        }
                    },
                    "device": {serial: {"has_fan": True, "temperature_scale": "C"}},
                },
            )
            code = self.passphrase(serial)["value"]
            self.assertEqual(self.claim(code, owner)[0], 200)
        self.ownerToken = self.login()[1]["access_token"]
        self.neighbourToken = self.login("neighbour")[1]["access_token"]
        self.structureKey = self.server.state.membership.structureKey(SERIAL)

    def devicePut(self, serial: str, body: dict[str, Any]) -> None:
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/v3/put",
            data=json.dumps(body).encode(),
            headers=basicAuth(serial),
        )
        self.assertEqual(self.answer(d, self.server.deviceClient)[0], 200)

    def appPut(self, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
        token = self.ownerToken if token is None else token
        d = self.server.deviceClient.post(
            DEVICE_URL + path,
            data=body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "X-nl-protocol-version": "1"},
        )
        return self.answer(d, self.server.deviceClient)

    def value(self, key: str, scope: str = SERIAL) -> dict[str, Any]:
        bucket = self.server.store.get(scope, key)
        assert bucket is not None
        return dict(bucket.value)

    def refusedUnchanged(self, status: int, path: str, body: Any, **kw: Any) -> Any:
        before = self.snapshot()
        code, document = self.appPut(path, body, **kw)
        self.assertEqual(code, status, document)
        self.assertIsInstance(document["error"], str)
        self.assertEqual(self.snapshot(), before)
        return document


class CommandTests(AppPutTestCase):
    """What an app's put writes."""

    def test_scenario69ReachesHeldV7Subscribe(self) -> None:
        """
        Scenario 69: C{POST /v2/put/shared.S} from the owner's token
        changes the setpoint, marks it pending and reaches a held v7
        subscribe of S; the answer is metadata only.
        """
        held = self.held(SERIAL)
        status, document = self.appPut(
            f"/v2/put/{SHARED}", {"target_temperature": 22.5}
        )
        self.assertEqual(status, 200)
        revision = self.server.store.get(SERIAL, SHARED)
        assert revision is not None
        self.assertEqual(
            document,
            {
                "shared": {
                    SERIAL: {
                        "$version": revision.revision,
                        "$timestamp": revision.timestamp,
                    }
                }
            },
        )
        shared = self.value(SHARED)
        self.assertEqual(shared["target_temperature"], 22.5)
        self.assertIs(shared["target_change_pending"], True)
        self.assertEqual(shared["touched_by"]["touched_by"], 3)
        self.server.deviceClient.flush()
        [pushed] = [
            obj
            for chunk in parseChunks(held.chunks)
            for obj in chunk["objects"]
            if obj["object_key"] == SHARED
        ]
        self.assertEqual(pushed["value"]["target_temperature"], 22.5)
        self.assertIs(pushed["value"]["target_change_pending"], True)
        self.endHolds()

    def test_endsHeldKeyListSubscribe(self) -> None:
        """
        A 4.x thermostat's held key-list subscribe ends with no body on an
        app's put, and its next poll carries the commanded bucket.
        """
        keys = [
            {"key": key, "version": b.revision, "timestamp": b.timestamp}
            for key in [SHARED, DEVICE]
            for b in [self.server.store.get(SERIAL, key)]
            if b is not None
        ]
        headers = {**basicAuth(SERIAL), "X-nl-session-id": "s"}
        url = DEVICE_URL + "/nest/transport/v3/subscribe"
        d = self.server.deviceClient.post(
            url, data=json.dumps({"keys": keys}), headers=headers
        )
        self.server.deviceClient.flush()
        answer = receive(self.successResultOf(d))
        self.assertNoResult(answer.done)
        self.assertEqual(
            self.appPut("/v1/put", {"shared": {SERIAL: {"target_temperature": 19}}})[0],
            200,
        )
        self.server.deviceClient.flush()
        self.successResultOf(answer.done)
        self.assertEqual(b"".join(answer.chunks), b"")
        d = self.server.deviceClient.post(
            url, data=json.dumps({"keys": keys}), headers=headers
        )
        self.server.deviceClient.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders("x-nl-skv-key"), [SHARED])
        body = receive(response)
        self.server.deviceClient.flush()
        self.assertEqual(json.loads(b"".join(body.chunks))["target_temperature"], 19)

    def test_reachesEventStream(self) -> None:
        """The event stream tells of an app's change like of a command."""
        d = self.server.controlClient.get(CONTROL_URL + "/api/events")
        self.server.controlClient.flush()
        answer, stream = receiveDroppable(self.successResultOf(d))
        self.appPut("/v2/put", {"shared": {SERIAL: {"target_temperature": 21}}})
        self.server.controlClient.flush()
        self.assertIn(
            {"serial": SERIAL},
            [data for _id, kind, data in sseEvents(answer.chunks) if kind == "message"],
        )
        stream.disconnect()
        self.server.controlClient.flush()
        self.failureResultOf(answer.done)

    def test_clampedAndMode(self) -> None:
        """
        Setpoints are clamped like C{set_temperature}; the mode goes through
        C{set_mode}'s names and capability checks; range takes both ends.
        """
        self.appPut(f"/v2/put/{SHARED}", {"target_temperature": 60})
        self.assertEqual(self.value(SHARED)["target_temperature"], 35.0)
        self.appPut(f"/v2/put/{SHARED}", {"target_temperature_type": "off"})
        self.assertEqual(self.value(SHARED)["target_temperature_type"], "off")
        self.refusedUnchanged(
            400, f"/v2/put/{SHARED}", {"target_temperature_type": "cool"}
        )
        self.refusedUnchanged(
            400, f"/v2/put/{SHARED}", {"target_temperature_type": "eco"}
        )

    def test_awayIsSetAway(self) -> None:
        """
        C{structure.away} from an app is C{set_away}: the eco switch and
        the app's fields in one transaction, and /status agrees.
        """
        sid = self.structureKey.split(".", 1)[1]
        status, document = self.appPut(
            "/v2/put",
            {
                "structure": {
                    sid: {"away": True, "away_timestamp": 1767225000, "away_setter": 0}
                }
            },
        )
        self.assertEqual(status, 200, document)
        structure = self.value(self.structureKey, GLOBAL_SCOPE)
        self.assertIs(structure["away"], True)
        self.assertIs(structure["manual_eco_all"], True)
        self.assertEqual(structure["away_timestamp"], 1767225000)
        code, statusDocument = self.control("GET", f"/status?serial={SERIAL}")
        self.assertIs(statusDocument["away"], True, statusDocument)
        self.appPut("/v2/put", {"structure": {sid: {"away": False}}})
        structure = self.value(self.structureKey, GLOBAL_SCOPE)
        self.assertEqual(
            (structure["away"], structure["manual_eco_all"]), (False, False)
        )
        self.assertEqual(self.value(DEVICE)["eco"]["mode"], "schedule")

    def test_commandAwayKeepsStructureAway(self) -> None:
        """C{/command set_away} moves the structure's C{away} too (§20.4)."""
        self.control(
            "POST", "/command", {"serial": SERIAL, "command": "set_away", "value": True}
        )
        structure = self.value(self.structureKey, GLOBAL_SCOPE)
        self.assertEqual((structure["away"], structure["manual_eco_all"]), (True, True))

    def test_v5PutObjects(self) -> None:
        """C{/v5/put} takes the v7 C{objects} shape with the app's token."""
        status, document = self.appPut(
            "/v5/put",
            {"objects": [{"object_key": SHARED, "value": {"target_temperature": 18}}]},
        )
        self.assertEqual(status, 200, document)
        self.assertEqual(self.value(SHARED)["target_temperature"], 18)

    def test_deviceSettingsAndFan(self) -> None:
        """Device fields go through C{set_device_setting} and C{set_fan}."""
        now = int(self.server.clock.seconds())
        self.appPut(
            f"/v2/put/{DEVICE}",
            {"fan_timer_timeout": now + 600, "temperature_scale": "F"},
        )
        device = self.value(DEVICE)
        self.assertEqual(device["fan_timer_timeout"], now + 600)
        self.assertEqual(device["temperature_scale"], "F")


class SchedulePutTests(AppPutTestCase):
    """C{/v1/put/schedule.S} with the full schedule (PROTOCOL.md §20.4)."""

    def test_scheduleReplacedWhole(self) -> None:
        """
        The schedule is checked and replaced whole like C{set_schedule},
        and shared's C{schedule_mode} follows it.
        """
        schedule = {
            "ver": 2,
            "schedule_mode": "HEAT",
            "days": {"0": {"0": {"time": 25200, "type": "HEAT", "temp": 20.5}}},
        }
        status, document = self.appPut(f"/v1/put/schedule.{SERIAL}", schedule)
        self.assertEqual(status, 200, document)
        stored = self.value(f"schedule.{SERIAL}")
        self.assertEqual(stored["days"]["0"]["0"]["temp"], 20.5)
        self.assertEqual(sorted(stored["days"]), [str(day) for day in range(7)])
        self.assertEqual(self.value(SHARED)["schedule_mode"], "HEAT")

    def test_badScheduleRefused(self) -> None:
        """A schedule C{set_schedule} would refuse is a 400; nothing changes."""
        self.refusedUnchanged(
            400,
            f"/v1/put/schedule.{SERIAL}",
            {
                "ver": 2,
                "schedule_mode": "HEAT",
                "days": {"0": {"0": {"time": 25200, "type": "HEAT", "temp": 99}}},
            },
        )


class RefusalTests(AppPutTestCase):
    """Scenario 70 (writes) and bad input: refused, nothing changes."""

    def test_scenario70OtherUsersPutIs403(self) -> None:
        """Another user's token, or a forged one, is a 403 and changes nothing."""
        for token in [self.neighbourToken, "forged"]:
            for path, body in [
                (f"/v2/put/{SHARED}", {"target_temperature": 25}),
                ("/v2/put", {"shared": {SERIAL: {"target_temperature": 25}}}),
                (
                    "/v1/put",
                    {"structure": {self.structureKey.split(".")[1]: {"away": True}}},
                ),
                (
                    "/v5/put",
                    {
                        "objects": [
                            {"object_key": SHARED, "value": {"target_temperature": 25}}
                        ]
                    },
                ),
            ]:
                self.refusedUnchanged(403, path, body, token=token)

    def test_oneForeignBucketRefusesAll(self) -> None:
        """A put naming its own bucket and another's changes neither."""
        self.refusedUnchanged(
            403,
            "/v2/put",
            {
                "shared": {
                    SERIAL: {"target_temperature": 25},
                    OTHER_SERIAL: {"target_temperature": 25},
                }
            },
        )

    def test_badInput(self) -> None:
        """Unwritable fields, bad values and malformed bodies are 400s."""
        for path, body in [
            (f"/v2/put/{SHARED}", {"current_temperature": 30}),
            (f"/v2/put/{SHARED}", {"target_temperature": "warm"}),
            (f"/v2/put/{DEVICE}", {"serial_number": "x"}),
            ("/v2/put/user.homeowner", {"name": "x"}),
            ("/v2/put", {"shared": {SERIAL: 5}}),
            ("/v2/put", b"not json"),
            (
                "/v2/put",
                {"structure": {self.structureKey.split(".")[1]: {"away": "yes"}}},
            ),
        ]:
            self.refusedUnchanged(400, path, body)

    def test_noTokenOnV5Is401(self) -> None:
        """C{/v5/put} is an app route: no token is a 401."""
        before = self.snapshot()
        d = self.server.deviceClient.post(DEVICE_URL + "/v5/put", data=b"{}")
        self.assertEqual(self.answer(d, self.server.deviceClient)[0], 401)
        self.assertEqual(self.snapshot(), before)
