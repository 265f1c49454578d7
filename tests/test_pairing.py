# -*- test-case-name: tests.test_pairing -*-
"""
Tests for L{nestproto.pairing} through the device port (entry keys,
PROTOCOL.md §5; §19 scenarios 7-10) and the control port (claiming, §13;
scenarios 42-45).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse

from nestproto.buckets import Bucket
from nestproto.control.api import ControlSettings
from nestproto.membership import GLOBAL_SCOPE, OWNER_RECORD
from nestproto.model import Commit
from nestproto.pairing import (
    DEVICE_SECRET_RECORD,
    ENTRY_KEY_RECORD,
    MIN_REMAINING_SECONDS,
    ClaimThrottle,
    EntryKey,
    TooManyAttempts,
    newCode,
)
from nestproto.store import BucketWrite, runInline

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    Answer,
    Server,
    basicAuth,
    clientObject,
    completed,
    makeServer,
    objectsBody,
    receive,
)
from .store_contract import CommitGate

CODE_PATTERN = re.compile(r"^[0-9]{3}[A-Z]{4}$")
INVALID = "Invalid, expired, or already claimed entry key"
#: The answer to a claim whose code no claimable key has: a 400 with a code.
REFUSED = (
    400,
    {
        "success": False,
        "error": INVALID,
        "message": INVALID,
        "code": "invalid_entry_key",
    },
)


class ServerTestCase(SynchronousTestCase):
    """A whole server in memory and the calls a thermostat and a user make."""

    #: The control API's settings for the test's server.
    controlSettings = ControlSettings()

    def setUp(self) -> None:
        self.server: Server = makeServer(controlSettings=self.controlSettings)

    def tearDown(self) -> None:
        # Every request a test made has ended: no timer left behind.
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    # Device side

    def deviceGet(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        d = self.server.deviceClient.get(DEVICE_URL + path, headers=headers)
        return self.answer(d, self.server.deviceClient)

    def passphrase(self, serial: str = SERIAL) -> dict[str, Any]:
        status, document = self.deviceGet("/nest/passphrase", basicAuth(serial))
        self.assertEqual(status, 200)
        assert isinstance(document, dict)
        return document

    def subscribe(
        self, objects: Sequence[Mapping[str, Any]], serial: str = SERIAL
    ) -> Answer:
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport",
            data=objectsBody(objects),
            headers=basicAuth(serial),
        )
        return receive(self.successResultOf(d))

    def held(self, serial: str = SERIAL) -> Answer:
        """
        A subscribe in sync with the server, so it is held. A paired device's
        first subscribe of the process gets its structure regardless
        (PROTOCOL.md §6.2 step 6); that one is answered and the device
        subscribes again.
        """
        for _attempt in range(2):
            objects = [
                clientObject(bucket.key, bucket.revision, bucket.timestamp)
                for bucket in self.server.state.listing(serial)
            ] or [clientObject(f"device.{serial}", 1, self.server.nowMs())]
            held = self.subscribe(objects, serial)
            if not held.done.called:
                break
        self.assertNoResult(held.done)
        self.assertEqual(held.chunks, [])
        return held

    def endHolds(self) -> None:
        self.server.clock.advance(self.server.hub.holdSeconds)
        self.server.deviceClient.flush()
        self.assertEqual(self.server.hub.total(), 0)
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    # Control side

    def control(
        self,
        method: str,
        path: str,
        document: Any = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        if data is None and document is not None:
            data = json.dumps(document).encode()
        sent = dict(headers or {})
        changing = data is not None or method in ("POST", "PUT", "PATCH")
        if changing and not any(n.lower() == "content-type" for n in sent):
            # As every control client does (the API refuses any other type).
            sent["Content-Type"] = "application/json"
        d = self.server.controlClient.request(
            method, CONTROL_URL + path, data=data, headers=sent
        )
        return self.answer(d, self.server.controlClient)

    def claim(self, code: str, userId: str = "homeowner") -> tuple[int, Any]:
        return self.control("POST", "/api/register", {"code": code, "userId": userId})

    def answer(self, d: Deferred[IResponse], client: Any) -> tuple[int, Any]:
        response, body = completed(self, client, d)
        return response.code, json.loads(body) if body else None

    # Store

    def snapshot(self) -> tuple[Any, ...]:
        """Every bucket and record the store holds."""
        store = self.server.store
        return (
            {scope: store.buckets(scope) for scope in store.scopes()},
            store.records(OWNER_RECORD),
            store.records(ENTRY_KEY_RECORD),
        )

    def stored(self, key: str, scope: str = GLOBAL_SCOPE) -> Bucket | None:
        return self.server.store.get(scope, key)


class PassphraseTests(ServerTestCase):
    """
    C{GET /nest/passphrase} and its status (PROTOCOL.md §5).
    """

    def test_scenario7FirstKey(self) -> None:
        """
        Scenario 7: the first call answers a 7-character code (3 digits, 4
        uppercase letters) and C{expires} as a JSON integer in ms, at least
        30 minutes ahead (the default TTL is one hour).
        """
        status, document = self.deviceGet("/nest/passphrase", basicAuth())
        self.assertEqual(status, 200)
        self.assertEqual(set(document), {"value", "expires"})
        self.assertRegex(document["value"], CODE_PATTERN)
        self.assertIs(type(document["expires"]), int)
        self.assertEqual(document["expires"], self.server.nowMs() + 3600 * 1000)

    def test_scenario8SameKeyAgain(self) -> None:
        """
        Scenario 8: a second call before expiry returns the identical value
        and expiry, and stores nothing new.
        """
        first = self.passphrase()
        before = self.snapshot()
        self.server.clock.advance(600)
        self.assertEqual(self.passphrase(), first)
        self.assertEqual(self.snapshot(), before)

    def test_freshKeyBelowDeviceMinimum(self) -> None:
        """
        Once fewer than 30 minutes of the key remain, a fresh key is minted:
        the device ignores a key that expires sooner (PROTOCOL.md §5 ⚠), so
        every key handed out has at least 30 minutes left.
        """
        first = self.passphrase()
        self.server.clock.advance(3600 - MIN_REMAINING_SECONDS)
        self.assertEqual(self.passphrase(), first)
        self.server.clock.advance(1)
        second = self.passphrase()
        self.assertNotEqual(second["value"], first["value"])
        self.assertEqual(second["expires"], self.server.nowMs() + 3600 * 1000)

    def test_scenario9NewKeyAfterExpiry(self) -> None:
        """
        Scenario 9: after the key expires a new, different key is issued and
        the older one is gone: it can no longer be claimed.
        """
        first = self.passphrase()
        self.server.clock.advance(3601)
        second = self.passphrase()
        self.assertNotEqual(second["value"], first["value"])
        keys = self.server.store.records(ENTRY_KEY_RECORD)
        self.assertEqual([doc["code"] for doc in keys.values()], [second["value"]])
        self.assertEqual(self.claim(first["value"]), REFUSED)

    def test_scenario9NewKeyAfterClaim(self) -> None:
        """
        Scenario 9: a device that polls after being claimed gets a new key;
        the owner stays.
        """
        first = self.passphrase()
        self.assertEqual(self.claim(first["value"])[1]["success"], True)
        second = self.passphrase()
        self.assertNotEqual(second["value"], first["value"])
        self.assertEqual(self.server.state.membership.ownerOf(SERIAL), "homeowner")

    def test_scenario10PairingDialog(self) -> None:
        """
        Scenario 10: minting creates C{device_alert_dialog.S} asking to
        confirm pairing, revision 1, stamped now.
        """
        self.passphrase()
        dialog = self.stored(f"device_alert_dialog.{SERIAL}", SERIAL)
        self.assertEqual(
            dialog,
            Bucket(
                f"device_alert_dialog.{SERIAL}",
                1,
                self.server.nowMs(),
                {"dialog_id": "confirm-pairing", "dialog_data": ""},
            ),
        )

    def test_scenario10ExistingDialogKept(self) -> None:
        """
        Scenario 10: an existing dialog is left as it is when a key is minted.
        """
        existing = Bucket(f"device_alert_dialog.{SERIAL}", 7, 1000, {"x": 1})
        self.server.seed(SERIAL, existing)
        self.passphrase()
        self.assertEqual(self.stored(existing.key, SERIAL), existing)

    def test_dialogPushedToHeldSubscriber(self) -> None:
        """
        A device holding a subscribe receives the new pairing dialog.
        """
        held = self.held()
        self.passphrase()
        self.server.deviceClient.flush()
        self.assertEqual(held.keys(), [f"device_alert_dialog.{SERIAL}"])
        self.endHolds()

    def test_legacyPath(self) -> None:
        """
        C{/passphrase} answers like C{/nest/passphrase} (PROTOCOL.md §1).
        """
        first = self.passphrase()
        status, document = self.deviceGet("/passphrase", basicAuth())
        self.assertEqual((status, document), (200, first))

    def test_serialRequired(self) -> None:
        """
        Without an identifiable serial the answer is 400 with the anchor's
        error sentence, and no key is minted.
        """
        status, document = self.deviceGet("/nest/passphrase")
        self.assertEqual(status, 400)
        self.assertEqual(document["error"], "Device serial required")
        self.assertEqual(self.server.store.records(ENTRY_KEY_RECORD), {})

    def test_deviceIdHeader(self) -> None:
        """
        C{X-nl-device-id} identifies a device without credentials.
        """
        status, document = self.deviceGet(
            "/nest/passphrase", {"X-nl-device-id": SERIAL}
        )
        self.assertEqual(status, 200)
        self.assertIn(SERIAL, self.server.store.records(ENTRY_KEY_RECORD))

    def test_keysPerDevice(self) -> None:
        """
        Each device has its own key; minting one leaves the other's.
        """
        first = self.passphrase(SERIAL)
        other = self.passphrase(OTHER_SERIAL)
        self.assertNotEqual(first["value"], other["value"])
        self.assertEqual(self.passphrase(SERIAL), first)

    def test_survivesRestart(self) -> None:
        """
        The key is stored durably: a restarted server serves the same key.
        """
        path = self.mktemp()
        server = makeServer(path)
        self.server = server
        first = self.passphrase()
        self.successResultOf(server.store.close())
        self.server = makeServer(path, clock=server.clock)
        self.assertEqual(self.passphrase(), first)
        self.successResultOf(self.server.store.close())

    def test_codesNeverLogged(self) -> None:
        """
        Neither minting nor claiming logs the code.
        """
        with capturedLogs() as events:
            code = self.passphrase()["value"]
            self.claim(code)
            self.claim("999ZZZZ")
        self.assertTrue(events)
        for event in events:
            self.assertNotIn(code, repr(event))

    def test_statusNoKey(self) -> None:
        """
        Before any key, the status is C{no_key}.
        """
        status, document = self.deviceGet("/nest/passphrase/status", basicAuth())
        self.assertEqual(status, 200)
        self.assertEqual(document["status"], "no_key")
        self.assertIs(document["claimed"], False)
        self.assertIsInstance(document["message"], str)

    def test_statusPending(self) -> None:
        """
        With an unclaimed key, the status is C{pending} with its expiry.
        """
        key = self.passphrase()
        status, document = self.deviceGet("/nest/passphrase/status", basicAuth())
        self.assertEqual(
            document,
            {"status": "pending", "claimed": False, "expiresAt": key["expires"]},
        )

    def test_statusClaimed(self) -> None:
        """
        Once claimed, the status names the user and when.
        """
        key = self.passphrase()
        self.server.clock.advance(5)
        self.claim(key["value"])
        status, document = self.deviceGet("/nest/passphrase/status?serial=" + SERIAL)
        self.assertEqual(
            document,
            {
                "status": "claimed",
                "claimed": True,
                "claimedBy": "homeowner",
                "claimedAt": self.server.nowMs(),
            },
        )

    def test_statusSerialRequired(self) -> None:
        """
        The status needs a serial too.
        """
        status, document = self.deviceGet("/nest/passphrase/status")
        self.assertEqual(status, 400)
        self.assertEqual(document["error"], "Device serial required")


class CodeTests(SynchronousTestCase):
    """
    L{newCode} and L{EntryKey}.
    """

    def test_format(self) -> None:
        """
        Codes are 3 digits then 4 uppercase letters, and vary.
        """
        codes = {newCode() for _ in range(50)}
        for code in codes:
            self.assertRegex(code, CODE_PATTERN)
        self.assertGreater(len(codes), 40)

    def test_recordRoundTrip(self) -> None:
        """
        An entry key survives its record form.
        """
        key = EntryKey(SERIAL, "123ABCD", 5000, 1000, "homeowner", 2000)
        self.assertEqual(EntryKey.fromRecord(SERIAL, key.toRecord()), key)


class ClaimTests(ServerTestCase):
    """
    C{POST /api/register} (PROTOCOL.md §13; scenarios 42-45).
    """

    def test_scenario44ClaimPushesUserAndStructure(self) -> None:
        """
        Scenario 44: claiming a valid code answers success with the serial,
        writes the owner, C{user.U} named U and C{structure.U} listing the
        device, and pushes both to the held subscribe in one chunk.
        """
        code = self.passphrase()["value"]
        held = self.held()
        self.server.clock.advance(2)
        status, document = self.claim(code)
        self.assertEqual(status, 200)
        self.assertEqual(
            document,
            {
                "success": True,
                "serial": SERIAL,
                "message": f"Device {SERIAL} registered to homeowner",
            },
        )
        now = self.server.nowMs()
        self.assertEqual(self.server.state.membership.ownerOf(SERIAL), "homeowner")
        user = Bucket("user.homeowner", 1, now, {"name": "homeowner"})
        structure = Bucket(
            "structure.homeowner",
            1,
            now,
            {"name": "Home", "devices": [f"device.{SERIAL}"]},
        )
        self.assertEqual(self.stored("user.homeowner"), user)
        self.assertEqual(self.stored("structure.homeowner"), structure)
        self.server.deviceClient.flush()
        [chunk] = held.documents()
        self.assertEqual(
            chunk["objects"],
            [
                {
                    "object_revision": 1,
                    "object_timestamp": now,
                    "object_key": "user.homeowner",
                    "value": {"name": "homeowner"},
                },
                {
                    "object_revision": 1,
                    "object_timestamp": now,
                    "object_key": "structure.homeowner",
                    "value": {"name": "Home", "devices": [f"device.{SERIAL}"]},
                },
            ],
        )
        self.endHolds()

    def test_claimOneTransaction(self) -> None:
        """
        The owner record, the claimed key, the user and the structure are
        committed to disk in one transaction, with the release of the
        device's bound password.
        """
        transactions: list[Any] = []

        def recordingRunner(f: Any, *args: Any) -> Deferred[Any]:
            transactions.append(f)
            return runInline(f, *args)

        server = makeServer(clock=self.server.clock, storeRunner=recordingRunner)
        key = self.successResultOf(server.pairing.passphrase(SERIAL))
        del transactions[:]
        commits: list[Commit] = []
        server.store.listen(commits.append)
        self.assertEqual(
            self.successResultOf(server.pairing.claim(key.code, "u")), SERIAL
        )
        self.assertEqual(len(transactions), 1)
        [commit] = commits
        written = sorted(
            [change.kind for change in commit.records]
            + [change.key for change in commit.buckets]
        )
        self.assertEqual(
            written,
            [
                DEVICE_SECRET_RECORD,
                ENTRY_KEY_RECORD,
                OWNER_RECORD,
                "structure.u",
                "user.u",
            ],
        )

    def test_racingClaimsOneWins(self) -> None:
        """
        Two claims of one code decided while neither has committed: the
        code is checked inside the transaction, so the first wins and the
        second changes nothing.
        """
        gate = CommitGate(runInline)
        server = makeServer(clock=self.server.clock, storeRunner=gate)
        key = self.successResultOf(server.pairing.passphrase(SERIAL))
        gate.holding = True
        first = server.pairing.claim(key.code, "alice")
        second = server.pairing.claim(key.code, "bob")
        gate.release()
        self.assertEqual(self.successResultOf(first), SERIAL)
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(server.state.membership.ownerOf(SERIAL), "alice")
        self.assertIsNone(server.store.get(GLOBAL_SCOPE, "user.bob"))

    def test_hyphenAndCase(self) -> None:
        """
        The code is accepted as the device shows it (C{123-ABCD}) and in
        lower case.
        """
        code = self.passphrase()["value"]
        status, document = self.claim(f"{code[:3]}-{code[3:]}".lower())
        self.assertEqual((status, document["success"]), (200, True))

    def test_claimedCodeCannotBeClaimedAgain(self) -> None:
        """
        A claimed code is refused the second time, with nothing changed.
        """
        code = self.passphrase()["value"]
        self.assertTrue(self.claim(code)[1]["success"])
        before = self.snapshot()
        self.assertEqual(self.claim(code, "intruder"), REFUSED)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.server.state.membership.ownerOf(SERIAL), "homeowner")

    def test_scenario45ExpiredCode(self) -> None:
        """
        Scenario 45: an expired code answers C{success: false} and creates
        no owner; the answer is a 400 with C{code} C{invalid_entry_key} (the
        anchor's is a 200, which a client checking the status takes for a
        claim done).
        """
        code = self.passphrase()["value"]
        self.server.clock.advance(3600)
        before = self.snapshot()
        self.assertEqual(self.claim(code), REFUSED)
        self.assertEqual(self.snapshot(), before)
        self.assertIsNone(self.server.state.membership.ownerOf(SERIAL))

    def test_unknownCode(self) -> None:
        """
        A code nobody was given is refused the same way.
        """
        self.passphrase()
        before = self.snapshot()
        self.assertEqual(self.claim("000AAAA"), REFUSED)
        self.assertEqual(self.snapshot(), before)

    def test_malformed(self) -> None:
        """
        A malformed body, a missing field or a code that is not 7 letters
        and digits is a 400 with C{success: false} and a message.
        """
        code = self.passphrase()["value"]
        before = self.snapshot()
        for data in [
            b"{not json",
            b"[]",
            json.dumps({"code": code}).encode(),
            json.dumps({"userId": "homeowner"}).encode(),
            json.dumps({"code": "12ABCD", "userId": "homeowner"}).encode(),
            json.dumps({"code": 1234567, "userId": "homeowner"}).encode(),
            json.dumps({"code": code, "userId": "bad user/id"}).encode(),
            json.dumps({"code": code, "userId": "user_"}).encode(),
            # The structure ids of unclaimed devices (membership.py).
            json.dumps({"code": code, "userId": f"unpaired-{SERIAL}"}).encode(),
            json.dumps({"code": code, "userId": "user_unpaired-x"}).encode(),
            json.dumps({"code": code, "userId": "Unpaired-x"}).encode(),
        ]:
            status, document = self.control("POST", "/api/register", data=data)
            self.assertEqual(status, 400, data)
            self.assertIs(document["success"], False)
            self.assertIsInstance(document["message"], str)
        self.assertEqual(self.snapshot(), before)

    def test_existingBucketsMerged(self) -> None:
        """
        An existing structure gains the device (union, revision + 1) and an
        existing user bucket gets its name set.
        """
        self.server.store.write(
            [
                BucketWrite(
                    GLOBAL_SCOPE,
                    Bucket(
                        "structure.homeowner",
                        4,
                        1000,
                        {"name": "Cabin", "devices": [f"device.{OTHER_SERIAL}"]},
                    ),
                ),
                BucketWrite(
                    GLOBAL_SCOPE, Bucket("user.homeowner", 2, 1000, {"name": ""})
                ),
            ]
        )
        self.claim(self.passphrase()["value"])
        structure = self.stored("structure.homeowner")
        assert structure is not None
        self.assertEqual(structure.revision, 5)
        self.assertEqual(
            structure.value,
            {
                "name": "Cabin",
                "devices": [f"device.{OTHER_SERIAL}", f"device.{SERIAL}"],
            },
        )
        user = self.stored("user.homeowner")
        assert user is not None
        self.assertEqual((user.revision, user.value), (3, {"name": "homeowner"}))

    def test_reclaimMovesDevice(self) -> None:
        """
        Claiming a device again for another user moves it to that user's
        structure and out of the old one.
        """
        self.claim(self.passphrase()["value"], "alice")
        self.claim(self.passphrase()["value"], "bob")
        self.assertEqual(self.server.state.membership.ownerOf(SERIAL), "bob")
        alice = self.stored("structure.alice")
        bob = self.stored("structure.bob")
        assert alice is not None and bob is not None
        self.assertEqual(alice.value["devices"], [])
        self.assertEqual(bob.value["devices"], [f"device.{SERIAL}"])

    def test_rateLimit(self) -> None:
        """
        Five wrong codes from one address are answered 400; then the
        address is locked out with 429 (even for a right code) until the
        lockout passes, and the lockout doubles with each further failure.
        """
        code = self.passphrase()["value"]
        for _ in range(5):
            self.assertEqual(self.claim("000AAAA"), REFUSED)
        status, document = self.claim(code)
        self.assertEqual(status, 429)
        self.assertIs(document["success"], False)
        self.assertIsNone(self.server.state.membership.ownerOf(SERIAL))
        self.server.clock.advance(60)
        self.assertEqual(self.claim("000AAAA"), REFUSED)
        self.server.clock.advance(60)
        self.assertEqual(self.claim(code)[0], 429)
        self.server.clock.advance(60)
        self.assertEqual(self.claim(code), (200, self.claimed()))

    def claimed(self) -> dict[str, Any]:
        return {
            "success": True,
            "serial": SERIAL,
            "message": f"Device {SERIAL} registered to homeowner",
        }

    def test_retryAfterHeader(self) -> None:
        """
        The 429 answer says how long to wait.
        """
        for _ in range(5):
            self.claim("000AAAA")
        d = self.server.controlClient.post(
            CONTROL_URL + "/api/register",
            data=json.dumps({"code": "000AAAA", "userId": "u"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.server.controlClient.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["60"])

    def test_scenario42PairedSubscribeGetsUserAndStructure(self) -> None:
        """
        Scenario 42: a paired device subscribing without C{user.U} gets
        C{user.U} with its name and C{structure.U} listing the device.
        """
        self.claim(self.passphrase()["value"])
        held = self.subscribe(
            [clientObject(f"device.{SERIAL}", 1, self.server.nowMs())]
        )
        self.successResultOf(held.done)
        [document] = held.documents()
        byKey = {entry["object_key"]: entry for entry in document["objects"]}
        self.assertEqual(byKey["user.homeowner"]["value"], {"name": "homeowner"})
        self.assertEqual(
            byKey["structure.homeowner"]["value"]["devices"], [f"device.{SERIAL}"]
        )

    def test_scenario43StructureAfterRestart(self) -> None:
        """
        Scenario 43: after a restart the first subscribe from a paired device
        carries the structure even though its timestamp matches; the next
        one is held.
        """
        path = self.mktemp()
        first = makeServer(path)
        self.server = first
        self.claim(self.passphrase()["value"])
        self.successResultOf(first.store.close())
        self.server = makeServer(path, clock=first.clock)
        inSync = [
            clientObject(bucket.key, bucket.revision, bucket.timestamp)
            for bucket in self.server.state.listing(SERIAL)
        ]
        answer = self.subscribe(inSync)
        self.successResultOf(answer.done)
        self.assertEqual(answer.keys(), ["structure.homeowner"])
        self.held()
        self.endHolds()
        self.successResultOf(self.server.store.close())


class DialogAndUnclaimTests(ServerTestCase):
    """
    C{POST /api/dismiss-pairing/S}, C{DELETE /api/registered-devices/S}.
    """

    def test_dismiss(self) -> None:
        """
        Dismissing empties the dialog, moves its revision and pushes it.
        """
        self.passphrase()
        held = self.held()
        self.server.clock.advance(1)
        status, document = self.control("POST", f"/api/dismiss-pairing/{SERIAL}")
        self.assertEqual(status, 200)
        self.assertIs(document["success"], True)
        dialog = self.stored(f"device_alert_dialog.{SERIAL}", SERIAL)
        self.assertEqual(
            dialog,
            Bucket(f"device_alert_dialog.{SERIAL}", 2, self.server.nowMs(), {}),
        )
        self.server.deviceClient.flush()
        self.assertEqual(held.keys(), [f"device_alert_dialog.{SERIAL}"])
        self.endHolds()

    def test_dismissWithoutDialog(self) -> None:
        """
        A known device without a dialog: success, nothing written.
        """
        self.server.seed(SERIAL, Bucket(f"device.{SERIAL}", 1, 1000, {}))
        before = self.snapshot()
        status, document = self.control("POST", f"/api/dismiss-pairing/{SERIAL}")
        self.assertEqual((status, document["success"]), (200, True))
        self.assertEqual(self.snapshot(), before)

    def test_dismissUnknownDevice(self) -> None:
        """
        An unknown device is a 404.
        """
        status, document = self.control("POST", f"/api/dismiss-pairing/{SERIAL}")
        self.assertEqual(status, 404)
        self.assertIs(document["success"], False)

    def test_unclaim(self) -> None:
        """
        Unregistering removes the owner and the device from its structure;
        the next subscribe no longer gets the user.
        """
        self.claim(self.passphrase()["value"])
        status, document = self.control("DELETE", f"/api/registered-devices/{SERIAL}")
        self.assertEqual((status, document["success"]), (200, True))
        self.assertIsNone(self.server.state.membership.ownerOf(SERIAL))
        structure = self.stored("structure.homeowner")
        assert structure is not None
        self.assertEqual(structure.value["devices"], [])
        self.assertNotIn(
            "user.homeowner", self.server.state.membership.linkedKeys(SERIAL)
        )

    def test_unclaimNotPaired(self) -> None:
        """
        Unregistering a device nobody owns is a 404 and changes nothing.
        """
        self.passphrase()
        before = self.snapshot()
        status, document = self.control("DELETE", f"/api/registered-devices/{SERIAL}")
        self.assertEqual(status, 404)
        self.assertIs(document["success"], False)
        self.assertEqual(self.snapshot(), before)


class ThrottleTests(SynchronousTestCase):
    """
    L{ClaimThrottle}.
    """

    def test_successForgets(self) -> None:
        """
        A correct claim resets the count of an address.
        """
        throttle = ClaimThrottle(Clock())
        for _ in range(4):
            throttle.failed("a")
        throttle.succeeded("a")
        for _ in range(4):
            throttle.failed("a")
        throttle.check("a")

    def test_bounded(self) -> None:
        """
        At most C{maxTracked} addresses are remembered, the oldest dropped.
        """
        throttle = ClaimThrottle(Clock(), maxFailures=1, maxTracked=3)
        for address in "abcd":
            throttle.failed(address)
        throttle.check("a")
        self.assertRaises(TooManyAttempts, throttle.check, "d")
