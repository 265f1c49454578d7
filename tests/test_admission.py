# -*- test-case-name: tests.test_admission -*-
"""
Tests for L{nestproto.admission}: a device's password bound on first use,
pairing required (PROTOCOL.md §2.3, §19 scenario 59), and the cap on new
serials per client address, all through the device and control ports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from nestproto.admission import TRANSPORT, Admission, AdmissionSettings
from nestproto.errors import TooManyNewDevices
from nestproto.pairing import DEVICE_SECRET_RECORD, ENTRY_KEY_RECORD
from nestproto.store import runInline

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    basicAuth,
    clientObject,
    completed,
    makeServer,
    objectsBody,
    receiveDroppable,
    sseEvents,
)
from .test_pairing import ServerTestCase

SHARED = f"shared.{SERIAL}"
PUT_BODY = json.dumps(
    {"objects": [{"object_key": SHARED, "value": {"target_temperature": 20.0}}]}
).encode()


def frontDoor(serial: str = SERIAL) -> dict[str, str]:
    """How the firmware names itself at entry and passphrase, without credentials."""
    return {"X-nl-device-id": serial}


class AdmissionTestCase(ServerTestCase):
    """A server whose admission settings the test case chooses."""

    admission = AdmissionSettings()

    def setUp(self) -> None:
        self.server = makeServer(admission=self.admission)

    def device(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        data: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        """A device request; its status, JSON answer and response headers."""
        client = self.server.deviceClient
        d = client.request(method, DEVICE_URL + path, headers=headers, data=data)
        response, body = completed(self, client, d)
        return response.code, json.loads(body) if body else None, response.headers

    def put(self, headers: Mapping[str, str], serial: str = SERIAL) -> tuple[int, Any]:
        """A put of C{serial}'s shared bucket."""
        body = json.dumps(
            {
                "objects": [
                    {
                        "object_key": f"shared.{serial}",
                        "value": {"target_temperature": 20.0},
                    }
                ]
            }
        ).encode()
        status, document, _ = self.device("POST", "/nest/transport/put", headers, body)
        return status, document

    def subscribeNow(self, headers: Mapping[str, str]) -> tuple[int, Any]:
        """A subscribe that is answered at once (not chunked)."""
        status, document, _ = self.device(
            "POST",
            "/nest/transport",
            headers,
            objectsBody([clientObject(SHARED)], chunked=False),
        )
        return status, document

    def everything(self) -> tuple[Any, ...]:
        """The store's buckets and records of every kind, and presence."""
        store = self.server.store
        return (
            self.snapshot(),
            store.records(DEVICE_SECRET_RECORD),
            self.server.state.presence.heardFrom(),
        )


