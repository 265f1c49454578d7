# -*- test-case-name: tests.test_transport -*-
"""
The transport (subscribe, put, object listing) through the real device
resource: PROTOCOL.md §19 scenarios 11-41, 56 and 60, and the choices made
where sources disagree (the "⚠ DISAGREE" items of PROTOCOL.md).

Every request goes through L{DeviceAPI}'s Klein resource by StubTreq; time
moves only by the test's L{Clock}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import treq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH, IRequest, IResponse
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from nestproto import buckets
from nestproto.buckets import Bucket
from nestproto.device.api import _answerWriter
from nestproto.device.dialect import V7
from nestproto.hub import BATCHED
from nestproto.membership import OWNER_RECORD
from nestproto.store import BucketUpdate, BucketWrite, RecordWrite
from tests.helpers import (
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    Answer,
    DroppableBody,
    Server,
    basicAuth,
    clientObject,
    makeServer,
    objectsBody,
    receive,
    receiveDroppable,
)

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"
SCHEDULE = f"schedule.{SERIAL}"
HOLD_SECONDS = 290.0
BATCH_SECONDS = 3.0
OBJECT_FIELDS = ["object_revision", "object_timestamp", "object_key", "value"]
RECEIPT_FIELDS = ["object_revision", "object_timestamp", "object_key"]


def orderedObjects(body: bytes) -> list[list[str]]:
    """The field names of each object of C{body}, in the order sent."""
    document = json.loads(body, object_pairs_hook=lambda pairs: pairs)
    (name, objects) = document[0]
    assert name == "objects"
    return [[field for field, value in pairs] for pairs in objects]


class TransportTestCase(SynchronousTestCase):
    """
    A whole server in memory, and the requests a thermostat makes.
    """

    def setUp(self) -> None:
        self.server: Server = makeServer(holdSeconds=HOLD_SECONDS)
        self.clock: Clock = self.server.clock
        self.stub = self.server.deviceClient
        self.start = self.server.nowMs()

    # Requests

    def subscribe(
        self,
        objects: Sequence[Mapping[str, Any]],
        chunked: bool = True,
        serial: str = SERIAL,
        headers: Mapping[str, str] | None = None,
        path: str = "/nest/transport",
    ) -> Deferred[IResponse]:
        allHeaders = {**basicAuth(serial), **(headers or {})}
        return self.stub.post(
            DEVICE_URL + path,
            data=objectsBody(objects, chunked),
            headers=allHeaders,
        )

    def put(
        self,
        document: Mapping[str, Any],
        serial: str = SERIAL,
        path: str = "/nest/transport/put",
    ) -> Deferred[IResponse]:
        return self.stub.post(
            DEVICE_URL + path,
            data=json.dumps(document).encode(),
            headers=basicAuth(serial),
        )

    def receive(self, requested: Deferred[IResponse]) -> Answer:
        """Start collecting the body of a response whose headers arrived."""
        return receive(self.successResultOf(requested))

    def receiveDroppable(
        self, requested: Deferred[IResponse]
    ) -> tuple[Answer, DroppableBody]:
        return receiveDroppable(self.successResultOf(requested))

    def answered(self, requested: Deferred[IResponse]) -> tuple[Answer, Any]:
        """A response that is complete now, and its decoded body."""
        answer = self.receive(requested)
        self.successResultOf(answer.done)
        return answer, json.loads(b"".join(answer.chunks))

    def held(self, objects: Sequence[Mapping[str, Any]], **kwargs: Any) -> Answer:
        """Subscribe and check that the answer is held: headers, no body."""
        answer = self.receive(self.subscribe(objects, **kwargs))
        self.assertEqual(answer.response.code, 200)
        self.assertNoResult(answer.done)
        self.assertEqual(answer.chunks, [])
        return answer

    def command(
        self, key: str, fields: Mapping[str, Any], scope: str = SERIAL
    ) -> Bucket:
        """
        Change C{key} the way a control command does: through
        L{DeviceState.change}, which commits and pushes.
        """

        def change(current: Bucket | None, nowMs: int) -> Bucket:
            return buckets.forceMerge(current or buckets.empty(key), fields, nowMs)

        [written] = self.successResultOf(
            self.server.state.change([BucketUpdate(scope, key, change)])
        )
        assert written is not None
        return written

    def seed(self, *seeded: Bucket, serial: str = SERIAL) -> None:
        self.server.seed(serial, *seeded)

    def stored(self, key: str, scope: str = SERIAL) -> Bucket | None:
        return self.server.store.get(scope, key)

    def current(self, key: str, scope: str = SERIAL) -> Bucket:
        """The stored bucket C{key}, which must exist."""
        bucket = self.stored(key, scope)
        if bucket is None:
            self.fail(f"{key} is not stored")
        return bucket

    def snapshot(self) -> dict[str, list[Bucket]]:
        """Everything the store holds, by scope."""
        store = self.server.store
        return {scope: store.buckets(scope) for scope in store.scopes()}

    def assertClean(self) -> None:
        """No subscribe held and no timer left behind."""
        self.assertEqual(self.server.hub.total(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def endHolds(self) -> None:
        """Let every held subscribe time out, and check nothing remains."""
        self.clock.advance(HOLD_SECONDS)
        self.stub.flush()
        self.assertClean()


class SubscribeTests(TransportTestCase):
    """
    Subscribe: what is answered at once and what is held (scenarios 11-24).
    """

    def test_scenario11ZeroTimestampGetsServerCopy(self) -> None:
        """
        Scenario 11: a subscribe naming C{shared.S} with timestamp 0 gets the
        server's C{shared.S} at once, and the response ends.
        """
        shared = Bucket(SHARED, 12, self.start - 5000, {"target_temperature": 20.5})
        self.seed(shared)
        answer, body = self.answered(self.subscribe([clientObject(SHARED, 0, 0)]))
        self.assertEqual(answer.response.code, 200)
        self.assertEqual(
            body,
            {
                "objects": [
                    {
                        "object_revision": 12,
                        "object_timestamp": self.start - 5000,
                        "object_key": SHARED,
                        "value": {"target_temperature": 20.5},
                    }
                ]
            },
        )
        self.assertClean()

    def test_scenario12InSyncIsHeldWithHeadersOnly(self) -> None:
        """
        Scenario 12: an unpaired device (with no structure stored) whose
        timestamps equal the server's gets headers and no body, and the
        connection stays open until the hold ends.
        """
        self.seed(
            Bucket(DEVICE, 4, self.start - 1000, {"current_temperature": 20.0}),
            Bucket(SHARED, 9, self.start - 2000, {"target_temperature": 21.0}),
        )
        answer = self.held(
            [
                clientObject(DEVICE, 4, self.start - 1000),
                clientObject(SHARED, 9, self.start - 2000),
            ]
        )
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertEqual(self.server.hub.count(SERIAL), 1)
        self.endHolds()
        self.assertEqual(answer.chunks, [])

    def test_scenario13EqualTimestampHigherServerRevisionNotSent(self) -> None:
        """
        Scenario 13: equal timestamps with a higher server revision produce
        no send.

        PROTOCOL.md §11.2 / §18 item 1 (⚠ DISAGREE): the timestamp alone
        decides; the revision tiebreak of older sources is not applied.
        """
        self.seed(Bucket(SHARED, 40, self.start - 1000, {"target_temperature": 21.0}))
        self.held([clientObject(SHARED, 2, self.start - 1000)])
        self.endHolds()

    def test_scenario14NewerDeviceBucketSentAndClosed(self) -> None:
        """
        Scenario 14: when the server's C{device.S} is newer than the
        device's, it is in the first chunk and the response ends right after
        it, with no batch window.
        """
        device = Bucket(DEVICE, 7, self.start - 100, {"away_temperature_low": 15.0})
        self.seed(device, Bucket(SHARED, 3, self.start - 500, {}))
        answer, body = self.answered(
            self.subscribe(
                [
                    clientObject(DEVICE, 6, self.start - 200),
                    clientObject(SHARED, 3, self.start - 500),
                ]
            )
        )
        self.assertEqual([o["object_key"] for o in body["objects"]], [DEVICE])
        self.assertEqual(body["objects"][0]["value"], {"away_temperature_low": 15.0})
        self.assertClean()

    def test_scenario15DeviceAheadWithoutValueChangesNothing(self) -> None:
        """
        Scenario 15: a device whose timestamp is ahead of the server's and
        that sends no value gets nothing for that bucket, and the server's
        copy is unchanged.
        """
        shared = Bucket(SHARED, 3, self.start - 5000, {"target_temperature": 19.0})
        self.seed(shared)
        self.held([clientObject(SHARED, 4, self.start + 1000)])
        self.assertEqual(self.stored(SHARED), shared)
        self.endHolds()

    def test_scenario16DeviceAheadWithValueIsAdopted(self) -> None:
        """
        Scenario 16: a device ahead of the server that sends a value has it
        merged over the server's copy, with the device's revision and
        timestamp adopted; nothing is sent back.
        """
        self.seed(Bucket(SHARED, 3, self.start - 5000, {"a": 1, "b": 2}))
        self.held([clientObject(SHARED, 7, self.start + 1000, {"b": 3, "c": 4})])
        self.assertEqual(
            self.stored(SHARED),
            Bucket(SHARED, 7, self.start + 1000, {"a": 1, "b": 3, "c": 4}),
        )
        self.endHolds()

    def test_scenario17UnknownBucketPlaceholder(self) -> None:
        """
        Scenario 17: a bucket the server has no copy of, named with
        timestamp 0, comes back as revision 0, timestamp 0, empty value.
        """
        answer, body = self.answered(self.subscribe([clientObject(SCHEDULE, 0, 0)]))
        self.assertEqual(
            body,
            {
                "objects": [
                    {
                        "object_revision": 0,
                        "object_timestamp": 0,
                        "object_key": SCHEDULE,
                        "value": {},
                    }
                ]
            },
        )
        self.assertClean()

    def test_scenario18FieldOrderImmediate(self) -> None:
        """
        Scenario 18: every object of an immediate answer has its fields in
        the order C{object_revision}, C{object_timestamp}, C{object_key},
        C{value}.
        """
        self.seed(
            Bucket(DEVICE, 1, self.start - 10, {"z": 1, "a": 2}),
            Bucket(SHARED, 2, self.start - 20, {"target_temperature": 20.0}),
        )
        answer = self.receive(
            self.subscribe([clientObject(DEVICE, 0, 0), clientObject(SHARED, 0, 0)])
        )
        self.successResultOf(answer.done)
        self.assertEqual(
            orderedObjects(b"".join(answer.chunks)), [OBJECT_FIELDS, OBJECT_FIELDS]
        )

    def test_scenario18FieldOrderPushed(self) -> None:
        """
        Scenario 18: a pushed chunk has its fields in the same order.
        """
        self.seed(Bucket(SHARED, 2, self.start - 20, {"target_temperature": 20.0}))
        answer = self.held([clientObject(SHARED, 2, self.start - 20)])
        self.command(SHARED, {"target_temperature": 21.0})
        self.stub.flush()
        self.assertEqual(len(answer.chunks), 1)
        self.assertEqual(orderedObjects(answer.chunks[0]), [OBJECT_FIELDS])
        self.clock.advance(BATCH_SECONDS)
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertClean()

    def test_scenario19HeldHeaders(self) -> None:
        """
        Scenario 19: a held chunked subscribe's headers carry
        C{X-nl-service-timestamp} (the server's time in ms),
        C{X-nl-suspend-time-max} and C{X-nl-defer-device-window}, and the
        body has no length (chunked; the raw header is checked by
        L{RawHTTPTests}).
        """
        self.clock.advance(0.456)
        answer = self.held([clientObject(SHARED, 1, self.start)])
        self.assertEqual(answer.header("x-nl-service-timestamp"), str(self.start + 456))
        self.assertEqual(answer.header("x-nl-suspend-time-max"), "300")
        self.assertEqual(answer.header("x-nl-defer-device-window"), "15")
        self.assertIsNone(answer.header("x-nl-disable-defer-window"))
        self.assertEqual(answer.response.length, UNKNOWN_LENGTH)
        self.endHolds()

    def test_scenario21DisableDeferWindowWithSetpoint(self) -> None:
        """
        Scenario 21: an immediate answer carrying C{target_temperature} has
        C{X-nl-disable-defer-window}.
        """
        self.seed(Bucket(SHARED, 5, self.start - 10, {"target_temperature": 22.0}))
        answer, body = self.answered(self.subscribe([clientObject(SHARED, 0, 0)]))
        self.assertEqual(answer.header("x-nl-disable-defer-window"), "60")

    def test_scenario21NoDisableDeferWindowForSensors(self) -> None:
        """
        Scenario 21: an immediate answer with only device sensor fields has
        no C{X-nl-disable-defer-window}.
        """
        self.seed(
            Bucket(DEVICE, 5, self.start - 10, {"current_humidity": 44}),
            Bucket(SHARED, 5, self.start - 10, {"target_temperature": 22.0}),
        )
        answer, body = self.answered(
            self.subscribe(
                [clientObject(DEVICE, 0, 0), clientObject(SHARED, 5, self.start - 10)]
            )
        )
        self.assertEqual([o["object_key"] for o in body["objects"]], [DEVICE])
        self.assertIsNone(answer.header("x-nl-disable-defer-window"))

    def test_scenario22BothBodyFormsAgree(self) -> None:
        """
        Scenario 22: the objects-array form and the named form of the same
        subscribe give identical answers and identical stored state.
        """
        objects = [
            clientObject(DEVICE, 0, 0, {"current_temperature": 20.5}),
            clientObject(SHARED, 3, self.start - 100),
        ]
        seeded = Bucket(SHARED, 4, self.start - 50, {"target_temperature": 21.0})
        named = json.dumps(
            {
                "chunked": True,
                "session": "18b43000000102AA01AC0000000001",
                "device": objects[0],
                "shared": objects[1],
            }
        ).encode()
        results = []
        for body in [objectsBody(objects), named]:
            server = makeServer(holdSeconds=HOLD_SECONDS)
            server.seed(SERIAL, seeded)
            requested = server.deviceClient.post(
                DEVICE_URL + "/nest/transport", data=body, headers=basicAuth()
            )
            response = self.successResultOf(requested)
            content = self.successResultOf(treq.content(response))
            results.append((content, server.store.buckets(SERIAL)))
        self.assertEqual(results[0], results[1])
        self.assertEqual(
            [o["object_key"] for o in json.loads(results[0][0])["objects"]],
            [DEVICE, SHARED],
        )

    def test_scenario23InlineUpdateMergedAndReturned(self) -> None:
        """
        Scenario 23: an inline update (value with revision and timestamp 0)
        is merged, revision and timestamp moved, and the merged bucket comes
        back in the same answer (with the Weave id header recorded on the
        device bucket).
        """
        self.seed(Bucket(DEVICE, 2, self.start - 1000, {"a": 1, "b": 1}))
        self.clock.advance(1)
        answer, body = self.answered(
            self.subscribe(
                [clientObject(DEVICE, 0, 0, {"b": 2})],
                headers={"X-nl-weave-device-id": "18B4300000000001"},
            )
        )
        merged = Bucket(
            DEVICE,
            3,
            self.start + 1000,
            {"a": 1, "b": 2, "weave_device_id": "18B4300000000001"},
        )
        self.assertEqual(self.stored(DEVICE), merged)
        self.assertEqual(
            body["objects"],
            [
                {
                    "object_revision": 3,
                    "object_timestamp": self.start + 1000,
                    "object_key": DEVICE,
                    "value": merged.value,
                }
            ],
        )
        self.assertClean()

    def test_scenario24PendingChangeAcknowledged(self) -> None:
        """
        Scenario 24: C{shared.S} sent with its current revision and timestamp
        and C{target_change_pending: false} clears a stored C{true} without
        moving revision or timestamp; nothing is resent.
        """
        self.seed(
            Bucket(
                SHARED,
                8,
                self.start - 100,
                {"target_temperature": 21.0, "target_change_pending": True},
            )
        )
        self.held(
            [
                clientObject(
                    SHARED, 8, self.start - 100, {"target_change_pending": False}
                )
            ]
        )
        self.assertEqual(
            self.stored(SHARED),
            Bucket(
                SHARED,
                8,
                self.start - 100,
                {"target_temperature": 21.0, "target_change_pending": False},
            ),
        )
        self.endHolds()


class HeldTests(TransportTestCase):
    """
    Held subscribes: pushes, batching, timeouts, overlap, limits and replay
    (scenarios 25-32).
    """

    def setUp(self) -> None:
        super().setUp()
        self.shared = Bucket(
            SHARED, 10, self.start - 1000, {"target_temperature": 20.0}
        )
        self.seed(self.shared)
        self.inSync = [clientObject(SHARED, 10, self.start - 1000)]

    def test_scenario25CommandDeliveredOnHeld(self) -> None:
        """
        Scenario 25: a command made while a subscribe is held reaches that
        connection as one C{{"objects": [...]}} chunk with the full value,
        with no time passing.
        """
        answer = self.held(self.inSync)
        written = self.command(SHARED, {"target_temperature": 21.5})
        self.stub.flush()
        self.assertEqual(
            answer.documents(),
            [
                {
                    "objects": [
                        {
                            "object_revision": 11,
                            "object_timestamp": self.start,
                            "object_key": SHARED,
                            "value": {"target_temperature": 21.5},
                        }
                    ]
                }
            ],
        )
        self.assertEqual(written.revision, 11)
        self.assertNoResult(answer.done)
        self.clock.advance(BATCH_SECONDS)
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertClean()

    def test_scenario26TwoCommandsTwoChunksThenClose(self) -> None:
        """
        Scenario 26: two commands 1 s apart give two chunks on the same
        connection, which closes 3 s after the second.
        """
        answer = self.held(self.inSync)
        self.command(SHARED, {"target_temperature": 21.0})
        self.stub.flush()
        self.clock.advance(1)
        self.command(SHARED, {"target_temperature": 22.0})
        self.stub.flush()
        self.assertEqual(
            [d["objects"][0]["value"] for d in answer.documents()],
            [{"target_temperature": 21.0}, {"target_temperature": 22.0}],
        )
        self.assertEqual(
            [d["objects"][0]["object_revision"] for d in answer.documents()], [11, 12]
        )
        self.clock.advance(BATCH_SECONDS - 0.001)
        self.stub.flush()
        self.assertNoResult(answer.done)
        self.clock.advance(0.001)
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertEqual(len(answer.chunks), 2)
        self.assertClean()

    def test_scenario27IdleHoldEndsWithoutBody(self) -> None:
        """
        Scenario 27: a held subscribe with no data ends cleanly after the
        hold time (suspend_time_max - 10 s) with no body.
        """
        answer = self.held(self.inSync)
        self.clock.advance(HOLD_SECONDS - 0.001)
        self.stub.flush()
        self.assertNoResult(answer.done)
        self.clock.advance(0.001)
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertEqual(answer.chunks, [])
        self.assertClean()

    def test_scenario28OverlappingSubscribesBothPushed(self) -> None:
        """
        Scenario 28: two overlapping subscribes of one device both receive
        a push.
        """
        first = self.held(self.inSync)
        second = self.held(self.inSync)
        self.assertEqual(self.server.hub.count(SERIAL), 2)
        self.command(SHARED, {"target_temperature": 23.0})
        self.stub.flush()
        for answer in (first, second):
            self.assertEqual(
                answer.documents()[0]["objects"][0]["value"],
                {"target_temperature": 23.0},
            )
        self.clock.advance(BATCH_SECONDS)
        self.stub.flush()
        self.successResultOf(first.done)
        self.successResultOf(second.done)
        self.assertClean()

    def test_scenario28EndingOneLeavesTheOther(self) -> None:
        """
        Scenario 28: when one of two overlapping subscribes ends (its client
        left), the other stays registered and still receives pushes.
        """
        leaving, body = self.receiveDroppable(self.subscribe(self.inSync))
        staying = self.held(self.inSync)
        body.disconnect()
        self.stub.flush()
        self.failureResultOf(leaving.done)
        self.assertEqual(self.server.hub.count(SERIAL), 1)
        self.command(SHARED, {"target_temperature": 18.0})
        self.stub.flush()
        self.assertEqual(len(staying.documents()), 1)
        self.assertEqual(leaving.chunks, [])
        self.assertEqual(self.server.hub.undelivered(SERIAL), [])
        self.clock.advance(BATCH_SECONDS)
        self.stub.flush()
        self.successResultOf(staying.done)
        self.assertClean()

    def test_disconnectForgetsAtOnce(self) -> None:
        """
        A client that leaves a held subscribe is forgotten at once, with its
        hold timer.
        """
        answer, body = self.receiveDroppable(self.subscribe(self.inSync))
        self.assertEqual(self.server.hub.count(SERIAL), 1)
        body.disconnect()
        self.stub.flush()
        self.assertEqual(self.server.hub.count(SERIAL), 0)
        self.failureResultOf(answer.done)
        self.assertClean()

    def test_scenario29HundredFirstSubscribeAnswersEmpty(self) -> None:
        """
        Scenario 29: with nothing pending, the 101st concurrent subscribe of
        a device gets C{{"objects": []}} and is closed; the 100 stay held.
        """
        holding = [self.held(self.inSync) for _ in range(100)]
        self.assertEqual(self.server.hub.count(SERIAL), 100)
        answer, body = self.answered(self.subscribe(self.inSync))
        self.assertEqual(body, {"objects": []})
        self.assertEqual(answer.response.code, 200)
        self.assertEqual(self.server.hub.count(SERIAL), 100)
        self.endHolds()
        for each in holding:
            self.successResultOf(each.done)

    def test_scenario29LimitIsPerDevice(self) -> None:
        """
        Another device is held normally while one device is at its limit.
        """
        holding = [self.held(self.inSync) for _ in range(100)]
        other = self.held(
            [clientObject(f"shared.{OTHER_SERIAL}", 1, 1)], serial=OTHER_SERIAL
        )
        self.assertEqual(self.server.hub.count(OTHER_SERIAL), 1)
        self.endHolds()
        self.successResultOf(other.done)
        self.assertEqual(len(holding), 100)

    def failPush(self, key: str, fields: Mapping[str, Any]) -> Bucket:
        """
        Push a command to a held subscribe whose client is gone without its
        subscription having been cancelled: the real chunk writer of
        L{DeviceAPI} raises, and the hub keeps the push.

        Over HTTP this state is not reached: Twisted never fails a write to
        a lost connection (it drops it), and the same C{notifyFinish} errback
        that marks the writer gone makes Klein cancel the hold before any
        push can run. So the failing write is made here on a
        L{DummyRequest}; the replay itself goes through the resource.
        """
        request = DummyRequest([b"nest", b"transport"])
        # DummyRequest has IRequest's methods but does not declare it.
        writer = _answerWriter(cast(IRequest, request), V7)
        held = self.server.hub.hold(SERIAL, writer, lambda kept: [], BATCHED)
        assert held is not None
        request.processingFailed(Failure(ConnectionLost()))
        written = self.command(key, fields)
        self.successResultOf(held)
        # Only the headers, when the hold began.
        self.assertEqual(request.written, [b""])
        return written

    def test_scenario30FailedPushReplayedToNextHeld(self) -> None:
        """
        Scenario 30: a push whose chunk could not be written is replayed as
        the first chunk of the device's next held subscribe.
        """
        schedule = self.failPush(SCHEDULE, {"ver": 2, "name": "Winter"})
        self.assertEqual(self.server.hub.undelivered(SERIAL), [schedule])
        self.assertClean()
        answer = self.receive(self.subscribe(self.inSync))
        self.stub.flush()
        self.assertEqual(
            answer.documents(),
            [
                {
                    "objects": [
                        {
                            "object_revision": schedule.revision,
                            "object_timestamp": schedule.timestamp,
                            "object_key": SCHEDULE,
                            "value": {"ver": 2, "name": "Winter"},
                        }
                    ]
                }
            ],
        )
        self.assertEqual(self.server.hub.undelivered(SERIAL), [])
        self.clock.advance(BATCH_SECONDS)
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertClean()

    def test_scenario30ImmediateAnswerLeavesReplayForHeld(self) -> None:
        """
        Scenario 30: a subscribe answered at once does not take the kept
        push; it waits for the next I{held} subscribe.
        """
        self.failPush(SCHEDULE, {"ver": 2})
        self.answered(self.subscribe([clientObject(SHARED, 0, 0)]))
        self.assertEqual(len(self.server.hub.undelivered(SERIAL)), 1)
        answer = self.receive(self.subscribe(self.inSync))
        self.stub.flush()
        self.assertEqual(
            [o["object_key"] for o in answer.documents()[0]["objects"]], [SCHEDULE]
        )
        self.clock.advance(BATCH_SECONDS)
        self.stub.flush()
        self.assertClean()

    def test_scenario30ReplaySendsCurrentCopy(self) -> None:
        """
        A replay sends the bucket as it is now, not the copy that failed: a
        later change made while no subscribe was held is not undone.
        """
        self.failPush(SCHEDULE, {"name": "first"})
        latest = self.command(SCHEDULE, {"name": "second"})
        answer = self.receive(self.subscribe(self.inSync))
        self.stub.flush()
        [replayed] = answer.documents()[0]["objects"]
        self.assertEqual(replayed["value"], {"name": "second"})
        self.assertEqual(replayed["object_revision"], latest.revision)
        self.endHolds()

    def test_scenario30ReplaySkipsWhatTheDeviceHolds(self) -> None:
        """
        A kept push of a bucket the new subscribe already holds at the
        current timestamp is not replayed; the subscribe is held quietly.
        """
        written = self.failPush(SHARED, {"target_temperature": 24.0})
        answer = self.held([clientObject(SHARED, written.revision, written.timestamp)])
        self.stub.flush()
        self.assertEqual(answer.chunks, [])
        self.assertEqual(self.server.hub.undelivered(SERIAL), [])
        self.endHolds()
        self.successResultOf(answer.done)

    def test_scenario31CommandWithoutSubscriberDeliveredNext(self) -> None:
        """
        Scenario 31: a command made while no subscribe is open is delivered
        on the next subscribe, by the timestamp rule.
        """
        written = self.command(SHARED, {"target_temperature": 17.5})
        self.assertEqual(self.server.hub.undelivered(SERIAL), [])
        answer, body = self.answered(self.subscribe(self.inSync))
        self.assertEqual(
            body["objects"],
            [
                {
                    "object_revision": written.revision,
                    "object_timestamp": written.timestamp,
                    "object_key": SHARED,
                    "value": {"target_temperature": 17.5},
                }
            ],
        )
        self.assertClean()

    def test_scenario32NonChunkedAnswersAtOnce(self) -> None:
        """
        Scenario 32: a non-chunked subscribe with nothing newer is answered
        at once with C{{"objects": []}} and a content length; nothing is
        held.
        """
        answer, body = self.answered(self.subscribe(self.inSync, chunked=False))
        self.assertEqual(body, {"objects": []})
        self.assertEqual(answer.response.length, len(b"".join(answer.chunks)))
        self.assertIsNotNone(answer.header("x-nl-service-timestamp"))
        self.assertClean()

    def test_scenario32NonChunkedWithData(self) -> None:
        """
        Scenario 32: a non-chunked subscribe with newer data is answered at
        once with those objects.
        """
        answer, body = self.answered(
            self.subscribe([clientObject(SHARED, 0, 0)], chunked=False)
        )
        self.assertEqual([o["object_key"] for o in body["objects"]], [SHARED])
        self.assertEqual(answer.response.length, len(b"".join(answer.chunks)))
        self.assertClean()

    def test_subscribePaths(self) -> None:
        """
        The versioned and legacy subscribe paths (PROTOCOL.md §1, §3) hold
        and push like C{/nest/transport}.
        """
        for path in [
            "/nest/transport/v7/subscribe",
            "/nest/transport/v7",
            "/transport",
            "/transport/v7/subscribe",
            "/czfe/v7/subscribe",
        ]:
            answer = self.held(self.inSync, path=path)
            self.command(SHARED, {"target_temperature": 19.0})
            self.stub.flush()
            self.assertEqual(len(answer.documents()), 1, path)
            self.clock.advance(BATCH_SECONDS)
            self.stub.flush()
            self.successResultOf(answer.done)
            self.assertClean()
            self.inSync = [
                clientObject(SHARED, bucket.revision, bucket.timestamp)
                for bucket in [self.stored(SHARED)]
                if bucket is not None
            ]

    def test_endAllEndsHeldCleanly(self) -> None:
        """
        At shutdown (L{SubscriberHub.endAll}) a held subscribe ends at once
        with no body, so the device reconnects.
        """
        answer = self.held(self.inSync)
        self.server.hub.endAll()
        self.stub.flush()
        self.successResultOf(answer.done)
        self.assertEqual(answer.chunks, [])
        self.assertClean()

    def test_afterEndAllTransportRefused(self) -> None:
        """
        After shutdown began, subscribe and put answer a JSON 503 and
        change nothing: the store takes no more writes.
        """
        self.server.hub.endAll()
        before = self.snapshot()
        for requested in [
            self.subscribe([clientObject(SHARED, 0, 0, {"a": 1})]),
            self.put({"objects": [{"object_key": SHARED, "value": {"a": 1}}]}),
        ]:
            answer, body = self.answered(requested)
            self.assertEqual(answer.response.code, 503)
            self.assertEqual(
                body, {"error": "Server is shutting down", "code": "unavailable"}
            )
        self.assertEqual(self.snapshot(), before)
        self.assertClean()


class PutTests(TransportTestCase):
    """
    Put: merging, receipts and what it does not do (scenarios 33-41).
    """

    def receipts(self, document: Mapping[str, Any], serial: str = SERIAL) -> Any:
        answer, body = self.answered(self.put(document, serial))
        self.assertEqual(answer.response.code, 200)
        return body

    def test_scenario33BothPutFormsMergeAlike(self) -> None:
        """
        Scenario 33: the bucket-keyed form (fields inline) and the
        objects-array form (nested value) merge the same way and answer the
        same receipts.
        """
        seeded = Bucket(SHARED, 5, self.start - 10, {"a": 1, "b": 1})
        keyed = {
            "session": "s",
            SHARED: {"object_key": SHARED, "if_object_revision": 5, "b": 2, "c": 3},
        }
        arrayed = {
            "session": "s",
            "objects": [
                {
                    "object_key": SHARED,
                    "if_object_revision": 5,
                    "value": {"b": 2, "c": 3},
                }
            ],
        }
        results = []
        for document in [keyed, arrayed]:
            server = makeServer()
            server.seed(SERIAL, seeded)
            response = self.successResultOf(
                server.deviceClient.post(
                    DEVICE_URL + "/nest/transport/put",
                    data=json.dumps(document).encode(),
                    headers=basicAuth(),
                )
            )
            content = self.successResultOf(treq.content(response))
            results.append((content, server.store.buckets(SERIAL)))
        self.assertEqual(results[0], results[1])
        self.assertEqual(
            results[0][1], [Bucket(SHARED, 6, self.start, {"a": 1, "b": 2, "c": 3})]
        )

    def test_scenario34PutChangeMovesRevisionAndTimestamp(self) -> None:
        """
        Scenario 34: a put that changes a field moves the revision by one and
        the timestamp to now; the receipt has revision, timestamp and key
        and no value.

        PROTOCOL.md §7.3 (⚠ DISAGREE): receipts never carry a value, since
        the device would take it as authoritative.
        """
        self.seed(Bucket(DEVICE, 30, self.start - 60000, {"current_humidity": 40}))
        self.clock.advance(2.5)
        answer, _ = self.answered(
            self.put(
                {"objects": [{"object_key": DEVICE, "value": {"current_humidity": 44}}]}
            )
        )
        body = b"".join(answer.chunks)
        self.assertEqual(orderedObjects(body), [RECEIPT_FIELDS])
        self.assertEqual(
            json.loads(body),
            {
                "objects": [
                    {
                        "object_revision": 31,
                        "object_timestamp": self.start + 2500,
                        "object_key": DEVICE,
                    }
                ]
            },
        )
        self.assertEqual(
            self.stored(DEVICE),
            Bucket(DEVICE, 31, self.start + 2500, {"current_humidity": 44}),
        )

    def test_scenario35IdenticalPutKeepsRevisionAndTimestamp(self) -> None:
        """
        Scenario 35: repeating an identical put leaves revision and timestamp
        unchanged, and the receipt says so.
        """
        document = {
            "objects": [{"object_key": DEVICE, "value": {"current_humidity": 44}}]
        }
        first = self.receipts(document)
        before = self.stored(DEVICE)
        self.clock.advance(60)
        second = self.receipts(document)
        self.assertEqual(first, second)
        self.assertEqual(self.stored(DEVICE), before)

    def test_scenario36ShallowMerge(self) -> None:
        """
        Scenario 36: a put merges shallowly: untouched top-level fields
        survive and a nested object sent replaces the stored one whole.
        """
        self.seed(
            Bucket(
                DEVICE,
                1,
                self.start - 10,
                {"keep": True, "eco": {"mode": "schedule", "touched_by": 1}},
            )
        )
        self.receipts(
            {
                "objects": [
                    {"object_key": DEVICE, "value": {"eco": {"mode": "manual-eco"}}}
                ]
            }
        )
        self.assertEqual(
            self.current(DEVICE).value,
            {"keep": True, "eco": {"mode": "manual-eco"}},
        )

    def test_scenario37IfRevisionConflict(self) -> None:
        """
        Scenario 37: a put whose C{if_object_revision} differs from the
        stored revision leaves that bucket unchanged and answers its current
        revision, timestamp and key without a value; other buckets of the
        same put still apply.

        PROTOCOL.md §11.6 / §18 item 2 (⚠ DISAGREE): the conflict answers
        200, not 409, so the device retries with the new revision.
        """
        shared = Bucket(SHARED, 9, self.start - 100, {"target_temperature": 20.0})
        self.seed(shared, Bucket(DEVICE, 2, self.start - 100, {"battery_level": 3.8}))
        self.clock.advance(1)
        answer, body = self.answered(
            self.put(
                {
                    SHARED: {
                        "object_key": SHARED,
                        "if_object_revision": 8,
                        "target_temperature": 25.0,
                    },
                    DEVICE: {"object_key": DEVICE, "battery_level": 3.9},
                }
            )
        )
        self.assertEqual(answer.response.code, 200)
        self.assertEqual(
            body,
            {
                "objects": [
                    {
                        "object_revision": 9,
                        "object_timestamp": self.start - 100,
                        "object_key": SHARED,
                    },
                    {
                        "object_revision": 3,
                        "object_timestamp": self.start + 1000,
                        "object_key": DEVICE,
                    },
                ]
            },
        )
        self.assertEqual(self.stored(SHARED), shared)
        self.assertEqual(self.current(DEVICE).value, {"battery_level": 3.9})

    def test_scenario37IfRevisionMatching(self) -> None:
        """
        A put whose C{if_object_revision} equals the stored revision applies.
        """
        self.seed(Bucket(SHARED, 9, self.start - 100, {"target_temperature": 20.0}))
        body = self.receipts(
            {
                "objects": [
                    {
                        "object_key": SHARED,
                        "if_object_revision": 9,
                        "value": {"target_temperature": 25.0},
                    }
                ]
            }
        )
        self.assertEqual(body["objects"][0]["object_revision"], 10)
        self.assertEqual(self.current(SHARED).value, {"target_temperature": 25.0})

    def test_scenario38BaseRevisionMismatchAccepted(self) -> None:
        """
        Scenario 38: a put whose C{base_object_revision} does not match is
        accepted; C{base_object_revision} is informational.
        """
        self.seed(Bucket(SHARED, 9, self.start - 100, {"hvac_heater_state": False}))
        body = self.receipts(
            {
                "objects": [
                    {
                        "object_key": SHARED,
                        "base_object_revision": 1545,
                        "value": {"hvac_heater_state": True},
                    }
                ]
            }
        )
        self.assertEqual(body["objects"][0]["object_revision"], 10)
        self.assertEqual(self.current(SHARED).value, {"hvac_heater_state": True})

    def test_scenario39PutAnswersOnlyWhatWasPut(self) -> None:
        """
        Scenario 39: the put answer names only the buckets of the request:
        no shared piggyback, even when shared is newer.
        """
        self.seed(
            Bucket(SHARED, 9, self.start, {"target_temperature": 20.0}),
            Bucket(SCHEDULE, 1, self.start, {"ver": 2}),
        )
        body = self.receipts(
            {"objects": [{"object_key": DEVICE, "value": {"current_humidity": 50}}]}
        )
        self.assertEqual([o["object_key"] for o in body["objects"]], [DEVICE])

    def test_scenario40PutPushesNothing(self) -> None:
        """
        Scenario 40: a put does not push anything to the device's held
        subscribes.
        """
        self.seed(Bucket(SHARED, 9, self.start - 10, {"target_temperature": 20.0}))
        answer = self.held([clientObject(SHARED, 9, self.start - 10)])
        self.receipts(
            {"objects": [{"object_key": SHARED, "value": {"target_temperature": 23.0}}]}
        )
        self.stub.flush()
        self.assertEqual(answer.chunks, [])
        self.assertNoResult(answer.done)
        self.endHolds()
        self.assertEqual(answer.chunks, [])

    def test_scenario41PendingFalseViaPutNotResent(self) -> None:
        """
        Scenario 41: after a pushed C{target_change_pending: true}, the
        device's put of C{false} is stored, and its next subscribe (with the
        receipt's timestamp) does not get C{true} again.
        """
        self.seed(Bucket(SHARED, 9, self.start - 10, {"target_temperature": 20.0}))
        answer = self.held([clientObject(SHARED, 9, self.start - 10)])
        self.command(
            SHARED, {"target_temperature": 22.0, "target_change_pending": True}
        )
        self.stub.flush()
        self.assertTrue(
            answer.documents()[0]["objects"][0]["value"]["target_change_pending"]
        )
        self.clock.advance(BATCH_SECONDS)
        self.stub.flush()
        self.clock.advance(1)
        body = self.receipts(
            {
                SHARED: {
                    "object_key": SHARED,
                    "if_object_revision": 10,
                    "target_change_pending": False,
                }
            }
        )
        [receipt] = body["objects"]
        self.assertIs(self.current(SHARED).value["target_change_pending"], False)
        again = self.held(
            [
                clientObject(
                    SHARED, receipt["object_revision"], receipt["object_timestamp"]
                )
            ]
        )
        self.endHolds()
        self.assertEqual(again.chunks, [])

    def test_putWithoutFieldsChangesNothing(self) -> None:
        """
        An entry with no fields (empty value) is skipped: no receipt, no
        write.
        """
        body = self.receipts({"objects": [{"object_key": DEVICE, "value": {}}]})
        self.assertEqual(body, {"objects": []})
        self.assertIsNone(self.stored(DEVICE))

    def test_putPaths(self) -> None:
        """The versioned and legacy put paths are puts."""
        paths = ["/nest/transport/v7/put", "/transport/put", "/czfe/v7/put"]
        for revision, path in enumerate(paths, start=1):
            answer, body = self.answered(
                self.put(
                    {"objects": [{"object_key": DEVICE, "value": {"x": revision}}]},
                    path=path,
                )
            )
            self.assertEqual(body["objects"][0]["object_revision"], revision, path)
            self.assertNotIn("value", body["objects"][0])
        self.assertClean()


class ListingAndHeaderTests(TransportTestCase):
    """
    The object listing (scenario 56) and the service timestamp on every
    successful transport answer (scenario 60).
    """

    def test_scenario56DeviceListing(self) -> None:
        """
        Scenario 56: C{GET /nest/transport/device/S} lists revision,
        timestamp and key of every stored bucket of S, without values.
        """
        self.seed(
            Bucket(DEVICE, 3, self.start - 30, {"a": 1}),
            Bucket(SHARED, 4, self.start - 40, {"b": 2}),
            Bucket(SCHEDULE, 5, self.start - 50, {"ver": 2}),
        )
        self.seed(Bucket(f"device.{OTHER_SERIAL}", 1, 1, {}), serial=OTHER_SERIAL)
        for path in [
            f"/nest/transport/device/{SERIAL}",
            f"/nest/transport/v7/device/device.{SERIAL}",
        ]:
            answer, _ = self.answered(self.stub.get(DEVICE_URL + path))
            body = b"".join(answer.chunks)
            self.assertEqual(answer.response.code, 200)
            self.assertEqual(
                json.loads(body),
                {
                    "objects": [
                        {
                            "object_revision": 3,
                            "object_timestamp": self.start - 30,
                            "object_key": DEVICE,
                        },
                        {
                            "object_revision": 5,
                            "object_timestamp": self.start - 50,
                            "object_key": SCHEDULE,
                        },
                        {
                            "object_revision": 4,
                            "object_timestamp": self.start - 40,
                            "object_key": SHARED,
                        },
                    ]
                },
            )
            self.assertEqual(orderedObjects(body), [RECEIPT_FIELDS] * 3)
            self.assertIsNotNone(answer.header("x-nl-service-timestamp"))

    def test_listingOfAnotherDeviceRefused(self) -> None:
        """
        A device asking for another device's listing gets a 404 and nothing
        of it.
        """
        self.seed(Bucket(DEVICE, 3, self.start - 30, {"a": 1}))
        answer, body = self.answered(
            self.stub.get(
                DEVICE_URL + f"/nest/transport/device/{SERIAL}",
                headers=basicAuth(OTHER_SERIAL),
            )
        )
        self.assertEqual(answer.response.code, 404)
        self.assertNotIn(DEVICE, json.dumps(body))

    def test_scenario60ServiceTimestampOnEvery200(self) -> None:
        """
        Scenario 60: subscribe (immediate, held, non-chunked), put and
        listing answers carry C{X-nl-service-timestamp}, the server's time
        in ms; a 400 refusal does not.
        """
        self.clock.advance(0.25)
        now = str(self.start + 250)
        self.seed(Bucket(SHARED, 1, self.start, {}))
        answers = [
            self.answered(self.subscribe([clientObject(SHARED, 0, 0)]))[0],
            self.answered(
                self.subscribe([clientObject(SHARED, 1, self.start)], chunked=False)
            )[0],
            self.answered(
                self.put({"objects": [{"object_key": DEVICE, "value": {"a": 1}}]})
            )[0],
            self.answered(
                self.stub.get(DEVICE_URL + f"/nest/transport/device/{SERIAL}")
            )[0],
        ]
        held = self.held([clientObject(SHARED, 1, self.start)])
        answers.append(held)
        for answer in answers:
            self.assertEqual(answer.response.code, 200)
            self.assertEqual(answer.header("x-nl-service-timestamp"), now)
        refused, body = self.answered(
            self.stub.post(DEVICE_URL + "/nest/transport", data=objectsBody([]))
        )
        self.assertEqual(refused.response.code, 400)
        self.assertEqual(body["error"], "Device serial required")
        self.assertIsNone(refused.header("x-nl-service-timestamp"))
        self.endHolds()


class RawHTTPTests(SynchronousTestCase):
    """
    The bytes of a held subscribe on the wire (scenarios 19 and 20), through
    a real L{Site} and HTTP channel over a L{StringTransport}.
    """

    def setUp(self) -> None:
        self.server = makeServer(holdSeconds=HOLD_SECONDS)
        self.start = self.server.nowMs()
        self.server.seed(SERIAL, Bucket(SHARED, 3, self.start - 10, {"a": 1}))
        # The channel's own idle timer runs on a clock of its own, so the
        # server's clock shows only the hub's timers.
        self.site = Site(self.server.device.app.resource(), reactor=Clock())
        self.site.timeOut = None
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "192.168.1.20", 4242))
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.168.1.10", 8000),
            peerAddress=IPv4Address("TCP", "192.168.1.20", 4242),
        )
        self.channel.makeConnection(self.transport)

    def send(self, objects: list[dict[str, Any]]) -> None:
        body = objectsBody(objects)
        self.channel.dataReceived(
            b"POST /nest/transport HTTP/1.1\r\n"
            b"Host: 192.168.1.10:8000\r\n"
            b"Authorization: " + basicAuth()["Authorization"].encode() + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body),) + body
        )

    def headersAndBody(self) -> tuple[list[bytes], bytes]:
        head, separator, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertEqual(separator, b"\r\n\r\n")
        return head.split(b"\r\n"), body

    def test_scenario19And20HeldHeadersFirst(self) -> None:
        """
        Scenarios 19 and 20: a held subscribe's complete header block is on
        the wire at once, with C{Transfer-Encoding: chunked} and the X-nl
        headers, and no body bytes at all (not even an empty chunk); a push
        then arrives as one chunk and the end as the terminating chunk.
        """
        self.send([clientObject(SHARED, 3, self.start - 10)])
        lines, body = self.headersAndBody()
        self.assertEqual(lines[0], b"HTTP/1.1 200 OK")
        headers = {
            name.lower(): value
            for name, _, value in (line.partition(b": ") for line in lines[1:])
        }
        self.assertEqual(headers[b"transfer-encoding"], b"chunked")
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"x-nl-service-timestamp"], b"%d" % (self.start,))
        self.assertEqual(headers[b"x-nl-suspend-time-max"], b"300")
        self.assertEqual(headers[b"x-nl-defer-device-window"], b"15")
        self.assertNotIn(b"content-length", headers)
        self.assertEqual(body, b"")

        self.transport.clear()

        def change(current: Bucket | None, nowMs: int) -> Bucket:
            assert current is not None
            return buckets.forceMerge(current, {"a": 2}, nowMs)

        self.server.state.change([BucketUpdate(SERIAL, SHARED, change)])
        chunk = self.transport.value()
        size, _, rest = chunk.partition(b"\r\n")
        document = rest[: int(size, 16)]
        self.assertEqual(rest[int(size, 16) :], b"\r\n")
        self.assertEqual(json.loads(document)["objects"][0]["value"], {"a": 2})

        self.transport.clear()
        self.server.clock.advance(BATCH_SECONDS)
        self.assertEqual(self.transport.value(), b"0\r\n\r\n")
        self.assertEqual(self.server.hub.total(), 0)
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def test_scenario27IdleEndIsTerminatingChunkOnly(self) -> None:
        """
        Scenario 27 on the wire: the idle end of a hold is the terminating
        zero chunk and nothing else.
        """
        self.send([clientObject(SHARED, 3, self.start - 10)])
        self.transport.clear()
        self.server.clock.advance(HOLD_SECONDS)
        self.assertEqual(self.transport.value(), b"0\r\n\r\n")
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def test_shutdownEndClosesConnection(self) -> None:
        """
        A hold ended by shutdown (L{SubscriberHub.endAll}) ends with the
        terminating chunk and then closes the connection, so the device's
        immediate resubscribe goes to a new connection (and a new server),
        not to one that can no longer write.
        """
        self.send([clientObject(SHARED, 3, self.start - 10)])
        self.transport.clear()
        self.server.hub.endAll()
        self.assertEqual(self.transport.value(), b"0\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_requestAfterShutdownRefused(self) -> None:
        """
        A transport request arriving on an open connection after shutdown
        began is answered with a JSON 503 and C{Connection: close}, and the
        connection is closed; nothing is written.
        """
        self.server.hub.endAll()
        before = self.server.store.buckets(SERIAL)
        self.send([clientObject(SHARED, 0, 0, {"a": 9})])
        lines, body = self.headersAndBody()
        self.assertEqual(lines[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertIn(b"Connection: close", lines)
        self.assertIn(b"Content-Type: application/json", lines)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.server.store.buckets(SERIAL), before)
        self.assertEqual(self.server.hub.total(), 0)

    def test_connectionLostForgetsHold(self) -> None:
        """
        A connection lost under a held subscribe leaves nothing in the hub.
        """
        self.send([clientObject(SHARED, 3, self.start - 10)])
        self.assertEqual(self.server.hub.count(SERIAL), 1)
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.server.hub.count(SERIAL), 0)
        self.assertEqual(self.server.clock.getDelayedCalls(), [])


class DisagreementTests(TransportTestCase):
    """
    Choices made where PROTOCOL.md's sources disagree, and isolation
    between devices.
    """

    def test_equalTimestampsNeverResendWhateverTheRevisions(self) -> None:
        """
        Equal timestamps never resend, whether the server's revision is
        above, below or equal to the device's, on every bucket type.

        PROTOCOL.md §11.2 and §18 item 1 (⚠ DISAGREE): no revision tiebreak.
        """
        ts = self.start - 10
        self.seed(
            Bucket(DEVICE, 100, ts, {"a": 1}),
            Bucket(SHARED, -5, ts, {"b": 1}),
            Bucket(SCHEDULE, 7, ts, {"ver": 2}),
        )
        answer, body = self.answered(
            self.subscribe(
                [
                    clientObject(DEVICE, 1, ts),
                    clientObject(SHARED, 99, ts),
                    clientObject(SCHEDULE, 7, ts),
                ],
                chunked=False,
            )
        )
        self.assertEqual(body, {"objects": []})

    def test_timestampsNeverMoveBackwards(self) -> None:
        """
        When the server's clock steps back, a change is still stamped after
        the bucket's current timestamp, so devices holding that timestamp
        receive it (buckets.nextTimestamp).
        """
        self.seed(Bucket(SHARED, 3, self.start, {"target_temperature": 20.0}))
        self.clock.advance(-3600)
        written = self.command(SHARED, {"target_temperature": 21.0})
        self.assertEqual(written.timestamp, self.start + 1)
        body = self.answered(
            self.put({"objects": [{"object_key": SHARED, "value": {"x": 1}}]})
        )[1]
        self.assertEqual(body["objects"][0]["object_timestamp"], self.start + 2)
        answer, body = self.answered(
            self.subscribe([clientObject(SHARED, 3, self.start)])
        )
        self.assertEqual(body["objects"][0]["object_timestamp"], self.start + 2)

    def test_timestampsNeverMoveBackwardsAfterAdoption(self) -> None:
        """
        A device timestamp adopted from a clock running ahead is still
        followed by a later timestamp on the next change.
        """
        ahead = self.start + 3_600_000
        self.seed(Bucket(SHARED, 3, self.start - 10, {}))
        self.held([clientObject(SHARED, 4, ahead, {"target_temperature": 19.0})])
        self.assertEqual(self.current(SHARED).timestamp, ahead)
        written = self.command(SHARED, {"target_temperature": 20.0})
        self.assertEqual(written.timestamp, ahead + 1)
        self.endHolds()

    def test_unchangedInlineUpdateKeepsRevisionAndTimestamp(self) -> None:
        """
        An inline subscribe update that changes nothing moves neither
        revision nor timestamp.

        PROTOCOL.md §18 item 21 (⚠ DISAGREE): the anchor's subscribe path
        bumps the timestamp anyway, which resends unchanged buckets.
        """
        device = Bucket(DEVICE, 6, self.start - 5000, {"a": 1, "b": 2})
        self.seed(device)
        self.clock.advance(10)
        answer, body = self.answered(
            self.subscribe([clientObject(DEVICE, 0, 0, {"a": 1})])
        )
        self.assertEqual(self.stored(DEVICE), device)
        self.assertEqual(body["objects"][0]["object_revision"], 6)
        self.assertEqual(body["objects"][0]["object_timestamp"], self.start - 5000)

    def test_putReceiptNeverCarriesValueEvenOnConflict(self) -> None:
        """
        Neither a changed, an unchanged nor a refused put answers a value.

        PROTOCOL.md §7.3 (⚠ DISAGREE).
        """
        self.seed(Bucket(SHARED, 9, self.start - 100, {"target_temperature": 20.0}))
        document = {
            "objects": [
                {"object_key": DEVICE, "value": {"a": 1}},
                {"object_key": SHARED, "if_object_revision": 1, "value": {"x": 1}},
                {"object_key": SCHEDULE, "value": {"ver": 2}},
            ]
        }
        for _ in range(2):
            answer, body = self.answered(self.put(document))
            self.assertEqual(len(body["objects"]), 3)
            for receipt in body["objects"]:
                self.assertEqual(list(receipt), RECEIPT_FIELDS)


class IsolationTests(TransportTestCase):
    """
    Device B naming device A's buckets gets nothing of A's and changes
    nothing of A's.
    """

    def setUp(self) -> None:
        super().setUp()
        self.theirs = [
            Bucket(
                f"shared.{SERIAL}", 5, self.start - 10, {"target_temperature": 21.0}
            ),
            Bucket(f"device.{SERIAL}", 6, self.start - 10, {"postal_code": "94043"}),
            Bucket(f"schedule.{SERIAL}", 7, self.start - 10, {"ver": 2}),
            Bucket(f"device_alert_dialog.{SERIAL}", 1, self.start - 10, {"x": 1}),
        ]
        self.seed(*self.theirs)
        owner = "homeowner"
        self.server.store.write(
            [
                RecordWrite("owner", SERIAL, {"user": owner}),
                BucketWrite(
                    "", Bucket(f"user.{owner}", 1, self.start - 10, {"name": owner})
                ),
                BucketWrite(
                    "",
                    Bucket(
                        f"structure.{owner}",
                        1,
                        self.start - 10,
                        {"name": "Home", "devices": [f"device.{SERIAL}"]},
                    ),
                ),
            ]
        )
        self.keys = [bucket.key for bucket in self.theirs] + [
            f"user.{owner}",
            f"structure.{owner}",
        ]
        self.before = self.snapshot()

    def assertNothingOfTheirs(self, body: bytes) -> None:
        self.assertNotIn(SERIAL.encode(), body)
        self.assertNotIn(b"homeowner", body)

    def test_subscribeGetsNothing(self) -> None:
        """
        A subscribe by B naming A's buckets with timestamp 0 is answered
        without any of them, changes nothing, and a change to A's buckets is
        not pushed to B's held subscribe.
        """
        objects = [clientObject(key, 0, 0) for key in self.keys]
        answer, body = self.answered(
            self.subscribe(objects, serial=OTHER_SERIAL, chunked=False)
        )
        self.assertEqual(body, {"objects": []})
        chunked = self.held(objects, serial=OTHER_SERIAL)
        self.assertEqual(self.snapshot(), self.before)
        self.assertEqual(self.server.hub.count(OTHER_SERIAL), 1)
        self.command(SHARED, {"target_temperature": 30.0})
        self.stub.flush()
        self.assertEqual(chunked.chunks, [])
        self.endHolds()
        self.assertEqual(chunked.chunks, [])

    def test_subscribeInlineUpdateChangesNothing(self) -> None:
        """
        Inline updates and "newer" values B sends for A's buckets change
        nothing and answer nothing of A's.
        """
        objects = [clientObject(key, 0, 0, {"hijacked": True}) for key in self.keys]
        objects += [
            clientObject(key, 99, self.start + 10_000, {"hijacked": True})
            for key in self.keys[:1]
        ]
        answer, body = self.answered(
            self.subscribe(objects, serial=OTHER_SERIAL, chunked=False)
        )
        self.assertNothingOfTheirs(b"".join(answer.chunks))
        self.assertEqual(self.snapshot(), self.before)

    def test_putChangesNothing(self) -> None:
        """
        A put by B to A's buckets (both forms) is answered without receipts
        for them and changes nothing.
        """
        keyed = {key: {"object_key": key, "hijacked": True} for key in self.keys}
        arrayed = {
            "objects": [
                {"object_key": key, "value": {"hijacked": True}} for key in self.keys
            ]
        }
        documents: list[Mapping[str, Any]] = [keyed, arrayed]
        for document in documents:
            answer, body = self.answered(self.put(document, serial=OTHER_SERIAL))
            self.assertEqual(answer.response.code, 200)
            self.assertEqual(body, {"objects": []})
        self.assertEqual(self.snapshot(), self.before)

    def test_ownBucketsOfSameTypeStillWork(self) -> None:
        """
        B's own buckets in the same request are applied while A's are not.
        """
        mine = f"shared.{OTHER_SERIAL}"
        body = self.answered(
            self.put(
                {
                    "objects": [
                        {"object_key": SHARED, "value": {"hijacked": True}},
                        {"object_key": mine, "value": {"target_temperature": 19.0}},
                    ]
                },
                serial=OTHER_SERIAL,
            )
        )[1]
        self.assertEqual([o["object_key"] for o in body["objects"]], [mine])
        self.assertEqual(self.server.store.buckets(SERIAL), self.before[SERIAL])
        self.assertEqual(
            self.current(mine, OTHER_SERIAL).value,
            {"target_temperature": 19.0},
        )


class KnownDeviceTests(SynchronousTestCase):
    """
    L{DeviceState.isKnown} answers what membership in
    L{DeviceState.knownSerials} would, without listing every device.
    """

    def test_isKnownAgreesWithKnownSerials(self) -> None:
        """
        A device with buckets and a device with only an owner are known; a
        serial with neither, one whose buckets were all deleted, and the
        global scope are not.
        """
        server = makeServer()
        owned = "02AA01AC0000000003"
        emptied = "02AA01AC0000000004"
        server.seed(SERIAL, Bucket(SHARED, 1, 1000, {"name": "Hall"}))
        server.seed(emptied, Bucket(f"shared.{emptied}", 1, 1000, {}))
        server.store.deleteScope(emptied)
        server.store.write([RecordWrite(OWNER_RECORD, owned, {"user": "user_1"})])
        server.seed("", Bucket("structure.default", 1, 1000, {}))
        candidates = [SERIAL, owned, emptied, OTHER_SERIAL, ""]
        self.assertEqual(
            [s for s in candidates if server.state.membership.isKnown(s)],
            [SERIAL, owned],
        )
        self.assertEqual(
            [s for s in candidates if server.state.membership.isKnown(s)],
            [s for s in candidates if s in server.state.membership.knownSerials()],
        )
