# -*- test-case-name: tests.test_hub -*-
"""
Tests for L{nestproto.hub.SubscriberHub}: held subscribes, pushes, the
hold policies (the v7 batch window, end-on-change, one bucket per answer),
the hold timeout, the per-device limit and replay.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from nestproto.buckets import Bucket
from nestproto.hub import (
    BATCH_SECONDS,
    BATCHED,
    HOLD_SECONDS,
    MAX_SUBSCRIPTIONS_PER_DEVICE,
    BatchWindow,
    EndOnChange,
    IHoldPolicy,
    OneBucketPerAnswer,
    Reaction,
    ReplayFilter,
    SubscriberHub,
)

SERIAL = "02AA01AC0000000001"
OTHER_SERIAL = "02AA01AC0000000002"
SHARED = Bucket(f"shared.{SERIAL}", 2, 1000, {"target_temperature": 21.0})
DEVICE = Bucket(f"device.{SERIAL}", 5, 1000, {"current_humidity": 40})


class Recorder:
    """
    A deliver that records each batch, and how often the answer was opened
    (headers at once), or fails once told to.
    """

    def __init__(self) -> None:
        self.batches: list[list[Bucket]] = []
        self.opened = 0
        self.gone = False

    def __call__(self, batch: Sequence[Bucket]) -> None:
        if self.gone:
            raise ConnectionLost("subscriber left")
        if not batch:
            self.assertNothingYet()
            self.opened += 1
            return
        self.batches.append(list(batch))

    def assertNothingYet(self) -> None:
        if self.opened or self.batches:
            raise AssertionError("headers sent after the answer began")


def keepAll(kept: Sequence[Bucket]) -> list[Bucket]:
    return list(kept)


def keepNone(kept: Sequence[Bucket]) -> list[Bucket]:
    return []


class HubTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = SubscriberHub(self.clock)

    def hold(
        self,
        serial: str = SERIAL,
        replayFilter: ReplayFilter = keepAll,
        policy: IHoldPolicy = BATCHED,
    ) -> tuple[Deferred[None], Recorder]:
        recorder = Recorder()
        held = self.hub.hold(serial, recorder, replayFilter, policy)
        assert held is not None
        return held, recorder

    def assertClean(self) -> None:
        self.assertEqual(self.hub.total(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HoldTests(HubTestCase):
    """L{SubscriberHub.hold}: timeouts, cancellation and the limit."""

    def test_defaults(self) -> None:
        """
        The defaults are the protocol's: a 290 s hold, a 3 s batch window
        for v7 with headers at once, 100 subscribes per device
        (PROTOCOL.md §6.4, §12).
        """
        self.assertEqual(
            (self.hub.holdSeconds, BATCHED.batchSeconds, self.hub.maxPerDevice),
            (290.0, 3.0, 100),
        )
        self.assertEqual((BATCHED.headersAtOnce, BATCHED.holdSeconds), (True, None))
        self.assertEqual(
            (HOLD_SECONDS, BATCH_SECONDS, MAX_SUBSCRIPTIONS_PER_DEVICE),
            (290.0, 3.0, 100),
        )

    def test_holdTimeout(self) -> None:
        """
        An idle subscribe ends with C{None} when the hold time is over, and
        not before; nothing is delivered and nothing is left.
        """
        held, recorder = self.hold()
        self.assertEqual(self.hub.count(SERIAL), 1)
        self.clock.advance(HOLD_SECONDS - 0.001)
        self.assertNoResult(held)
        self.clock.advance(0.001)
        self.assertIsNone(self.successResultOf(held))
        self.assertEqual(recorder.batches, [])
        self.assertClean()

    def test_holdSecondsConfigurable(self) -> None:
        """The hold time is the hub's C{holdSeconds}."""
        hub = SubscriberHub(self.clock, holdSeconds=10.0)
        held = hub.hold(SERIAL, Recorder(), keepAll, BATCHED)
        assert held is not None
        self.clock.advance(9.999)
        self.assertNoResult(held)
        self.clock.advance(0.001)
        self.successResultOf(held)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelForgetsAtOnce(self) -> None:
        """
        Cancelling a held subscribe (the client left) removes it and its
        timer at once; a later push does not reach it.
        """
        held, recorder = self.hold()
        held.cancel()
        self.failureResultOf(held, CancelledError)
        self.assertClean()
        self.assertEqual(self.hub.push(SERIAL, [SHARED]), 0)
        self.assertEqual(recorder.batches, [])
        self.assertEqual(self.hub.undelivered(SERIAL), [])

    def test_cancelDuringBatchWindow(self) -> None:
        """Cancelling during the batch window also removes the batch timer."""
        held, recorder = self.hold()
        self.hub.push(SERIAL, [SHARED])
        held.cancel()
        self.failureResultOf(held, CancelledError)
        self.assertClean()

    def test_cancelOneOfTwo(self) -> None:
        """Cancelling one subscribe of a device leaves the other held."""
        first, _ = self.hold()
        second, recorder = self.hold()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(self.hub.count(SERIAL), 1)
        self.assertEqual(self.hub.push(SERIAL, [SHARED]), 1)
        self.assertEqual(recorder.batches, [[SHARED]])
        self.clock.advance(BATCH_SECONDS)
        self.successResultOf(second)
        self.assertClean()

    def test_limitPerDevice(self) -> None:
        """
        A device may hold 100 subscribes; the 101st is refused with C{None}
        and changes nothing; another device is unaffected.
        """
        holds = [self.hold()[0] for _ in range(MAX_SUBSCRIPTIONS_PER_DEVICE)]
        self.assertIsNone(self.hub.hold(SERIAL, Recorder(), keepAll, BATCHED))
        self.assertEqual(self.hub.count(SERIAL), MAX_SUBSCRIPTIONS_PER_DEVICE)
        other, _ = self.hold(OTHER_SERIAL)
        self.assertEqual(self.hub.total(), MAX_SUBSCRIPTIONS_PER_DEVICE + 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), len(holds) + 1)
        holds[0].cancel()
        self.failureResultOf(holds[0], CancelledError)
        self.assertIsNotNone(self.hub.hold(SERIAL, Recorder(), keepAll, BATCHED))
        self.clock.advance(HOLD_SECONDS)
        self.assertClean()
        self.successResultOf(other)

    def test_limitZero(self) -> None:
        """A hub allowing no subscribes refuses each and keeps no entry."""
        hub = SubscriberHub(self.clock, maxPerDevice=0)
        self.assertIsNone(hub.hold(SERIAL, Recorder(), keepAll, BATCHED))
        self.assertEqual(hub.total(), 0)
        self.assertEqual(hub.count(SERIAL), 0)

    def test_resubscribeFromCallback(self) -> None:
        """
        A subscribe made while the previous one ends (from its callback) is
        held normally.
        """
        held, _ = self.hold()
        again: list[Deferred[None] | None] = []
        held.addCallback(
            lambda ignored: again.append(
                self.hub.hold(SERIAL, Recorder(), keepAll, BATCHED)
            )
        )
        self.clock.advance(HOLD_SECONDS)
        self.assertEqual(self.hub.count(SERIAL), 1)
        self.assertNoResult(again[0])
        self.clock.advance(HOLD_SECONDS)
        self.assertClean()


