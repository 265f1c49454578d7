# -*- test-case-name: tests.test_store_pg -*-
"""
Tests for L{nestproto.store_pg}: the store contract on a real PostgreSQL,
plus what only a shared engine has (other writers' commits on the feed,
compare-and-set between processes, a listening connection that dies).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from nestproto import buckets as rules
from nestproto.buckets import Bucket
from nestproto.errors import StoreUnavailable, TooManyAttempts
from nestproto.model import BucketChanged, Commit, RecordChanged
from nestproto.pairing import CLAIM_THROTTLE_RECORD, SharedClaimThrottle
from nestproto.store import (
    BucketUpdate,
    BucketWrite,
    IBucketStore,
    RecordWrite,
    ScopeDelete,
    ThreadRunner,
    runInline,
)

from .pg import testDatabase
from .store_contract import START_MS, CommitGate, StoreContract, update

try:
    from nestproto.store_pg import FEED_NAME, PostgreSQLStore, SharedPresence
except ImportError:  # psycopg is an extra; testDatabase says so
    pass


def openForWriter(dsn: str, runner: ThreadRunner | None) -> IBucketStore:
    """How the contract's hard-kill writer (and its check) open the database."""
    from twisted.internet import reactor

    return PostgreSQLStore.open(dsn, runner or runInline, reactor)


def threadRunner(case: TestCase, name: str) -> ThreadRunner:
    """A one-thread pool on the real reactor, stopped in cleanup."""
    pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
    pool.start()
    case.addCleanup(pool.stop)
    return partial(deferToThreadPool, cast(Any, reactor), pool)


class PostgreSQLContractTests(StoreContract, TestCase):
    """The store contract, on a real PostgreSQL database, following its feed."""

    WRITER = "tests.test_store_pg:openForWriter"

    def setUp(self) -> None:
        self.dsn = testDatabase(self)
        self.clock = Clock()
        self.clock.advance(START_MS / 1000)
        self.gate = CommitGate(threadRunner(self, "test-store"))
        self.listenRunner = threadRunner(self, "test-listen")

    def openStore(self, again: IBucketStore | None = None) -> Deferred[IBucketStore]:
        store: IBucketStore = PostgreSQLStore.open(
            self.dsn, self.gate, self.clock, self.listenRunner
        )
        return succeed(store)

    def writerLocation(self) -> str:
        return testDatabase(self)


async def eventually(
    condition: Callable[[], bool], timeoutSeconds: float = 10.0
) -> None:
    """Wait on the real reactor until C{condition()} holds."""
    deadline = time.monotonic() + timeoutSeconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(cast(Any, reactor), 0.01)


