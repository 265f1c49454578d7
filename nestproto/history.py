# -*- test-case-name: tests.test_history -*-
"""
The history of each thermostat: samples and HVAC transitions taken from the
store's change feed, kept beside the buckets, rolled up by hour, and pruned.

What is recorded, from each committed change a device made to its own
C{shared.SERIAL} or C{device.SERIAL} bucket (a put, or a subscribe's inline
update):

 - a I{sample} of current temperature, humidity, target(s), mode and eco,
   at most one per device per clock minute: the state at the device's last
   report in that minute, with that report's time;
 - a I{transition} each time one of L{HVAC_FIELDS} turns on or off.

Times are the server's clock when the commit was announced, in ms; not the
bucket's timestamp, which a subscribe may have adopted from the device's own
clock (PROTOCOL.md §11.3) and a seed or restore copies from elsewhere. The
clock puts every row on one timeline, the one pruning, roll-up and the API
use, and lags the transaction's own time only by the commit (milliseconds).

Rows are buffered in memory and written in batches (every L{FLUSH_SECONDS}
or L{FLUSH_ROWS} rows) through an L{IHistoryStorage}, so a device's request
never waits for them. A crash loses at most the unwritten batch.

Every L{MAINTENANCE_SECONDS}, complete hours are rolled up into hourly rows
(min/mean/max of each number, milliseconds on of each HVAC field and usage
category), raw rows older than the raw retention are pruned (once rolled
up), and hourly rows older than theirs. A device's deletion deletes its
history.
"""

from __future__ import annotations

import math
import sqlite3
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .buckets import Bucket
from .membership import GLOBAL_SCOPE
from .model import Commit
from .store import IBucketStore, SQLiteStore

T = TypeVar("T")

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

#: Raw samples and transitions are kept this long by default.
DEFAULT_RAW_DAYS = 14
#: Hourly rows are kept this long by default (two years).
DEFAULT_HOURLY_DAYS = 730
FLUSH_SECONDS = 10.0
FLUSH_ROWS = 1000
MAINTENANCE_SECONDS = 300.0
#: Rows kept in memory while the database refuses them; the oldest go first.
MAX_BUFFERED_ROWS = 100_000
#: Hours one roll-up job aggregates, so commits run between jobs after a
#: long stop.
ROLLUP_HOURS_PER_JOB = 24
#: Longest mode or eco word kept; a device can put anything there.
TEXT_MAX_LENGTH = 32

#: The HVAC state fields of a device's shared bucket (PROTOCOL.md §10.2).
HVAC_FIELDS = (
    "hvac_heater_state",
    "hvac_heat_x2_state",
    "hvac_heat_x3_state",
    "hvac_alt_heat_state",
    "hvac_alt_heat_x2_state",
    "hvac_aux_heater_state",
    "hvac_emer_heat_state",
    "hvac_ac_state",
    "hvac_cool_x2_state",
    "hvac_cool_x3_state",
    "hvac_fan_state",
)
#: Usage categories: on while any of their fields is on.
USAGE = {
    "heating": (
        "hvac_heater_state",
        "hvac_heat_x2_state",
        "hvac_heat_x3_state",
        "hvac_alt_heat_state",
        "hvac_alt_heat_x2_state",
    ),
    "cooling": ("hvac_ac_state", "hvac_cool_x2_state", "hvac_cool_x3_state"),
    "fan": ("hvac_fan_state",),
    "aux": ("hvac_aux_heater_state", "hvac_emer_heat_state"),
}
#: What hourly rows count time on for: every HVAC field, every category.
SIGNALS = HVAC_FIELDS + tuple(USAGE)
#: The numbers of a sample, as the API and the tables name them.
NUMBERS = ("temperature", "humidity", "target", "target_low", "target_high")
#: The words of a sample.
WORDS = ("mode", "eco")

Span = tuple[int, int]


@frozen
class Sample:
    """
    A device's state at C{timeMs}; C{values} maps each of L{NUMBERS} (a
    float) and L{WORDS} (a string) to its value, C{None} when unknown.
    """

    serial: str
    timeMs: int
    values: Mapping[str, float | str | None]


@frozen
class Transition:
    """HVAC field C{field} of C{serial} turned C{on} (or off) at C{timeMs}."""

    serial: str
    timeMs: int
    field: str
    on: bool


@frozen
class Transitions:
    """Each HVAC field's state at the start of a period, and its changes in it."""

    initial: Mapping[str, bool]
    changes: Sequence[Transition]


@frozen
class Hour:
    """
    One device's hour from C{hourMs}: how many samples it had; (min, mean,
    max) of each number that had values; milliseconds on of each signal
    that was on.
    """

    serial: str
    hourMs: int
    samples: int
    stats: Mapping[str, tuple[float, float, float]]
    onMs: Mapping[str, int]


#: Where an export goes on: the table (0: samples, 1: transitions, 2: hourly
#: rows) and the primary key of the last row read of it.
ExportPosition = tuple[int, tuple[Any, ...]]


@frozen
class HistoryRows:
    """
    Some rows of a history exactly as stored, for copying it to another
    storage a batch at a time (L{IHistoryStorage.exportRows} and
    L{IHistoryStorage.importRows}).
    """

    samples: Sequence[Sample] = ()
    transitions: Sequence[Transition] = ()
    hours: Sequence[Hour] = ()
    #: Where hourly rows end (C{None}: nothing rolled up yet).
    rolledUpTo: int | None = None
    #: Where the next batch starts; C{None} after the last one.
    following: ExportPosition | None = None


