# -*- test-case-name: tests.test_commit_visibility -*-
"""
Nothing is shown before it is committed (issue 10, item 1): a command whose
commit is held shows nowhere until it commits, and one whose commit fails
shows nowhere at all and is answered with a JSON 503.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from nestproto.store import runInline

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    SERIAL,
    basicAuth,
    clientObject,
    completed,
    makeServer,
    parseChunks,
    receiveDroppable,
    sseEvents,
)
from .store_contract import CommitGate
from .test_control_api import ControlTestCase


class CommitVisibilityTests(ControlTestCase):
    """A thermostat, a held subscribe and an event stream around one command."""

    def setUp(self) -> None:
        self.gate = CommitGate(runInline)
        self.server = makeServer(
            controlSettings=self.controlSettings, storeRunner=self.gate
        )
        self.connect()
        self.hold = self.held()
        d = self.server.controlClient.get(CONTROL_URL + "/api/events")
        self.server.controlClient.flush()
        self.events, self.eventBody = receiveDroppable(self.successResultOf(d))

    def tearDown(self) -> None:
        self.eventBody.disconnect()
        self.server.controlClient.flush()
        # The stream ends as a dropped body does; consumed here, or it is
        # logged as unhandled when collected, failing whichever test runs.
        self.failureResultOf(self.events.done)
        self.endHolds()
        super().tearDown()

    def views(self) -> dict[str, Any]:
        """Every way a client or the thermostat can see the setpoint."""
        listing = self.server.deviceClient.get(
            DEVICE_URL + f"/nest/transport/device/{SERIAL}", headers=basicAuth()
        )
        _code, listed = self.answer(listing, self.server.deviceClient)
        _code, devices = self.control("GET", "/api/devices")
        fresh = self.subscribe([clientObject(f"shared.{SERIAL}")])
        self.server.deviceClient.flush()
        return {
            "status": self.status()["target_temperature"],
            "devices": devices["devices"][0]["target_temperature"],
            "listing": [
                (o["object_key"], o["object_revision"]) for o in listed["objects"]
            ],
            "subscribe": [
                o["value"]["target_temperature"]
                for chunk in parseChunks(fresh.chunks)
                for o in chunk["objects"]
            ],
            "pushed": parseChunks(self.hold.chunks),
            "events": [data for _id, _kind, data in sseEvents(self.events.chunks)],
        }

    def setTemperature(self, celsius: float) -> Deferred[IResponse]:
        d = self.server.controlClient.post(
            CONTROL_URL + "/command",
            data=json.dumps(
                {"serial": SERIAL, "command": "set_temperature", "value": celsius}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.server.controlClient.flush()
        return d

    def test_heldCommitShowsNothing(self) -> None:
        """
        While the command's commit is held, status, the device list, the
        object listing, a fresh subscribe, the held subscribe and the event
        stream all show the old setpoint; once committed, all show the new.
        """
        before = self.views()
        self.assertEqual(before["status"], 20.0)
        self.gate.holding = True
        d = self.setTemperature(23)
        self.assertNoResult(d)
        self.assertEqual(self.views(), before)
        self.gate.release()
        response, body = completed(self, self.server.controlClient, d)
        self.assertEqual(response.code, 200, body)
        self.server.deviceClient.flush()
        after = self.views()
        self.assertEqual(
            (after["status"], after["devices"], after["subscribe"]), (23, 23, [23])
        )
        self.assertNotEqual(after["listing"], before["listing"])
        [pushed] = after["pushed"]
        self.assertEqual(pushed["objects"][0]["value"]["target_temperature"], 23)
        self.assertEqual(after["events"], [{"serial": SERIAL}])

    def test_failedCommitChangesNothing(self) -> None:
        """
        A command whose commit fails is a JSON 503; every view is as before
        and nothing is pushed or announced. The next command goes through.
        """
        before = self.views()
        self.gate.failNext = True
        response, body = completed(
            self, self.server.controlClient, self.setTemperature(23)
        )
        self.assertEqual(response.code, 503)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        self.assertEqual(json.loads(body)["code"], "store_unavailable")
        self.assertEqual(self.views(), before)
        response, body = completed(
            self, self.server.controlClient, self.setTemperature(24)
        )
        self.assertEqual(response.code, 200, body)
        self.server.deviceClient.flush()
        self.assertEqual(self.views()["subscribe"], [24])