def admin(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


class SharedDatabaseTests(TestCase):
    """Two stores on one database, as two processes would have them."""

    def setUp(self) -> None:
        self.dsn = testDatabase(self)
        self.clock = Clock()
        self.clock.advance(START_MS / 1000)

    def store(self, name: str, follow: bool = True) -> PostgreSQLStore:
        store = PostgreSQLStore.open(
            self.dsn,
            threadRunner(self, f"{name}-store"),
            self.clock,
            threadRunner(self, f"{name}-feed") if follow else None,
        )
        self.addCleanup(store.close)
        return store

    def test_dropsSpacedKeysOnOpen(self) -> None:
        """
        A bucket stored under a 4.x firmware's mangled key (C{shared.S
        ._sync}), as a copy from an older nestproto may hold, is dropped
        when a process opens the database (PROTOCOL.md §20.2).
        """
        self.store("a", follow=False)
        with admin(self.dsn) as connection:
            connection.execute(
                "INSERT INTO buckets VALUES ('S', 'shared.S', 1, 1700, '{}'), "
                "('S', 'shared.S ._sync', 1, 1700, '{}')"
            )
        store = self.store("b", follow=False)
        self.assertEqual([b.key for b in store.buckets("S")], ["shared.S"])
        with admin(self.dsn) as connection:
            keys = connection.execute("SELECT key FROM buckets").fetchall()
        self.assertEqual(keys, [("shared.S",)])

    async def test_otherProcessesCommitsAreAnnounced(self) -> None:
        """
        What one store commits reaches the other's reads and feed, in
        order, with its origin and sequence.
        """
        a = self.store("a")
        b = self.store("b")
        seen: list[Commit] = []
        b.listen(seen.append)
        [written] = await a.write([update("S", "shared.S", {"t": 20})], origin="S")
        await a.write([RecordWrite("owner", "S", {"user": "u"})])
        await eventually(lambda: len(seen) == 2)
        assert b.get("S", "shared.S") == written
        assert b.record("owner", "S") == {"user": "u"}
        assert [(c.sequence, c.origin) for c in seen] == [(1, "S"), (2, None)]
        assert seen[0].buckets == (BucketChanged("S", "shared.S", written),)
        assert b.since(0) == seen and b.lastSequence == a.lastSequence == 2

    async def test_ownCommitsWaitForEarlierOnes(self) -> None:
        """
        A store that commits after another shows and announces the other's
        commit first: the sequence never goes back and nothing is skipped.
        """
        a = self.store("a", follow=False)
        b = self.store("b", follow=False)
        seen: list[Commit] = []
        b.listen(seen.append)
        await a.write([update("S", "shared.S", {"n": 1})])
        await a.write([update("S", "shared.S", {"n": 2})])
        [mine] = await b.write([update("S", "shared.S", {"n": 3})])
        assert mine is not None and mine.revision == 3
        assert [c.sequence for c in seen] == [1, 2, 3]
        assert b.get("S", "shared.S") == mine

    async def test_failedStatementLeavesTheStoreUsable(self) -> None:
        """
        A batch refused by the database in the middle of its pipelined
        statements fails as a whole, commits nothing, and the next write
        commits on the same connection.
        """
        a = self.store("a")
        tooBig = Bucket("shared.S", 2**63, START_MS, {"t": 1})
        with self.assertRaises(StoreUnavailable):
            await a.write([BucketWrite("S", tooBig)])
        assert a.get("S", "shared.S") is None and a.lastSequence == 0
        [written] = await a.write([update("S", "shared.S", {"t": 20})])
        assert written is not None and written.revision == 1
        assert a.lastSequence == 1

    async def test_claimThrottleCountsAcrossStores(self) -> None:
        """
        Wrong codes sent to two processes count together: the fifth locks
        the address out on both, and a correct claim on one frees it on
        both.
        """
        a = self.store("a")
        b = self.store("b")
        onA = SharedClaimThrottle(self.clock, store=a)
        onB = SharedClaimThrottle(self.clock, store=b)
        for throttle in [onA, onB, onA, onB]:
            throttle.check("192.0.2.1")
            throttle.failed("192.0.2.1")
        # The fifth, on A, once A has seen B's failures.
        await eventually(
            lambda: (
                (a.record(CLAIM_THROTTLE_RECORD, "192.0.2.1") or {}).get("count") == 4
            )
        )
        onA.failed("192.0.2.1")
        await eventually(
            lambda: (
                (b.record(CLAIM_THROTTLE_RECORD, "192.0.2.1") or {}).get("count") == 5
            )
        )
        with self.assertRaises(TooManyAttempts):
            onB.check("192.0.2.1")
        with self.assertRaises(TooManyAttempts):
            onA.check("192.0.2.1")
        onB.check("198.51.100.7")
        # Once the lockout is over, a correct claim on B forgets it on A too.
        self.clock.advance(onA.baseLockSeconds)
        onB.check("192.0.2.1")
        onB.succeeded("192.0.2.1")
        await eventually(lambda: a.record(CLAIM_THROTTLE_RECORD, "192.0.2.1") is None)
        onA.check("192.0.2.1")

    async def test_compareAndSetAcrossStores(self) -> None:
        """
        Conditional puts of one revision through two stores at once: one
        wins, the other is decided on top of it and refused.
        """
        a = self.store("a")
        b = self.store("b")
        [first] = await a.write([update("S", "shared.S", {"t": 20})])
        assert first is not None
        outcomes: list[bool] = []

        def conditional(value: int) -> BucketUpdate:
            def decide(stored: Bucket | None, nowMs: int) -> Bucket | None:
                after, conflict = rules.conditionalMerge(
                    stored or rules.empty("shared.S"),
                    {"t": value},
                    first.revision,
                    nowMs,
                )
                outcomes.append(conflict)
                return stored if conflict else after

            return BucketUpdate("S", "shared.S", decide)

        results = await gatherResults(
            [a.write([conditional(21)]), b.write([conditional(22)])]
        )
        assert sorted(outcomes) == [False, True], outcomes
        [[fromA], [fromB]] = results
        assert fromA == fromB and fromA is not None and fromA.revision == 2
        await eventually(lambda: a.get("S", "shared.S") == b.get("S", "shared.S"))

    async def test_deadListeningConnectionMissesNothing(self) -> None:
        """
        The listening connection killed with pg_terminate_backend while
        another store commits: the follower reconnects, re-reads the log
        and announces every commit once, in order.
        """
        a = self.store("a", follow=False)
        b = self.store("b")
        seen: list[Commit] = []
        b.listen(seen.append)
        await a.write([update("S", "shared.S", {"n": 0})])
        await eventually(lambda: len(seen) == 1)
        with admin(self.dsn) as connection:
            killed = 0
            for n in range(1, 41):
                await a.write([update("S", "shared.S", {"n": n})])
                if n % 10 == 0:
                    killed += connection.execute(
                        "SELECT count(pg_terminate_backend(pid)) "
                        "FROM pg_stat_activity WHERE application_name = %s "
                        "AND datname = current_database()",
                        (FEED_NAME,),
                    ).fetchone()[0]
        assert killed >= 1
        await eventually(lambda: len(seen) == 41, timeoutSeconds=30)
        assert [c.sequence for c in seen] == list(range(1, 42))
        stored = b.get("S", "shared.S")
        assert stored is not None and stored.value == {"n": 40}
        self.flushLoggedErrors()

    async def test_prunedLogReloads(self) -> None:
        """
        A follower that missed commits the log no longer holds reloads the
        state and announces the difference as one commit.
        """
        a = self.store("a", follow=False)
        b = self.store("b", follow=False)
        await a.write([update("S", "shared.S", {"n": 1}), update("S", "x.S", {})])
        await a.write([update("S", "shared.S", {"n": 2}), ScopeDelete("T")])
        await a.write([RecordWrite("owner", "S", {"user": "u"})])
        with admin(self.dsn) as connection:
            connection.execute("DELETE FROM changes")
        heard = b._listenOnce(0, False)
        assert heard.snapshot is not None and heard.snapshot.sequence == 3
        seen: list[Commit] = []
        b.listen(seen.append)
        b._receive(heard)
        [commit] = seen
        assert commit.sequence == 3 and b.lastSequence == 3
        assert {change.key for change in commit.buckets} == {"shared.S", "x.S"}
        assert commit.records == (RecordChanged("owner", "S", {"user": "u"}),)
        assert b.since(0) is None and b.since(3) == []
        assert b.get("S", "shared.S") == a.get("S", "shared.S")


class SharedPresenceTests(TestCase):
    """Two processes' presence on one database, each with its own clock."""

    def setUp(self) -> None:
        self.dsn = testDatabase(self)

    def presence(self, name: str, atSeconds: float) -> tuple[SharedPresence, Clock]:
        clock = Clock()
        clock.advance(atSeconds)
        store = PostgreSQLStore.open(self.dsn, threadRunner(self, name), clock)
        self.addCleanup(store.close)
        return SharedPresence(store, clock), clock

    async def test_lastSeenShared(self) -> None:
        """
        What one process heard shows on another after both sync, and last
        seen only moves forward.
        """
        a, aClock = self.presence("a", 1000)
        b, _ = self.presence("b", 900)
        a.touch("S")
        await a.sync()
        await b.sync()
        self.assertEqual(b.lastSeen("S"), 1000)
        self.assertEqual(b.heardFrom(), ["S"])
        b.touch("S")  # at 900, behind what a heard
        await b.sync()
        await a.sync()
        self.assertEqual((a.lastSeen("S"), b.lastSeen("S")), (1000, 1000))
        aClock.advance(5)
        a.touch("S")
        await a.sync()
        await b.sync()
        self.assertEqual(b.lastSeen("S"), 1005)

    async def test_entryFieldsFollowTheNewest(self) -> None:
        """
        Entry fields noted on one process show on the other, and a device
        that boots again on the other with new fields and then back on the
        first with its first fields ends with those first fields everywhere:
        a text read before is not taken for one already applied.
        """
        a, _ = self.presence("a", 1000)
        b, _ = self.presence("b", 1000)
        first, second = {"swversion": "5.9.3"}, {"swversion": "6.0"}
        a.noteEntry("S", first)
        await a.sync()
        await b.sync()
        self.assertEqual(b.entryFields("S"), first)
        b.noteEntry("S", second)
        await b.sync()
        await a.sync()
        self.assertEqual(a.entryFields("S"), second)
        a.noteEntry("S", first)
        await a.sync()
        await b.sync()
        self.assertEqual(b.entryFields("S"), first)
        self.assertEqual(a.entryFields("S"), first)

    async def test_forgetShared(self) -> None:
        """A device forgotten on one process is no longer stored for others."""
        a, _ = self.presence("a", 1000)
        b, _ = self.presence("b", 1000)
        a.noteEntry("S", {"swversion": "5.9.3"})
        await a.sync()
        a.forget("S")
        await a.sync()
        await b.sync()
        self.assertEqual((b.lastSeen("S"), b.entryFields("S")), (None, {}))
