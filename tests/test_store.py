# -*- test-case-name: tests.test_store -*-
"""
Tests for L{nestproto.store}: durability, group commit, restart, crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from nestproto.buckets import Bucket
from nestproto.errors import StoreClosed
from nestproto.store import (
    BucketWrite,
    IBucketStore,
    RecordWrite,
    SQLiteStore,
    runInline,
)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HeldRunner:
    """
    A thread runner whose jobs wait until the test releases them: the
    commits of a store can be watched one at a time.
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def release(self) -> None:
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


def rowCount(path: str) -> int:
    import sqlite3

    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("SELECT COUNT(*) FROM buckets").fetchone()[0])
    finally:
        connection.close()


class SQLiteStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()

    def test_providesInterface(self) -> None:
        """L{SQLiteStore} provides L{IBucketStore}."""
        store = SQLiteStore.open(self.path, runInline)
        self.assertTrue(verifyObject(IBucketStore, store))

    def test_reopenKeepsBucketsExactly(self) -> None:
        """
        Buckets written and acknowledged come back after a reopen with the
        same revision, timestamp and value, each in its own scope.
        """
        store = SQLiteStore.open(self.path, runInline)
        shared = Bucket("shared.02AA01AC0000000001", -5, 1767225600123, {"t": 21.5})
        structure = Bucket("structure.home", 3, 1767225600999, {"devices": ["a"]})
        self.successResultOf(
            store.write(
                [BucketWrite("02AA01AC0000000001", shared), BucketWrite("", structure)]
            )
        )
        self.successResultOf(store.close())

        reopened = SQLiteStore.open(self.path, runInline)
        self.assertEqual(reopened.get("02AA01AC0000000001", shared.key), shared)
        self.assertEqual(reopened.get("", structure.key), structure)
        self.assertIsNone(reopened.get("", shared.key))
        self.assertEqual(reopened.scopes(), ["", "02AA01AC0000000001"])

    def test_recordsPersistAndDelete(self) -> None:
        """Records are kept across a reopen; a C{None} document deletes one."""
        store = SQLiteStore.open(self.path, runInline)
        self.successResultOf(
            store.write(
                [
                    RecordWrite("owner", "A", {"user": "u1"}),
                    RecordWrite("owner", "B", {"user": "u2"}),
                ]
            )
        )
        self.successResultOf(store.write([RecordWrite("owner", "B", None)]))
        self.successResultOf(store.close())
        reopened = SQLiteStore.open(self.path, runInline)
        self.assertEqual(reopened.records("owner"), {"A": {"user": "u1"}})

    def test_deleteScope(self) -> None:
        """Deleting a scope removes its buckets in memory and on disk."""
        store = SQLiteStore.open(self.path, runInline)
        self.successResultOf(
            store.write([BucketWrite("S", Bucket("device.S0000000000", 1, 1))])
        )
        self.successResultOf(store.deleteScope("S"))
        self.assertEqual(store.buckets("S"), [])
        self.assertEqual(rowCount(self.path), 0)

    def test_readsSeeWritesBeforeCommit(self) -> None:
        """
        A write is visible to reads at once (the next change builds on it)
        while its Deferred waits for the commit.
        """
        runner = HeldRunner()
        store = SQLiteStore.open(self.path, runner)
        bucket = Bucket("device.S0000000000", 1, 1, {"a": 1})
        d = store.write([BucketWrite("S", bucket)])
        self.assertEqual(store.get("S", bucket.key), bucket)
        self.assertNoResult(d)
        self.assertEqual(rowCount(self.path), 0)
        runner.release()
        self.successResultOf(d)
        self.assertEqual(rowCount(self.path), 1)

    def test_groupCommit(self) -> None:
        """
        Writes made while a commit runs are committed together in one
        following transaction, and each is acknowledged only after it.
        """
        runner = HeldRunner()
        store = SQLiteStore.open(self.path, runner)
        first = store.write([BucketWrite("S", Bucket("device.S0000000001", 1, 1))])
        later = [
            store.write([BucketWrite("S", Bucket(f"device.S000000010{i}", 1, 1))])
            for i in range(5)
        ]
        self.assertEqual(len(runner.jobs), 1)
        runner.release()
        self.successResultOf(first)
        for d in later:
            self.assertNoResult(d)
        self.assertEqual(len(runner.jobs), 1, "the five waiting writes make one job")
        runner.release()
        for d in later:
            self.successResultOf(d)
        self.assertEqual(rowCount(self.path), 6)

    def test_failedCommitFailsItsWrites(self) -> None:
        """A commit that fails errbacks the writes it carried."""
        runner = HeldRunner()
        store = SQLiteStore.open(self.path, runner)
        d = store.write([BucketWrite("S", Bucket("device.S0000000001", 1, 1))])
        store._connection.close()
        runner.release()
        self.failureResultOf(d)
        self.flushLoggedErrors()

    def test_closeWaitsForPendingCommits(self) -> None:
        """Closing fires only after every accepted write is on disk."""
        runner = HeldRunner()
        store = SQLiteStore.open(self.path, runner)
        store.write([BucketWrite("S", Bucket("device.S0000000001", 1, 1))])
        closed = store.close()
        self.assertNoResult(closed)
        while runner.jobs:
            runner.release()
        self.successResultOf(closed)
        self.assertEqual(rowCount(self.path), 1)

    def test_writeAfterCloseRefused(self) -> None:
        """
        A write after close is refused with a 503 error (the server is
        shutting down) rather than a crash, and changes nothing.
        """
        store = SQLiteStore.open(self.path, runInline)
        self.successResultOf(store.close())
        error = self.assertRaises(
            StoreClosed, store.write, [BucketWrite("S", Bucket("device.S0000000001"))]
        )
        self.assertEqual(error.status, 503)
        self.assertIsNone(store.get("S", "device.S0000000001"))

    def test_walMode(self) -> None:
        """The file is in WAL mode, so readers never block the writer."""
        SQLiteStore.open(self.path, runInline)
        import sqlite3

        mode = sqlite3.connect(self.path).execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")


