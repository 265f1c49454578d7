# -*- test-case-name: tests.test_conformance_teeth -*-
"""
The property tests have teeth: each invariant of the conformance machine,
the bucket properties and the fuzzers fails on a server broken in the way
that invariant is there to catch.

Each test patches one deliberate defect into nestproto (trial's C{patch}
restores it afterwards), runs the property test with few examples and a
fixed seed, and asserts that it fails, naming the invariant.
"""

from __future__ import annotations

from typing import Any

from attrs import evolve
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from nestproto import buckets, hub, router
from nestproto.buckets import Bucket
from nestproto.control.api import ControlAPI
from nestproto.device import api as deviceAPI
from nestproto.device import wire
from nestproto.errors import BadBody
from nestproto.hub import SubscriberHub
from nestproto.membership import Membership
from nestproto.model import Commit
from nestproto.state import DeviceState
from nestproto.store import SQLiteStore

from . import test_buckets_properties, test_conformance, test_fuzz
from .strategies import buckets as bucketStrategies
from .strategies import bucketValues
from .test_buckets_properties import nows as propertyNows
from .test_conformance import ConformanceMachine

#: Few examples, a fixed seed and no shrinking: a broken server must be
#: caught quickly and every run alike.
TEETH = settings(
    max_examples=60,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    verbosity=Verbosity.quiet,
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


#: The checks of a subscribe's answer against the model: a defect that
#: changes what a subscribe answers may surface through any of them first.
ANSWER = (
    "answer matches the model",
    "a subscribe with nothing newer is held",
    "an answer with data ends at once",
    "disable-defer-window only with a setpoint in the answer (§6.3)",
)


class MachineTeethTests(SynchronousTestCase):
    """
    The conformance machine fails on each kind of broken server.
    """

    def assertMachineFails(self, *invariants: str, examples: int = 30) -> None:
        """
        Run the machine and assert that it fails on one of C{invariants}.
        """
        try:
            run_state_machine_as_test(
                ConformanceMachine, settings=settings(TEETH, max_examples=examples)
            )
        except AssertionError as e:
            message = str(e)
        else:
            self.fail(f"the machine passed; expected a failure of {invariants}")
        self.assertTrue(
            any(message.startswith(invariant) for invariant in invariants),
            message[:500],
        )

    def test_healthyServerPasses(self) -> None:
        """
        With nothing broken, the same settings pass: the failures below
        come from the defects, not from the settings.
        """
        run_state_machine_as_test(
            ConformanceMachine, settings=settings(TEETH, max_examples=30)
        )

    def test_mergeMovesWithoutChange(self) -> None:
        """
        A merge that moves revision and timestamp when nothing changed
        breaks "move only when the value changed" (§11.5).
        """

        def merge(bucket: Bucket, fields: Any, nowMs: int) -> Bucket:
            return buckets.changed(bucket, {**bucket.value, **fields}, nowMs)

        self.patch(buckets, "merge", merge)
        self.assertMachineFails(
            "revision and timestamp move only when the value changed",
            "put receipts match the model",
            *ANSWER,
        )

    def test_putAnswerEchoesValue(self) -> None:
        """A put answer carrying values is caught (§7.3)."""
        renderObjects = wire.renderObjects

        def echoing(found: Any, withValues: bool = True) -> bytes:
            return renderObjects(found, True)

        self.patch(wire, "renderObjects", echoing)
        self.assertMachineFails("no value in a put answer")

    def test_fieldOrder(self) -> None:
        """Objects with the key before revision and timestamp are caught (§6.3)."""

        def keyFirst(bucket: Bucket, withValue: bool = True) -> dict[str, Any]:
            rendered: dict[str, Any] = {
                "object_key": bucket.key,
                "object_revision": bucket.revision,
                "object_timestamp": bucket.timestamp,
            }
            if withValue:
                rendered["value"] = bucket.value
            return rendered

        self.patch(wire, "objectJSON", keyFirst)
        self.assertMachineFails("field order")

    def test_hubKeepsCancelledWaiters(self) -> None:
        """
        A hub whose held subscribes ignore cancellation keeps a waiter for
        every dropped connection.
        """

        def deafDeferred(canceller: Any = None) -> Deferred[None]:
            return Deferred()

        self.patch(hub, "Deferred", deafDeferred)
        self.assertMachineFails("the hub holds exactly the live subscribes")

    def test_timerOutlivesRequest(self) -> None:
        """
        A hub that forgets a dropped subscribe but not its hold timer leaves
        a delayed call behind.
        """

        def forget(self: SubscriberHub, subscription: Any) -> None:
            live = self._subscriptions.get(subscription.serial, [])
            if subscription in live:
                live.remove(subscription)
            if not live:
                self._subscriptions.pop(subscription.serial, None)

        self.patch(SubscriberHub, "_forget", forget)
        self.assertMachineFails(
            "one timer per held subscribe, none outliving its request"
        )

    def test_deviceReadsAnotherDevicesBucket(self) -> None:
        """
        A state that places C{shared.A} in A's scope whoever asks lets
        device B read it: caught as an isolation breach.
        """
        scopeFor = Membership.scopeFor

        def leaky(self: Membership, serial: str, key: str) -> str | None:
            bucketType, bucketId = buckets.splitKey(key)
            if bucketType in buckets.SERIAL_KEYED_TYPES:
                return bucketId
            return scopeFor(self, serial, key)

        self.patch(Membership, "scopeFor", leaky)
        self.assertMachineFails(
            "isolation: a device sees only its own and linked buckets",
            "put receipts match the model",
            # Device B wrote into A's scope with a subscribe or put.
            "the store holds what the model says",
            *ANSWER,
        )

    def test_resendOnEqualTimestamps(self) -> None:
        """
        Sending buckets whose timestamp equals the device's (the revision
        tiebreak of §18 item 1, or any ">=") is a spurious resend.
        """

        def eager(clientTimestamp: int, serverTimestamp: int) -> bool:
            return clientTimestamp == 0 or serverTimestamp >= clientTimestamp

        self.patch(buckets, "serverIsNewer", eager)
        self.assertMachineFails("no spurious resend", *ANSWER)

    def test_structureForcedEveryTime(self) -> None:
        """
        Forcing the structure on every subscribe, not once per process
        (§6.2 step 6), resends what the device holds.
        """
        newerFor = DeviceState._newerFor

        def forgetful(self: DeviceState, serial: str, clientTimestamps: Any) -> Any:
            self._structureSent.clear()
            return newerFor(self, serial, clientTimestamps)

        self.patch(DeviceState, "_newerFor", forgetful)
        self.assertMachineFails("convergence: subscribing settles", *ANSWER)

    def test_putPushedBack(self) -> None:
        """A put pushed to the device's held subscribes comes back (§7.2 step 6)."""
        pushCommit = SubscriberHub.pushCommit

        def echoing(self: SubscriberHub, commit: Commit, seeing: Any) -> None:
            pushCommit(self, evolve(commit, origin=None), seeing)

        self.patch(SubscriberHub, "pushCommit", echoing)
        self.assertMachineFails(
            "nothing pushed unexpectedly",
            # The echo opens a batch window the machine does not expect, so
            # the timer check may see it first.
            "one timer per held subscribe, none outliving its request",
        )

    def test_acknowledgedPutLost(self) -> None:
        """
        A store that acknowledges writes it never commits loses them at
        the restart.
        """
        self.patch(SQLiteStore, "_commitToDisk", lambda self, *batch: None)
        self.assertMachineFails(
            "acknowledged writes survive", "the store holds what the model says"
        )

    def test_timestampsStandStill(self) -> None:
        """
        Changes that keep the old timestamp when the clock has not moved
        never reach a device that holds the earlier change: caught by
        convergence even when the model shares the defect.
        """

        def standStill(bucket: Bucket, nowMs: int) -> int:
            return max(nowMs, bucket.timestamp)

        def modelStandStill(copy: Any, value: dict[str, Any], nowMs: int) -> Any:
            revision = (
                buckets.INT32_MIN
                if copy.revision == buckets.INT32_MAX
                else copy.revision + 1
            )
            return test_conformance.Copy(revision, max(nowMs, copy.timestamp), value)

        self.patch(buckets, "nextTimestamp", standStill)
        self.patch(test_conformance, "afterChange", modelStandStill)
        self.assertMachineFails(
            "convergence: the device holds the server's copy",
            "convergence: subscribing settles",
            "no spurious resend",
        )

    def test_pushLost(self) -> None:
        """A hub that never pushes leaves held devices waiting: caught."""
        self.patch(SubscriberHub, "pushCommit", lambda self, commit, seeing: None)
        self.assertMachineFails("a command is pushed to every held device that sees it")


class BucketPropertyTeethTests(SynchronousTestCase):
    """
    The bucket property tests fail on broken rules. Each runs the property's
    own body under a fresh C{given} (hypothesis refuses to run one test
    function from two test case instances).
    """

    def test_mergeMovesWithoutChange(self) -> None:
        """An identical merge that moves revision and timestamp is caught."""

        def merge(bucket: Bucket, fields: Any, nowMs: int) -> Bucket:
            return buckets.changed(bucket, {**bucket.value, **fields}, nowMs)

        self.patch(buckets, "merge", merge)
        properties = test_buckets_properties.MergeTests

        @TEETH
        @given(bucketStrategies(), bucketValues(), propertyNows, propertyNows)
        def idempotent(bucket: Bucket, fields: Any, first: int, second: int) -> None:
            properties.test_idempotent.hypothesis.inner_test(  # type: ignore[attr-defined]
                self, bucket, fields, first, second
            )

        self.assertRaises(AssertionError, idempotent)

    def test_revisionTiebreak(self) -> None:
        """The revision tiebreak some sources describe is not §11.2's table."""

        def tiebreak(clientTimestamp: int, serverTimestamp: int) -> bool:
            return clientTimestamp == 0 or serverTimestamp >= clientTimestamp

        self.patch(buckets, "serverIsNewer", tiebreak)
        properties = test_buckets_properties.ServerIsNewerTests

        @TEETH
        @given(properties.timestamp, properties.timestamp)
        def table(clientTimestamp: int, serverTimestamp: int) -> None:
            properties.test_table.hypothesis.inner_test(  # type: ignore[attr-defined]
                self, clientTimestamp, serverTimestamp
            )

        self.assertRaises(AssertionError, table)


class FuzzTeethTests(SynchronousTestCase):
    """
    The fuzzers fail on a server that crashes, answers without JSON, or
    changes state on a refused request.
    """

    def assertFuzzFails(self) -> str:
        @TEETH
        @given(st.data())
        def fuzz(data: st.DataObject) -> None:
            test_fuzz.DeviceFuzzTests.test_transport.hypothesis.inner_test(self, data)  # type: ignore[attr-defined]

        try:
            fuzz()
        except AssertionError as e:
            return str(e)
        self.fail("the fuzzer passed on a broken server")

    def test_crash(self) -> None:
        """An unexpected exception (a 500) on put is caught."""

        def crash(body: bytes) -> Any:
            raise RuntimeError("broken")

        self.patch(deviceAPI, "V7", evolve(deviceAPI.V7, parsePut=crash))
        self.assertIn("500", self.assertFuzzFails())
        self.flushLoggedErrors(RuntimeError)

    def test_refusedRequestChangesState(self) -> None:
        """A put applied and then refused is caught."""
        put = DeviceState.put

        def applyThenRefuse(self: DeviceState, *args: Any) -> Deferred[Any]:
            def refuse(receipts: Any) -> Any:
                raise BadBody("refused after the fact")

            return put(self, *args).addCallback(refuse)

        self.patch(DeviceState, "put", applyThenRefuse)
        self.assertIn("refused after the fact", self.assertFuzzFails())

    def test_notJSON(self) -> None:
        """A refusal answered as text is caught."""
        jsonResponse = router.jsonResponse

        def text(request: Any, document: Any, status: int = 200) -> bytes:
            if status < 400:
                return jsonResponse(request, document, status)
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"text/plain")
            return b"no"

        self.patch(router, "jsonResponse", text)
        self.assertIn("text/plain", self.assertFuzzFails())

    def test_tokenIgnored(self) -> None:
        """A control port that forgets to check its token is caught."""
        self.patch(ControlAPI, "admit", lambda self, request, route: None)

        @settings(TEETH, max_examples=200)
        @given(st.data())
        def fuzz(data: st.DataObject) -> None:
            test_fuzz.fuzzControl(self, data)

        self.assertRaises(AssertionError, fuzz)