# Pure rules of time on


def onSpans(
    initial: bool, changes: Iterable[tuple[int, bool]], startMs: int, endMs: int
) -> list[Span]:
    """
    The spans of [C{startMs}, C{endMs}) in which a signal is on.

    @param initial: its state just before C{startMs}.
    @param changes: (time, on) in time order; those before C{startMs} only
        set the initial state.
    """
    spans: list[Span] = []
    onSince = startMs if initial else None
    for timeMs, on in changes:
        if timeMs >= endMs:
            break
        if timeMs < startMs:
            onSince = startMs if on else None
        elif on and onSince is None:
            onSince = timeMs
        elif not on and onSince is not None:
            if timeMs > onSince:
                spans.append((onSince, timeMs))
            onSince = None
    if onSince is not None and endMs > onSince:
        spans.append((onSince, endMs))
    return spans


def unionSpans(*spanLists: Sequence[Span]) -> list[Span]:
    """The spans in which any of C{spanLists} is on, merged and ordered."""
    merged: list[Span] = []
    for start, end in sorted(span for spans in spanLists for span in spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def msPerPeriod(spans: Iterable[Span], boundaries: Sequence[int]) -> list[int]:
    """
    Milliseconds of C{spans} inside each period [C{boundaries[i]},
    C{boundaries[i + 1]}); time outside every period is not counted.
    """
    totals = [0] * max(len(boundaries) - 1, 0)
    for start, end in spans:
        i = max(bisect_right(boundaries, start) - 1, 0)
        while i < len(totals) and boundaries[i] < end:
            overlap = min(end, boundaries[i + 1]) - max(start, boundaries[i])
            if overlap > 0:
                totals[i] += overlap
            i += 1
    return totals


def signalSpans(
    initial: Mapping[str, bool],
    changes: Iterable[Transition],
    startMs: int,
    endMs: int,
) -> dict[str, list[Span]]:
    """
    The on-spans in [C{startMs}, C{endMs}) of every one of L{SIGNALS}, from
    one device's state before C{startMs} and its transitions in time order.
    """
    byField: dict[str, list[tuple[int, bool]]] = {}
    for change in changes:
        byField.setdefault(change.field, []).append((change.timeMs, change.on))
    spans = {
        name: onSpans(initial.get(name, False), byField.get(name, ()), startMs, endMs)
        for name in HVAC_FIELDS
    }
    for category, members in USAGE.items():
        spans[category] = unionSpans(*(spans[name] for name in members))
    return spans


# Reading a device's buckets


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        # JSON's integers have no bound; a float's do.
        return None
    return number if math.isfinite(number) else None


def _word(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= TEXT_MAX_LENGTH:
        return value
    return None


def sampleValues(
    shared: Mapping[str, Any], device: Mapping[str, Any]
) -> dict[str, float | str | None]:
    """
    What a sample records of a device's shared and device buckets: the
    shared copy of a field first, as the status does.
    """
    temperature = _number(shared.get("current_temperature"))
    if temperature is None:
        temperature = _number(device.get("current_temperature"))
    eco = device.get("eco")
    return {
        "temperature": temperature,
        "humidity": _number(device.get("current_humidity")),
        "target": _number(shared.get("target_temperature")),
        "target_low": _number(shared.get("target_temperature_low")),
        "target_high": _number(shared.get("target_temperature_high")),
        "mode": _word(shared.get("target_temperature_type")),
        "eco": _word(eco.get("mode")) if isinstance(eco, dict) else None,
    }


def hvacState(shared: Mapping[str, Any]) -> dict[str, bool]:
    """Each HVAC field of a shared bucket's value: on only when C{true}."""
    return {name: shared.get(name) is True for name in HVAC_FIELDS}


# Storage


class IHistoryStorage(Interface):
    """
    What history needs from a database: its tables beside the buckets.
    Every call is queued behind the ones before it.
    """

    def append(
        samples: Sequence[Sample], transitions: Sequence[Transition]
    ) -> Deferred[None]:
        """Store C{samples} and C{transitions} in one transaction."""

    def rollUp(untilMs: int) -> Deferred[int]:
        """
        Aggregate complete hours before C{untilMs} not aggregated yet, a
        bounded number per call, the first time from the oldest raw row.

        @return: fires with how many hours were aggregated; 0 once caught
            up, or while another process sharing the database maintains.
        """

    def prune(rawBeforeMs: int, hourlyBeforeMs: int) -> Deferred[None]:
        """
        Delete raw rows before C{rawBeforeMs} (only those already rolled up;
        of transitions, the last one of each device's field is kept while
        it is on) and hourly rows before C{hourlyBeforeMs}; nothing while
        another process sharing the database maintains.
        """

    def forget(serial: str) -> Deferred[None]:
        """Delete every row of C{serial}."""

    def samples(serial: str, fromMs: int, toMs: int) -> Deferred[list[Sample]]:
        """C{serial}'s samples in [C{fromMs}, C{toMs}), oldest first."""

    def transitions(serial: str, fromMs: int, toMs: int) -> Deferred[Transitions]:
        """C{serial}'s HVAC state at C{fromMs} and its transitions until C{toMs}."""

    def hours(serial: str, fromMs: int, toMs: int) -> Deferred[list[Hour]]:
        """C{serial}'s hourly rows starting in [C{fromMs}, C{toMs}), oldest first."""

    def usage(
        serial: str, boundaries: Sequence[int], rawFromMs: int
    ) -> Deferred[list[dict[str, int]]]:
        """
        Milliseconds on of each L{USAGE} category in each period between
        consecutive C{boundaries}: exact from raw transitions from the hour
        after C{rawFromMs} (or wherever raw rows are complete from), and
        from hourly rows before it (an hour counts in the period it starts
        in).
        """

    def databaseBytes() -> Deferred[int]:
        """The size of the whole database, buckets included."""

    def exportRows(after: ExportPosition | None, limit: int) -> Deferred[HistoryRows]:
        """
        Up to C{limit} stored rows, from where the previous batch's
        C{following} says (C{None}: from the first), with where hourly rows
        end: every sample, then every transition, then every hourly row,
        each table in the order of its primary key. Reading until
        C{following} is C{None} reads the whole history, a batch in memory
        at a time.
        """

    def importRows(rows: HistoryRows) -> Deferred[None]:
        """
        Store C{rows} exactly as they are, and where hourly rows end when
        they say, in one transaction: a batch of another storage's export.
        """


_HOURS_NUMBER_COLUMNS = tuple(
    f"{name}_{stat}" for name in NUMBERS for stat in ("min", "mean", "max")
)
_HOURS_ON_COLUMNS = tuple(f"{name}_ms" for name in SIGNALS)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS history_samples (
    serial TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    {", ".join(f"{name} REAL" for name in NUMBERS)},
    {", ".join(f"{name} TEXT" for name in WORDS)},
    PRIMARY KEY (serial, time_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_samples_time ON history_samples (time_ms);
CREATE TABLE IF NOT EXISTS history_transitions (
    serial TEXT NOT NULL,
    field TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    state INTEGER NOT NULL,
    PRIMARY KEY (serial, field, time_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_transitions_time
    ON history_transitions (time_ms);
CREATE TABLE IF NOT EXISTS history_hours (
    serial TEXT NOT NULL,
    hour_ms INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    {", ".join(f"{name} REAL" for name in _HOURS_NUMBER_COLUMNS)},
    {", ".join(f"{name} INTEGER NOT NULL" for name in _HOURS_ON_COLUMNS)},
    PRIMARY KEY (serial, hour_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_hours_time ON history_hours (hour_ms);
CREATE TABLE IF NOT EXISTS history_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
_SAMPLE_COLUMNS = ("serial", "time_ms", *NUMBERS, *WORDS)
_HOURS_COLUMNS = (
    "serial",
    "hour_ms",
    "samples",
    *_HOURS_NUMBER_COLUMNS,
    *_HOURS_ON_COLUMNS,
)
_ROLLED_UP_TO = "rolled_up_to"


def hourRows(
    startMs: int,
    endMs: int,
    sampleStats: Iterable[Sequence[Any]],
    initial: Iterable[tuple[str, str, object]],
    changes: Iterable[tuple[str, int, str, object]],
) -> list[list[Any]]:
    """
    The hourly rows (L{_HOURS_COLUMNS}) of the complete hours in
    [C{startMs}, C{endMs}), from what the raw tables say (any engine's).

    @param sampleStats: per device and hour that had samples: serial, hour
        (C{time_ms // HOUR_MS}), count, then min, mean and max of each of
        L{NUMBERS}.
    @param initial: (serial, field, state) of each device's field's last
        transition before C{startMs}.
    @param changes: (serial, time, field, state) of the transitions in the
        hours, in time order.
    """
    rows: dict[tuple[str, int], list[Any]] = {}

    def row(serial: str, hourMs: int) -> list[Any]:
        found = rows.get((serial, hourMs))
        if found is None:
            found = rows[serial, hourMs] = [serial, hourMs, 0]
            found.extend([None] * len(_HOURS_NUMBER_COLUMNS))
            found.extend([0] * len(_HOURS_ON_COLUMNS))
        return found

    for serial, hour, count, *numbers in sampleStats:
        found = row(serial, hour * HOUR_MS)
        found[2] = count
        found[3 : 3 + len(numbers)] = numbers
    before: dict[str, dict[str, bool]] = {}
    for serial, name, state in initial:
        before.setdefault(serial, {})[name] = bool(state)
    bySerial: dict[str, list[Transition]] = {}
    for serial, timeMs, name, state in changes:
        bySerial.setdefault(serial, []).append(
            Transition(serial, timeMs, name, bool(state))
        )
    boundaries = list(range(startMs, endMs + 1, HOUR_MS))
    onOffset = 3 + len(_HOURS_NUMBER_COLUMNS)
    for serial in {*bySerial, *(s for s, v in before.items() if any(v.values()))}:
        spans = signalSpans(
            before.get(serial, {}), bySerial.get(serial, ()), startMs, endMs
        )
        for i, name in enumerate(SIGNALS):
            for hourMs, ms in zip(
                boundaries, msPerPeriod(spans[name], boundaries), strict=False
            ):
                if ms:
                    row(serial, hourMs)[onOffset + i] = ms
    return list(rows.values())


def usageTotals(
    boundaries: Sequence[int],
    rawFromMs: int,
    rolledUpTo: int | None,
    hourly: Callable[[int, int], Iterable[Sequence[Any]]],
    raw: Callable[[int, int], Transitions],
) -> list[dict[str, int]]:
    """
    L{IHistoryStorage.usage} from what the tables say (any engine's).

    @param rolledUpTo: where hourly rows end (C{None}: none yet).
    @param hourly: gives (hour, then ms on of each L{USAGE} category) of
        the device's hourly rows starting in [from, to).
    @param raw: gives the device's L{Transitions} in [from, to).
    """
    totals = [dict.fromkeys(USAGE, 0) for _ in boundaries[1:]]
    if not totals:
        return totals
    firstMs, lastMs = boundaries[0], boundaries[-1]
    # Raw rows are complete from the split on (pruning never deletes what
    # is not rolled up yet); hourly rows before it.
    splitMs = firstMs if rolledUpTo is None else min(_ceilHour(rawFromMs), rolledUpTo)
    splitMs = min(max(splitMs, firstMs), lastMs)
    if splitMs > firstMs:
        for hourMs, *onMs in hourly(firstMs, splitMs):
            period = bisect_right(boundaries, hourMs) - 1
            for name, value in zip(USAGE, onMs, strict=True):
                totals[period][name] += value
    transitions = raw(splitMs, lastMs)
    spans = signalSpans(transitions.initial, transitions.changes, splitMs, lastMs)
    for name in USAGE:
        for period, ms in enumerate(msPerPeriod(spans[name], boundaries)):
            totals[period][name] += ms
    return totals


#: What an export reads of each table, in turn: its name, its columns
#: (the primary key's first) and how many of them are the key.
_EXPORTED: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("history_samples", _SAMPLE_COLUMNS, 2),
    ("history_transitions", ("serial", "field", "time_ms", "state"), 3),
    ("history_hours", _HOURS_COLUMNS, 2),
)


def exportQuery(
    table: int, key: tuple[Any, ...] | None, count: int, placeholder: str
) -> tuple[str, tuple[Any, ...]]:
    """
    The statement and parameters that read, of table C{table} of
    L{_EXPORTED}, at most C{count} rows after C{key} in key order, with an
    engine's C{placeholder} (C{?} or C{%s}).
    """
    name, columns, keyLength = _EXPORTED[table]
    keyColumns = ", ".join(columns[:keyLength])
    marks = ", ".join([placeholder] * keyLength)
    following = "" if key is None else f" WHERE ({keyColumns}) > ({marks})"
    return (
        f"SELECT {', '.join(columns)} FROM {name}{following}"
        f" ORDER BY {keyColumns} LIMIT {placeholder}",
        (*(key or ()), count),
    )


def exportBatch(
    after: ExportPosition | None,
    limit: int,
    select: Callable[[int, tuple[Any, ...] | None, int], Sequence[Sequence[Any]]],
    rolledUpTo: int | None,
) -> HistoryRows:
    """
    L{IHistoryStorage.exportRows} from what the tables say (any engine's).

    @param select: gives, of table C{i} of L{_EXPORTED}, at most C{n} rows
        (its columns) whose key follows C{key} (from the first when
        C{None}), in key order, for C{(i, key, n)}.
    @param rolledUpTo: where hourly rows end.
    """
    if limit < 1:
        raise ValueError(f"an export's batch holds at least one row, not {limit}")
    table, key = (0, None) if after is None else after
    found: list[list[Sequence[Any]]] = [[] for _ in _EXPORTED]
    following: ExportPosition | None = None
    remaining = limit
    while table < len(_EXPORTED):
        rows = select(table, key, remaining)
        found[table].extend(rows)
        remaining -= len(rows)
        if remaining <= 0:
            keyLength = _EXPORTED[table][2]
            following = (table, tuple(rows[-1][:keyLength]))
            break
        table, key = table + 1, None
    samples, transitions, hours = found
    return HistoryRows(
        [_sampleFromRow(row) for row in samples],
        [
            Transition(serial, timeMs, name, bool(state))
            for serial, name, timeMs, state in transitions
        ],
        [_hourFromRow(row) for row in hours],
        rolledUpTo,
        following,
    )


def _hourRow(hour: Hour) -> list[Any]:
    """The row (L{_HOURS_COLUMNS}) of C{hour}: L{_hourFromRow} undone."""
    return [
        hour.serial,
        hour.hourMs,
        hour.samples,
        *(v for name in NUMBERS for v in hour.stats.get(name, (None, None, None))),
        *(hour.onMs.get(name, 0) for name in SIGNALS),
    ]


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _inTransaction(connection: sqlite3.Connection, f: Callable[[], T]) -> T:
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = f()
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return result


def _rolledUpTo(connection: sqlite3.Connection) -> int | None:
    row = connection.execute(
        "SELECT value FROM history_meta WHERE name = ?", (_ROLLED_UP_TO,)
    ).fetchone()
    return None if row is None else int(row[0])


def _ceilHour(timeMs: int) -> int:
    return -(-timeMs // HOUR_MS) * HOUR_MS


class _Executes(Protocol):
    """A database connection of either engine, as the shared reads use it."""

    def execute(self, query: str, params: Any, /) -> Iterable[Sequence[Any]]: ...


def readSamples(
    connection: _Executes, mark: str, serial: str, fromMs: int, toMs: int
) -> list[Sample]:
    """C{serial}'s samples in [C{fromMs}, C{toMs}); C{mark}: the engine's C{?}."""
    return [
        _sampleFromRow(row)
        for row in connection.execute(
            f"SELECT {', '.join(_SAMPLE_COLUMNS)} FROM history_samples"
            f" WHERE serial = {mark} AND time_ms >= {mark} AND time_ms < {mark}"
            " ORDER BY time_ms",
            (serial, fromMs, toMs),
        )
    ]


def readChanges(
    connection: _Executes, mark: str, serial: str, fromMs: int, toMs: int
) -> list[Transition]:
    """C{serial}'s HVAC transitions in [C{fromMs}, C{toMs}), in order."""
    return [
        Transition(serial, timeMs, name, bool(state))
        for timeMs, name, state in connection.execute(
            "SELECT time_ms, field, state FROM history_transitions"
            f" WHERE serial = {mark} AND time_ms >= {mark} AND time_ms < {mark}"
            " ORDER BY time_ms, field",
            (serial, fromMs, toMs),
        )
    ]


def readHours(
    connection: _Executes, mark: str, serial: str, fromMs: int, toMs: int
) -> list[Hour]:
    """C{serial}'s hourly rows from C{fromMs} to before C{toMs}."""
    return [
        _hourFromRow(row)
        for row in connection.execute(
            f"SELECT {', '.join(_HOURS_COLUMNS)} FROM history_hours"
            f" WHERE serial = {mark} AND hour_ms >= {mark} AND hour_ms < {mark}"
            " ORDER BY hour_ms",
            (serial, fromMs, toMs),
        )
    ]


def _sampleFromRow(row: Sequence[Any]) -> Sample:
    return Sample(row[0], row[1], dict(zip(NUMBERS + WORDS, row[2:], strict=True)))


def _hourFromRow(row: Sequence[Any]) -> Hour:
    serial, hourMs, samples = row[0], row[1], row[2]
    numbers = row[3 : 3 + len(_HOURS_NUMBER_COLUMNS)]
    ons = row[3 + len(_HOURS_NUMBER_COLUMNS) :]
    stats = {
        name: (numbers[3 * i], numbers[3 * i + 1], numbers[3 * i + 2])
        for i, name in enumerate(NUMBERS)
        if numbers[3 * i] is not None
    }
    return Hour(
        serial,
        hourMs,
        samples,
        stats,
        {name: ms for name, ms in zip(SIGNALS, ons, strict=True) if ms},
    )


#: Each device's field's last transition before a time: its state then.
#: (SQLite takes a bare column from the row of the MAX; a field has one
#: row per time, its primary key.)
_LAST_BEFORE = (
    "SELECT serial, field, state, MAX(time_ms) AS last FROM history_transitions"
    " WHERE time_ms < :before {andSerial} GROUP BY serial, field"
)


def _transitionsOf(
    connection: sqlite3.Connection, serial: str, fromMs: int, toMs: int
) -> Transitions:
    initial = {
        name: bool(state)
        for _, name, state, _ in connection.execute(
            _LAST_BEFORE.format(andSerial="AND serial = :serial"),
            {"before": fromMs, "serial": serial},
        )
    }
    return Transitions(initial, readChanges(connection, "?", serial, fromMs, toMs))


@implementer(IHistoryStorage)
@define
class SQLiteHistoryStorage:
    """
    L{IHistoryStorage} in tables of a L{SQLiteStore}'s file, run on the
    store's own thread in turn with its commits (L{SQLiteStore.withConnection}).
    The tables are created by the first call.
    """

    store: SQLiteStore
    _ready: bool = field(default=False, init=False)

    def _run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        def job(connection: sqlite3.Connection) -> T:
            # Only the store's thread reads and writes _ready.
            if not self._ready:
                connection.executescript(_SCHEMA)
                self._ready = True
            return f(connection, *args)

        return maybeDeferred(self.store.withConnection, job)

    def append(
        self, samples: Sequence[Sample], transitions: Sequence[Transition]
    ) -> Deferred[None]:
        return self._run(_append, list(samples), list(transitions))

    def rollUp(self, untilMs: int) -> Deferred[int]:
        return self._run(_rollUp, untilMs)

    def prune(self, rawBeforeMs: int, hourlyBeforeMs: int) -> Deferred[None]:
        return self._run(_prune, rawBeforeMs, hourlyBeforeMs)

    def forget(self, serial: str) -> Deferred[None]:
        return self._run(_forget, serial)

    def samples(self, serial: str, fromMs: int, toMs: int) -> Deferred[list[Sample]]:
        return self._run(readSamples, "?", serial, fromMs, toMs)

    def transitions(self, serial: str, fromMs: int, toMs: int) -> Deferred[Transitions]:
        return self._run(_transitionsOf, serial, fromMs, toMs)

    def hours(self, serial: str, fromMs: int, toMs: int) -> Deferred[list[Hour]]:
        return self._run(readHours, "?", serial, fromMs, toMs)

    def usage(
        self, serial: str, boundaries: Sequence[int], rawFromMs: int
    ) -> Deferred[list[dict[str, int]]]:
        return self._run(_usage, serial, list(boundaries), rawFromMs)

    def databaseBytes(self) -> Deferred[int]:
        return self._run(_databaseBytes)

    def exportRows(
        self, after: ExportPosition | None, limit: int
    ) -> Deferred[HistoryRows]:
        return self._run(_exportRows, after, limit)

    def importRows(self, rows: HistoryRows) -> Deferred[None]:
        return self._run(_importRows, rows)


registerAdapter(SQLiteHistoryStorage, SQLiteStore, IHistoryStorage)


def _insertRaw(
    connection: sqlite3.Connection,
    samples: Sequence[Sample],
    transitions: Sequence[Transition],
) -> None:
    connection.executemany(
        f"INSERT OR REPLACE INTO history_samples ({', '.join(_SAMPLE_COLUMNS)})"
        f" VALUES ({_placeholders(len(_SAMPLE_COLUMNS))})",
        [
            (
                sample.serial,
                sample.timeMs,
                *(sample.values.get(name) for name in NUMBERS + WORDS),
            )
            for sample in samples
        ],
    )
    # Two changes of a field in one ms (one group commit): the last
    # one stands.
    connection.executemany(
        "INSERT OR REPLACE INTO history_transitions"
        " (serial, time_ms, field, state) VALUES (?, ?, ?, ?)",
        [(t.serial, t.timeMs, t.field, int(t.on)) for t in transitions],
    )


def _insertHours(connection: sqlite3.Connection, rows: Iterable[Sequence[Any]]) -> None:
    connection.executemany(
        f"INSERT OR REPLACE INTO history_hours ({', '.join(_HOURS_COLUMNS)})"
        f" VALUES ({_placeholders(len(_HOURS_COLUMNS))})",
        rows,
    )


def _setRolledUpTo(connection: sqlite3.Connection, timeMs: int) -> None:
    connection.execute(
        "INSERT OR REPLACE INTO history_meta VALUES (?, ?)", (_ROLLED_UP_TO, timeMs)
    )


def _append(
    connection: sqlite3.Connection,
    samples: list[Sample],
    transitions: list[Transition],
) -> None:
    _inTransaction(connection, partial(_insertRaw, connection, samples, transitions))


def _rollUp(connection: sqlite3.Connection, untilMs: int) -> int:
    def rollUp() -> int:
        endMs = untilMs // HOUR_MS * HOUR_MS
        startMs = _rolledUpTo(connection)
        if startMs is None:
            (first,) = connection.execute(
                "SELECT MIN(time_ms) FROM (SELECT MIN(time_ms) AS time_ms"
                " FROM history_samples UNION ALL SELECT MIN(time_ms)"
                " FROM history_transitions)"
            ).fetchone()
            startMs = endMs if first is None else min(first // HOUR_MS * HOUR_MS, endMs)
        endMs = min(endMs, startMs + ROLLUP_HOURS_PER_JOB * HOUR_MS)
        if endMs <= startMs:
            _setRolledUpTo(connection, startMs)
            return 0
        stats = ", ".join(f"MIN({name}), AVG({name}), MAX({name})" for name in NUMBERS)
        rows = hourRows(
            startMs,
            endMs,
            connection.execute(
                f"SELECT serial, time_ms / {HOUR_MS}, COUNT(*), {stats}"
                " FROM history_samples WHERE time_ms >= ? AND time_ms < ?"
                " GROUP BY serial, time_ms / ?",
                (startMs, endMs, HOUR_MS),
            ),
            (
                (serial, name, state)
                for serial, name, state, _ in connection.execute(
                    _LAST_BEFORE.format(andSerial=""), {"before": startMs}
                )
            ),
            connection.execute(
                "SELECT serial, time_ms, field, state FROM history_transitions"
                " WHERE time_ms >= ? AND time_ms < ? ORDER BY time_ms",
                (startMs, endMs),
            ),
        )
        _insertHours(connection, rows)
        _setRolledUpTo(connection, endMs)
        return (endMs - startMs) // HOUR_MS

    return _inTransaction(connection, rollUp)


def _prune(
    connection: sqlite3.Connection, rawBeforeMs: int, hourlyBeforeMs: int
) -> None:
    def prune() -> None:
        rolledUpTo = _rolledUpTo(connection)
        if rolledUpTo is not None:
            cutoff = min(rawBeforeMs, rolledUpTo)
            connection.execute(
                "DELETE FROM history_samples WHERE time_ms < ?", (cutoff,)
            )
            # A field's last transition before the cutoff says what it was
            # from then on: kept while it says on (off is the default).
            lastOn = (
                f"SELECT serial, field, last FROM ({_LAST_BEFORE.format(andSerial='')})"
                " WHERE state = 1"
            )
            connection.execute(
                "DELETE FROM history_transitions WHERE time_ms < :before"
                f" AND (serial, field, time_ms) NOT IN ({lastOn})",
                {"before": cutoff},
            )
        connection.execute(
            "DELETE FROM history_hours WHERE hour_ms < ?", (hourlyBeforeMs,)
        )

    _inTransaction(connection, prune)


def _forget(connection: sqlite3.Connection, serial: str) -> None:
    def forget() -> None:
        for table in ("history_samples", "history_transitions", "history_hours"):
            connection.execute(f"DELETE FROM {table} WHERE serial = ?", (serial,))

    _inTransaction(connection, forget)


def _usage(
    connection: sqlite3.Connection,
    serial: str,
    boundaries: list[int],
    rawFromMs: int,
) -> list[dict[str, int]]:
    columns = ", ".join(f"{name}_ms" for name in USAGE)

    def hourly(fromMs: int, toMs: int) -> Iterable[Sequence[Any]]:
        return connection.execute(
            f"SELECT hour_ms, {columns} FROM history_hours"
            " WHERE serial = ? AND hour_ms >= ? AND hour_ms < ?",
            (serial, fromMs, toMs),
        )

    return usageTotals(
        boundaries,
        rawFromMs,
        _rolledUpTo(connection),
        hourly,
        partial(_transitionsOf, connection, serial),
    )


def _exportRows(
    connection: sqlite3.Connection, after: ExportPosition | None, limit: int
) -> HistoryRows:
    def select(
        table: int, key: tuple[Any, ...] | None, count: int
    ) -> list[Sequence[Any]]:
        return connection.execute(*exportQuery(table, key, count, "?")).fetchall()

    return exportBatch(after, limit, select, _rolledUpTo(connection))


def _importRows(connection: sqlite3.Connection, rows: HistoryRows) -> None:
    def write() -> None:
        _insertRaw(connection, rows.samples, rows.transitions)
        _insertHours(connection, [_hourRow(hour) for hour in rows.hours])
        if rows.rolledUpTo is not None:
            _setRolledUpTo(connection, rows.rolledUpTo)

    _inTransaction(connection, write)


def _databaseBytes(connection: sqlite3.Connection) -> int:
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    (size,) = connection.execute("PRAGMA page_size").fetchone()
    return int(pages) * int(size)


# Recording


@frozen
class HistorySettings:
    """How long history is kept, and how often it is written and maintained."""

    rawDays: int = DEFAULT_RAW_DAYS
    hourlyDays: int = DEFAULT_HOURLY_DAYS
    flushSeconds: float = FLUSH_SECONDS
    flushRows: int = FLUSH_ROWS
    maintenanceSeconds: float = MAINTENANCE_SECONDS


@frozen
class _Report:
    """A device's report: its time, and its buckets as committed by it."""

    serial: str
    timeMs: int
    shared: Bucket | None
    device: Bucket | None

    def sample(self) -> Sample:
        return Sample(
            self.serial,
            self.timeMs,
            sampleValues(
                {} if self.shared is None else self.shared.value,
                {} if self.device is None else self.device.value,
            ),
        )


@define
class History:
    """
    Records samples and transitions from a store's feed and answers what
    was recorded. Build it with L{following}; L{start} its timers (a
    L{HistoryService} does).
    """

    log = Logger()

    store: IBucketStore
    storage: IHistoryStorage
    clock: IReactorTime
    settings: HistorySettings = field(factory=HistorySettings)
    #: Each known device's HVAC fields as last committed.
    _hvac: dict[str, dict[str, bool]] = field(factory=dict, init=False, repr=False)
    #: Each device's sample of the current minute, replaced by later reports
    #: in the same minute.
    _current: dict[str, _Report] = field(factory=dict, init=False, repr=False)
    _samples: list[Sample] = field(factory=list, init=False, repr=False)
    _transitions: list[Transition] = field(factory=list, init=False, repr=False)
    _loops: list[LoopingCall] = field(factory=list, init=False, repr=False)
    _maintaining: bool = field(default=False, init=False)
    #: Set by L{stop}: the store is about to close and takes no more rows.
    _stopped: bool = field(default=False, init=False)

    @classmethod
    def following(
        cls,
        store: IBucketStore,
        storage: IHistoryStorage,
        clock: IReactorTime,
        settings: HistorySettings | None = None,
    ) -> History:
        """
        A history of C{store}'s devices from now on: it knows their HVAC
        state as committed, and listens to the feed.
        """
        history = cls(store, storage, clock, settings or HistorySettings())
        for serial in store.scopes():
            shared = store.get(serial, f"shared.{serial}")
            if serial != GLOBAL_SCOPE and shared is not None:
                history._hvac[serial] = hvacState(shared.value)
        store.listen(history.apply)
        return history

    def nowMs(self) -> int:
        # Rounded: a clock set to a whole number of ms reads as that number.
        return round(self.clock.seconds() * 1000)

    # The feed

    def apply(self, commit: Commit) -> None:
        """
        Record what C{commit}, a device's own report or a deletion, says:
        only when this process committed it, so that processes sharing a
        database record each report once. A deletion is forgotten by every
        process (each after its own writes of the device's rows).
        """
        origin = commit.origin
        reported: Bucket | None = None
        deviceReported = False
        deleted: set[str] = set()
        for change in commit.buckets:
            if change.bucket is None:
                deleted.add(change.scope)
            elif change.scope == origin:
                if change.key == f"shared.{origin}":
                    reported = change.bucket
                elif change.key == f"device.{origin}":
                    deviceReported = True
        for scope in deleted:
            if scope != GLOBAL_SCOPE and not self.store.buckets(scope):
                self._forget(scope)
        if not commit.local:
            # Another process sharing the database committed it, and
            # records it; this one keeps the device's HVAC state current,
            # so that a later report through it changes only what changed.
            if origin is not None and reported is not None:
                self._hvac[origin] = hvacState(reported.value)
            return
        if self._stopped or origin is None or (reported is None and not deviceReported):
            return
        nowMs = self.nowMs()
        if reported is not None:
            self._noteHvac(origin, reported.value, nowMs)
        self._sample(origin, nowMs)
        if len(self._samples) + len(self._transitions) >= self.settings.flushRows:
            self.flush()

    def _noteHvac(self, serial: str, shared: Mapping[str, Any], nowMs: int) -> None:
        now = hvacState(shared)
        before = self._hvac.get(serial, {})
        for name, on in now.items():
            if before.get(name, False) != on:
                self._transitions.append(Transition(serial, nowMs, name, on))
        self._hvac[serial] = now

    def _sample(self, serial: str, nowMs: int) -> None:
        # What to sample is read only once the minute's last report is
        # known: most reports within a minute are replaced unread.
        report = _Report(
            serial,
            nowMs,
            self.store.get(serial, f"shared.{serial}"),
            self.store.get(serial, f"device.{serial}"),
        )
        current = self._current.get(serial)
        if current is not None and current.timeMs // MINUTE_MS != nowMs // MINUTE_MS:
            self._samples.append(current.sample())
        self._current[serial] = report

    def _forget(self, serial: str) -> None:
        """C{serial}'s scope was deleted: so is its history."""
        self._hvac.pop(serial, None)
        self._current.pop(serial, None)
        self._samples = [s for s in self._samples if s.serial != serial]
        self._transitions = [t for t in self._transitions if t.serial != serial]
        # Queued behind any write of its rows already under way.
        self.storage.forget(serial).addErrback(self._failed, "forget")

    # Writing and maintenance

    def flush(self, everything: bool = False) -> Deferred[None]:
        """
        Write what is buffered: every transition, and every sample of a
        minute that has ended (all of them when C{everything}).

        @return: fires once written; a failure is logged and the rows are
            kept for the next flush.
        """
        minute = self.nowMs() // MINUTE_MS
        for serial, report in list(self._current.items()):
            if everything or report.timeMs // MINUTE_MS < minute:
                self._samples.append(report.sample())
                del self._current[serial]
        samples, self._samples = self._samples, []
        transitions, self._transitions = self._transitions, []
        if not samples and not transitions:
            return succeed(None)

        def failed(failure: Failure) -> None:
            self.log.failure(
                "writing {rows} history rows failed; kept for the next try",
                failure,
                rows=len(samples) + len(transitions),
            )
            self._samples[:0] = samples
            self._transitions[:0] = transitions
            excess = len(self._samples) + len(self._transitions) - MAX_BUFFERED_ROWS
            if excess > 0:
                self.log.warn("dropped {rows} history rows", rows=excess)
                del self._samples[: min(excess, len(self._samples))]

        return self.storage.append(samples, transitions).addErrback(failed)

    def maintain(self) -> Deferred[None]:
        """
        Flush, roll up every complete hour, and prune what retention lets
        go. Failures are logged; a run already under way makes this one a
        no-op.
        """
        if self._maintaining:
            return succeed(None)
        self._maintaining = True
        nowMs = self.nowMs()

        async def maintain() -> None:
            await self.flush()
            while await self.storage.rollUp(nowMs):
                pass
            await self.storage.prune(
                nowMs - self.settings.rawDays * DAY_MS,
                nowMs - self.settings.hourlyDays * DAY_MS,
            )

        def done(result: None | Failure) -> None:
            self._maintaining = False
            if isinstance(result, Failure):
                self._failed(result, "maintenance")

        return Deferred.fromCoroutine(maintain()).addBoth(done)

    def start(self) -> None:
        """Flush and maintain periodically, the first time one period from now."""
        self._stopped = False
        for seconds, f in [
            (self.settings.flushSeconds, self.flush),
            (self.settings.maintenanceSeconds, self.maintain),
        ]:
            loop = LoopingCall(f)
            loop.clock = self.clock
            loop.start(seconds, now=False)
            self._loops.append(loop)

    def stop(self) -> Deferred[None]:
        """
        Stop the timers and write everything buffered; reports from then on
        (requests still finishing while the server stops) are not recorded.
        """
        self._stopped = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        return self.flush(everything=True)

    def _failed(self, failure: Failure, what: str) -> None:
        self.log.failure("history {what} failed", failure, what=what)

    # Reading

    def samples(self, serial: str, fromMs: int, toMs: int) -> Deferred[list[Sample]]:
        """
        C{serial}'s samples in [C{fromMs}, C{toMs}), the current minute's
        included.
        """
        # What is buffered is written before the read runs (calls to the
        # storage run in turn).
        self.flush()
        current = self._current.get(serial)

        def withCurrent(stored: list[Sample]) -> list[Sample]:
            if current is not None and fromMs <= current.timeMs < toMs:
                stored.append(current.sample())
            return stored

        return self.storage.samples(serial, fromMs, toMs).addCallback(withCurrent)

    def transitions(self, serial: str, fromMs: int, toMs: int) -> Deferred[Transitions]:
        """C{serial}'s HVAC state at C{fromMs} and its transitions until C{toMs}."""
        self.flush()
        return self.storage.transitions(serial, fromMs, toMs)

    def hours(self, serial: str, fromMs: int, toMs: int) -> Deferred[list[Hour]]:
        """C{serial}'s rolled-up hours starting in [C{fromMs}, C{toMs})."""
        return self.storage.hours(serial, fromMs, toMs)

    def usage(
        self, serial: str, boundaries: Sequence[int]
    ) -> Deferred[list[dict[str, int]]]:
        """
        Milliseconds on of each L{USAGE} category in each period between
        consecutive C{boundaries}.
        """
        self.flush()
        rawFromMs = self.nowMs() - self.settings.rawDays * DAY_MS
        return self.storage.usage(serial, boundaries, rawFromMs)


@define
class HistoryService(Service):
    """Runs a L{History}'s timers while the server runs; flushes at stop."""

    history: History

    def startService(self) -> None:
        Service.startService(self)
        self.history.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.history.stop()