class PushTests(HubTestCase):
    """L{SubscriberHub.push} and the batch window."""

    def test_pushDeliversToEveryHold(self) -> None:
        """
        A push reaches every held subscribe of the device, and only those.
        """
        first, a = self.hold()
        second, b = self.hold()
        other, c = self.hold(OTHER_SERIAL)
        self.assertEqual(self.hub.push(SERIAL, [SHARED, DEVICE]), 2)
        self.assertEqual(a.batches, [[SHARED, DEVICE]])
        self.assertEqual(b.batches, [[SHARED, DEVICE]])
        self.assertEqual(c.batches, [])
        self.clock.advance(HOLD_SECONDS)
        self.assertClean()

    def test_pushWithoutHoldKeepsNothing(self) -> None:
        """
        A push to a device with nothing held reaches nobody and is not
        queued: the next subscribe finds the change by its timestamp.
        """
        self.assertEqual(self.hub.push(SERIAL, [SHARED]), 0)
        self.assertEqual(self.hub.undelivered(SERIAL), [])
        held, recorder = self.hold()
        self.assertEqual(recorder.batches, [])
        held.cancel()
        self.failureResultOf(held, CancelledError)

    def test_emptyPushIsNothing(self) -> None:
        """An empty push delivers nothing and does not start a batch window."""
        held, recorder = self.hold()
        self.assertEqual(self.hub.push(SERIAL, []), 0)
        self.assertEqual(recorder.batches, [])
        self.clock.advance(BATCH_SECONDS)
        self.assertNoResult(held)
        self.clock.advance(HOLD_SECONDS - BATCH_SECONDS)
        self.successResultOf(held)
        self.assertClean()

    def test_batchWindowEndsThreeSecondsAfterPush(self) -> None:
        """
        After a push the subscribe stays open 3 s for more pushes, then
        ends; the hold timer no longer applies.
        """
        held, recorder = self.hold()
        self.clock.advance(100)
        self.hub.push(SERIAL, [SHARED])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(BATCH_SECONDS - 0.001)
        self.assertNoResult(held)
        self.clock.advance(0.001)
        self.successResultOf(held)
        self.assertClean()

    def test_batchWindowResetsOnEachPush(self) -> None:
        """
        Each push restarts the batch window; every push is its own batch.
        """
        held, recorder = self.hold()
        for value in range(5):
            self.hub.push(SERIAL, [Bucket(SHARED.key, 3 + value, 2000 + value, {})])
            self.clock.advance(BATCH_SECONDS - 0.5)
            self.assertNoResult(held)
        self.clock.advance(0.5)
        self.successResultOf(held)
        self.assertEqual([b[0].revision for b in recorder.batches], [3, 4, 5, 6, 7])
        self.assertClean()

    def test_batchWindowNearHoldEnd(self) -> None:
        """
        A push just before the hold time ends still gets its full batch
        window.
        """
        held, recorder = self.hold()
        self.clock.advance(HOLD_SECONDS - 1)
        self.hub.push(SERIAL, [SHARED])
        self.clock.advance(1)
        self.assertNoResult(held)
        self.clock.advance(BATCH_SECONDS - 1)
        self.successResultOf(held)
        self.assertClean()

    def test_failedDeliverEndsOnlyThatHold(self) -> None:
        """
        A deliver that raises ends its own subscribe; the others still get
        the push and are counted.
        """
        failing, gone = self.hold()
        working, recorder = self.hold()
        gone.gone = True
        self.assertEqual(self.hub.push(SERIAL, [SHARED]), 1)
        self.successResultOf(failing)
        self.assertEqual(self.hub.count(SERIAL), 1)
        self.assertEqual(recorder.batches, [[SHARED]])
        self.clock.advance(BATCH_SECONDS)
        self.successResultOf(working)
        self.assertClean()


