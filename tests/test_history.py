# -*- test-case-name: tests.test_history -*-
"""
Tests for L{nestproto.history}: what a thermostat's reports record (through
the device port and the store's feed), the hourly roll-up, retention, the
size the database settles at, and the store's hook the tables use.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from nestproto.apps import AppSettings, buildApps
from nestproto.buckets import Bucket
from nestproto.errors import StoreClosed
from nestproto.history import (
    DAY_MS,
    HOUR_MS,
    HVAC_FIELDS,
    SIGNALS,
    USAGE,
    History,
    HistoryService,
    HistorySettings,
    IHistoryStorage,
    Sample,
    SQLiteHistoryStorage,
    Transition,
    msPerPeriod,
    onSpans,
    signalSpans,
    unionSpans,
)
from nestproto.service import Options, makeService
from nestproto.store import BucketWrite, IBucketStore, SQLiteStore, runInline

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    Server,
    basicAuth,
    clientObject,
    completed,
    makeServer,
    objectsBody,
)
from .history_contract import END_MS, START_MS, HistoryStorageContract, Recorder
from .stub import StubClient

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"


def historyOf(server: Server) -> History:
    history = server.control.history
    assert history is not None
    return history


def storedRows(store: SQLiteStore, table: str, serial: str = SERIAL) -> int:
    """How many rows of C{serial} C{table} holds (the store runs inline)."""
    # Its first call creates the tables.
    SQLiteHistoryStorage(store).databaseBytes()
    rows: list[int] = []
    store.withConnection(
        lambda c: c.execute(
            f"SELECT COUNT(*) FROM {table} WHERE serial = ?", (serial,)
        ).fetchone()[0]
    ).addCallback(rows.append)
    return rows[0]


class _Recorder(Recorder):
    """A SQLite store at C{path} with a history of its own."""

    store: SQLiteStore

    def __init__(
        self, settings: HistorySettings | None = None, path: str = ":memory:"
    ) -> None:
        clock = Clock()
        clock.advance(START_MS / 1000)
        store = SQLiteStore.open(path, runInline, clock)
        super().__init__(store, SQLiteHistoryStorage(store), clock, settings)
        self.store = store


class SQLiteStorageTests(HistoryStorageContract, SynchronousTestCase):
    """The history storage contract, on SQLite in memory."""

    def openStore(self, clock: Clock) -> tuple[IBucketStore, IHistoryStorage]:
        store = SQLiteStore.open(":memory:", runInline, clock)
        return store, IHistoryStorage(store)


class RecordingTests(SynchronousTestCase):
    """A thermostat's puts and subscribes, through the device port, record."""

    def setUp(self) -> None:
        self.server = makeServer()
        self.history = historyOf(self.server)

    def put(self, shared: Mapping[str, Any] | None = None, **device: Any) -> None:
        objects = []
        if shared is not None:
            objects.append({"object_key": SHARED, "value": dict(shared)})
        if device:
            objects.append({"object_key": DEVICE, "value": device})
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/put",
            data=json.dumps({"session": "s", "objects": objects}).encode(),
            headers=basicAuth(SERIAL),
        )
        response, body = completed(self, self.server.deviceClient, d)
        self.assertEqual(response.code, 200, body)

    def at(self, offsetMs: int) -> None:
        """Move the clock to C{offsetMs} after the start."""
        self.server.clock.advance(
            (START_MS + offsetMs) / 1000 - self.server.clock.seconds()
        )

    def samples(self) -> list[tuple[int, Any]]:
        found = self.successResultOf(self.history.samples(SERIAL, START_MS, END_MS))
        return [(s.timeMs - START_MS, s.values["temperature"]) for s in found]

    def transitions(self) -> list[tuple[int, str, bool]]:
        found = self.successResultOf(self.history.transitions(SERIAL, START_MS, END_MS))
        return [(t.timeMs - START_MS, t.field, t.on) for t in found.changes]

    def test_oneSampleAMinuteTheLastReport(self) -> None:
        """
        Reports within one clock minute make one sample: the state and time
        of the last of them. Only minutes that have ended are written; the
        current one is answered from memory.
        """
        for offsetMs, temperature in [
            (5_000, 20.0),
            (25_000, 20.5),
            (45_000, 21.0),
            (65_000, 21.5),
            (119_999, 21.25),
        ]:
            self.at(offsetMs)
            self.put({"current_temperature": temperature})
        self.assertEqual(self.samples(), [(45_000, 21.0), (119_999, 21.25)])
        self.assertEqual(storedRows(self.server.store, "history_samples"), 1)
        self.at(120_000)
        self.history.flush()
        self.assertEqual(storedRows(self.server.store, "history_samples"), 2)
        self.assertEqual(self.samples(), [(45_000, 21.0), (119_999, 21.25)])

    def test_sampleValues(self) -> None:
        """
        A sample holds current temperature (shared first, device second),
        humidity, targets, mode and eco mode; a device bucket put alone
        samples too.
        """
        self.put(
            {
                "target_temperature": 21.0,
                "target_temperature_low": 19.0,
                "target_temperature_high": 24.5,
                "target_temperature_type": "range",
            },
            current_temperature=20.25,
            current_humidity=44,
            eco={"mode": "manual-eco", "touched_by": 1},
        )
        (sample,) = self.successResultOf(self.history.samples(SERIAL, 0, END_MS))
        self.assertEqual(
            dict(sample.values),
            {
                "temperature": 20.25,
                "humidity": 44.0,
                "target": 21.0,
                "target_low": 19.0,
                "target_high": 24.5,
                "mode": "range",
                "eco": "manual-eco",
            },
        )

    def test_unusableValues(self) -> None:
        """
        A mode word too long is recorded as unknown. (A non-number in a
        numeric field, or a number a float cannot hold, never gets this far:
        the device port refuses it, see L{nestproto.fields}.)
        """
        self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/put",
            data=b'{"objects": [{"object_key": "shared.%s", "value": {'
            b'"target_temperature_type": "%s"}}]}' % (SERIAL.encode(), b"x" * 33),
            headers=basicAuth(SERIAL),
        )
        self.server.deviceClient.flush()
        (sample,) = self.successResultOf(self.history.samples(SERIAL, 0, END_MS))
        self.assertEqual(set(sample.values.values()), {None})

    def test_transitionsExact(self) -> None:
        """
        Each HVAC field that turns on or off is a transition at the exact
        millisecond of its report (listed by time, then field); a report
        that changes none is none.
        """
        self.at(7_123)
        self.put({"hvac_heater_state": True, "hvac_fan_state": True})
        self.at(30_000)
        self.put({"hvac_heater_state": True, "current_temperature": 20.0})
        self.at(95_500)
        self.put({"hvac_heater_state": False})
        self.at(3_600_001)
        self.put({"hvac_fan_state": False, "hvac_ac_state": True})
        self.assertEqual(
            self.transitions(),
            [
                (7_123, "hvac_fan_state", True),
                (7_123, "hvac_heater_state", True),
                (95_500, "hvac_heater_state", False),
                (3_600_001, "hvac_ac_state", True),
                (3_600_001, "hvac_fan_state", False),
            ],
        )

    def test_subscribeInlineUpdateRecords(self) -> None:
        """A first subscribe carrying the device's state inline records it."""
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport",
            data=objectsBody(
                [
                    clientObject(
                        SHARED,
                        value={"hvac_heater_state": True, "current_temperature": 19.5},
                    )
                ],
                chunked=False,
            ),
            headers=basicAuth(SERIAL),
        )
        completed(self, self.server.deviceClient, d)
        self.assertEqual(self.samples(), [(0, 19.5)])
        self.assertEqual(self.transitions(), [(0, "hvac_heater_state", True)])

    def test_othersChangesNotRecorded(self) -> None:
        """
        A command's change (not the device's own report) and another
        device's reports record nothing for the device.
        """
        self.put({"target_temperature": 20.0, "can_heat": True})
        self.at(120_000)
        d = self.server.controlClient.post(
            CONTROL_URL + "/command",
            json={"serial": SERIAL, "command": "set_temperature", "value": 22.0},
        )
        response, body = completed(self, self.server.controlClient, d)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.samples(), [(0, None)])

    def test_deletedDeviceForgotten(self) -> None:
        """
        Deleting a device deletes its stored and buffered history; another
        device's stays.
        """
        self.put({"hvac_heater_state": True, "current_temperature": 20.0})
        self.at(120_000)
        self.put({"hvac_heater_state": False})
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/put",
            data=objectsBody(
                [
                    {
                        "object_key": f"shared.{OTHER_SERIAL}",
                        "value": {"hvac_heater_state": True},
                    }
                ]
            ),
            headers=basicAuth(OTHER_SERIAL),
        )
        completed(self, self.server.deviceClient, d)
        self.history.flush()
        self.assertEqual(storedRows(self.server.store, "history_samples"), 1)
        d = self.server.controlClient.delete(
            CONTROL_URL + "/api/device", json={"serial": SERIAL}
        )
        response, body = completed(self, self.server.controlClient, d)
        self.assertEqual(response.code, 200, body)
        for table in ("history_samples", "history_transitions", "history_hours"):
            self.assertEqual(storedRows(self.server.store, table), 0)
        self.assertEqual(self.samples(), [])
        self.assertEqual(self.transitions(), [])
        self.assertEqual(
            storedRows(self.server.store, "history_transitions", OTHER_SERIAL), 1
        )

    def test_restartKnowsTheHVACState(self) -> None:
        """
        After a restart a report repeating the committed HVAC state is no
        transition; the next change is.
        """
        path = self.mktemp()
        first = makeServer(path, clock=self.server.clock)
        self.server = first
        self.history = historyOf(first)
        self.put({"hvac_heater_state": True})
        self.successResultOf(self.history.stop())
        self.successResultOf(first.store.close())
        self.server = makeServer(path, clock=first.clock)
        self.history = historyOf(self.server)
        self.at(60_000)
        self.put({"hvac_heater_state": True, "current_temperature": 20.0})
        self.at(90_000)
        self.put({"hvac_heater_state": False})
        self.assertEqual(
            self.transitions(),
            [(0, "hvac_heater_state", True), (90_000, "hvac_heater_state", False)],
        )

    def test_flushEveryPeriodAndStop(self) -> None:
        """
        Started, history writes what is buffered every C{flushSeconds};
        stopped, it writes the rest, the current minute's sample included,
        and leaves no timer.
        """
        service = HistoryService(self.history)
        service.startService()
        self.put({"hvac_heater_state": True, "current_temperature": 20.0})
        self.assertEqual(storedRows(self.server.store, "history_transitions"), 0)
        self.server.clock.advance(self.history.settings.flushSeconds)
        self.assertEqual(storedRows(self.server.store, "history_transitions"), 1)
        self.assertEqual(storedRows(self.server.store, "history_samples"), 0)
        self.successResultOf(service.stopService())
        self.assertEqual(storedRows(self.server.store, "history_samples"), 1)
        self.assertEqual(self.server.clock.getDelayedCalls(), [])


