# -*- test-case-name: tests.test_history_pg -*-
"""
Tests for L{nestproto.history_pg}: the history storage contract on a real
PostgreSQL, and what sharing the database adds: each report recorded once
whichever processes hear of it, maintenance in turn, the schema upgrade,
and the commit-latency metric; and the history's connection of its own,
which no commit waits for.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nestproto.apps import buildApps
from nestproto.buckets import Bucket
from nestproto.errors import StoreClosed
from nestproto.history import (
    HOUR_MS,
    MINUTE_MS,
    History,
    IHistoryStorage,
    Sample,
    Transition,
    sampleValues,
)
from nestproto.model import Commit
from nestproto.store import BucketWrite, IBucketStore, runInline

from .helpers import SERIAL
from .history_contract import END_MS, START_MS, HistoryStorageContract, Recorder
from .pg import testDatabase
from .test_store_pg import admin, eventually, threadRunner

try:
    import psycopg

    from nestproto.history_pg import (
        _MAINTENANCE_LOCK,
        HISTORY_NAME,
        SETTLE_MS,
        PostgreSQLHistoryStorage,
    )
    from nestproto.store_pg import PostgreSQLStore, SharedPresence
except ImportError:  # psycopg is an extra; testDatabase says so
    pass

SHARED = f"shared.{SERIAL}"

_EMPTY = """
TRUNCATE buckets, records, changes, presence,
    history_samples, history_transitions, history_hours;