class ReplayTests(HubTestCase):
    """Pushes that could not be written, replayed to the next hold."""

    def failedPush(self, *pushed: Bucket) -> None:
        held, recorder = self.hold()
        recorder.gone = True
        self.assertEqual(self.hub.push(SERIAL, list(pushed)), 0)
        self.successResultOf(held)

    def test_failedPushKept(self) -> None:
        """
        A push whose deliver raised is kept for the device, and the failed
        subscribe is ended with its timer.
        """
        self.failedPush(SHARED, DEVICE)
        self.assertEqual(
            sorted(self.hub.undelivered(SERIAL), key=lambda b: b.key),
            [DEVICE, SHARED],
        )
        self.assertEqual(self.hub.undelivered(OTHER_SERIAL), [])
        self.assertClean()

    def test_replayedAsFirstBatchOfNextHold(self) -> None:
        """
        The next held subscribe of the device gets what its replay filter
        keeps of the kept pushes at once, as its first batch, and then the
        batch window applies.
        """
        self.failedPush(SHARED, DEVICE)
        seen: list[list[Bucket]] = []

        def onlyShared(kept: Sequence[Bucket]) -> list[Bucket]:
            seen.append(list(kept))
            return [b for b in kept if b.key == SHARED.key]

        held, recorder = self.hold(replayFilter=onlyShared)
        self.assertEqual(sorted(seen[0], key=lambda b: b.key), [DEVICE, SHARED])
        self.assertEqual(recorder.batches, [[SHARED]])
        self.assertEqual(self.hub.undelivered(SERIAL), [])
        self.clock.advance(BATCH_SECONDS)
        self.successResultOf(held)
        self.assertClean()

    def test_filteredOutReplayIsDropped(self) -> None:
        """
        What the replay filter drops is gone: the hold is quiet and a later
        hold gets nothing.
        """
        self.failedPush(SHARED)
        held, recorder = self.hold(replayFilter=keepNone)
        self.assertEqual(recorder.batches, [])
        self.assertEqual(self.hub.undelivered(SERIAL), [])
        self.clock.advance(BATCH_SECONDS)
        self.assertNoResult(held)
        held.cancel()
        self.failureResultOf(held, CancelledError)
        self.assertClean()

    def test_replayOnlyToSameDevice(self) -> None:
        """Another device's hold does not take the kept pushes."""
        self.failedPush(SHARED)
        held, recorder = self.hold(OTHER_SERIAL)
        self.assertEqual(recorder.batches, [])
        self.assertEqual(self.hub.undelivered(SERIAL), [SHARED])
        held.cancel()
        self.failureResultOf(held, CancelledError)

    def test_laterFailureOfSameKeyReplaces(self) -> None:
        """
        Two failed pushes of one bucket keep only the later copy.
        """
        newer = Bucket(SHARED.key, 3, 2000, {"target_temperature": 22.0})
        self.failedPush(SHARED)
        self.failedPush(newer)
        self.assertEqual(self.hub.undelivered(SERIAL), [newer])

    def test_failedReplayKeptAgain(self) -> None:
        """
        A replay that cannot be written either is kept again and the hold
        ends at once.
        """
        self.failedPush(SHARED)
        recorder = Recorder()
        recorder.gone = True
        held = self.hub.hold(SERIAL, recorder, keepAll, BATCHED)
        assert held is not None
        self.successResultOf(held)
        self.assertEqual(self.hub.undelivered(SERIAL), [SHARED])
        self.assertClean()


