# -*- test-case-name: tests.test_e2e_simulator -*-
"""
The simulated thermostat end to end: the real service (C{makeService}) on
loopback TCP ports with a real SQLite file, a L{SimulatedThermostat}
booting against it, claimed and commanded through the control port; and a
session recorded with C{--record} that replays green.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Callable
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from nestproto import replay
from nestproto.recording.format import loadFixture
from nestproto.recording.replayer import replayInMemory
from nestproto.simulator import SOFTWARE_VERSION, SimulatedThermostat

from .e2e import LiveServiceTestCase, sleep
from .helpers import OTHER_SERIAL, SERIAL, basicAuth

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"


class SimulatorEndToEndTests(LiveServiceTestCase):
    """A simulated thermostat against the real service over TCP."""

    def setUp(self) -> None:
        super().setUp()
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.thermostats: list[SimulatedThermostat] = []

    async def closeConnections(self) -> None:
        for thermostat in self.thermostats:
            thermostat.stop()
        await super().closeConnections()

    def thermostat(
        self, origin: str, serial: str = SERIAL, firmware: str = SOFTWARE_VERSION
    ) -> SimulatedThermostat:
        thermostat = SimulatedThermostat(
            self.http,
            reactor,
            origin,
            serial,
            mac=f"18B43000000{len(self.thermostats) + 1}",
            changeSeconds=3600,
            firmware=firmware,
            refetchSeconds=0.2,
        )
        self.thermostats.append(thermostat)
        return thermostat

    async def until(self, what: str, condition: Callable[[], Any]) -> None:
        """Wait (up to 10 s) until C{condition()} is true."""
        for _attempt in range(500):
            if await _maybe(condition()):
                return
            await sleep(0.02)
        self.fail(f"timed out waiting until {what}")

    async def post(self, url: str, document: Any) -> Any:
        response = await self.http.post(url, json=document)
        return json.loads(await treq.content(response))

    async def listing(
        self, origin: str, serial: str = SERIAL
    ) -> dict[str, tuple[int, int]]:
        _code, document = await self.json(
            "GET",
            f"{origin}/nest/transport/device/{serial}",
            # The password the thermostat gave first is bound to its serial.
            headers=basicAuth(serial, self.thermostats[0].password),
        )
        return {
            o["object_key"]: (o["object_revision"], o["object_timestamp"])
            for o in document["objects"]
        }

    async def converged(self, origin: str, thermostat: SimulatedThermostat) -> bool:
        """Whether the server lists, for each bucket, what the thermostat holds."""
        serial = thermostat.serial
        listed = await self.listing(origin, serial)
        for key in (f"device.{serial}", f"shared.{serial}"):
            local = thermostat.buckets[key]
            if listed.get(key) != (local.revision, local.timestamp):
                return False
        return not thermostat._dirty

    async def claimAndCommand(
        self,
        origin: str,
        control: str,
        serial: str = SERIAL,
        firmware: str = SOFTWARE_VERSION,
    ) -> SimulatedThermostat:
        """Boot a thermostat, claim it with its code, set 21.5 °C."""
        thermostat = self.thermostat(origin, serial, firmware)
        shared = f"shared.{serial}"
        thermostat.start()
        await self.until("a code is shown", lambda: thermostat.code)
        await self.until("held", lambda: thermostat.subscribes >= 2)
        claim = await self.post(
            control + "/api/register",
            {"code": thermostat.code, "userId": "homeowner"},
        )
        self.assertEqual((claim["success"], claim["serial"]), (True, serial))
        await self.until("claimed", lambda: thermostat.owner == "homeowner")
        command = await self.post(
            control + "/command",
            {"serial": serial, "command": "set_temperature", "value": 21.5},
        )
        self.assertIs(command["success"], True)
        await self.until(
            "the setpoint applied",
            lambda: thermostat.buckets[shared].value.get("target_temperature") == 21.5,
        )
        return thermostat

    def test_keyListMixedFleet(self) -> Deferred[None]:
        """
        A 4.3.3 thermostat (key-list dialect, PROTOCOL.md §20) beside a v7
        one on the same service: each boots, is claimed, takes a command on
        its held subscribe, acknowledges it and converges; an app's put
        reaches both; neither made an error.
        """

        async def go() -> None:
            origin, control = await self.start()
            old = await self.claimAndCommand(origin, control, SERIAL, "4.3.3")
            self.assertTrue(old.keyList)
            new = await self.claimAndCommand(origin, control, OTHER_SERIAL)
            for thermostat in (old, new):
                await self.until(
                    f"{thermostat.serial} converges",
                    _bound(self.converged, origin, thermostat),
                )
            created = await self.post(
                control + "/api/users",
                {"username": "homeowner", "password": "correct horse"},
            )
            self.assertIs(created["success"], True)
            response = await self.http.post(
                origin + "/user/login",
                data=b"username=homeowner&password=correct+horse",
                headers=Headers(
                    {b"Content-Type": [b"application/x-www-form-urlencoded"]}
                ),
            )
            token = json.loads(await treq.content(response))["access_token"]
            body = {
                "shared": {
                    serial: {"target_temperature": 19.5}
                    for serial in (SERIAL, OTHER_SERIAL)
                }
            }
            response = await self.http.post(
                origin + "/v2/put",
                data=json.dumps(body).encode(),
                headers=Headers({b"Authorization": [f"Basic {token}".encode()]}),
            )
            self.assertEqual(response.code, 200, await treq.content(response))
            for thermostat in (old, new):
                await self.until(
                    f"{thermostat.serial} takes the app's setpoint",
                    _bound(_setpointIs, thermostat, 19.5),
                )
                await self.until(
                    f"{thermostat.serial} converges again",
                    _bound(self.converged, origin, thermostat),
                )
                self.assertEqual(thermostat.errors, 0)
            self.assertEqual(
                old.buckets[f"device.{SERIAL}"].value["current_version"], "4.3.3"
            )

        return self.asDeferred(go())

    def test_claimedCommandedConverges(self) -> Deferred[None]:
        """
        A simulated thermostat boots against the real service, shows its
        code, is claimed with it, receives a set_temperature command on its
        held subscribe, acknowledges it, puts its own changes, and ends
        holding exactly the revisions and timestamps the server has.
        """

        async def go() -> None:
            origin, control = await self.start()
            thermostat = await self.claimAndCommand(origin, control)
            await self.until(
                "the acknowledgement is stored and both sides agree",
                lambda: self.converged(origin, thermostat),
            )
            shared = thermostat.buckets[SHARED].value
            self.assertIs(shared["target_change_pending"], False)
            thermostat.drift()
            await self.until(
                "the drift is put", lambda: self.converged(origin, thermostat)
            )
            status = json.loads(
                await treq.content(
                    await self.http.get(f"{control}/status?serial={SERIAL}")
                )
            )
            self.assertEqual(status["target_temperature"], 21.5)
            self.assertEqual(
                status["current_temperature"],
                thermostat.buckets[DEVICE].value["current_temperature"],
            )
            self.assertIn("structure.homeowner", thermostat.subscribeKeys())
            self.assertEqual(thermostat.errors, 0)

        return self.asDeferred(go())

    def test_recordedSessionReplays(self) -> Deferred[None]:
        """
        C{--record} writes the simulated session (both ports, one file for
        the serial); the file replays green against a fresh server in
        memory and over TCP against a fresh real one.
        """

        async def go() -> None:
            directory = self.mktemp()
            origin, control = await self.start("--record", directory)
            thermostat = await self.claimAndCommand(origin, control)
            # Wait on the thermostat alone: a read of the server made while
            # its PUT is in flight would race it, in the replay as here.
            await self.until(
                "the setpoint is acknowledged",
                lambda: thermostat.puts >= 1 and not thermostat._dirty,
            )
            await sleep(3.2)
            thermostat.stop()
            await sleep(0.1)
            await self.services[0].stopService()
            (path,) = glob.glob(os.path.join(directory, "*.jsonl"))
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            self.assertNotIn(SERIAL, text)
            fixture = loadFixture(path)
            kinds = {exchange.kind for exchange in fixture.exchanges}
            self.assertEqual(kinds, {"device", "control"})
            inMemory = replayInMemory(fixture, tolerance=0.25)
            self.assertEqual(inMemory.describe(), [])
            fresh, freshControl = await self.start(data=self.mktemp())
            options = replay.Options()
            options.parseOptions(
                replay.optionsFirst(
                    [path, "--against", fresh, "--control", freshControl]
                )
            )
            (overTCP,) = await replay.replayOverTCP(reactor, [fixture], options)
            self.maxDiff = None
            self.assertEqual(overTCP.describe(), [])
            self.assertEqual(overTCP.matched, len(fixture.exchanges))

        return self.asDeferred(go())


class ReplayAgainstTests(LiveServiceTestCase):
    """C{python -m nestproto.replay --against URL} and a server's devices."""

    def test_refusesServerWithDevices(self) -> Deferred[None]:
        """
        A replay against a server that has no devices runs; against one
        that has, it is refused (exit status 2, one line saying why) and
        sends nothing, unless C{--force} is given.
        """

        async def go() -> None:
            origin, control = await self.start()
            path = os.path.join(FIXTURES, "body_forms.jsonl")
            fixture = loadFixture(path)

            def options(*extra: str) -> replay.Options:
                parsed = replay.Options()
                parsed.parseOptions(
                    replay.optionsFirst(
                        [path, "--against", origin, "--control", control, *extra]
                    )
                )
                return parsed

            self.assertIsNone(await replay.refusal(reactor, options()))
            out = io.StringIO()
            status = await replay.runAgainst(reactor, [fixture], options(), out)
            self.assertEqual(status, 0, out.getvalue())
            _code, before = await self.json("GET", f"{control}/api/devices")
            self.assertEqual(before["total"], 1)

            out = io.StringIO()
            status = await replay.runAgainst(reactor, [fixture], options(), out)
            self.assertEqual(status, 2)
            [line] = out.getvalue().splitlines()
            self.assertTrue(line.startswith("error: "), line)
            self.assertIn("already has 1 device(s)", line)
            self.assertIn("--force", line)
            _code, after = await self.json("GET", f"{control}/api/devices")
            self.assertEqual(after, before)

            out = io.StringIO()
            await replay.runAgainst(reactor, [fixture], options("--force"), out)
            self.assertIn("1 fixtures: replayed", out.getvalue())

        return self.asDeferred(go())

    def test_refusesWhatItCannotCount(self) -> Deferred[None]:
        """
        A control port that refuses the count (a token is needed) or that
        does not answer is a refusal naming what to give.
        """

        async def go() -> None:
            origin, control = await self.start("--control-token", "t0ken")
            options = replay.Options()
            options.parseOptions(
                replay.optionsFirst(
                    ["x.jsonl", "--against", origin, "--control", control]
                )
            )
            refused = await replay.refusal(reactor, options)
            assert refused is not None
            self.assertIn("answered 401 (give --control-token)", refused)
            options["control-token"] = "t0ken"
            self.assertIsNone(await replay.refusal(reactor, options))
            options["control"] = "http://127.0.0.1:1"
            refused = await replay.refusal(reactor, options)
            assert refused is not None
            self.assertIn("cannot count the devices", refused)

        return self.asDeferred(go())


def _bound(f: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: f(*args)


def _setpointIs(thermostat: SimulatedThermostat, celsius: float) -> bool:
    shared = thermostat.buckets[f"shared.{thermostat.serial}"].value
    return bool(shared.get("target_temperature") == celsius)


async def _maybe(value: Any) -> Any:
    if isinstance(value, Deferred):
        return await value
    if hasattr(value, "__await__"):
        return await value
    return value