DELETE FROM meta WHERE name NOT IN ('schema_version', 'last_sequence');
UPDATE meta SET value = 0 WHERE name = 'last_sequence';
"""


class PostgreSQLStorageTests(HistoryStorageContract, SynchronousTestCase):
    """
    The history storage contract, on a real PostgreSQL database (one per
    test, emptied for each store: the property tests open many).
    """

    def setUp(self) -> None:
        self.dsn: str | None = None
        self.opened: PostgreSQLStore | None = None

    def openStore(self, clock: Clock) -> tuple[IBucketStore, IHistoryStorage]:
        if self.dsn is None:
            self.dsn = testDatabase(self)
        if self.opened is not None:
            self.successResultOf(self.opened.close())
            with admin(self.dsn) as connection:
                connection.execute(_EMPTY)
        else:
            self.addCleanup(self.closeOpened)
        store = self.opened = PostgreSQLStore.open(self.dsn, runInline, clock)
        # Hours are rolled up as soon as they end, as on SQLite.
        store.history.settleMs = 0
        return store, store.history

    def closeOpened(self) -> None:
        if self.opened is not None:
            self.successResultOf(self.opened.close())
            self.opened = None

    def test_storeAdapts(self) -> None:
        """A PostgreSQL store adapts to its history storage, always the same."""
        store, _ = self.openStore(Clock())
        self.assertIsInstance(IHistoryStorage(store), PostgreSQLHistoryStorage)
        self.assertIs(IHistoryStorage(store), IHistoryStorage(store))

    def test_settles(self) -> None:
        """
        An hour is rolled up only L{SETTLE_MS} after it ends: another
        process may still hold its last rows.
        """
        self.openStore(Clock())
        assert self.dsn is not None
        storage = PostgreSQLHistoryStorage(self.dsn, runInline)
        self.addCleanup(storage.close)
        hourMs = START_MS // HOUR_MS * HOUR_MS
        append = storage.append([Sample(SERIAL, hourMs + 5, {"temperature": 20.0})], [])
        self.successResultOf(append)
        rollUp = storage.rollUp
        self.assertEqual(self.successResultOf(rollUp(hourMs + HOUR_MS)), 0)
        self.assertEqual(
            self.successResultOf(rollUp(hourMs + HOUR_MS + SETTLE_MS - 1)), 0
        )
        self.assertEqual(self.successResultOf(rollUp(hourMs + HOUR_MS + SETTLE_MS)), 1)
        [hour] = self.successResultOf(storage.hours(SERIAL, 0, END_MS))
        self.assertEqual((hour.hourMs, hour.samples), (hourMs, 1))

    def test_appendTwiceStoresOnce(self) -> None:
        """
        A batch written again (a retry after an answer was lost) leaves one
        row per sample and transition: the last written stands.
        """
        store, storage = self.openStore(Clock())
        values = sampleValues({"current_temperature": 20.0}, {"current_humidity": 40})
        sample = Sample(SERIAL, START_MS, values)
        on = Transition(SERIAL, START_MS, "hvac_heater_state", True)
        off = Transition(SERIAL, START_MS, "hvac_heater_state", False)
        self.successResultOf(storage.append([sample], [on]))
        self.successResultOf(storage.append([sample], [on, off]))
        stored = self.successResultOf(storage.samples(SERIAL, 0, END_MS))
        self.assertEqual(stored, [sample])
        transitions = self.successResultOf(storage.transitions(SERIAL, 0, END_MS))
        self.assertEqual(transitions.changes, [off])

    def test_upgradeFromVersion1(self) -> None:
        """
        A database of schema 1 (no history tables, a change log without
        writers) is upgraded when a store opens it.
        """
        store, _ = self.openStore(Clock())
        self.closeOpened()
        assert self.dsn is not None
        with admin(self.dsn) as connection:
            connection.execute(
                "DROP TABLE history_samples, history_transitions, history_hours;"
                "ALTER TABLE changes DROP COLUMN writer;"
                "UPDATE meta SET value = 1 WHERE name = 'schema_version'"
            )
        clock = Clock()
        clock.advance(START_MS / 1000)
        recorder = Recorder(*self.openStore(clock), clock)
        recorder.report({"hvac_heater_state": True})
        self.successResultOf(recorder.history.flush(everything=True))
        self.assertEqual(recorder.stored(), (1, 1))
        with admin(self.dsn) as connection:
            [(version,)] = connection.execute(
                "SELECT value FROM meta WHERE name = 'schema_version'"
            ).fetchall()
            [(writers,)] = connection.execute(
                "SELECT COUNT(DISTINCT writer) FROM changes"
            ).fetchall()
        self.assertEqual((version, writers), (2, 1))

    def test_commitSecondsObserved(self) -> None:
        """
        The commit-latency histogram counts the PostgreSQL store's commits,
        and the database's size is known.
        """
        store, _ = self.openStore(Clock())
        apps = buildApps(store, Clock(), runInline)
        self.assertIsNotNone(apps.history)
        registry = apps.metrics.registry
        count = "nestproto_store_commit_seconds_count"
        before = registry.get_sample_value(count)
        self.successResultOf(
            store.write([BucketWrite(SERIAL, Bucket(SHARED, 1, 1, {"t": 20}))])
        )
        self.assertEqual(registry.get_sample_value(count), (before or 0) + 1)
        self.successResultOf(apps.metrics.render())
        self.assertGreater(
            registry.get_sample_value("nestproto_database_bytes") or 0, 0
        )


class SharedHistoryTests(TestCase):
    """Two stores on one database, each with a history, as two processes."""

    def setUp(self) -> None:
        self.dsn = testDatabase(self)
        self.clocks: list[Clock] = []

    def process(self, name: str, offsetMs: int = 0) -> tuple[PostgreSQLStore, History]:
        """
        A store and its history on a clock of their own, C{offsetMs} ahead
        of the start (processes' clocks differ; equal ones would hide a
        report recorded twice behind the tables' primary keys).
        """
        clock = Clock()
        clock.advance((START_MS + offsetMs) / 1000)
        self.clocks.append(clock)
        store = PostgreSQLStore.open(
            self.dsn,
            threadRunner(self, f"{name}-store"),
            clock,
            threadRunner(self, f"{name}-feed"),
        )
        store.runHistoryIn(threadRunner(self, f"{name}-history"))
        history = History.following(store, IHistoryStorage(store), clock)
        self.addCleanup(store.close)
        self.addCleanup(history.stop)
        return store, history

    async def test_eachReportRecordedOnce(self) -> None:
        """
        Reports committed by A are recorded by A only, though B hears of
        each; once the device reports through B, B records only what
        changed since A's last report (it kept the HVAC state current).
        """
        a, historyA = self.process("a")
        b, historyB = self.process("b", offsetMs=7)
        shared: dict[str, Any] = {}

        async def report(store: PostgreSQLStore, **fields: Any) -> None:
            shared.update(fields)
            await store.write(
                [BucketWrite(SERIAL, Bucket(SHARED, 1, 1, dict(shared)))],
                origin=SERIAL,
            )
            await eventually(lambda: a.lastSequence == b.lastSequence)
            for clock in self.clocks:
                clock.advance(MINUTE_MS / 1000)

        await report(a, current_temperature=20.0, hvac_heater_state=True)
        await report(a, current_temperature=21.0, hvac_heater_state=False)
        await report(a, current_temperature=22.0, hvac_heater_state=True)
        # The device now talks to B: the heater stays on, the fan starts.
        await report(b, current_temperature=23.0, hvac_fan_state=True)
        await historyA.flush(everything=True)
        await historyB.flush(everything=True)
        samples = await historyB.samples(SERIAL, 0, END_MS)
        self.assertEqual(
            [s.values["temperature"] for s in samples], [20.0, 21.0, 22.0, 23.0]
        )
        transitions = await historyA.transitions(SERIAL, 0, END_MS)
        self.assertEqual(
            [(t.timeMs - START_MS, t.field, t.on) for t in transitions.changes],
            [
                (0, "hvac_heater_state", True),
                (MINUTE_MS, "hvac_heater_state", False),
                (2 * MINUTE_MS, "hvac_heater_state", True),
                (3 * MINUTE_MS + 7, "hvac_fan_state", True),
            ],
        )

    async def test_maintenanceInTurn(self) -> None:
        """
        While another process maintains (holds the lock), a roll-up or
        prune does nothing, at once (waiting would hold this process's
        flushes behind the other's roll-up); two processes rolling up at
        once aggregate each hour once, and agree on where the hourly rows
        end.
        """
        a, _ = self.process("a")
        b, _ = self.process("b")
        storageA, storageB = IHistoryStorage(a), IHistoryStorage(b)
        hourMs = START_MS // HOUR_MS * HOUR_MS
        samples = [
            Sample(SERIAL, hourMs + minute * MINUTE_MS, {"temperature": minute % 5})
            for minute in range(0, 60 * 60, 7)
        ]
        await storageA.append(samples, [])
        untilMs = hourMs + 60 * HOUR_MS + SETTLE_MS

        def stored() -> Deferred[int]:
            return storageA.samples(SERIAL, 0, END_MS).addCallback(len)

        with admin(self.dsn) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (_MAINTENANCE_LOCK,))
            self.assertEqual(await storageA.rollUp(untilMs), 0)
            other.execute("SELECT pg_advisory_unlock(%s)", (_MAINTENANCE_LOCK,))

        async def catchUp(storage: IHistoryStorage) -> None:
            while await storage.rollUp(untilMs):
                pass

        both = [
            Deferred.fromCoroutine(catchUp(storageA)),
            Deferred.fromCoroutine(catchUp(storageB)),
        ]
        for d in both:
            await d
        hours = await storageB.hours(SERIAL, 0, END_MS)
        self.assertEqual(
            [h.hourMs for h in hours], [hourMs + i * HOUR_MS for i in range(60)]
        )
        self.assertEqual(sum(h.samples for h in hours), len(samples))
        with admin(self.dsn) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (_MAINTENANCE_LOCK,))
            await storageA.prune(untilMs, 0)
            self.assertEqual(await stored(), len(samples))
            other.execute("SELECT pg_advisory_unlock(%s)", (_MAINTENANCE_LOCK,))
        await storageB.prune(untilMs, 0)
        self.assertEqual(await stored(), 0)


class OwnConnectionTests(TestCase):
    """
    The history runs on a connection and thread of its own, beside the
    store's commits.
    """

    def setUp(self) -> None:
        self.dsn = testDatabase(self)
        self.clock = Clock()
        self.clock.advance(START_MS / 1000)
        self.store = PostgreSQLStore.open(
            self.dsn,
            threadRunner(self, "test-store"),
            self.clock,
            threadRunner(self, "test-feed"),
        )
        self.store.runHistoryIn(threadRunner(self, "test-history"))
        self.history = History.following(
            self.store, IHistoryStorage(self.store), self.clock
        )
        self.addCleanup(self.store.close)
        self.addCleanup(self.history.stop)
        self.announced: list[Commit] = []
        self.store.listen(self.announced.append)

    def report(self, temperature: float) -> Deferred[list[Bucket | None]]:
        """The device reports C{temperature}, as the device API writes it."""
        shared = {"current_temperature": temperature}
        return self.store.write(
            [BucketWrite(SERIAL, Bucket(SHARED, 1, 1, shared))], origin=SERIAL
        )

    def historyConnections(self, waiting: bool = False) -> int:
        """The history's connections (waiting for a lock, with C{waiting})."""
        with admin(self.dsn) as connection:
            [(count,)] = connection.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s"
                " AND (NOT %s OR wait_event_type = 'Lock')",
                (HISTORY_NAME, waiting),
            ).fetchall()
        return int(count)

    async def test_historyDoesNotDelayCommits(self) -> None:
        """
        While a roll-up, and a flush queued behind it, wait in the database
        (another connection holds their table), the store's writes commit
        and are announced; the history's jobs finish once let go, the
        reports committed meanwhile recorded.
        """
        await self.report(20.0)
        self.clock.advance(MINUTE_MS / 1000)
        storage = IHistoryStorage(self.store)
        with admin(self.dsn) as other:
            with other.transaction():
                other.execute("LOCK TABLE history_samples IN ACCESS EXCLUSIVE MODE")
                rollUp = storage.rollUp(START_MS + 2 * HOUR_MS + SETTLE_MS)
                flush = self.history.flush(everything=True)
                await eventually(lambda: self.historyConnections(waiting=True) == 1)
                write = self.report(21.0)
                await eventually(lambda: write.called, timeoutSeconds=5.0)
                await write
                self.assertEqual(len(self.announced), 2)
                self.assertTrue(self.announced[-1].local)
                self.assertEqual(self.historyConnections(waiting=True), 1)
                self.assertFalse(rollUp.called)
                self.assertFalse(flush.called)
        self.assertEqual(await rollUp, 0)
        await flush
        await self.history.flush(everything=True)
        samples = await storage.samples(SERIAL, 0, END_MS)
        self.assertEqual([s.values["temperature"] for s in samples], [20.0, 21.0])

    async def test_presenceSyncDoesNotDelayCommits(self) -> None:
        """
        The presence sync runs on the history's connection too: while it
        waits in the database (another connection holds its table), the
        store's writes commit; the sync finishes once let go.
        """
        presence = SharedPresence(self.store, self.clock)
        presence.touch(SERIAL)
        with admin(self.dsn) as other:
            with other.transaction():
                other.execute("LOCK TABLE presence IN ACCESS EXCLUSIVE MODE")
                sync = presence.sync()
                await eventually(lambda: self.historyConnections(waiting=True) == 1)
                write = self.report(21.0)
                await eventually(lambda: write.called, timeoutSeconds=5.0)
                await write
                self.assertFalse(sync.called)
        await sync
        with admin(self.dsn) as connection:
            [(seen,)] = connection.execute(
                "SELECT last_seen FROM presence WHERE serial = %s", (SERIAL,)
            ).fetchall()
        self.assertEqual(seen, self.clock.seconds())

    async def test_closedAfterLastFlush(self) -> None:
        """
        Stopped as the service stops them, the history first: its last
        flush is written, then the store closes its connection.
        """
        await self.report(20.0)
        self.assertEqual(self.historyConnections(), 0)
        await self.history.flush(everything=True)
        self.assertEqual(self.historyConnections(), 1)
        self.clock.advance(MINUTE_MS / 1000)
        await self.report(21.0)
        stopping = [self.history.stop(), self.store.close()]
        for d in stopping:
            await d
        self.assertEqual(self.historyConnections(), 0)
        with admin(self.dsn) as connection:
            [(count,)] = connection.execute(
                "SELECT count(*) FROM history_samples"
            ).fetchall()
        self.assertEqual(count, 2)
        with self.assertRaises(StoreClosed):
            await IHistoryStorage(self.store).samples(SERIAL, 0, END_MS)

    async def test_reconnects(self) -> None:
        """
        When the history's connection broke, the job that finds out fails,
        and the next one connects again.
        """
        storage = IHistoryStorage(self.store)
        values = sampleValues({"current_temperature": 20.0}, {})
        sample = Sample(SERIAL, START_MS, values)
        await storage.append([sample], [])
        with admin(self.dsn) as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (HISTORY_NAME,),
            )
        with self.assertRaises(psycopg.OperationalError):
            await storage.samples(SERIAL, 0, END_MS)
        self.assertEqual(await storage.samples(SERIAL, 0, END_MS), [sample])
