# -*- test-case-name: tests.test_store -*-
"""
The contract of L{IBucketStore}, as one set of tests any engine runs.

An engine's test case mixes L{StoreContract} into an asynchronous
L{twisted.trial.unittest.TestCase} and provides L{StoreContract.openStore}
(a fresh store, or the same database again) and L{StoreContract.WRITER}
(how a subprocess opens it, for the hard-kill test). Commits run through a
L{CommitGate} the contract hands the engine, so the tests can hold a commit
or fail it on demand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from nestproto import buckets as rules
from nestproto.buckets import Bucket
from nestproto.errors import StoreClosed, StoreUnavailable, TooManyBuckets
from nestproto.model import BucketChanged, Commit, RecordChanged
from nestproto.store import (
    REPLAY_COMMITS,
    BucketUpdate,
    BucketWrite,
    IBucketStore,
    RecordUpdate,
    RecordWrite,
    ScopeDelete,
    ThreadRunner,
)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_MS = 1767225600000


class CommitGate:
    """
    A thread runner in front of an engine's own: it passes commits through,
    or holds them until released, or fails the next one without running it.
    """

    def __init__(self, runner: ThreadRunner) -> None:
        self._runner = runner
        self.holding = False
        self.failNext = False
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.failNext:
            self.failNext = False
            d: Deferred[Any] = Deferred()
            d.errback(OSError(28, "No space left on device"))
            return d
        if self.holding:
            held: Deferred[Any] = Deferred()
            self.held.append((f, args, held))
            return held
        return self._runner(f, *args)

    def release(self) -> None:
        """Let every held commit run, and hold no more."""
        self.holding = False
        held, self.held = self.held, []
        for f, args, d in held:
            self._runner(f, *args).chainDeferred(d)


def update(scope: str, key: str, value: dict[str, Any]) -> BucketUpdate:
    """Set C{key} of C{scope} to C{value}, as the server's rules do."""

    def decide(stored: Bucket | None, nowMs: int) -> Bucket:
        return rules.changed(stored or rules.empty(key), value, nowMs)

    return BucketUpdate(scope, key, decide)


if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase as _Base
else:
    _Base = object


