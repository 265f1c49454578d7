# -*- test-case-name: tests.test_migrate -*-
"""
Tests for L{nestproto.migrate}: a SQLite state copied to PostgreSQL and
back is exactly what it was.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nestproto.buckets import Bucket
from nestproto.datadir import STORE_FILE, DataLock
from nestproto.migrate import main, migrate
from nestproto.store import (
    BucketWrite,
    IBucketStore,
    RecordWrite,
    SQLiteStore,
    Write,
    runInline,
)

from .pg import asURL, testDatabase

BUCKETS = [
    ("S1", Bucket("shared.S1", 7, 1767225600123, {"target_temperature": 20.5})),
    ("S1", Bucket("device.S1", -3, 1700, {"nested": {"list": [1, 2.25, None]}})),
    ("S2", Bucket("shared.S2", 1, 1, {"unicode": "Küche ☃", "big": 2**53})),
    ("", Bucket("structure.u1", 4, 5, {"devices": ["device.S1"], "name": "Home"})),
    ("", Bucket("user.u1", 2, 3, {"name": "u1"})),
]
RECORDS: list[tuple[str, str, dict[str, Any]]] = [
    ("owner", "S1", {"user": "u1", "claimedAt": 1767225600000}),
    ("entry_key", "S2", {"code": "123ABCD", "expires": 9, "created": 1}),
    ("account", "u1", {"tokens": ["t"]}),
]


def snapshot(store: IBucketStore) -> tuple[object, ...]:
    return (
        {scope: store.buckets(scope) for scope in store.scopes()},
        {kind: store.records(kind) for kind in ("owner", "entry_key", "account")},
    )


class MigrateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.source = self.mktemp()
        os.makedirs(self.source)
        store = SQLiteStore.open(
            os.path.join(self.source, STORE_FILE), runInline, Clock()
        )
        writes: list[Write] = [BucketWrite(scope, bucket) for scope, bucket in BUCKETS]
        writes += [RecordWrite(kind, name, doc) for kind, name, doc in RECORDS]
        self.successResultOf(store.write(writes))
        self.expected = snapshot(store)
        self.successResultOf(store.close())

    def sqlite(self, directory: str) -> SQLiteStore:
        store = SQLiteStore.open(
            os.path.join(directory, STORE_FILE), runInline, Clock()
        )
        self.addCleanup(store.close)
        return store

    def test_roundTripIsExact(self) -> None:
        """
        A data directory copied to PostgreSQL and from there to a new data
        directory holds every bucket (revision, timestamp, value) and every
        record exactly as before; so does the database in between.
        """
        from nestproto.store_pg import PostgreSQLStore

        url = asURL(testDatabase(self))
        self.assertEqual(migrate(self.source, url), (len(BUCKETS), len(RECORDS)))
        shared = PostgreSQLStore.open(url, runInline, Clock())
        self.addCleanup(shared.close)
        self.assertEqual(snapshot(shared), self.expected)
        back = self.mktemp()
        self.assertEqual(migrate(url, back), (len(BUCKETS), len(RECORDS)))
        self.assertEqual(snapshot(self.sqlite(back)), self.expected)

    def test_refusesATargetThatHoldsState(self) -> None:
        """A target that holds anything is refused, and left as it was."""
        url = asURL(testDatabase(self))
        migrate(self.source, url)
        err = io.StringIO()
        with redirect_stderr(err):
            status = main(["--from", self.source, "--to", url])
        self.assertEqual(status, 1)
        self.assertIn("already holds a nestproto state", err.getvalue())

    def test_refusesADirectoryAServerHolds(self) -> None:
        """A data directory a running server holds is not read."""
        lock = DataLock.acquire(self.source)
        self.addCleanup(lock.release)
        err = io.StringIO()
        with redirect_stderr(err):
            status = main(["--from", self.source, "--to", self.mktemp()])
        self.assertEqual(status, 1)
        self.assertIn(self.source, err.getvalue())

    def test_mainSaysWhatItCopied(self) -> None:
        """The command line copies and says how much."""
        out = io.StringIO()
        target = self.mktemp()
        with redirect_stdout(out):
            status = main(["--from", self.source, "--to", target])
        self.assertEqual(status, 0)
        self.assertIn("copied 5 buckets and 3 records", out.getvalue())
        self.assertEqual(snapshot(self.sqlite(target)), self.expected)
