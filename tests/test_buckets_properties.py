# -*- test-case-name: tests.test_buckets_properties -*-
"""
Properties of the versioning rules of L{nestproto.buckets} (PROTOCOL.md §11),
over generated buckets, fields and times.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nestproto import buckets
from nestproto.buckets import INT32_MAX, INT32_MIN, Bucket

from .strategies import START_MS, bucketValues, revisions
from .strategies import buckets as bucketStrategy

#: Times at which changes are applied: around the start, or before a
#: bucket's own timestamp (a clock stepped back).
nows = st.integers(0, START_MS + 10**9)


def revisionFollows(before: int, after: int) -> bool:
    """
    Whether C{after} is C{before} or later: revisions are int32 and wrap
    from the largest to the smallest (PROTOCOL.md §10), nowhere else.
    """
    return after >= before or (before == INT32_MAX and after == INT32_MIN)


def tableSaysSend(clientTimestamp: int, serverTimestamp: int) -> bool:
    """PROTOCOL.md §11.2's table, row by row."""
    if clientTimestamp == 0:
        return True
    if serverTimestamp == 0:
        return False
    if serverTimestamp > clientTimestamp:
        return True
    if serverTimestamp == clientTimestamp:
        return False
    return False


def subsetOf(value: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Fields already in C{value}, with the values they have there."""
    return st.sets(st.sampled_from(sorted(value)) if value else st.nothing()).map(
        lambda names: {name: value[name] for name in names}
    )


class MergeTests(SynchronousTestCase):
    """
    L{buckets.merge}: the device's put and inline update (§11.5).
    """

    @given(bucketStrategy(), bucketValues(), nows, nows)
    def test_idempotent(
        self, bucket: Bucket, fields: dict[str, Any], first: int, second: int
    ) -> None:
        """
        Merging the same fields twice is merging them once: the second
        merge, at any later time, returns the bucket unchanged.
        """
        once = buckets.merge(bucket, fields, first)
        self.assertIs(buckets.merge(once, fields, second), once)

    @given(st.data(), bucketStrategy(), nows)
    @example(
        data=None,
        bucket=Bucket("shared.02AA01AC0000000001", 4, START_MS, {"a": 1}),
        nowMs=START_MS + 5,
    )
    def test_unchangedMovesNothing(
        self, data: st.DataObject | None, bucket: Bucket, nowMs: int
    ) -> None:
        """
        Fields the bucket already holds, with the values it holds, leave
        revision, timestamp and value untouched.
        """
        fields = {} if data is None else data.draw(subsetOf(bucket.value))
        self.assertIs(buckets.merge(bucket, fields, nowMs), bucket)

    @given(bucketStrategy(), bucketValues(minSize=1), nows)
    def test_changeMovesRevisionAndTimestamp(
        self, bucket: Bucket, fields: dict[str, Any], nowMs: int
    ) -> None:
        """
        A merge that changes the value moves the revision by one (wrapping
        within int32) and the timestamp to now, or past the old timestamp
        when now is not past it.
        """
        merged = buckets.merge(bucket, fields, nowMs)
        expected = {**bucket.value, **fields}
        if expected == bucket.value:
            self.assertIs(merged, bucket)
            return
        self.assertEqual(merged.value, expected)
        wrapped = INT32_MIN if bucket.revision == INT32_MAX else bucket.revision + 1
        self.assertEqual(merged.revision, wrapped)
        self.assertEqual(merged.timestamp, max(nowMs, bucket.timestamp + 1))
        self.assertGreater(merged.timestamp, bucket.timestamp)

    @given(bucketStrategy(), bucketValues(), nows)
    def test_shallow(self, bucket: Bucket, fields: dict[str, Any], nowMs: int) -> None:
        """
        The merge is shallow: every field sent replaces the stored one
        whole, every field not sent survives, and the input is not mutated.
        """
        before = deepcopy(bucket.value)
        merged = buckets.merge(bucket, fields, nowMs)
        self.assertEqual(bucket.value, before)
        for name, value in merged.value.items():
            self.assertEqual(value, fields[name] if name in fields else before[name])
        self.assertEqual(set(merged.value), set(before) | set(fields))


class VersionMovesForwardTests(SynchronousTestCase):
    """
    No rule of L{buckets} moves a revision or timestamp back.
    """

    @given(
        bucketStrategy(),
        bucketValues(),
        nows,
        st.none() | revisions(),
        revisions(),
        st.integers(1, START_MS * 2),
    )
    def test_neverBack(
        self,
        bucket: Bucket,
        fields: dict[str, Any],
        nowMs: int,
        ifRevision: int | None,
        clientRevision: int,
        clientTimestamp: int,
    ) -> None:
        """
        merge, forceMerge, replace, conditionalMerge, clearPendingChange and
        adopt of a newer copy never lower the revision (except the int32
        wrap) or the timestamp.
        """
        results = [
            buckets.merge(bucket, fields, nowMs),
            buckets.forceMerge(bucket, fields, nowMs),
            buckets.replace(bucket, fields, nowMs),
            buckets.conditionalMerge(bucket, fields, ifRevision, nowMs)[0],
            buckets.clearPendingChange(bucket),
        ]
        if clientTimestamp > bucket.timestamp:
            results.append(
                buckets.adopt(bucket, fields, clientRevision, clientTimestamp)
            )
        for result in results:
            self.assertTrue(
                revisionFollows(bucket.revision, result.revision),
                (bucket.revision, result.revision),
            )
            self.assertGreaterEqual(result.timestamp, bucket.timestamp)

    @given(bucketStrategy(), bucketValues(), nows)
    def test_commandAlwaysMoves(
        self, bucket: Bucket, fields: dict[str, Any], nowMs: int
    ) -> None:
        """
        A command's write moves revision and timestamp even when the value
        stays the same (PROTOCOL.md §11.5), so it is always pushed.
        """
        for result in [
            buckets.forceMerge(bucket, fields, nowMs),
            buckets.replace(bucket, bucket.value, nowMs),
        ]:
            self.assertNotEqual(result.revision, bucket.revision)
            self.assertTrue(revisionFollows(bucket.revision, result.revision))
            self.assertGreater(result.timestamp, bucket.timestamp)

    @given(bucketStrategy(), bucketValues(minSize=1), revisions(), nows)
    def test_conditionalMismatchChangesNothing(
        self, bucket: Bucket, fields: dict[str, Any], ifRevision: int, nowMs: int
    ) -> None:
        """
        A put whose C{if_object_revision} is not the stored revision is
        refused and leaves the bucket as it was (§7.2 step 1); a matching
        one is an ordinary merge.
        """
        result, refused = buckets.conditionalMerge(bucket, fields, ifRevision, nowMs)
        if ifRevision == bucket.revision:
            self.assertFalse(refused)
            self.assertEqual(result, buckets.merge(bucket, fields, nowMs))
        else:
            self.assertTrue(refused)
            self.assertIs(result, bucket)

    @given(bucketStrategy())
    def test_clearPendingKeepsVersion(self, bucket: Bucket) -> None:
        """
        The acknowledgement of a setpoint push stores
        C{target_change_pending: false} with revision and timestamp as they
        were (§11.6).
        """
        cleared = buckets.clearPendingChange(bucket)
        self.assertIs(cleared.value["target_change_pending"], False)
        self.assertEqual(
            (cleared.revision, cleared.timestamp), (bucket.revision, bucket.timestamp)
        )


class ServerIsNewerTests(SynchronousTestCase):
    """
    L{buckets.serverIsNewer} is PROTOCOL.md §11.2's table.
    """

    timestamp = st.one_of(
        st.just(0), st.integers(1, 5), st.integers(0, buckets.TIMESTAMP_MAX)
    )

    @given(timestamp, timestamp)
    @example(0, 0)
    @example(5, 0)
    @example(5, 5)
    @example(5, 6)
    @example(6, 5)
    def test_table(self, clientTimestamp: int, serverTimestamp: int) -> None:
        """
        A device with no data gets the server's copy, even an empty one; a
        device with data gets it only when the server's timestamp is
        strictly later, whatever the revisions.
        """
        self.assertEqual(
            buckets.serverIsNewer(clientTimestamp, serverTimestamp),
            tableSaysSend(clientTimestamp, serverTimestamp),
        )

    @given(bucketStrategy(), bucketValues(minSize=1), nows)
    def test_changeReachesHolder(
        self, bucket: Bucket, fields: dict[str, Any], nowMs: int
    ) -> None:
        """
        A device holding a bucket is sent every change made to it after,
        whatever the time of the change: a changed timestamp is always
        later than the one it replaces.
        """
        for result in [
            buckets.merge(bucket, fields, nowMs),
            buckets.forceMerge(bucket, fields, nowMs),
        ]:
            if result is bucket:
                continue
            self.assertTrue(buckets.serverIsNewer(bucket.timestamp, result.timestamp))