class StoreContract(_Base):
    """The tests every L{IBucketStore} engine passes."""

    #: C{"module:function"} that a subprocess calls with the database
    #: location and a thread runner to open the store.
    WRITER: str

    clock: Clock
    gate: CommitGate

    # What an engine's test case provides

    def openStore(self, again: IBucketStore | None = None) -> Deferred[IBucketStore]:
        """
        A fresh, empty store whose commits run through C{self.gate} and
        whose time is C{self.clock}; or, with C{again}, that store's
        database opened anew after C{again} was closed.
        """
        raise NotImplementedError()

    def writerLocation(self) -> str:
        """Where the hard-kill test's subprocess writes (path or URL)."""
        raise NotImplementedError()

    # Helpers

    async def fresh(self) -> IBucketStore:
        store = await self.openStore()
        self.addCleanup(self.closeQuietly, store)
        return store

    async def reopened(self, store: IBucketStore) -> IBucketStore:
        await store.close()
        again = await self.openStore(store)
        self.addCleanup(self.closeQuietly, again)
        return again

    def closeQuietly(self, store: IBucketStore) -> Deferred[None] | None:
        try:
            return store.close()
        except Exception:
            return None

    def watch(self, store: IBucketStore) -> list[Commit]:
        seen: list[Commit] = []
        store.listen(seen.append)
        return seen

    # The contract

    async def test_providesInterface(self) -> None:
        """The engine provides L{IBucketStore}."""
        store = await self.fresh()
        assert verifyObject(IBucketStore, store)

    async def test_writeIsDecidedAtTheStoresTime(self) -> None:
        """
        A decision gets the stored bucket and the store's time; what it
        returns is stored exactly and survives a reopen.
        """
        store = await self.fresh()
        seenBy: list[tuple[Bucket | None, int]] = []

        def decide(stored: Bucket | None, nowMs: int) -> Bucket:
            seenBy.append((stored, nowMs))
            return rules.changed(stored or rules.empty("shared.A"), {"t": 20.5}, nowMs)

        [written] = await store.write([BucketUpdate("A", "shared.A", decide)])
        assert seenBy == [(None, START_MS)], seenBy
        assert written == Bucket("shared.A", 1, START_MS, {"t": 20.5}), written
        self.clock.advance(1)
        [again] = await store.write([update("A", "shared.A", {"t": 21})])
        assert again == Bucket("shared.A", 2, START_MS + 1000, {"t": 21}), again
        store = await self.reopened(store)
        assert store.get("A", "shared.A") == again
        assert store.buckets("A") == [again]

    async def test_exactWritesAndRecordsSurviveReopen(self) -> None:
        """
        Buckets written as given (negative revisions included) and records
        survive a reopen; deleted ones stay deleted, and a kind whose last
        record is deleted is no longer listed.
        """
        store = await self.fresh()
        exact = Bucket("device.A", -5, 1234, {"nested": {"x": [1, 2]}})
        await store.write(
            [
                BucketWrite("A", exact),
                RecordWrite("owner", "A", {"user": "u1"}),
                RecordWrite("owner", "B", {"user": "u2"}),
                RecordWrite("a-later-kind", "x", {}),
            ]
        )
        await store.write([RecordWrite("owner", "B", None)])
        await store.write([RecordWrite("a-later-kind", "x", None)])
        store = await self.reopened(store)
        assert store.get("A", "device.A") == exact
        assert store.records("owner") == {"A": {"user": "u1"}}
        assert store.record("owner", "B") is None
        assert store.recordKinds() == ["owner"]

    async def test_nothingShownBeforeCommit(self) -> None:
        """
        While a commit is held, reads, the feed and the caller see nothing
        of it; once it commits, all three see it.
        """
        store = await self.fresh()
        await store.write([update("A", "shared.A", {"t": 20})])
        before = store.get("A", "shared.A")
        seen = self.watch(store)
        self.gate.holding = True
        d = store.write([update("A", "shared.A", {"t": 25})])
        assert not d.called
        assert store.get("A", "shared.A") == before
        assert seen == []
        self.gate.release()
        [after] = await d
        assert after is not None and after.value == {"t": 25}
        assert store.get("A", "shared.A") == after
        assert [c.buckets for c in seen] == [(BucketChanged("A", "shared.A", after),)]

    async def test_failedCommitChangesNothing(self) -> None:
        """
        A commit that fails fails its writes with L{StoreUnavailable};
        memory, the feed and the database are as before, and the next write
        succeeds.
        """
        store = await self.fresh()
        await store.write([update("A", "shared.A", {"t": 20})])
        before = store.get("A", "shared.A")
        sequence = store.lastSequence
        seen = self.watch(store)
        self.gate.failNext = True
        failed = store.write(
            [update("A", "shared.A", {"t": 30}), RecordWrite("owner", "A", {})]
        )
        try:
            await failed
        except StoreUnavailable:
            pass
        else:
            raise AssertionError("the failed commit succeeded")
        assert store.get("A", "shared.A") == before
        assert store.record("owner", "A") is None
        assert (seen, store.lastSequence) == ([], sequence)
        [after] = await store.write([update("A", "shared.A", {"t": 31})])
        assert after is not None and before is not None
        assert after.revision == before.revision + 1
        store = await self.reopened(store)
        assert store.get("A", "shared.A") == after
        assert store.record("owner", "A") is None

    async def test_decisionSeesEarlierUncommittedWriteNever(self) -> None:
        """
        A write decided while an earlier one is still committing is decided
        on top of it: a compare-and-set can never accept a stale revision.
        """
        store = await self.fresh()
        [first] = await store.write([update("A", "shared.A", {"t": 20})])
        assert first is not None
        self.gate.holding = True
        racing = store.write([update("A", "shared.A", {"t": 21})])
        outcomes: list[bool] = []

        def conditional(stored: Bucket | None, nowMs: int) -> Bucket | None:
            after, conflict = rules.conditionalMerge(
                stored or rules.empty("shared.A"), {"t": 99}, first.revision, nowMs
            )
            outcomes.append(conflict)
            return stored if conflict else after

        late = store.write([BucketUpdate("A", "shared.A", conditional)])
        self.gate.release()
        [won] = await racing
        [refused] = await late
        assert outcomes == [True], outcomes
        assert refused == won
        assert store.get("A", "shared.A") == won

    async def test_refusedDecisionChangesNothing(self) -> None:
        """
        A decision that raises fails its whole write (nothing of it is
        stored or announced); other writes committed with it are unaffected.
        """
        store = await self.fresh()
        seen = self.watch(store)

        def refuse(stored: Bucket | None, nowMs: int) -> Bucket:
            raise TooManyBuckets("no")

        self.gate.holding = True
        fine = store.write([update("B", "shared.B", {"ok": 1})])
        bad = store.write(
            [update("A", "shared.A", {"t": 1}), BucketUpdate("A", "x.A", refuse)]
        )
        self.gate.release()
        await fine
        try:
            await bad
        except TooManyBuckets:
            pass
        else:
            raise AssertionError("the refused write succeeded")
        assert store.buckets("A") == []
        assert [c.buckets[0].key for c in seen] == ["shared.B"]

    async def test_recordDecidedInTransaction(self) -> None:
        """
        A record update sees the record as the transaction does (an earlier,
        still-committing write included) and may refuse the whole write.
        """
        store = await self.fresh()
        await store.write([RecordWrite("entry_key", "A", {"claimedBy": None})])

        def claimFor(user: str) -> RecordUpdate:
            def decide(doc: dict[str, Any] | None) -> dict[str, Any]:
                if doc is None or doc["claimedBy"] is not None:
                    raise TooManyBuckets("taken")
                return {"claimedBy": user}

            return RecordUpdate("entry_key", "A", decide)

        self.gate.holding = True
        first = store.write([claimFor("alice"), RecordWrite("owner", "A", {})])
        second = store.write([claimFor("bob"), update("", "user.bob", {})])
        self.gate.release()
        await first
        try:
            await second
        except TooManyBuckets:
            pass
        else:
            raise AssertionError("the second claim succeeded")
        assert store.record("entry_key", "A") == {"claimedBy": "alice"}
        assert store.get("", "user.bob") is None
        store = await self.reopened(store)
        assert store.record("entry_key", "A") == {"claimedBy": "alice"}

    async def test_unchangedWriteIsNotAnnounced(self) -> None:
        """A decision that keeps the stored bucket changes and announces nothing."""
        store = await self.fresh()
        [stored] = await store.write([update("A", "shared.A", {"t": 1})])
        seen = self.watch(store)
        sequence = store.lastSequence
        [same] = await store.write([BucketUpdate("A", "shared.A", lambda b, now: b)])
        assert same == stored
        assert (seen, store.lastSequence) == ([], sequence)

    async def test_feedSequenceAndOrigin(self) -> None:
        """
        Every committed write is announced once, in commit order, with the
        next sequence number and its origin; the sequence goes on after a
        reopen.
        """
        store = await self.fresh()
        seen = self.watch(store)
        start = store.lastSequence
        self.gate.holding = True
        writes = [
            store.write([update("A", "shared.A", {"n": n})], origin="A")
            for n in range(3)
        ]
        writes.append(store.write([RecordWrite("owner", "A", {"user": "u"})]))
        self.gate.release()
        for d in writes:
            await d
        assert [c.sequence for c in seen] == [start + n for n in range(1, 5)]
        assert [c.origin for c in seen] == ["A", "A", "A", None]
        values = [change.bucket for c in seen[:3] for change in c.buckets]
        assert [b.value["n"] for b in values if b is not None] == [0, 1, 2]
        assert seen[3].records == (RecordChanged("owner", "A", {"user": "u"}),)
        store = await self.reopened(store)
        again = self.watch(store)
        await store.write([update("A", "shared.A", {"n": 9})])
        assert [c.sequence for c in again] == [start + 5]

    async def test_sinceGivesExactlyWhatWasMissed(self) -> None:
        """
        L{IChangeFeed.since} gives the commits after a sequence; none when
        up to date; C{None} when they are no longer kept or never existed.
        """
        store = await self.fresh()
        seen = self.watch(store)
        for n in range(5):
            await store.write([update("A", "shared.A", {"n": n})])
        last = store.lastSequence
        assert store.since(last) == []
        assert store.since(last - 2) == seen[-2:]
        assert store.since(last + 1) is None
        for n in range(REPLAY_COMMITS + 1):
            await store.write([update("B", "shared.B", {"n": n})])
        assert store.since(last) is None
        kept = store.since(store.lastSequence - REPLAY_COMMITS + 1)
        assert kept is not None and len(kept) == REPLAY_COMMITS - 1

    async def test_scopesAreIsolated(self) -> None:
        """
        One key in two scopes is two buckets; deleting a scope removes only
        its own, and announces each deletion.
        """
        store = await self.fresh()
        await store.write(
            [update("A", "shared.X", {"a": 1}), update("B", "shared.X", {"b": 1})]
        )
        await store.write([update("", "structure.s", {"devices": []})])
        assert store.scopes() == ["", "A", "B"]
        seen = self.watch(store)
        await store.write([ScopeDelete("A")])
        assert store.buckets("A") == [] and store.scopes() == ["", "B"]
        assert seen[0].buckets == (BucketChanged("A", "shared.X", None),)
        other = store.get("B", "shared.X")
        assert other is not None and other.value == {"b": 1}
        store = await self.reopened(store)
        assert store.scopes() == ["", "B"]

    async def test_closeWaitsForCommits(self) -> None:
        """Close commits what is pending first; a write after close is refused."""
        store = await self.fresh()
        self.gate.holding = True
        pending = store.write([update("A", "shared.A", {"t": 1})])
        closed = store.close()
        assert not closed.called
        self.gate.release()
        await pending
        await closed
        try:
            store.write([update("A", "shared.A", {"t": 2})])
        except StoreClosed:
            pass
        else:
            raise AssertionError("a write after close was accepted")
        again = await self.openStore(store)
        self.addCleanup(self.closeQuietly, again)
        stored = again.get("A", "shared.A")
        assert stored is not None and stored.value == {"t": 1}

    def test_hardKillLosesNothingAcknowledged(self) -> None:
        """
        A writer process killed with SIGKILL mid-stream loses no write it
        acknowledged: every acknowledged revision (or a later one) is found.
        """
        location = self.writerLocation()
        env = {**os.environ, "PYTHONPATH": PROJECT_ROOT}
        process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, self.WRITER, location],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert process.stdout is not None
        acknowledged: list[int] = []
        try:
            while len(acknowledged) < 1000:
                line = process.stdout.readline()
                if not line:
                    break
                acknowledged.append(int(line))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            process.stdout.close()
        assert len(acknowledged) >= 1000, "writer died early"
        module, name = self.WRITER.split(":")
        opener = getattr(__import__(module, fromlist=[name]), name)
        reopened: IBucketStore = opener(location, None)
        self.addCleanup(self.closeQuietly, reopened)
        latest = {f"shared.S{n % 50:04d}": n for n in acknowledged}
        for key, n in latest.items():
            found = reopened.get("S", key)
            assert found is not None, key
            # A later, unacknowledged write may have landed; never an older.
            assert found.value["n"] >= n, (key, found, n)


_WRITER = textwrap.dedent(
    """
    import functools, sys
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool
    from nestproto.buckets import Bucket
    from nestproto.store import BucketWrite

    module, name = sys.argv[1].split(":")
    opener = getattr(__import__(module, fromlist=[name]), name)
    pool = ThreadPool(1, 1)
    pool.start()
    store = opener(sys.argv[2], functools.partial(deferToThreadPool, reactor, pool))
    counter = [0]

    def acknowledged(ignored, n):
        # The line is the acknowledgement: printed only after durability.
        sys.stdout.write("%d\\n" % n)
        sys.stdout.flush()

    def writeMore():
        for _ in range(20):
            counter[0] += 1
            n = counter[0]
            bucket = Bucket("shared.S%04d" % (n % 50), n, n, {"n": n})
            store.write([BucketWrite("S", bucket)]).addCallback(acknowledged, n)
        reactor.callLater(0.001, writeMore)

    reactor.callWhenRunning(writeMore)
    reactor.run()
    """
)
