# -*- test-case-name: tests.test_history -*-
"""
The contract of L{IHistoryStorage}, as one set of tests any engine runs.

An engine's test case mixes L{HistoryStorageContract} into a
L{twisted.trial.unittest.SynchronousTestCase} and provides
L{HistoryStorageContract.openStore}: a fresh, empty store whose calls run
inline (so every Deferred has fired by the time the call returns), with a
history storage beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from nestproto.buckets import Bucket
from nestproto.history import (
    DAY_MS,
    HOUR_MS,
    HVAC_FIELDS,
    USAGE,
    History,
    HistoryRows,
    HistoryService,
    HistorySettings,
    IHistoryStorage,
    Sample,
)
from nestproto.store import BucketWrite, IBucketStore

from .helpers import OTHER_SERIAL, SERIAL, START_SECONDS
from .strategies import thermostatReports

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

START_MS = int(START_SECONDS * 1000)
#: Far enough to include everything a test records.
END_MS = START_MS + 10 * 365 * DAY_MS


class Recorder:
    """A store with a history of its own, fed by writes as a device's."""

    def __init__(
        self,
        store: IBucketStore,
        storage: IHistoryStorage,
        clock: Clock,
        settings: HistorySettings | None = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.storage = storage
        self.history = History.following(
            store, storage, clock, settings or HistorySettings()
        )
        self.shared: dict[str, Any] = {}

    def nowMs(self) -> int:
        return self.history.nowMs()

    def report(self, fields: Mapping[str, Any], serial: str = SERIAL) -> None:
        """C{serial} puts C{fields} to its shared bucket."""
        self.shared.update(fields)
        self.store.write(
            [BucketWrite(serial, Bucket(f"shared.{serial}", 1, 1, dict(self.shared)))],
            origin=serial,
        )

    def result(self, d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        (result,) = results
        if isinstance(result, Exception):
            raise result
        return result

    def stored(self, serial: str = SERIAL) -> tuple[int, int]:
        """How many samples and transitions of C{serial} are stored."""
        samples = self.result(self.storage.samples(serial, 0, END_MS))
        transitions = self.result(self.storage.transitions(serial, 0, END_MS))
        return len(samples), len(transitions.changes)


def modelOnMs(
    events: Sequence[tuple[int, Mapping[str, Any]]], startMs: int, endMs: int, name: str
) -> int:
    """Time on of C{name} in [start, end) from reports, by brute force."""
    total = 0
    on, since = False, 0
    for timeMs, fields in [*events, (endMs, {})]:
        if on:
            total += max(0, min(timeMs, endMs) - max(since, startMs))
        if name in fields:
            on = fields[name] is True
        since = timeMs
    return total


class HistoryStorageContract(_Base):
    """What every engine's L{IHistoryStorage} does, through a L{History}."""

    def openStore(self, clock: Clock) -> tuple[IBucketStore, IHistoryStorage]:
        """A fresh store on C{clock} running inline, and its history storage."""
        raise NotImplementedError()

    def recorder(
        self, settings: HistorySettings | None = None, offsetMs: int = 0
    ) -> Recorder:
        clock = Clock()
        clock.advance((START_MS + offsetMs) / 1000)
        store, storage = self.openStore(clock)
        return Recorder(store, storage, clock, settings)

    def test_storageInterface(self) -> None:
        """The engine's storage provides L{IHistoryStorage}."""
        self.assertTrue(verifyObject(IHistoryStorage, self.recorder().storage))

    def test_flushAfterRows(self) -> None:
        """
        A batch is written as soon as C{flushRows} rows are buffered (the
        current minute's sample is not one yet).
        """
        recorder = self.recorder(HistorySettings(flushRows=5))
        stored = []
        for minute in range(4):
            recorder.clock.advance(60)
            recorder.report({"hvac_heater_state": minute % 2 == 0})
            stored.append(recorder.stored())
        self.assertEqual(stored, [(0, 0), (0, 0), (2, 3), (2, 3)])

    def test_forget(self) -> None:
        """A device's deletion deletes its rows of every table, no one else's."""
        recorder = self.recorder()
        for minute in range(3):
            recorder.report({"hvac_fan_state": minute != 1}, SERIAL)
            recorder.report({"hvac_fan_state": minute != 1}, OTHER_SERIAL)
            recorder.clock.advance(60)
        recorder.clock.advance(2 * HOUR_MS / 1000)
        recorder.result(recorder.history.maintain())
        hours = recorder.storage.hours
        self.assertNotEqual(recorder.result(hours(SERIAL, 0, END_MS)), [])
        recorder.result(recorder.store.deleteScope(SERIAL))
        recorder.result(recorder.history.flush())
        self.assertEqual(recorder.stored(SERIAL), (0, 0))
        self.assertEqual(recorder.result(hours(SERIAL, 0, END_MS)), [])
        self.assertEqual(recorder.stored(OTHER_SERIAL), (3, 3))
        self.assertNotEqual(recorder.result(hours(OTHER_SERIAL, 0, END_MS)), [])

    def test_exportInBatches(self) -> None:
        """
        An export reads every row once, whatever its batches' size, and
        where hourly rows end; importing it back into the emptied store
        gives the same rows and the same answers.
        """
        recorder = self.recorder()
        for minute in range(150):
            for serial in (SERIAL, OTHER_SERIAL):
                recorder.report(
                    {"current_temperature": 18.0 + minute % 5}
                    | {"hvac_heater_state": minute % 17 < 6}
                    | ({"hvac_fan_state": minute % 3 == 0} if serial == SERIAL else {}),
                    serial,
                )
            recorder.clock.advance(60)
        recorder.clock.advance(HOUR_MS / 1000)
        recorder.result(recorder.history.maintain())
        storage = recorder.storage

        def export(limit: int) -> list[HistoryRows]:
            batches = [recorder.result(storage.exportRows(None, limit))]
            while batches[-1].following is not None:
                after = batches[-1].following
                batches.append(recorder.result(storage.exportRows(after, limit)))
            return batches

        def rows(batches: list[HistoryRows]) -> tuple[object, ...]:
            return (
                [s for b in batches for s in b.samples],
                [t for b in batches for t in b.transitions],
                [h for b in batches for h in b.hours],
                {b.rolledUpTo for b in batches},
            )

        def reads() -> list[object]:
            return [
                recorder.result(f(serial, 0, END_MS))
                for serial in (SERIAL, OTHER_SERIAL)
                for f in (storage.samples, storage.transitions, storage.hours)
            ]

        [whole] = export(10_000)
        self.assertEqual(len(whole.samples), 2 * 150)
        self.assertEqual(len(whole.hours), 2 * 3)
        self.assertIsNotNone(whole.rolledUpTo)
        for limit in (1, 7, len(whole.samples)):
            self.assertEqual(rows(export(limit)), rows([whole]), limit)
        before = reads()
        batches = export(13)
        for serial in (SERIAL, OTHER_SERIAL):
            recorder.result(storage.forget(serial))
        self.assertEqual(rows(export(5))[:3], ([], [], []))
        for batch in batches:
            recorder.result(storage.importRows(batch))
        self.assertEqual(rows(export(10_000)), rows([whole]))
        self.assertEqual(reads(), before)

    # Each engine's test case runs this one test (differing executors);
    # every example builds its own store, so no state crosses them.
    @settings(max_examples=30, suppress_health_check=[HealthCheck.differing_executors])
    @given(thermostatReports(), st.integers(0, DAY_MS - 1))
    def test_aggregatesEqualTheSumOfRaw(
        self, reports: list[tuple[int, dict[str, Any]]], offsetMs: int
    ) -> None:
        """
        Reports over hours and days (from any time of day): each hour's
        sample count, min, mean and max are those of its raw samples; its
        time on of every signal is at most an hour; summed over the hours,
        each HVAC field's time on is what the reports say, and each local
        (UTC) day's usage too, before pruning and after.
        """
        recorder = self.recorder(offsetMs=offsetMs)
        startMs = recorder.nowMs()
        events: list[tuple[int, dict[str, Any]]] = []
        for delayMs, fields in reports:
            recorder.clock.advance(delayMs / 1000)
            recorder.report(fields)
            events.append((recorder.nowMs(), fields))
        recorder.clock.advance(HOUR_MS / 1000)
        nowMs = recorder.nowMs()
        firstHour = startMs // HOUR_MS * HOUR_MS
        lastHour = nowMs // HOUR_MS * HOUR_MS
        days = list(range(startMs // DAY_MS * DAY_MS, nowMs, DAY_MS)) + [nowMs]
        rawUsage = recorder.result(recorder.history.usage(SERIAL, days))
        recorder.result(recorder.history.maintain())
        hours = recorder.result(recorder.storage.hours(SERIAL, 0, END_MS))
        raw = recorder.result(recorder.storage.samples(SERIAL, 0, END_MS))
        byHour: dict[int, list[Sample]] = {}
        for sample in raw:
            byHour.setdefault(sample.timeMs // HOUR_MS * HOUR_MS, []).append(sample)
        self.assertEqual({hour.hourMs for hour in hours if hour.samples}, set(byHour))
        for hour in hours:
            self.assertTrue(firstHour <= hour.hourMs < lastHour)
            inHour = byHour.get(hour.hourMs, [])
            self.assertEqual(hour.samples, len(inHour))
            temperatures = [
                value
                for value in (s.values["temperature"] for s in inHour)
                if isinstance(value, float)
            ]
            if temperatures:
                low, mean, high = hour.stats["temperature"]
                self.assertEqual((low, high), (min(temperatures), max(temperatures)))
                self.assertAlmostEqual(mean, sum(temperatures) / len(temperatures))
            else:
                self.assertNotIn("temperature", hour.stats)
            self.assertTrue(all(0 < ms <= HOUR_MS for ms in hour.onMs.values()))
        for name in HVAC_FIELDS:
            self.assertEqual(
                sum(hour.onMs.get(name, 0) for hour in hours),
                modelOnMs(events, firstHour, lastHour, name),
                name,
            )
        # The reports turn on one field of each category at most.
        expected = [
            {
                category: sum(modelOnMs(events, a, b, name) for name in members)
                for category, members in USAGE.items()
            }
            for a, b in zip(days, days[1:], strict=False)
        ]
        afterRollUp = recorder.result(recorder.history.usage(SERIAL, days))
        self.assertEqual(rawUsage, expected)
        self.assertEqual(afterRollUp, expected)
        # Prune everything raw: usage comes from the hourly rows, the same
        # for every complete hour.
        recorder.result(recorder.storage.prune(nowMs, 0))
        self.assertEqual(
            recorder.result(recorder.storage.samples(SERIAL, 0, END_MS)), []
        )
        hourlyDays = [min(max(d, firstHour), lastHour) for d in days[:-1]] + [lastHour]
        hourly = recorder.result(
            recorder.storage.usage(SERIAL, hourlyDays, nowMs + HOUR_MS)
        )
        self.assertEqual(
            [day["fan"] for day in hourly],
            [
                modelOnMs(events, a, b, "hvac_fan_state")
                for a, b in zip(hourlyDays, hourlyDays[1:], strict=False)
            ],
        )

    def test_prunedByItself(self) -> None:
        """
        Over eight days of reports every 10 minutes with raw retention of 2
        days and hourly of 5: raw rows go once older than 2 days, hourly
        once older than 5; the heater's state survives the pruning of its
        last transition; daily usage stays what the reports say.
        """
        recorder = self.recorder(
            HistorySettings(rawDays=2, hourlyDays=5, maintenanceSeconds=3600)
        )
        service = HistoryService(recorder.history)
        service.startService()
        events: list[tuple[int, dict[str, Any]]] = []
        for step in range(8 * 24 * 6):
            recorder.clock.advance(600)
            # The heater stays on through the last three days.
            fields = {
                "current_temperature": 18.0 + step % 7,
                "hvac_heater_state": step >= 5 * 24 * 6 or step % 4 == 0,
            }
            recorder.report(fields)
            events.append((recorder.nowMs(), fields))
        nowMs = recorder.nowMs()
        recorder.result(recorder.history.maintain())
        samples = recorder.result(recorder.storage.samples(SERIAL, 0, END_MS))
        hours = recorder.result(recorder.storage.hours(SERIAL, 0, END_MS))
        self.assertGreaterEqual(samples[0].timeMs, nowMs - 2 * DAY_MS - HOUR_MS)
        self.assertLessEqual(samples[0].timeMs, nowMs - 2 * DAY_MS + HOUR_MS)
        self.assertGreaterEqual(hours[0].hourMs, nowMs - 5 * DAY_MS - HOUR_MS)
        self.assertLessEqual(hours[0].hourMs, nowMs - 5 * DAY_MS + HOUR_MS)
        state = recorder.result(
            recorder.storage.transitions(SERIAL, nowMs - HOUR_MS, nowMs)
        )
        self.assertEqual(state.initial["hvac_heater_state"], True)
        self.assertEqual(state.changes, [])
        midnight = nowMs // DAY_MS * DAY_MS
        days = [midnight - back * DAY_MS for back in range(4, -1, -1)] + [nowMs]
        usage = recorder.result(recorder.history.usage(SERIAL, days))
        self.assertEqual(
            [day["heating"] for day in usage],
            [
                modelOnMs(events, a, b, "hvac_heater_state")
                for a, b in zip(days, days[1:], strict=False)
            ],
        )
        self.successResultOf(service.stopService())
        self.assertEqual(recorder.clock.getDelayedCalls(), [])
