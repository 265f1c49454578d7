# -*- test-case-name: tests.test_keylist -*-
"""
The key-list dialect of firmware 4.x (PROTOCOL.md §20.2-§20.5, scenarios
62-66) through the real device resource, and its pure shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse

from nestproto.buckets import Bucket
from nestproto.device import keylist
from nestproto.errors import BadBody
from nestproto.model import PutEntry
from tests.helpers import DEVICE_URL, SERIAL, Answer, basicAuth, receive
from tests.test_transport import HOLD_SECONDS, TransportTestCase

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"
SCHEDULE = f"schedule.{SERIAL}"
V3 = "/nest/transport/v3"


class ShapeTests(SynchronousTestCase):
    """The pure parsing and rendering of L{keylist}."""

    def test_canonicalKeyCutsAtFirstSpace(self) -> None:
        """A mangled key names the bucket before its first space (§20.2)."""
        self.assertEqual(keylist.canonicalKey("shared.S ._sync"), "shared.S")
        self.assertEqual(keylist.canonicalKey("device.S .$version .$v"), "device.S")
        self.assertEqual(keylist.canonicalKey("shared.S"), "shared.S")

    def test_parseKeysOptionalVersions(self) -> None:
        """Versions and timestamps are optional; keys are canonical, once."""
        body = json.dumps(
            {
                "keys": [
                    {"key": "shared.S", "version": -3, "timestamp": 1326038378000},
                    {"key": "device.S ._sync"},
                    "schedule.S",
                    {"key": "shared.S"},
                ]
            }
        ).encode()
        self.assertEqual(
            keylist.parseKeys(body),
            (
                keylist.ListedKey("shared.S", -3, 1326038378000),
                keylist.ListedKey("device.S"),
                keylist.ListedKey("schedule.S"),
            ),
        )

    def test_parseKeysRefusesBadInput(self) -> None:
        """Broken keys, wrong types and out-of-range versions are refused."""
        for document in [
            {"keys": "shared.S"},
            {"keys": [{"key": "nosuchtype.S"}]},
            {"keys": [{"key": 3}]},
            {"keys": [7]},
            {"keys": [{"key": "shared.S", "version": "1"}]},
            {"keys": [{"key": "shared.S", "version": 2**31}]},
            {"keys": [{"key": "shared.S", "timestamp": -1}]},
            {"keys": [{"key": "shared.S", "timestamp": True}]},
            {"keys": [{"key": f"shared.{n}"} for n in range(300)]},
            {"objects": []},
        ]:
            self.assertRaises(BadBody, keylist.parseKeys, json.dumps(document).encode())

    def test_parsePutDropsMetadata(self) -> None:
        """Metadata fields are never stored; empty buckets are skipped."""
        body = json.dumps(
            {
                "shared": {
                    "S ._sync": {
                        "$version": 3,
                        "$timestamp": 5,
                        "target_temperature": 21.5,
                        "if_object_revision": 4,
                    },
                },
                "device": {"S": {"$version": 1}},
            }
        ).encode()
        self.assertEqual(
            keylist.parsePut(body),
            [PutEntry("shared.S", {"target_temperature": 21.5}, 4)],
        )

    def test_parsePutRefusesBadInput(self) -> None:
        """Non-object levels and unknown types are refused."""
        for document in [
            {"shared": []},
            {"shared": {"S": 21.5}},
            {"nosuchtype": {"S": {"a": 1}}},
            {"shared": {"S": {"a": {"b": 1}} | {"deep": _deep(20)}}},
        ]:
            self.assertRaises(BadBody, keylist.parsePut, json.dumps(document).encode())

    def test_renderBucketCompactBareValue(self) -> None:
        """One bucket: its bare value, compact, named by headers (§20.3)."""
        rendered = keylist.renderBucket(
            Bucket("shared.S", -2086438581, 1326038378000, {"a": 1, "b": [1, 2]})
        )
        self.assertEqual(rendered.body, b'{"a":1,"b":[1,2]}')
        self.assertIn((b"x-nl-skv-version", b"-2086438581"), rendered.headers)
        self.assertIn((b"x-nl-skv-key", b"shared.S"), rendered.headers)
        self.assertIn((b"x-nl-skv-timestamp", b"1326038378000"), rendered.headers)

    def test_subscribeTimeout(self) -> None:
        """X-nl-subscribe-timeout is whole seconds from 1 to 3600."""
        self.assertIsNone(keylist.parseSubscribeTimeout(None))
        self.assertEqual(keylist.parseSubscribeTimeout(b"8"), 8.0)
        for bad in [b"0", b"-1", b"1.5", b"x", b"3601", b""]:
            self.assertRaises(BadBody, keylist.parseSubscribeTimeout, bad)


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"x": value}
    return value


class KeyListTestCase(TransportTestCase):
    """A whole server and a 4.x thermostat."""

    def setUp(self) -> None:
        super().setUp()
        self.seed(
            Bucket(SHARED, 7, self.start - 5000, {"target_temperature": 20.0}),
            Bucket(DEVICE, -2086438581, self.start - 6000, {"temperature_scale": "C"}),
        )

    def keySubscribe(
        self,
        keys: Sequence[Mapping[str, Any] | str],
        session: str = "session-1",
        headers: Mapping[str, str] | None = None,
        path: str = V3 + "/subscribe",
    ) -> Deferred[IResponse]:
        allHeaders = {
            **basicAuth(),
            "X-nl-session-id": session,
            **(headers or {}),
        }
        return self.stub.post(
            DEVICE_URL + path, data=json.dumps({"keys": list(keys)}), headers=allHeaders
        )

    def keyPut(
        self, body: bytes | Mapping[str, Any], path: str = V3 + "/put"
    ) -> Deferred[IResponse]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.stub.post(DEVICE_URL + path, data=data, headers=basicAuth())

    def bucketAnswer(self, requested: Deferred[IResponse]) -> tuple[Answer, bytes]:
        """A complete one-bucket answer and its raw body."""
        answer = self.receive(requested)
        self.successResultOf(answer.done)
        self.assertEqual(answer.response.code, 200)
        return answer, b"".join(answer.chunks)

    def heldKeys(self, keys: Sequence[Mapping[str, Any] | str], **kw: Any) -> Answer:
        answer, self.dropper = self.receiveDroppable(self.keySubscribe(keys, **kw))
        self.assertEqual(answer.response.code, 200)
        self.assertNoResult(answer.done)
        self.assertEqual(answer.chunks, [])
        self.assertIsNone(answer.header("x-nl-skv-key"))
        self.assertIsNotNone(answer.header("x-nl-service-timestamp"))
        self.assertIsNotNone(answer.header("x-nl-suspend-time-max"))
        return answer

    def leave(self, answer: Answer) -> None:
        """The client leaves its held subscribe; nothing stays behind."""
        self.dropper.disconnect()
        self.stub.flush()
        self.failureResultOf(answer.done)
        self.assertClean()

    def inSync(self, *keys: str) -> list[dict[str, Any]]:
        return [
            {
                "key": key,
                "version": self.current(key).revision,
                "timestamp": self.current(key).timestamp,
            }
            for key in keys
        ]

    def refusedUnchanged(self, requested: Deferred[IResponse], status: int) -> None:
        before = self.snapshot()
        answer = self.receive(requested)
        self.successResultOf(answer.done)
        self.assertEqual(answer.response.code, status)
        document = json.loads(b"".join(answer.chunks))
        self.assertIsInstance(document["error"], str)
        self.assertEqual(self.snapshot(), before)
        self.assertClean()


class SubscribeTests(KeyListTestCase):
    """Key-list subscribe (PROTOCOL.md §20.3)."""

    def test_scenario62OneBareCompactBucket(self) -> None:
        """
        Scenario 62: a subscribe with no versions gets the first listed
        bucket alone, its bare value compact, named by C{X-nl-skv-*}.
        """
        answer, body = self.bucketAnswer(self.keySubscribe([SHARED, DEVICE]))
        self.assertEqual(body, b'{"target_temperature":20.0}')
        self.assertEqual(answer.header("x-nl-skv-key"), SHARED)
        self.assertEqual(answer.header("x-nl-skv-version"), "7")
        self.assertEqual(answer.header("x-nl-skv-timestamp"), str(self.start - 5000))
        self.assertEqual(answer.header("x-nl-service-timestamp"), str(self.start))
        self.assertEqual(answer.response.length, len(body))
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertClean()

    def test_signedRevisionInHeader(self) -> None:
        """A negative revision goes out as a signed decimal (§20.3)."""
        answer, body = self.bucketAnswer(self.keySubscribe([{"key": DEVICE}]))
        self.assertEqual(answer.header("x-nl-skv-version"), "-2086438581")
        self.assertEqual(json.loads(body), {"temperature_scale": "C"})

    def test_firstContactThenFollowingPollsThenHeld(self) -> None:
        """
        Bare keys: the first poll gets the first bucket, the following
        polls the others, one each; then the session is in sync and held,
        not flooded with the same bucket.
        """
        keys = [SHARED, DEVICE, SCHEDULE]
        sent = []
        for _ in range(3):
            answer, _ = self.bucketAnswer(self.keySubscribe(keys))
            sent.append(answer.header("x-nl-skv-key"))
        self.assertEqual(sent, [SHARED, DEVICE, SCHEDULE])
        held = self.heldKeys(keys)
        self.clock.advance(HOLD_SECONDS)
        self.stub.flush()
        self.successResultOf(held.done)
        self.assertEqual(held.chunks, [])
        self.assertClean()

    def test_newSessionIsFirstContactAgain(self) -> None:
        """Another session id starts over: a bare key is "no data"."""
        self.bucketAnswer(self.keySubscribe([SHARED]))
        self.leave(self.heldKeys([SHARED]))
        answer, _ = self.bucketAnswer(self.keySubscribe([SHARED], session="other"))
        self.assertEqual(answer.header("x-nl-skv-key"), SHARED)

    def test_keyFirstListedLaterCountsInSync(self) -> None:
        """After the first answer, a newly listed bare key is in sync."""
        self.bucketAnswer(self.keySubscribe([SHARED]))
        self.leave(self.heldKeys([SHARED, DEVICE]))

    def test_scenario63HeldEndsOnChangeNextPollGetsBucket(self) -> None:
        """
        Scenario 63: in sync, the answer's headers come at once; a command
        ends it with no body; the next subscribe carries the bucket.
        """
        answer = self.heldKeys(self.inSync(SHARED, DEVICE))
        written = self.command(SHARED, {"target_temperature": 22.0})
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertEqual(answer.chunks, [])
        self.assertClean()
        again, body = self.bucketAnswer(self.keySubscribe([SHARED, DEVICE]))
        self.assertEqual(again.header("x-nl-skv-key"), SHARED)
        self.assertEqual(again.header("x-nl-skv-version"), str(written.revision))
        self.assertEqual(json.loads(body)["target_temperature"], 22.0)

    def test_bareKeysHeldEndOnChangeNextPollGetsBucket(self) -> None:
        """The same with bare keys: the session remembers what it was sent."""
        for _ in range(2):
            self.bucketAnswer(self.keySubscribe([SHARED, DEVICE]))
        answer = self.heldKeys([SHARED, DEVICE])
        self.command(SHARED, {"target_temperature": 22.0})
        self.stub.flush()
        self.successResultOf(answer.done)
        again, body = self.bucketAnswer(self.keySubscribe([SHARED, DEVICE]))
        self.assertEqual(again.header("x-nl-skv-key"), SHARED)
        self.assertEqual(json.loads(body)["target_temperature"], 22.0)
        self.leave(self.heldKeys([SHARED, DEVICE]))

    def test_changeOfAnotherKeyKeepsHold(self) -> None:
        """A change to a key not listed leaves the hold as it is."""
        answer = self.heldKeys(self.inSync(SHARED))
        self.command(DEVICE, {"temperature_scale": "F"})
        self.stub.flush()
        self.assertNoResult(answer.done)
        self.endHolds()

    def test_subscribeTimeoutShortensHold(self) -> None:
        """X-nl-subscribe-timeout ends the hold early, with no body."""
        answer = self.heldKeys(
            self.inSync(SHARED), headers={"X-nl-subscribe-timeout": "8"}
        )
        self.clock.advance(8)
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertEqual(answer.chunks, [])
        self.assertClean()

    def test_subscribeTimeoutNeverBeyondHold(self) -> None:
        """A longer timeout than the server's is cut to the server's."""
        answer = self.heldKeys(
            self.inSync(SHARED), headers={"X-nl-subscribe-timeout": "3600"}
        )
        self.clock.advance(HOLD_SECONDS)
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertClean()

    def test_keysBodyOnPlainTransportIsKeyList(self) -> None:
        """A subscribe body with a C{keys} array speaks key-list (§20.1)."""
        answer, body = self.bucketAnswer(
            self.keySubscribe([SHARED], path="/nest/transport")
        )
        self.assertEqual(answer.header("x-nl-skv-key"), SHARED)

    def test_v2SubscribeForDevice(self) -> None:
        """C{/v2/subscribe} answers a device the same way."""
        answer, body = self.bucketAnswer(
            self.keySubscribe([SHARED], path="/v2/subscribe")
        )
        self.assertEqual(answer.header("x-nl-skv-key"), SHARED)

    def test_otherDevicesKeyNeverAnswered(self) -> None:
        """A key of another device is not sent; the subscribe is held."""
        self.leave(self.heldKeys(["shared.02AA01AC0000000002"]))

    def test_badInputRefused(self) -> None:
        """Broken keys and bad timeouts get a 400 and change nothing."""
        self.refusedUnchanged(self.keySubscribe([{"key": "nosuch.S"}]), 400)
        self.refusedUnchanged(self.keySubscribe([{"key": [1]}]), 400)
        self.refusedUnchanged(
            self.keySubscribe([SHARED], headers={"X-nl-subscribe-timeout": "soon"}),
            400,
        )
        self.refusedUnchanged(
            self.stub.post(
                DEVICE_URL + V3 + "/subscribe",
                data=b'{"keys": [' + b'"shared.S",' * 200_000 + b'"x"]}',
                headers=basicAuth(),
            ),
            413,
        )


class PutTests(KeyListTestCase):
    """Nested put (PROTOCOL.md §20.4)."""

    def acknowledged(self, requested: Deferred[IResponse]) -> bytes:
        answer = self.receive(requested)
        self.successResultOf(answer.done)
        self.assertEqual(answer.response.code, 200)
        self.assertIsNotNone(answer.header("x-nl-service-timestamp"))
        return b"".join(answer.chunks)

    def test_scenario64MergeAndCompactAcknowledgement(self) -> None:
        """
        Scenario 64: a nested put merges shallowly and is acknowledged with
        C{$version}/C{$timestamp} only, compact, never a value.
        """
        body = self.acknowledged(
            self.keyPut(
                {"shared": {SERIAL: {"target_temperature": 21.5, "$version": 7}}}
            )
        )
        stored = self.current(SHARED)
        self.assertEqual(stored.value, {"target_temperature": 21.5})
        self.assertEqual(stored.revision, 8)
        self.assertEqual(
            body,
            b'{"shared":{"%s":{"$version":8,"$timestamp":%d}}}'
            % (SERIAL.encode(), self.start),
        )

    def test_identicalPutMovesNothing(self) -> None:
        """A put that changes nothing leaves revision and timestamp (§11.5)."""
        before = self.current(SHARED)
        self.acknowledged(
            self.keyPut({"shared": {SERIAL: {"target_temperature": 20.0}}})
        )
        self.assertEqual(self.current(SHARED), before)

    def test_scenario65EmptyBodiesChangeNothing(self) -> None:
        """Scenario 65: C{{"objects": []}} and C{{}} answer 200, no change."""
        before = self.snapshot()
        self.assertEqual(self.acknowledged(self.keyPut({"objects": []})), b"{}")
        self.assertEqual(self.acknowledged(self.keyPut({})), b"{}")
        self.assertEqual(self.snapshot(), before)

    def test_scenario66MangledKeyStoredCanonical(self) -> None:
        """Scenario 66: a put for C{shared.S ._sync} is stored under shared.S."""
        self.acknowledged(
            self.keyPut({"shared": {SERIAL + " ._sync": {"target_temperature": 19.0}}})
        )
        self.assertEqual(self.current(SHARED).value["target_temperature"], 19.0)
        self.assertEqual([b.key for b in self.snapshot()[SERIAL] if " " in b.key], [])

    def test_bucketInPath(self) -> None:
        """C{/v2/put/<key>} takes the bucket's bare fields as its body."""
        body = self.acknowledged(
            self.keyPut(
                {"target_temperature": 18.5, "$timestamp": 1},
                path=f"/v2/put/{SHARED}%20._sync",
            )
        )
        self.assertEqual(self.current(SHARED).value, {"target_temperature": 18.5})
        self.assertEqual(list(json.loads(body)), ["shared"])

    def test_metadataNeverStored(self) -> None:
        """C{$version}, C{$timestamp} and the v7 metadata are never stored."""
        self.acknowledged(
            self.keyPut(
                {
                    "device": {
                        SERIAL: {
                            "$version": 1,
                            "$timestamp": 2,
                            "object_key": "x",
                            "base_object_revision": 3,
                            "rssi": 40,
                        }
                    }
                },
                path="/v1/put",
            )
        )
        self.assertEqual(
            self.current(DEVICE).value, {"temperature_scale": "C", "rssi": 40}
        )

    def test_ownPutNotSentBack(self) -> None:
        """
        What the device put is not answered back to its bare-key session
        (the stale echo, §12).
        """
        for _ in range(2):
            self.bucketAnswer(self.keySubscribe([SHARED, DEVICE]))
        self.acknowledged(self.keyPut({"shared": {SERIAL: {"target_temperature": 23}}}))
        self.leave(self.heldKeys([SHARED, DEVICE]))
        self.stub.flush()

    def test_otherDevicesBucketNotWritten(self) -> None:
        """A put naming another device's bucket changes nothing of it."""
        before = self.snapshot()
        body = self.acknowledged(
            self.keyPut({"shared": {"02AA01AC0000000002": {"target_temperature": 5}}})
        )
        self.assertEqual(body, b"{}")
        self.assertEqual(self.snapshot(), before)

    def test_badInputRefused(self) -> None:
        """Bad nested bodies get a 4xx and change nothing."""
        for bad in [
            b"[]",
            b"not json",
            b'{"shared": 3}',
            b'{"shared": {"%s": 21.5}}' % (SERIAL.encode(),),
            b'{"nosuch": {"S": {"a": 1}}}',
            b'{"shared": {"%s": {"a": 1}}, "device": []}' % (SERIAL.encode(),),
        ]:
            self.refusedUnchanged(self.keyPut(bad), 400)
        self.refusedUnchanged(self.keyPut(b"[]", path="/v2/put/shared.S"), 400)
        self.refusedUnchanged(self.keyPut(b"{}", path="/v2/put/nosuch.S"), 400)
        self.refusedUnchanged(self.keyPut(b"{" + b" " * 2_000_000 + b"}"), 413)

    def test_nonNumberRefused(self) -> None:
        """
        A nested put, or a put of one bucket named in the path, giving a
        field clients read as a number a non-number is refused as a whole
        (nestproto.fields).
        """
        good = {"target_temperature": 21.0}
        for bad in ["21", True, [21]]:
            self.refusedUnchanged(
                self.keyPut(
                    {
                        "shared": {SERIAL: good},
                        "device": {SERIAL: {"current_humidity": bad}},
                    }
                ),
                400,
            )
            self.refusedUnchanged(
                self.keyPut(
                    {"current_temperature": bad}, path=f"/v2/put/shared.{SERIAL}"
                ),
                400,
            )


class BigGetTests(KeyListTestCase):
    """The device's whole-state read (PROTOCOL.md §20.5)."""

    def test_bigGetNested(self) -> None:
        """
        C{GET …/v3/device/device.S}, even mangled, answers every bucket of
        S nested with C{$version}, C{$timestamp} and the fields.
        """
        d = self.stub.get(
            DEVICE_URL + V3 + "/device/device." + SERIAL + "%20._sync",
            headers=basicAuth(),
        )
        answer = receive(self.successResultOf(d))
        self.successResultOf(answer.done)
        self.assertEqual(answer.response.code, 200)
        body = b"".join(answer.chunks)
        self.assertNotIn(b": ", body)
        self.assertEqual(
            json.loads(body),
            {
                "shared": {
                    SERIAL: {
                        "$version": 7,
                        "$timestamp": self.start - 5000,
                        "target_temperature": 20.0,
                    }
                },
                "device": {
                    SERIAL: {
                        "$version": -2086438581,
                        "$timestamp": self.start - 6000,
                        "temperature_scale": "C",
                    }
                },
            },
        )