class BatchWindowTests(HubTestCase):
    """
    L{BatchWindow}, the v7 policy: headers at once, a chunk per push, the
    answer ended once pushes stop for the window (PushTests has the window
    itself).
    """

    def test_provides(self) -> None:
        """Every policy provides L{IHoldPolicy}."""
        for policy in [
            BATCHED,
            EndOnChange(frozenset({SHARED.key})),
            OneBucketPerAnswer(),
        ]:
            verifyObject(IHoldPolicy, policy)

    def test_reaction(self) -> None:
        """A push is delivered whole, and the answer may end in 3 s."""
        self.assertEqual(
            BATCHED.react([SHARED, DEVICE]), Reaction((SHARED, DEVICE), 3.0)
        )
        self.assertEqual(BatchWindow(1.5).react([SHARED]), Reaction((SHARED,), 1.5))

    def test_headersAtOnce(self) -> None:
        """
        The answer is opened (headers only) as the hold begins, before any
        push or replay, so the device may sleep (PROTOCOL.md §6.3).
        """
        held, recorder = self.hold()
        self.assertEqual((recorder.opened, recorder.batches), (1, []))
        self.hub.push(SERIAL, [SHARED])
        self.hub.push(SERIAL, [DEVICE])
        self.assertEqual(recorder.opened, 1)
        self.assertEqual(recorder.batches, [[SHARED], [DEVICE]])
        self.clock.advance(BATCH_SECONDS)
        self.successResultOf(held)
        self.assertClean()

    def test_openingFails(self) -> None:
        """
        A client gone before the headers could go ends its hold at once,
        with its timer; nothing is kept for it.
        """
        recorder = Recorder()
        recorder.gone = True
        held = self.hub.hold(SERIAL, recorder, keepAll, BATCHED)
        assert held is not None
        self.successResultOf(held)
        self.assertEqual(self.hub.undelivered(SERIAL), [])
        self.assertClean()


