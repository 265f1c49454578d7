# -*- test-case-name: tests.test_migrate -*-
"""
Tests for L{nestproto.migrate}: a SQLite state and its history copied to
PostgreSQL and back is exactly what it was.
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
from nestproto.history import (
    HOUR_MS,
    MINUTE_MS,
    HistoryRows,
    IHistoryStorage,
    Sample,
    Transition,
    sampleValues,
)
from nestproto.migrate import Copied, MigrationError, main, migrate
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


#: Where the history below starts: a whole hour.
START_MS = 1767225600000
#: Hours of history; all but the last are rolled up, the first two are
#: pruned of raw rows.
HOURS = 5
ROLLED_UP_TO = START_MS + (HOURS - 1) * HOUR_MS
PRUNED_BEFORE = START_MS + 2 * HOUR_MS
SERIALS = ("S1", "S2")


def historyOf(serial: str) -> tuple[list[Sample], list[Transition]]:
    """A sample every 7 minutes, the heater and fan turning on and off."""
    samples = [
        Sample(
            serial,
            START_MS + minute * MINUTE_MS + 123,
            sampleValues(
                {
                    "current_temperature": 18 + minute / 7,
                    "target_temperature_type": "heat" if minute % 2 else "range",
                    "target_temperature_low": None if minute % 3 else 17.5,
                },
                {"current_humidity": 40 + minute % 9, "eco": {"mode": "manual-eco"}},
            ),
        )
        for minute in range(0, HOURS * 60, 7)
    ]
    transitions = [
        Transition(serial, START_MS + minute * MINUTE_MS + 5, name, on)
        for minute in range(3, HOURS * 60, 41)
        for name, on in [
            ("hvac_heater_state", minute % 2 == 1),
            ("hvac_fan_state", minute % 3 != 0),
        ]
    ]
    return samples, transitions


def result(d: Any) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    (value,) = results
    if isinstance(value, Exception):
        raise value
    return value


def snapshot(store: IBucketStore) -> tuple[object, ...]:
    return (
        {scope: store.buckets(scope) for scope in store.scopes()},
        {kind: store.records(kind) for kind in ("owner", "entry_key", "account")},
    )


def historySnapshot(storage: IHistoryStorage) -> dict[str, Any]:
    """
    What the history API reads of C{storage}: each device's samples,
    transitions (from the start, and from within the pruned hours), hours,
    and usage per hour over the whole range, from raw rows as far as they
    go and from hourly rows as far as they go; and where hourly rows end.
    """
    endMs = START_MS + (HOURS + 1) * HOUR_MS
    boundaries = list(range(START_MS - HOUR_MS, endMs + 1, HOUR_MS))
    reads: dict[str, Any] = {}
    for serial in SERIALS:
        reads[serial] = (
            result(storage.samples(serial, 0, endMs)),
            result(storage.transitions(serial, 0, endMs)),
            result(storage.transitions(serial, START_MS + 90 * MINUTE_MS, endMs)),
            result(storage.hours(serial, 0, endMs)),
            result(storage.usage(serial, boundaries, 0)),
            result(storage.usage(serial, boundaries, endMs)),
        )
    first: HistoryRows = result(storage.exportRows(None, 1))
    reads["rolledUpTo"] = first.rolledUpTo
    return reads


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
        history = IHistoryStorage(store)
        for serial in SERIALS:
            result(history.append(*historyOf(serial)))
        while result(history.rollUp(ROLLED_UP_TO)):
            pass
        result(history.prune(PRUNED_BEFORE, 0))
        self.expectedHistory = historySnapshot(history)
        self.successResultOf(store.close())

    def sqlite(self, directory: str) -> SQLiteStore:
        store = SQLiteStore.open(
            os.path.join(directory, STORE_FILE), runInline, Clock()
        )
        self.addCleanup(store.close)
        return store

    def copied(self) -> Copied:
        """What a migration of the source copies."""
        samples, transitions, _, hours, _, _ = zip(
            *(self.expectedHistory[serial] for serial in SERIALS), strict=True
        )
        return Copied(
            len(BUCKETS),
            len(RECORDS),
            sum(map(len, samples)),
            sum(len(t.changes) for t in transitions),
            sum(map(len, hours)),
        )

    def test_historyIsNotTrivial(self) -> None:
        """
        The source's history has raw samples and transitions, hourly rows,
        hours whose raw rows are pruned, and an hour not rolled up yet.
        """
        copied = self.copied()
        self.assertTrue(copied.samples and copied.transitions)
        self.assertEqual(copied.hours, len(SERIALS) * (HOURS - 1))
        self.assertEqual(self.expectedHistory["rolledUpTo"], ROLLED_UP_TO)
        samples = self.expectedHistory[SERIALS[0]][0]
        self.assertTrue(PRUNED_BEFORE <= samples[0].timeMs)
        self.assertTrue(ROLLED_UP_TO <= samples[-1].timeMs)

    def test_roundTripIsExact(self) -> None:
        """
        A data directory copied to PostgreSQL and from there to a new data
        directory holds every bucket (revision, timestamp, value) and every
        record exactly as before, and its history reads the same (samples,
        transitions, hours, usage, where hourly rows end); so does the
        database in between. Batches of history cross tables.
        """
        from nestproto.store_pg import PostgreSQLStore

        url = asURL(testDatabase(self))
        self.assertEqual(migrate(self.source, url, batchRows=7), self.copied())
        shared = PostgreSQLStore.open(url, runInline, Clock())
        self.addCleanup(shared.close)
        self.assertEqual(snapshot(shared), self.expected)
        self.assertEqual(historySnapshot(IHistoryStorage(shared)), self.expectedHistory)
        back = self.mktemp()
        self.assertEqual(migrate(url, back), self.copied())
        backHistory = IHistoryStorage(self.sqlite(back))
        self.assertEqual(snapshot(self.sqlite(back)), self.expected)
        self.assertEqual(historySnapshot(backHistory), self.expectedHistory)

    def test_migratedHistoryGoesOn(self) -> None:
        """
        On PostgreSQL, the migrated history goes on where it was: the hours
        rolled up before are not rolled up again, the next one is, from the
        migrated raw rows.
        """
        from nestproto.history_pg import PostgreSQLHistoryStorage
        from nestproto.store_pg import PostgreSQLStore

        url = asURL(testDatabase(self))
        migrate(self.source, url)
        shared = PostgreSQLStore.open(url, runInline, Clock())
        self.addCleanup(shared.close)
        history = PostgreSQLHistoryStorage(url, runInline, settleMs=0)
        self.addCleanup(history.close)
        self.assertEqual(result(history.rollUp(ROLLED_UP_TO)), 0)
        self.assertEqual(result(history.rollUp(ROLLED_UP_TO + HOUR_MS)), 1)
        for serial in SERIALS:
            samples = self.expectedHistory[serial][0]
            *before, last = result(history.hours(serial, 0, ROLLED_UP_TO + HOUR_MS))
            self.assertEqual(before, self.expectedHistory[serial][3])
            self.assertEqual(
                (last.hourMs, last.samples),
                (ROLLED_UP_TO, sum(s.timeMs >= ROLLED_UP_TO for s in samples)),
            )

    def test_refusesATargetThatHoldsHistory(self) -> None:
        """
        A target that holds history and no state (a sample, or only where
        hourly rows end) is refused, and left as it was.
        """
        from nestproto.store_pg import PostgreSQLStore

        url = asURL(testDatabase(self))
        shared = PostgreSQLStore.open(url, runInline, Clock())
        sample = Sample("S9", START_MS, sampleValues({}, {}))
        result(IHistoryStorage(shared).append([sample], []))
        result(shared.close())
        directory = self.mktemp()
        os.makedirs(directory)
        store = SQLiteStore.open(
            os.path.join(directory, STORE_FILE), runInline, Clock()
        )
        self.assertEqual(result(IHistoryStorage(store).rollUp(START_MS)), 0)
        result(store.close())
        for target in (url, directory):
            with self.assertRaises(MigrationError) as raised:
                migrate(self.source, target)
            self.assertIn("already holds a nestproto state", str(raised.exception))
        shared = PostgreSQLStore.open(url, runInline, Clock())
        self.addCleanup(shared.close)
        self.assertEqual(shared.scopes(), [])
        self.assertEqual(
            result(IHistoryStorage(shared).samples("S9", 0, START_MS + 1)), [sample]
        )
        self.assertEqual(snapshot(self.sqlite(directory))[0], {})

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
        copied = self.copied()
        self.assertIn(
            f"copied 5 buckets and 3 records, and a history of {copied.samples}"
            f" samples, {copied.transitions} transitions and {copied.hours}"
            " hourly rows",
            out.getvalue(),
        )
        self.assertEqual(snapshot(self.sqlite(target)), self.expected)