class CredentialTests(AdmissionTestCase):
    """
    Trust on first use: the first Basic password a serial gives is bound to
    it until the device is claimed again or deleted.
    """

    def test_firstPasswordBound(self) -> None:
        """
        The first password is bound to the serial, stored as a salted hash
        that contains nothing of it; the same password is accepted again.
        """
        self.assertEqual(self.put(basicAuth(password="first-secret"))[0], 200)
        record = self.server.store.record(DEVICE_SECRET_RECORD, SERIAL)
        assert record is not None
        self.assertEqual(sorted(record), ["boundAt", "salt", "sha256"])
        self.assertNotIn("first-secret", json.dumps(record))
        self.assertEqual(self.put(basicAuth(password="first-secret"))[0], 200)
        self.assertEqual(self.subscribeNow(basicAuth(password="first-secret"))[0], 200)

    def test_otherPasswordRefused(self) -> None:
        """
        Another password is refused with a 401 JSON error on every endpoint
        that names the serial, with nothing changed and a warning that
        names the serial and not the password; entry is still answered,
        but what it says is not kept.
        """
        self.put(basicAuth(password="first-secret"))
        before = self.everything()
        other = basicAuth(password="second-secret")
        with capturedLogs() as events:
            for method, path, body in [
                ("POST", "/nest/transport", objectsBody([clientObject(SHARED)])),
                ("POST", "/nest/transport/put", PUT_BODY),
                ("GET", "/nest/passphrase", None),
                ("GET", "/nest/passphrase/status", None),
                ("GET", f"/nest/transport/device/{SERIAL}", None),
                ("POST", "/nest/upload", b"log"),
            ]:
                status, document, _ = self.device(method, path, other, body)
                self.assertEqual(status, 401, path)
                self.assertEqual(document["code"], "device_unauthorized", path)
                self.assertIsInstance(document["error"], str)
        self.assertEqual(self.everything(), before)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 6)
        for event in warnings:
            self.assertEqual(event["serial"], SERIAL)
            self.assertNotIn("second-secret", repr(event))
            self.assertNotIn("first-secret", repr(event))
        status, document, _ = self.device(
            "POST",
            "/nest/entry",
            {**other, "Content-Type": "application/x-www-form-urlencoded"},
            b"mac=18B430000001",
        )
        self.assertEqual(status, 200)
        self.assertIn("transport_url", document)
        self.assertEqual(self.server.state.presence.entryFields(SERIAL), {})

    def test_noPasswordOnlyAtTheFrontDoor(self) -> None:
        """
        Once a password is bound, entry, passphrase and the listing are
        still answered without one (the firmware asks them before it has
        credentials, PROTOCOL.md §2.1), but a subscribe or put naming the
        serial by another header is refused.
        """
        self.put(basicAuth(password="first-secret"))
        self.assertEqual(self.deviceGet("/nest/passphrase", frontDoor())[0], 200)
        self.assertEqual(
            self.deviceGet(f"/nest/transport/device/{SERIAL}", frontDoor())[0], 200
        )
        before = self.everything()
        for headers in [frontDoor(), {"X-nl-client-id": f"d.{SERIAL}.AB12"}]:
            self.assertEqual(self.subscribeNow(headers)[0], 401)
            self.assertEqual(self.put(headers)[0], 401)
        self.assertEqual(self.everything(), before)

    def test_withoutPasswordNothingBound(self) -> None:
        """
        A device that never gives a password is served by its headers
        (PROTOCOL.md §19 scenario 4), and nothing is bound.
        """
        headers = {"X-nl-client-id": f"d.{SERIAL}.AB12"}
        self.assertEqual(self.put(headers)[0], 200)
        self.assertEqual(self.subscribeNow(headers)[0], 200)
        self.assertEqual(self.server.store.records(DEVICE_SECRET_RECORD), {})

    def test_passwordOfAnotherSerialIgnored(self) -> None:
        """
        A password belongs to the serial its username names: one given with
        a username that names no serial is not bound to the serial another
        header names.
        """
        headers = {
            **basicAuth("short", "stray-secret"),
            "X-nl-device-id": SERIAL,
        }
        self.assertEqual(self.deviceGet("/nest/passphrase", headers)[0], 200)
        self.assertEqual(self.server.store.records(DEVICE_SECRET_RECORD), {})

    def test_deletingReleases(self) -> None:
        """
        Deleting the device (C{DELETE /api/device}) releases the password:
        the next one given is bound.
        """
        self.put(basicAuth(password="first-secret"))
        status, document = self.control("DELETE", "/api/device", {"serial": SERIAL})
        self.assertEqual(status, 200, document)
        self.assertEqual(self.server.store.records(DEVICE_SECRET_RECORD), {})
        self.assertEqual(self.put(basicAuth(password="new-secret"))[0], 200)
        self.assertEqual(self.put(basicAuth(password="first-secret"))[0], 401)

    def test_deletingOnlyBound(self) -> None:
        """
        A serial known only by its bound password (it asked for its entry
        map and nothing else) can be deleted, which releases it.
        """
        status, document, _ = self.device(
            "GET", "/nest/entry", basicAuth(password="first-secret")
        )
        self.assertEqual(status, 200)
        self.assertIsNotNone(self.server.store.record(DEVICE_SECRET_RECORD, SERIAL))
        status, document = self.control("DELETE", "/api/device", {"serial": SERIAL})
        self.assertEqual(status, 200, document)
        self.assertEqual(self.server.store.records(DEVICE_SECRET_RECORD), {})

    def test_claimReleases(self) -> None:
        """
        Claiming the device again (re-pairing) releases the password: the
        next one given is bound, and the old one is then refused.
        """
        code = self.deviceGet("/nest/passphrase", basicAuth(password="old-secret"))[1]
        self.assertEqual(self.claim(code["value"])[0], 200)
        self.assertEqual(self.server.store.records(DEVICE_SECRET_RECORD), {})
        self.assertEqual(self.put(basicAuth(password="new-secret"))[0], 200)
        self.assertEqual(self.put(basicAuth(password="old-secret"))[0], 401)

    def test_bindingHeldUntilDurable(self) -> None:
        """
        While the binding is being committed, a request with another
        password is refused already; a commit that fails binds nothing.
        """
        commits: list[Deferred[Any]] = []

        def slowRunner(f: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            commits.append(d)
            return d.addCallback(lambda ignored: f(*args))

        self.server = makeServer(storeRunner=slowRunner)
        d = self.server.deviceClient.get(
            DEVICE_URL + "/nest/passphrase/status", headers=basicAuth(password="a")
        )
        self.server.deviceClient.flush()
        self.successResultOf(d)
        self.assertEqual(len(commits), 1)
        self.assertIsNone(self.server.store.record(DEVICE_SECRET_RECORD, SERIAL))
        status, document, _ = self.device(
            "GET", "/nest/passphrase/status", basicAuth(password="b")
        )
        self.assertEqual(status, 401)
        with capturedLogs() as events:
            commits.pop().errback(OSError(28, "No space left on device"))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertIn(
            "binding a password to 02AA01AC0000000001 failed",
            [formatEvent(e).split(":")[0] for e in events],
        )
        self.assertIsNone(self.server.store.record(DEVICE_SECRET_RECORD, SERIAL))
        status, document, _ = self.device(
            "GET", "/nest/passphrase/status", basicAuth(password="b")
        )
        self.assertEqual(status, 200)
        commits.pop().callback(None)
        self.assertIsNotNone(self.server.store.record(DEVICE_SECRET_RECORD, SERIAL))


class PairingRequiredTests(AdmissionTestCase):
    """
    C{--pairing-required} (PROTOCOL.md §2.3, §19 scenario 59).
    """

    admission = AdmissionSettings(pairingRequired=True)

    def test_scenario59UnknownDeviceRefused(self) -> None:
        """
        Scenario 59: a device no one claimed and that shows no code gets a
        401 with the anchor's sentence on subscribe, put and upload, and
        nothing is stored.
        """
        before = self.everything()
        for status, document in [
            self.subscribeNow(basicAuth()),
            self.put(basicAuth()),
            self.device("POST", "/nest/upload", basicAuth(), b"log")[:2],
            self.device("POST", "/nest/upload", {}, b"log")[:2],
        ]:
            self.assertEqual(status, 401)
            self.assertEqual(
                document["error"], "Device not authorized. Complete pairing first."
            )
            self.assertEqual(document["code"], "pairing_required")
        self.assertEqual(self.everything()[:2], before[:2])

    def test_scenario59PendingPutDropped(self) -> None:
        """
        Scenario 59: a device showing a code may subscribe; its put is
        answered 200 C{{"objects": []}} with the service timestamp, and
        changes nothing; its upload is refused.
        """
        self.passphrase()
        self.assertEqual(self.subscribeNow(basicAuth())[0], 200)
        before = self.everything()
        status, document, headers = self.device(
            "POST", "/nest/transport/put", basicAuth(), PUT_BODY
        )
        self.assertEqual((status, document), (200, {"objects": []}))
        self.assertEqual(
            headers.getRawHeaders("x-nl-service-timestamp"),
            [str(self.server.nowMs())],
        )
        self.assertEqual(self.everything()[:2], before[:2])
        self.assertEqual(
            self.device("POST", "/nest/upload", basicAuth(), b"log")[0], 401
        )

    def test_expiredCodeRefusedAgain(self) -> None:
        """
        A device whose code expired unclaimed may no longer subscribe until
        it asks for a new one.
        """
        self.passphrase()
        self.server.clock.advance(3600)
        self.assertEqual(self.subscribeNow(basicAuth())[0], 401)
        self.passphrase()
        self.assertEqual(self.subscribeNow(basicAuth())[0], 200)

    def reportWhileShowingCode(self) -> None:
        """The device, showing a code, subscribes with a value: it is known."""
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport",
            data=objectsBody(
                [clientObject(SHARED, value={"target_temperature": 19.0})],
                chunked=False,
            ),
            headers=basicAuth(),
        )
        self.assertEqual(self.answer(d, self.server.deviceClient)[0], 200)
        self.assertTrue(self.server.state.membership.isKnown(SERIAL))

    def test_hiddenUntilClaimed(self) -> None:
        """
        The control API does not show an unclaimed device (the list leaves
        it out, C{/status}, C{/api/schedule} and C{/command} answer 404);
        once claimed it is shown and its puts are kept.
        """
        self.passphrase()
        self.reportWhileShowingCode()
        self.assertEqual(
            self.control("GET", "/api/devices")[1], {"devices": [], "total": 0}
        )
        for method, path, document in [
            ("GET", f"/status?serial={SERIAL}", None),
            ("GET", f"/api/schedule?serial={SERIAL}", None),
            (
                "POST",
                "/command",
                {"serial": SERIAL, "command": "set_temperature", "value": 21},
            ),
        ]:
            before = self.everything()
            status, answer = self.control(method, path, document)
            self.assertEqual(status, 404, (path, answer))
            self.assertEqual(self.everything(), before)

        self.claim(self.passphrase()["value"])
        status, document = self.control("GET", "/api/devices")
        self.assertEqual([d["serial"] for d in document["devices"]], [SERIAL])
        self.assertEqual(self.control("GET", f"/status?serial={SERIAL}")[0], 200)
        self.assertEqual(self.put(basicAuth())[0], 200)
        stored = self.stored(SHARED, SERIAL)
        assert stored is not None
        self.assertEqual(stored.value["target_temperature"], 20.0)

    def test_eventsNameOnlyShownDevices(self) -> None:
        """
        The event stream names no device the control side hides: an
        unclaimed device that shows a code and reports is no event; its
        claim is one, and so is its removal, so a client learns it is gone.
        """
        d = self.server.controlClient.get(CONTROL_URL + "/api/events")
        self.server.controlClient.flush()
        answer, stream = receiveDroppable(self.successResultOf(d))

        def named() -> list[str]:
            self.server.controlClient.flush()
            return [
                data["serial"]
                for _id, kind, data in sseEvents(answer.chunks)
                if kind == "message"
            ]

        code = self.passphrase()["value"]
        self.reportWhileShowingCode()
        self.assertEqual(named(), [])
        self.claim(code)
        self.assertEqual(named(), [SERIAL])
        self.assertEqual(self.control("DELETE", f"/api/device?serial={SERIAL}")[0], 200)
        self.assertEqual(named(), [SERIAL, SERIAL])
        stream.disconnect()
        self.server.controlClient.flush()
        self.failureResultOf(answer.done)

    def test_openModeShowsUnclaimed(self) -> None:
        """Without pairing required, an unclaimed device is listed and served."""
        self.server = makeServer()
        self.assertEqual(self.put(basicAuth())[0], 200)
        self.assertEqual(self.control("GET", "/api/devices")[1]["total"], 1)