class EndOnChangeTests(HubTestCase):
    """
    L{EndOnChange}, the key-list device policy (PROTOCOL.md §20.3): headers
    at once; a change of a watched key ends the answer with no body.
    """

    policy = EndOnChange(frozenset({SHARED.key}))

    def test_changeEndsWithNoBody(self) -> None:
        """
        The hold sends its headers at once; a push of a watched key ends it
        at once, writing nothing, and counts as taken; nothing is left.
        """
        held, recorder = self.hold(policy=self.policy)
        self.assertEqual(recorder.opened, 1)
        self.assertNoResult(held)
        self.clock.advance(100)
        self.assertEqual(self.hub.push(SERIAL, [DEVICE, SHARED]), 1)
        self.assertIsNone(self.successResultOf(held))
        self.assertEqual(recorder.batches, [])
        self.assertEqual(self.hub.undelivered(SERIAL), [])
        self.assertClean()

    def test_otherKeysIgnored(self) -> None:
        """
        A push of keys the subscribe does not list leaves it held, is not
        counted, and the hold ends at its timeout with no body.
        """
        held, recorder = self.hold(policy=self.policy)
        self.assertEqual(self.hub.push(SERIAL, [DEVICE]), 0)
        self.clock.advance(BATCH_SECONDS)
        self.assertNoResult(held)
        self.clock.advance(HOLD_SECONDS - BATCH_SECONDS)
        self.successResultOf(held)
        self.assertEqual(recorder.batches, [])
        self.assertClean()

    def test_shorterHold(self) -> None:
        """
        The policy may hold shorter than the hub (an app's
        C{X-nl-subscribe-timeout}), never longer.
        """
        held, _ = self.hold(policy=EndOnChange(frozenset({SHARED.key}), 8.0))
        self.clock.advance(7.999)
        self.assertNoResult(held)
        self.clock.advance(0.001)
        self.successResultOf(held)
        longer, _ = self.hold(policy=EndOnChange(frozenset(), HOLD_SECONDS * 2))
        self.clock.advance(HOLD_SECONDS)
        self.successResultOf(longer)
        self.assertClean()

    def test_cancel(self) -> None:
        """Cancelling (the client left) leaves nothing; a push reaches nobody."""
        held, recorder = self.hold(policy=self.policy)
        held.cancel()
        self.failureResultOf(held, CancelledError)
        self.assertClean()
        self.assertEqual(self.hub.push(SERIAL, [SHARED]), 0)

    def test_keptPushEndsNextHold(self) -> None:
        """
        A push an earlier subscribe missed, of a watched key, ends the next
        hold at once: the device's next poll fetches the bucket.
        """
        failing, gone = self.hold()
        gone.gone = True
        self.hub.push(SERIAL, [SHARED])
        self.successResultOf(failing)
        held, recorder = self.hold(policy=self.policy)
        self.successResultOf(held)
        self.assertEqual((recorder.opened, recorder.batches), (1, []))
        self.assertEqual(self.hub.undelivered(SERIAL), [])
        self.assertClean()

    def test_besideV7(self) -> None:
        """
        A key-list hold and a v7 hold of one device each answer as their
        own policy says.
        """
        keylist, quiet = self.hold(policy=self.policy)
        v7, recorder = self.hold()
        self.assertEqual(self.hub.push(SERIAL, [SHARED]), 2)
        self.successResultOf(keylist)
        self.assertEqual(quiet.batches, [])
        self.assertEqual(recorder.batches, [[SHARED]])
        self.assertNoResult(v7)
        self.clock.advance(BATCH_SECONDS)
        self.successResultOf(v7)
        self.assertClean()


