# -*- test-case-name: tests.test_conformance_keylist -*-
"""
The conformance state machine of a mixed fleet (PROTOCOL.md §20): a v7
thermostat and a 4.x thermostat (key-list dialect) of one owner, a third
thermostat of a neighbour, and the owner's app. After any sequence of
their actions and a settling round, the three views of every bucket (the
store, each thermostat's copy, the app's read) agree; an app's put reaches
both thermostats; a token never reads or writes outside its account.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import treq
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse

from nestproto.control.commands import DEFAULT_MAX_CELSIUS, DEFAULT_MIN_CELSIUS

from .helpers import CONTROL_URL, DEVICE_URL, Server, basicAuth, makeServer

V7_SERIAL = "02AA01AC0000000011"
V3_SERIAL = "02AA01AC0000000012"
NEIGHBOUR_SERIAL = "02AA01AC0000000013"
PASSWORD = "correct horse"
KINDS = ("device", "shared")


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must have fired, successfully."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, f"no synchronous answer: {d}"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class MixedFleetMachine(RuleBasedStateMachine):
    """Two dialects, two accounts, one app."""

    def __init__(self) -> None:
        super().__init__()
        self.server: Server = makeServer()
        self.server.device.accounts.scryptN = 2**10
        #: Each thermostat's copy: key -> (revision, timestamp, value).
        self.copies: dict[str, dict[str, tuple[int, int, dict[str, Any]]]] = {
            serial: {} for serial in (V7_SERIAL, V3_SERIAL, NEIGHBOUR_SERIAL)
        }
        self.appSetpoints: dict[str, float] = {}
        #: Sessions used by the app's reads, each its first contact.
        self.sessions = 0

    def teardown(self) -> None:
        self.server.hub.endAll()
        self.server.deviceClient.flush()
        result(self.server.store.close())

    # Wire

    def send(
        self, client: Any, method: str, url: str, **kwargs: Any
    ) -> tuple[IResponse, bytes]:
        d = client.request(method, url, **kwargs)
        client.flush()
        response = result(d)
        body = treq.content(response)
        client.flush()
        return response, result(body)

    def device(self, method: str, path: str, **kwargs: Any) -> tuple[IResponse, bytes]:
        return self.send(self.server.deviceClient, method, DEVICE_URL + path, **kwargs)

    def control(self, method: str, path: str, document: Any) -> Any:
        response, body = self.send(
            self.server.controlClient,
            method,
            CONTROL_URL + path,
            data=json.dumps(document).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert response.code == 200, (path, body)
        return json.loads(body)

    def stored(self, serial: str, key: str) -> tuple[int, int, dict[str, Any]] | None:
        bucket = self.server.store.get(serial, key)
        if bucket is None:
            return None
        return bucket.revision, bucket.timestamp, dict(bucket.value)

    def snapshot(self) -> Any:
        store = self.server.store
        return {scope: store.buckets(scope) for scope in store.scopes()}

    # Thermostats

    def v7Sync(self, serial: str) -> None:
        """A non-chunked v7 subscribe: every newer bucket, at once."""
        objects = [
            {"object_key": key, "object_revision": rev, "object_timestamp": ts}
            for key, (rev, ts, _value) in self.copies[serial].items()
        ]
        response, body = self.device(
            "POST",
            "/nest/transport",
            data=json.dumps({"chunked": False, "objects": objects}).encode(),
            headers=basicAuth(serial),
        )
        assert response.code == 200, body
        for item in json.loads(body).get("objects", []):
            self.take(serial, item["object_key"], item)

    def take(self, serial: str, key: str, item: dict[str, Any]) -> None:
        if not key.endswith(serial) or "value" not in item:
            return
        held = self.copies[serial].get(key)
        if held is None or item["object_timestamp"] > held[1]:
            self.copies[serial][key] = (
                item["object_revision"],
                item["object_timestamp"],
                item["value"],
            )

    def keyListPoll(self, serial: str) -> bool:
        """
        One key-list subscribe with what it holds; whether it got a bucket
        (in sync it is held, and its hold ends at a 1 s timeout, empty).
        """
        keys = [
            {"key": key, "version": rev, "timestamp": ts}
            for key, (rev, ts, _value) in self.copies[serial].items()
        ]
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/v3/subscribe",
            data=json.dumps({"keys": keys}).encode(),
            headers={
                **basicAuth(serial),
                "X-nl-session-id": f"session-{serial}",
                "X-nl-subscribe-timeout": "1",
            },
        )
        self.server.deviceClient.flush()
        response = result(d)
        body = treq.content(response)
        self.server.deviceClient.flush()
        if not body.called:
            self.server.clock.advance(1)
            self.server.deviceClient.flush()
        data = result(body)
        assert response.code == 200, data
        key = response.headers.getRawHeaders("x-nl-skv-key")
        if key is None:
            assert data == b"", data
            return False
        value = json.loads(data)
        assert "objects" not in value
        self.take(
            serial,
            key[0],
            {
                "object_revision": int(
                    response.headers.getRawHeaders("x-nl-skv-version")[0]
                ),
                "object_timestamp": int(
                    response.headers.getRawHeaders("x-nl-skv-timestamp")[0]
                ),
                "value": value,
            },
        )
        return True

    def sync(self, serial: str) -> None:
        if serial == V3_SERIAL:
            for _poll in range(8):
                if not self.keyListPoll(serial):
                    return
            raise AssertionError("a key-list thermostat never came to be held")
        self.v7Sync(serial)

    def devicePut(
        self, serial: str, fields: dict[str, Any], kind: str = "shared"
    ) -> None:
        """The thermostat reports (its own put), and takes the receipt."""
        shared = f"{kind}.{serial}"
        if serial == V3_SERIAL:
            response, body = self.device(
                "POST",
                "/nest/transport/v3/put",
                data=json.dumps({kind: {serial: fields}}).encode(),
                headers=basicAuth(serial),
            )
            assert response.code == 200, body
            receipt = json.loads(body)[kind][serial]
            assert set(receipt) == {"$version", "$timestamp"}, receipt
            revision, timestamp = receipt["$version"], receipt["$timestamp"]
        else:
            response, body = self.device(
                "POST",
                "/nest/transport/put",
                data=json.dumps(
                    {"objects": [{"object_key": shared, "value": fields}]}
                ).encode(),
                headers=basicAuth(serial),
            )
            assert response.code == 200, body
            (receipt,) = json.loads(body)["objects"]
            revision, timestamp = (
                receipt["object_revision"],
                receipt["object_timestamp"],
            )
        held = self.copies[serial].get(shared, (0, 0, {}))
        self.copies[serial][shared] = (revision, timestamp, {**held[2], **fields})

    # App

    def login(self, name: str) -> str:
        response, body = self.device(
            "POST",
            "/user/login",
            data=urlencode({"username": name, "password": PASSWORD}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.code == 200, body
        token = json.loads(body)["access_token"]
        assert isinstance(token, str)
        return token

    def app(self, method: str, path: str, token: str, body: Any = None) -> Any:
        response, data = self.device(
            method,
            path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}"},
        )
        return response.code, json.loads(data) if data else None

    # Rules

    @initialize()
    def setUp(self) -> None:
        for name in ("homeowner", "neighbour"):
            self.control("POST", "/api/users", {"username": name, "password": PASSWORD})
        for serial, owner in [
            (V7_SERIAL, "homeowner"),
            (V3_SERIAL, "homeowner"),
            (NEIGHBOUR_SERIAL, "neighbour"),
        ]:
            self.devicePut(
                serial,
                {
                    "current_temperature": 20.0,
                    "target_temperature": 20.0,
                    "target_temperature_type": "heat",
                },
            )
            self.devicePut(
                serial, {"temperature_scale": "C", "has_fan": True}, "device"
            )
            response, body = self.device(
                "GET", "/nest/passphrase", headers=basicAuth(serial)
            )
            code = json.loads(body)["value"]
            self.control("POST", "/api/register", {"code": code, "userId": owner})
            self.sync(serial)
        self.token = self.login("homeowner")
        self.neighbourToken = self.login("neighbour")

    @rule(
        serial=st.sampled_from([V7_SERIAL, V3_SERIAL]),
        celsius=st.floats(10, 30).map(lambda c: round(c, 1)),
    )
    def report(self, serial: str, celsius: float) -> None:
        """A thermostat reports its room temperature."""
        self.devicePut(serial, {"current_temperature": celsius})

    @rule(serial=st.sampled_from([V7_SERIAL, V3_SERIAL]))
    def syncOne(self, serial: str) -> None:
        self.sync(serial)

    @rule(
        serials=st.lists(
            st.sampled_from([V7_SERIAL, V3_SERIAL]), min_size=1, max_size=2, unique=True
        ),
        celsius=st.floats(0, 50).map(lambda c: round(c, 1)),
        path=st.sampled_from(["/v2/put", "/v1/put", "bucket"]),
    )
    def appPut(self, serials: list[str], celsius: float, path: str) -> None:
        """The owner's app sets setpoints: clamped, pending, one answer."""
        if path == "bucket":
            for serial in serials:
                status, answer = self.app(
                    "POST",
                    f"/v2/put/shared.{serial}",
                    self.token,
                    {"target_temperature": celsius},
                )
                assert status == 200, answer
        else:
            body = {"shared": {s: {"target_temperature": celsius} for s in serials}}
            status, answer = self.app("POST", path, self.token, body)
            assert status == 200, answer
            assert list(answer["shared"]) == serials, answer
        expected = min(max(celsius, DEFAULT_MIN_CELSIUS), DEFAULT_MAX_CELSIUS)
        for serial in serials:
            self.appSetpoints[serial] = expected
            stored = self.stored(serial, f"shared.{serial}")
            assert stored is not None
            assert stored[2]["target_temperature"] == expected, stored
            assert stored[2]["target_change_pending"] is True, stored

    @rule(
        which=st.sampled_from(["neighbourReadsOwner", "neighbourPuts", "ownerPuts"]),
        path=st.sampled_from(["/v2/put", "bucket", "/v5/put"]),
    )
    def trespass(self, which: str, path: str) -> None:
        """A token outside its account: 403, and nothing changes."""
        before = self.snapshot()
        if which == "neighbourReadsOwner":
            status, _ = self.app(
                "GET", "/v2/mobile/user.homeowner", self.neighbourToken
            )
            assert status == 403
            return
        token, serial = (
            (self.neighbourToken, V7_SERIAL)
            if which == "neighbourPuts"
            else (self.token, NEIGHBOUR_SERIAL)
        )
        fields = {"target_temperature": 25.0}
        if path == "/v2/put":
            status, _ = self.app("POST", path, token, {"shared": {serial: fields}})
        elif path == "/v5/put":
            body = {"objects": [{"object_key": f"shared.{serial}", "value": fields}]}
            status, _ = self.app("POST", path, token, body)
        else:
            status, _ = self.app("POST", f"/v2/put/shared.{serial}", token, fields)
        assert status == 403, (which, path, status)
        assert self.snapshot() == before

    @rule(serial=st.sampled_from([V7_SERIAL, V3_SERIAL]), kind=st.sampled_from(KINDS))
    def jsonpRead(self, serial: str, kind: str) -> None:
        """
        The owner's browser reads a bucket by JSONP (scenario 71): a
        compact C{cb_1({"status","headers","payload"})} whose headers are
        those of the app's key-list answer for it (§20.3), in seed 001's
        order and as JSON numbers as seed 001 shows them, and whose
        payload is the stored value.
        """
        key = f"{kind}.{serial}"
        keys = json.dumps({"keys": [{"key": key}]})
        self.sessions += 1
        query = urlencode(
            {
                "jsonp": "cb_1",
                "payload": keys,
                "X-nl-session-id": f"tab-{self.sessions}",
                "Authorization": f"Basic {self.token}",
            }
        )
        response, body = self.device("GET", f"/v1/subscribe?{query}")
        assert response.code == 200, body
        assert response.headers.getRawHeaders("content-type") == [
            "application/javascript"
        ]
        stored = self.stored(serial, key)
        assert stored is not None, key
        revision, timestamp, value = stored
        headers = {
            "X-nl-skv-key": key,
            "X-nl-skv-version": revision,
            "X-nl-skv-timestamp": timestamp,
            "X-nl-service-timestamp": self.server.nowMs(),
        }
        envelope = {"status": 200, "headers": headers, "payload": value}
        expected = f"cb_1({json.dumps(envelope, separators=(',', ':'))})"
        assert body == expected.encode(), (body, expected)
        response, data = self.device(
            "POST",
            "/v2/subscribe",
            data=keys.encode(),
            headers={
                "Authorization": f"Basic {self.token}",
                "X-nl-session-id": f"app-{self.sessions}",
            },
        )
        assert response.code == 200, data
        for name, number in headers.items():
            assert response.headers.getRawHeaders(name) == [str(number)], name
        assert json.loads(data) == value

    @rule(seconds=st.sampled_from([0.5, 3.0, 60.0]))
    def advance(self, seconds: float) -> None:
        self.server.clock.advance(seconds)
        self.server.deviceClient.flush()

    @invariant()
    def agreeAfterSettling(self) -> None:
        """
        Once both thermostats have synced, the store, each thermostat and
        the app's read hold the same copy of every device and shared
        bucket; the app's last setpoint reached both thermostats.
        """
        if not hasattr(self, "token"):
            return
        for serial in (V7_SERIAL, V3_SERIAL):
            self.sync(serial)
        status, mobile = self.app("GET", "/v2/mobile/user.homeowner", self.token)
        assert status == 200, mobile
        assert sorted(mobile["device"]) == [V7_SERIAL, V3_SERIAL], mobile["device"]
        for serial in (V7_SERIAL, V3_SERIAL):
            for kind in KINDS:
                key = f"{kind}.{serial}"
                stored = self.stored(serial, key)
                assert stored is not None, key
                assert self.copies[serial].get(key) == stored, (
                    key,
                    self.copies[serial].get(key),
                    stored,
                )
                read = dict(mobile[kind][serial])
                assert (read.pop("$version"), read.pop("$timestamp")) == stored[:2]
                assert read == stored[2], (key, read, stored[2])
            if serial in self.appSetpoints:
                shared = self.copies[serial][f"shared.{serial}"][2]
                assert shared["target_temperature"] == self.appSetpoints[serial]
        assert self.server.hub.total() == 0


class MixedFleetConformanceTests(SynchronousTestCase):
    """The server conforms with both dialects and an app at once."""

    def test_machine(self) -> None:
        """
        Every generated sequence of reports, syncs, app puts, trespasses
        and time steps leaves the three views of every bucket in agreement.
        """
        run_state_machine_as_test(
            MixedFleetMachine,
            settings=settings(
                settings.default, stateful_step_count=20, max_examples=15
            ),
        )

    def test_jsonpEnvelope(self) -> None:
        """
        Scenario 71's answer, for each of the owner's buckets: the
        envelope carries the key-list answer's headers as numbers in
        seed 001's order, and the stored value, compact.
        """
        machine = MixedFleetMachine()
        try:
            machine.setUp()
            for serial in (V7_SERIAL, V3_SERIAL):
                for kind in KINDS:
                    machine.jsonpRead(serial, kind)
        finally:
            machine.teardown()
