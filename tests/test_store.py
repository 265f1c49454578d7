# -*- test-case-name: tests.test_store -*-
"""
Tests for L{nestproto.store}: the store contract on SQLite, plus what only
the SQLite engine has (WAL, group commit, schema upgrades).
"""

from __future__ import annotations

import sqlite3
from functools import partial
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel, capturedLogs
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nestproto.buckets import Bucket
from nestproto.errors import StoreUnavailable
from nestproto.store import (
    BucketWrite,
    IBucketStore,
    SchemaTooNew,
    SQLiteStore,
    ThreadRunner,
    runInline,
)

from .store_contract import START_MS, CommitGate, StoreContract, update


def openForWriter(path: str, runner: ThreadRunner | None) -> SQLiteStore:
    """How the contract's hard-kill writer (and its check) open the file."""
    from twisted.internet import reactor

    return SQLiteStore.open(path, runner or runInline, reactor)


def rowCount(path: str) -> int:
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("SELECT COUNT(*) FROM buckets").fetchone()[0])
    finally:
        connection.close()


class SQLiteContractTests(StoreContract, TestCase):
    """The store contract, on a real SQLite file committed by a real thread."""

    WRITER = "tests.test_store:openForWriter"

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = Clock()
        self.clock.advance(START_MS / 1000)
        pool = ThreadPool(minthreads=1, maxthreads=1, name="test-store")
        pool.start()
        self.addCleanup(pool.stop)
        self.gate = CommitGate(partial(deferToThreadPool, cast(Any, reactor), pool))

    def openStore(self, again: IBucketStore | None = None) -> Deferred[IBucketStore]:
        store: IBucketStore = SQLiteStore.open(self.path, self.gate, self.clock)
        return succeed(store)

    def writerLocation(self) -> str:
        return str(self.mktemp())


class SQLiteStoreTests(SynchronousTestCase):
    """What only the SQLite engine does."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = Clock()

    def test_groupCommit(self) -> None:
        """
        Writes made while a commit runs are committed together in one
        following transaction, and each is acknowledged only after it.
        """
        gate = CommitGate(runInline)
        gate.holding = True
        store = SQLiteStore.open(self.path, gate, self.clock)
        first = store.write([update("S", "device.S1", {"n": 0})])
        later = [store.write([update("S", f"device.T{i}", {"n": i})]) for i in range(5)]
        self.assertEqual(len(gate.held), 1)
        held, gate.held = gate.held[0], []
        f, args, d = held
        runInline(f, *args).chainDeferred(d)
        self.successResultOf(first)
        for each in later:
            self.assertNoResult(each)
        self.assertEqual(len(gate.held), 1, "the five waiting writes make one job")
        gate.release()
        for each in later:
            self.successResultOf(each)
        self.assertEqual(rowCount(self.path), 6)

    def test_diskErrorFailsTheBatch(self) -> None:
        """
        A commit that fails in SQLite itself (here: the connection is gone)
        fails its writes with a 503, leaves memory as it was, and says why
        in one error line, without a traceback.
        """
        store = SQLiteStore.open(self.path, runInline, self.clock)
        store._connection.close()
        with capturedLogs() as events:
            failed = store.write([update("S", "device.S", {})])
        self.assertIsInstance(self.failureResultOf(failed).value, StoreUnavailable)
        self.assertIsNone(store.get("S", "device.S"))
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertNotIn("log_failure", event)
        self.assertIn("closed database", event["reason"])

    def test_walMode(self) -> None:
        """The file is in WAL mode, so readers never block the writer."""
        SQLiteStore.open(self.path, runInline, self.clock)
        mode = sqlite3.connect(self.path).execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")

    def test_upgradesTheFirstSchema(self) -> None:
        """
        A database written by the first release (no meta table) opens with
        every bucket and record intact, and is recorded as the current
        schema with a change sequence starting at 0.
        """
        connection = sqlite3.connect(self.path)
        connection.executescript(
            """
            CREATE TABLE buckets (scope TEXT NOT NULL, key TEXT NOT NULL,
                revision INTEGER NOT NULL, timestamp INTEGER NOT NULL,
                value TEXT NOT NULL, PRIMARY KEY (scope, key));
            CREATE TABLE records (kind TEXT NOT NULL, name TEXT NOT NULL,
                doc TEXT NOT NULL, PRIMARY KEY (kind, name));
            INSERT INTO buckets VALUES ('S', 'shared.S', -3, 1700, '{"t":20.5}');
            INSERT INTO records VALUES ('owner', 'S', '{"user":"u"}');
            """
        )
        connection.close()
        store = SQLiteStore.open(self.path, runInline, self.clock)
        self.assertEqual(
            store.get("S", "shared.S"), Bucket("shared.S", -3, 1700, {"t": 20.5})
        )
        self.assertEqual(store.record("owner", "S"), {"user": "u"})
        self.assertEqual(store.lastSequence, 0)
        self.successResultOf(store.write([update("S", "shared.S", {"t": 21})]))
        self.assertEqual(store.lastSequence, 1)
        self.successResultOf(store.close())
        version = (
            sqlite3.connect(self.path)
            .execute("SELECT value FROM meta WHERE name = 'schema_version'")
            .fetchone()[0]
        )
        self.assertEqual(version, 2)

    def test_dropsSpacedKeysOnOpen(self) -> None:
        """
        A bucket an older nestproto stored under a 4.x firmware's mangled
        key (C{shared.S ._sync}) is dropped when the file is opened, with a
        warning; the bucket under the canonical key is kept (PROTOCOL.md
        §20.2).
        """
        store = SQLiteStore.open(self.path, runInline, self.clock)
        self.successResultOf(store.write([update("S", "shared.S", {"t": 20})]))
        self.successResultOf(store.close())
        connection = sqlite3.connect(self.path)
        connection.execute(
            "INSERT INTO buckets VALUES ('S', 'shared.S ._sync', 1, 1700, '{}')"
        )
        connection.commit()
        connection.close()
        with capturedLogs() as events:
            store = SQLiteStore.open(self.path, runInline, self.clock)
        self.assertEqual([b.key for b in store.buckets("S")], ["shared.S"])
        self.assertEqual(rowCount(self.path), 1)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["count"], 1)

    def test_refusesANewerSchema(self) -> None:
        """A database from a newer nestproto is refused, not misread."""
        store = SQLiteStore.open(self.path, runInline, self.clock)
        self.successResultOf(store.close())
        connection = sqlite3.connect(self.path)
        connection.execute("UPDATE meta SET value = 99 WHERE name = 'schema_version'")
        connection.commit()
        connection.close()
        error = self.assertRaises(
            SchemaTooNew, SQLiteStore.open, self.path, runInline, self.clock
        )
        self.assertIn("99", str(error))

    def test_exactWriteOfAbsentDeleteChangesNothing(self) -> None:
        """Deleting a bucket that is not there commits and announces nothing."""
        store = SQLiteStore.open(self.path, runInline, self.clock)
        seen: list[object] = []
        store.listen(seen.append)
        self.successResultOf(
            store.write([BucketWrite("S", Bucket("x.S"), delete=True)])
        )
        self.assertEqual((seen, store.lastSequence), ([], 0))