class OneBucketPerAnswerTests(HubTestCase):
    """
    L{OneBucketPerAnswer} (PROTOCOL.md §20.3): nothing while holding; the
    first watched bucket pushed is the whole answer.
    """

    def test_oneBucketThenEnd(self) -> None:
        """
        No headers go out while holding; a push of several buckets writes
        only the first watched one and ends the answer at once.
        """
        policy = OneBucketPerAnswer(frozenset({SHARED.key}))
        held, recorder = self.hold(policy=policy)
        self.assertEqual(recorder.opened, 0)
        self.assertEqual(self.hub.push(SERIAL, [DEVICE, SHARED]), 1)
        self.successResultOf(held)
        self.assertEqual(recorder.batches, [[SHARED]])
        self.assertClean()

    def test_anyKey(self) -> None:
        """Watching every key, the first bucket pushed is the answer."""
        held, recorder = self.hold(policy=OneBucketPerAnswer())
        self.hub.push(SERIAL, [DEVICE, SHARED])
        self.successResultOf(held)
        self.assertEqual(recorder.batches, [[DEVICE]])
        self.assertClean()

    def test_otherKeysIgnored(self) -> None:
        """
        Unwatched keys do not answer; the hold times out with nothing
        written at all.
        """
        policy = OneBucketPerAnswer(frozenset({SHARED.key}), holdSeconds=8.0)
        held, recorder = self.hold(policy=policy)
        self.assertEqual(self.hub.push(SERIAL, [DEVICE]), 0)
        self.clock.advance(8.0)
        self.successResultOf(held)
        self.assertEqual((recorder.opened, recorder.batches), (0, []))
        self.assertClean()

    def test_failedWriteKept(self) -> None:
        """
        A bucket that could not be written is kept, and is the answer of
        the device's next hold at once.
        """
        held, recorder = self.hold(policy=OneBucketPerAnswer())
        recorder.gone = True
        self.assertEqual(self.hub.push(SERIAL, [SHARED]), 0)
        self.successResultOf(held)
        self.assertEqual(self.hub.undelivered(SERIAL), [SHARED])
        again, replayed = self.hold(policy=OneBucketPerAnswer())
        self.successResultOf(again)
        self.assertEqual(replayed.batches, [[SHARED]])
        self.assertClean()

    def test_cancel(self) -> None:
        """Cancelling leaves nothing behind."""
        held, _ = self.hold(policy=OneBucketPerAnswer())
        held.cancel()
        self.failureResultOf(held, CancelledError)
        self.assertClean()

    def test_endAll(self) -> None:
        """At shutdown every policy's holds end, with no timer left."""
        holds = [
            self.hold(policy=policy)[0]
            for policy in [BATCHED, EndOnChange(frozenset()), OneBucketPerAnswer()]
        ]
        self.hub.endAll()
        for held in holds:
            self.successResultOf(held)
        self.assertClean()


class EndAllTests(HubTestCase):
    """L{SubscriberHub.endAll}, at shutdown."""

    def test_endAll(self) -> None:
        """
        Every held subscribe of every device ends cleanly at once, with all
        timers, including those in a batch window.
        """
        holds = [self.hold()[0] for _ in range(3)] + [self.hold(OTHER_SERIAL)[0]]
        self.hub.push(OTHER_SERIAL, [SHARED])
        self.hub.endAll()
        for held in holds:
            self.assertIsNone(self.successResultOf(held))
        self.assertClean()

    def test_endAllEmpty(self) -> None:
        """Ending nothing is harmless."""
        self.hub.endAll()
        self.assertClean()

    def test_closed(self) -> None:
        """A hub is open until L{SubscriberHub.endAll}, closed after it."""
        self.assertFalse(self.hub.closed)
        self.hub.endAll()
        self.assertTrue(self.hub.closed)