class BufferTests(SynchronousTestCase):
    """Writing in batches, and what a failed batch does."""

    def test_failedBatchKept(self) -> None:
        """
        Rows the database refused are kept and written by the next flush.
        """
        recorder = _Recorder()
        recorder.history.storage = _FailingOnce(recorder.store)
        recorder.report({"hvac_heater_state": True})
        recorder.history.flush()
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertEqual(storedRows(recorder.store, "history_transitions"), 0)
        recorder.history.flush()
        self.assertEqual(storedRows(recorder.store, "history_transitions"), 1)

    def test_storageAdapter(self) -> None:
        """A SQLite store adapts to its L{SQLiteHistoryStorage}."""
        store = SQLiteStore.open(":memory:", runInline, Clock())
        self.assertIsInstance(IHistoryStorage(store), SQLiteHistoryStorage)


class _FailingOnce(SQLiteHistoryStorage):
    """A storage whose first write fails as a full disk does."""

    failed = False

    def append(
        self, samples: Sequence[Sample], transitions: Sequence[Transition]
    ) -> Deferred[None]:
        if not self.failed:
            type(self).failed = True
            return fail(sqlite3.OperationalError("database or disk is full"))
        return super().append(samples, transitions)


class SpanTests(SynchronousTestCase):
    """The pure rules of time on."""

    def test_onSpans(self) -> None:
        """
        On from the state before the start or from a turn on, until a turn
        off or the end; repeated ons and offs change nothing.
        """
        self.assertEqual(
            onSpans(
                True,
                [
                    (5, False),
                    (10, True),
                    (12, True),
                    (20, False),
                    (25, False),
                    (40, True),
                ],
                0,
                50,
            ),
            [(0, 5), (10, 20), (40, 50)],
        )
        self.assertEqual(onSpans(False, [(-5, True), (60, False)], 0, 50), [(0, 50)])

    def test_unionAndPeriods(self) -> None:
        """Spans merge where they touch; periods split them."""
        self.assertEqual(
            unionSpans([(0, 10), (30, 40)], [(10, 20), (35, 50)]), [(0, 20), (30, 50)]
        )
        self.assertEqual(msPerPeriod([(5, 25), (28, 29)], [0, 10, 20, 30]), [5, 10, 6])

    @given(
        st.lists(
            st.tuples(
                st.integers(-2 * HOUR_MS, 30 * HOUR_MS),
                st.sampled_from(HVAC_FIELDS[:4]),
                st.booleans(),
            ),
            max_size=40,
        ),
        st.integers(0, 3 * HOUR_MS),
        st.integers(1, 27 * HOUR_MS),
        st.fixed_dictionaries({name: st.booleans() for name in HVAC_FIELDS[:4]}),
    )
    def test_minutesOnNeverExceedTheInterval(
        self,
        changes: list[tuple[int, str, bool]],
        startMs: int,
        lengthMs: int,
        initial: dict[str, bool],
    ) -> None:
        """
        For any transitions, each signal's time on per hour is at most an
        hour, and summed over the hours it is its whole time on, at most
        the interval; a category is on at least as long as any of its
        fields and at most as long as all of them together.
        """
        endMs = startMs + lengthMs
        transitions = [
            Transition(SERIAL, t, name, on)
            for t, name, on in sorted(changes, key=lambda c: c[0])
        ]
        spans = signalSpans(initial, transitions, startMs, endMs)
        hours = list(range(startMs // HOUR_MS * HOUR_MS, endMs + HOUR_MS, HOUR_MS))
        for name in SIGNALS:
            perHour = msPerPeriod(spans[name], hours)
            self.assertTrue(all(0 <= ms <= HOUR_MS for ms in perHour))
            total = sum(end - start for start, end in spans[name])
            self.assertEqual(sum(perHour), total)
            self.assertLessEqual(total, lengthMs)
        for category, members in USAGE.items():
            total = sum(e - s for s, e in spans[category])
            memberTotals = [sum(e - s for s, e in spans[name]) for name in members]
            self.assertGreaterEqual(total, max(memberTotals))
            self.assertLessEqual(total, sum(memberTotals))


class SizeTests(SynchronousTestCase):
    """The size SQLite's file settles at."""

    def test_sizeSettles(self) -> None:
        """
        A year of one-minute samples of one thermostat (heater and fan
        cycling twice an hour), maintained daily with raw retention of 14
        days and hourly of 180: the database stops growing once both
        retentions are reached. Printed: its size along the year, and the
        size it settles at with the default two years of hourly rows.
        """
        path = self.mktemp()
        recorder = _Recorder(HistorySettings(rawDays=14, hourlyDays=180), path=path)
        # Only the sizes matter here: no fsync per commit. The storage's
        # first call creates the tables.
        recorder.store.withConnection(lambda c: c.execute("PRAGMA synchronous=OFF"))
        recorder.result(recorder.storage.databaseBytes())
        sizes: dict[int, tuple[int, int, int]] = {}
        for day in range(365):
            recorder.result(
                recorder.store.withConnection(
                    partial(oneDay, dayMs=START_MS + day * DAY_MS)
                )
            )
            recorder.clock.advance(DAY_MS / 1000)
            recorder.result(recorder.history.maintain())
            if day + 1 in (14, 30, 180, 190, 270, 365):
                sizes[day + 1] = self.sizes(recorder.store, path)
        used = {day: size[0] for day, size in sizes.items()}
        fileBytes = {day: size[1] for day, size in sizes.items()}
        self.assertLessEqual(used[365], used[190] * 1.02)
        self.assertLessEqual(fileBytes[365], fileBytes[190] * 1.02)
        self.assertLessEqual(fileBytes[365], 8 * 1024 * 1024)
        # Raw rows settle at 14 days; each hourly row costs the same.
        hourlyBytes = sizes[365][2]
        settled = used[365] + hourlyBytes * (730 - 180) // 180
        print(
            "history of one thermostat, bytes used / file: "
            + ", ".join(
                f"day {day}: {used[day]:,} / {fileBytes[day]:,}"
                for day in sorted(sizes)
            )
            + f"; with two years of hourly rows it settles near {settled:,}"
        )

    def sizes(self, store: SQLiteStore, path: str) -> tuple[int, int, int]:
        """Bytes in use, bytes of the file, bytes of the hourly table."""

        def measure(connection: sqlite3.Connection) -> tuple[int, int]:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages, free, size = (
                connection.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("page_count", "freelist_count", "page_size")
            )
            (hourly,) = connection.execute(
                "SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'history_hours%'"
            ).fetchone()
            return (pages - free) * size, hourly

        results: list[tuple[int, int]] = []
        store.withConnection(measure).addCallback(results.append)
        used, hourly = results[0]
        return used, os.path.getsize(path), hourly


def oneDay(connection: sqlite3.Connection, dayMs: int) -> None:
    """
    A day of one thermostat's history, written straight into the tables:
    a sample a minute, heater and fan each on for 11 minutes twice an hour.
    """
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT INTO history_samples"
        " (serial, time_ms, temperature, humidity, target, mode, eco)"
        " VALUES (?, ?, ?, ?, 20.5, 'heat', 'schedule')",
        [
            (
                SERIAL,
                dayMs + minute * 60_000 + 1_234,
                19 + minute % 97 / 50,
                40 + minute % 13,
            )
            for minute in range(24 * 60)
        ],
    )
    connection.executemany(
        "INSERT INTO history_transitions (serial, time_ms, field, state)"
        " VALUES (?, ?, ?, ?)",
        [
            (SERIAL, dayMs + cycle * 1_800_000 + offset, name, on)
            for cycle in range(48)
            for name in ("hvac_heater_state", "hvac_fan_state")
            for offset, on in ((60_000, 1), (720_000, 0))
        ],
    )
    connection.execute("COMMIT")


class StoreHookTests(SynchronousTestCase):
    """L{SQLiteStore.withConnection}: jobs in turn with commits."""

    def setUp(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

        def runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.calls.append((f, args, d))
            return d

        self.store = SQLiteStore.open(":memory:", runner, Clock())

    def runNext(self) -> None:
        f, args, d = self.calls.pop(0)
        d.callback(f(*args))

    def test_inTurnWithCommits(self) -> None:
        """A job runs after the commit handed to the thread before it."""
        self.store.write([BucketWrite(SERIAL, Bucket(SHARED, 1, 1, {"a": 1}))])
        job = self.store.withConnection(
            lambda c: c.execute("SELECT COUNT(*) FROM buckets").fetchone()[0]
        )
        self.assertEqual(len(self.calls), 2)
        self.runNext()
        self.runNext()
        self.assertEqual(self.successResultOf(job), 1)

    def test_closeWaitsForJobs(self) -> None:
        """Closing waits for jobs; a job asked for once closing is refused."""
        job = self.store.withConnection(lambda c: 7)
        closed = self.store.close()
        self.assertNoResult(closed)
        self.assertRaises(StoreClosed, self.store.withConnection, lambda c: 8)
        self.runNext()
        self.assertEqual(self.successResultOf(job), 7)
        self.successResultOf(closed)


class ServiceTests(SynchronousTestCase):
    """The options, and the service that runs history's timers."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--data", self.mktemp(), *argv])
        return options

    def test_options(self) -> None:
        """
        History is kept 14 days raw and 730 days hourly unless told; a raw
        retention below a day, or an hourly one shorter than the raw one, is
        refused with a sentence.
        """
        options = self.parse()
        self.assertEqual(
            (options["history-days"], options["history-hourly-days"]), (14, 730)
        )
        self.assertFalse(options["no-history"])
        for argv, words in [
            (["--history-days", "0"], "--history-days must be between 1"),
            (
                ["--history-days", "30", "--history-hourly-days", "20"],
                "--history-hourly-days must be at least --history-days",
            ),
            (["--history-hourly-days", "5000"], "at most 3650"),
        ]:
            with self.assertRaises(Exception) as caught:
                self.parse(*argv)
            self.assertIn(words, str(caught.exception))

    def test_serviceTree(self) -> None:
        """
        The history service stops before the store's (its last rows are
        written before the store closes); with C{--no-history} there is
        none.
        """
        root = makeService(self.parse(), MemoryReactorClock())
        names = [type(service).__name__ for service in IServiceCollection(root)]
        self.assertLess(names.index("_StoreService"), names.index("HistoryService"))
        root.startService()
        root.stopService()
        off = makeService(self.parse("--no-history"), MemoryReactorClock())
        self.assertNotIn(
            "HistoryService", [type(s).__name__ for s in IServiceCollection(off)]
        )
        off.startService()
        off.stopService()

    def test_offAnswersNotFound(self) -> None:
        """Without history, C{/api/history} and C{/api/usage} answer 404."""
        clock = Clock()
        store = SQLiteStore.open(":memory:", runInline, clock)
        apps = buildApps(store, clock, runInline, AppSettings(history=None))
        self.assertIsNone(apps.history)
        client = StubClient(apps.control.app.resource())
        for path in ("/api/history", "/api/usage"):
            d = client.get(f"{CONTROL_URL}{path}?serial={SERIAL}")
            response, body = completed(self, client, d)
            self.assertEqual(response.code, 404)
            self.assertEqual(json.loads(body)["code"], "history_off")