class NewSerialCapTests(AdmissionTestCase):
    """New serials per client address and hour are capped."""

    admission = AdmissionSettings(newSerialsPerHour=3)

    def serial(self, number: int) -> str:
        return f"02AA01AC{number:010d}"

    def putAs(self, serial: str) -> tuple[int, Any]:
        return self.put(basicAuth(serial), serial)

    def test_capped(self) -> None:
        """
        Past the cap, a new serial's requests are refused with a 429 JSON
        error and nothing is stored or remembered of it; entry is still
        answered. Serials already known are still served.
        """
        for number in range(3):
            self.assertEqual(self.putAs(self.serial(number))[0], 200)
        before = self.everything()
        new = self.serial(3)
        for status, document in [
            self.putAs(new),
            self.subscribeNow(basicAuth(new)),
            self.deviceGet("/nest/passphrase", frontDoor(new)),
        ]:
            self.assertEqual(status, 429)
            self.assertEqual(document["code"], "too_many_new_devices")
        status, document, _ = self.device("GET", "/nest/entry", frontDoor(new))
        self.assertEqual(status, 200)
        self.assertEqual(self.everything(), before)
        self.assertEqual(self.server.state.presence.lastSeen(new), None)
        self.assertEqual(self.putAs(self.serial(0))[0], 200)

    def test_sameSerialCountsOnce(self) -> None:
        """A new serial's several requests count once."""
        for _request in range(5):
            self.assertEqual(
                self.deviceGet("/nest/passphrase", frontDoor(SERIAL))[0], 200
            )
        self.assertEqual(self.putAs(OTHER_SERIAL)[0], 200)

    def test_hourLater(self) -> None:
        """An hour after the first, new serials are taken again."""
        for number in range(3):
            self.putAs(self.serial(number))
            self.server.clock.advance(60)
        self.assertEqual(self.putAs(self.serial(3))[0], 429)
        self.server.clock.advance(3600 - 180)
        self.assertEqual(self.putAs(self.serial(3))[0], 200)
        self.assertEqual(self.putAs(self.serial(4))[0], 429)

    def test_perAddress(self) -> None:
        """Each client address has a cap of its own."""
        admission = Admission(self.server.state, AdmissionSettings(newSerialsPerHour=1))

        def request(host: str) -> IRequest:
            request = DummyRequest([b""])
            request.client = IPv4Address("TCP", host, 4242)
            # DummyRequest has IRequest's methods but does not declare it.
            return cast(IRequest, request)

        admission.admit(request("192.168.1.20"), self.serial(1), TRANSPORT)
        admission.admit(request("192.168.1.21"), self.serial(2), TRANSPORT)
        self.assertRaises(
            TooManyNewDevices,
            admission.admit,
            request("192.168.1.20"),
            self.serial(3),
            TRANSPORT,
        )

    def test_noCap(self) -> None:
        """A cap of 0 takes any number of new serials."""
        self.server = makeServer(admission=AdmissionSettings(newSerialsPerHour=0))
        for number in range(30):
            self.assertEqual(self.putAs(self.serial(number))[0], 200)
        self.assertEqual(len(self.server.store.scopes()), 30)

    def test_knownBeforeRestartNotNew(self) -> None:
        """
        A serial the store knows (its buckets or its entry key) is not new
        after a restart.
        """
        path = self.mktemp()
        self.server = makeServer(path=path)
        for number in range(3):
            self.putAs(self.serial(number))
        self.deviceGet("/nest/passphrase", frontDoor(self.serial(3)))
        self.assertIsNotNone(self.server.store.record(ENTRY_KEY_RECORD, self.serial(3)))
        self.successResultOf(self.server.store.close())
        self.server = makeServer(
            path=path,
            admission=AdmissionSettings(newSerialsPerHour=1),
            storeRunner=runInline,
        )
        for number in range(4):
            self.assertEqual(self.putAs(self.serial(number))[0], 200)