_WRITER = textwrap.dedent(
    """
    import functools, sys
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool
    from nestproto.buckets import Bucket
    from nestproto.store import BucketWrite, SQLiteStore

    pool = ThreadPool(1, 1)
    pool.start()
    runner = functools.partial(deferToThreadPool, reactor, pool)
    store = SQLiteStore.open(sys.argv[1], runner)
    counter = [0]

    def acknowledged(ignored, n):
        # The line is the acknowledgement: printed only after durability.
        sys.stdout.write("%d\\n" % n)
        sys.stdout.flush()

    def writeMore():
        for _ in range(20):
            counter[0] += 1
            n = counter[0]
            bucket = Bucket("shared.S%09d" % (n % 50), n, 1767225600000 + n, {"n": n})
            store.write([BucketWrite("S", bucket)]).addCallback(acknowledged, n)
        reactor.callLater(0.001, writeMore)

    reactor.callWhenRunning(writeMore)
    reactor.run()
    """
)


class CrashTests(SynchronousTestCase):
    def test_killNineLosesNothingAcknowledged(self) -> None:
        """
        A real process writing to a real SQLite file is killed with SIGKILL
        mid-stream; every write it acknowledged is found after reopening,
        with its exact revision and timestamp.
        """
        path = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, path],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert process.stdout is not None
        acknowledged: list[int] = []
        while len(acknowledged) < 2000:
            line = process.stdout.readline()
            if not line:
                break
            acknowledged.append(int(line))
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.assertGreaterEqual(len(acknowledged), 2000, "writer died early")

        reopened = SQLiteStore.open(path, runInline)
        latest: dict[str, int] = {}
        for n in acknowledged:
            latest[f"shared.S{n % 50:09d}"] = n
        for key, n in latest.items():
            found = reopened.get("S", key)
            assert found is not None, key
            # A later, unacknowledged write may have landed too; never an
            # older one.
            self.assertGreaterEqual(found.revision, n)
            self.assertEqual(found.timestamp, 1767225600000 + found.revision)
            self.assertEqual(found.value, {"n": found.revision})
