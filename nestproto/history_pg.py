# -*- test-case-name: tests.test_history_pg -*-
"""
L{IHistoryStorage} on PostgreSQL: the history tables beside a
L{PostgreSQLStore}'s, shared by every process on the database.

The same tables and answers as L{SQLiteHistoryStorage}. What sharing adds:

 - Each report is recorded once: a process records only the commits it
   made itself (L{Commit.local}), and every row has a primary key, so a
   batch written twice (a retry after a lost answer) leaves one row.
 - Roll-up and pruning take one advisory lock for their transaction, so
   that one process at a time maintains, starting from where the one
   before it left C{rolled up to}. They do not wait for it: a process
   that finds another maintaining leaves the work to it (a roll-up then
   answers 0, as when caught up) and tries again at its next maintenance.
   (Waiting would no longer delay commits, which have a connection of
   their own, but it would hold this process's flushes and history reads
   behind the other process's roll-up, to find the hours done.)
 - A process writes a minute's last sample up to L{FLUSH_SECONDS} after
   the minute, and its clock may differ a little from the one rolling up:
   an hour is rolled up only L{SETTLE_MS} after it ends, so that every
   process's rows of it are in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import StoreClosed
from .history import (
    _HOURS_COLUMNS,
    _HOURS_NUMBER_COLUMNS,
    _HOURS_ON_COLUMNS,
    _SAMPLE_COLUMNS,
    FLUSH_SECONDS,
    HOUR_MS,
    MINUTE_MS,
    NUMBERS,
    ROLLUP_HOURS_PER_JOB,
    USAGE,
    WORDS,
    ExportPosition,
    HistoryRows,
    Hour,
    IHistoryStorage,
    Sample,
    Transition,
    Transitions,
    _hourRow,
    exportBatch,
    exportQuery,
    hourRows,
    readChanges,
    readHours,
    readSamples,
    usageTotals,
)
from .store import ThreadRunner

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

#: The history connection's application_name.
HISTORY_NAME = "nestproto-history"

#: How long after an hour ends it is rolled up (see the module docstring).
SETTLE_MS = MINUTE_MS + 6 * int(FLUSH_SECONDS * 1000)

#: Created with the store's schema (L{nestproto.store_pg.createSchema}).
HISTORY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS history_samples (
    serial TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    {", ".join(f"{name} DOUBLE PRECISION" for name in NUMBERS)},
    {", ".join(f"{name} TEXT" for name in WORDS)},
    PRIMARY KEY (serial, time_ms)
);
CREATE INDEX IF NOT EXISTS history_samples_time ON history_samples (time_ms);
CREATE TABLE IF NOT EXISTS history_transitions (
    serial TEXT NOT NULL,
    field TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    state BOOLEAN NOT NULL,
    PRIMARY KEY (serial, field, time_ms)
);
CREATE INDEX IF NOT EXISTS history_transitions_time
    ON history_transitions (time_ms);
CREATE TABLE IF NOT EXISTS history_hours (
    serial TEXT NOT NULL,
    hour_ms BIGINT NOT NULL,
    samples INTEGER NOT NULL,
    {", ".join(f"{name} DOUBLE PRECISION" for name in _HOURS_NUMBER_COLUMNS)},
    {", ".join(f"{name} BIGINT NOT NULL" for name in _HOURS_ON_COLUMNS)},
    PRIMARY KEY (serial, hour_ms)
);
CREATE INDEX IF NOT EXISTS history_hours_time ON history_hours (hour_ms);
"""

#: Held by roll-up and pruning for their transaction.
_MAINTENANCE_LOCK = 0x6E657374_68697374  # "nesthist"
#: Where hourly rows end, in the store's C{meta} table.
_ROLLED_UP_TO = "history_rolled_up_to"

#: Each device's field's last transition before a time: its state then.
_LAST_BEFORE = (
    "SELECT DISTINCT ON (serial, field) serial, field, state, time_ms"
    " FROM history_transitions WHERE time_ms < %(before)s {andSerial}"
    " ORDER BY serial, field, time_ms DESC"
)


def _upsert(
    table: str,
    columns: Sequence[str],
    key: Sequence[str],
    types: Sequence[str] | None = None,
) -> str:
    """
    An insert of C{columns} that replaces the row of the same C{key}: of
    one row, or with C{types}, of one array per column (one row per
    element).
    """
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in key)
    values = (
        f"VALUES ({', '.join(['%s'] * len(columns))})"
        if types is None
        else f"SELECT * FROM unnest({', '.join(f'%s::{t}[]' for t in types)})"
    )
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) {values}"
        f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


_SAMPLES_UPSERT = _upsert(
    "history_samples",
    _SAMPLE_COLUMNS,
    ("serial", "time_ms"),
    ("text", "bigint", *(["float8"] * len(NUMBERS)), *(["text"] * len(WORDS))),
)
_TRANSITIONS_UPSERT = _upsert(
    "history_transitions",
    ("serial", "field", "time_ms", "state"),
    ("serial", "field", "time_ms"),
    ("text", "text", "bigint", "boolean"),
)
_HOURS_UPSERT = _upsert("history_hours", _HOURS_COLUMNS, ("serial", "hour_ms"))


@implementer(IHistoryStorage)
@define
class PostgreSQLHistoryStorage:
    """
    L{IHistoryStorage} in tables of a L{PostgreSQLStore}'s database, on a
    connection and thread of its own: a flush or a roll-up (up to seconds
    with many thermostats) never delays the store's commits, which have
    their own. One per store (L{PostgreSQLStore.history}, which closes it).

    @ivar _runInThread: runs its transactions, one at a time: a thread of
        its own in the server, the caller's in the migration.
    """

    _dsn: str = field(repr=False)
    _runInThread: ThreadRunner
    settleMs: int = SETTLE_MS
    #: Used on C{_runInThread}'s thread only; opened by the first job.
    _connection: Connection | None = field(default=None, init=False, repr=False)
    #: Jobs not yet done (L{close} waits for them).
    _jobs: int = field(default=0, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _drained: list[Deferred[None]] = field(factory=list, init=False, repr=False)

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{f(*args, connection)} on the history's thread and connection;
        also what else no commit should wait for (the presence sync).
        """
        if self._closed:
            return fail(StoreClosed())
        self._jobs += 1

        def job() -> T:
            connection = self._connect()
            try:
                return f(*args, connection)
            except BaseException:
                # Each function ends its own transaction; a broken
                # connection is replaced by the next job.
                if connection.broken:
                    connection.close()
                raise

        def done(result: T | Failure) -> T | Failure:
            self._jobs -= 1
            self._closeIfDrained()
            return result

        d: Deferred[T] = self._runInThread(job)
        return d.addBoth(done)

    def _connect(self) -> Connection:
        if self._connection is None or self._connection.closed:
            # Imported here: store_pg imports this module.
            from .store_pg import _durable, connect

            self._connection = connect(self._dsn, HISTORY_NAME)
            _durable(self._connection)
        return self._connection

    def close(self) -> Deferred[None]:
        """
        Take no more jobs; fire once those accepted are done and the
        connection is closed.
        """
        self._closed = True
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        self._closeIfDrained()

        def closeConnection(ignored: None) -> Deferred[None]:
            if self._connection is None:
                return succeed(None)
            return self._runInThread(self._closeConnection)

        return drained.addCallback(closeConnection)

    def _closeIfDrained(self) -> None:
        if self._jobs:
            return
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def _closeConnection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def append(
        self, samples: Sequence[Sample], transitions: Sequence[Transition]
    ) -> Deferred[None]:
        return self.run(_append, list(samples), list(transitions))

    def rollUp(self, untilMs: int) -> Deferred[int]:
        return self.run(_rollUp, untilMs - self.settleMs)

    def prune(self, rawBeforeMs: int, hourlyBeforeMs: int) -> Deferred[None]:
        return self.run(_prune, rawBeforeMs, hourlyBeforeMs)

    def forget(self, serial: str) -> Deferred[None]:
        return self.run(_forget, serial)

    def samples(self, serial: str, fromMs: int, toMs: int) -> Deferred[list[Sample]]:
        return self.run(_samples, serial, fromMs, toMs)

    def transitions(self, serial: str, fromMs: int, toMs: int) -> Deferred[Transitions]:
        return self.run(_transitionsOf, serial, fromMs, toMs)

    def hours(self, serial: str, fromMs: int, toMs: int) -> Deferred[list[Hour]]:
        return self.run(_hours, serial, fromMs, toMs)

    def usage(
        self, serial: str, boundaries: Sequence[int], rawFromMs: int
    ) -> Deferred[list[dict[str, int]]]:
        return self.run(_usage, serial, list(boundaries), rawFromMs)

    def databaseBytes(self) -> Deferred[int]:
        return self.run(_databaseBytes)

    def exportRows(
        self, after: ExportPosition | None, limit: int
    ) -> Deferred[HistoryRows]:
        return self.run(_exportRows, after, limit)

    def importRows(self, rows: HistoryRows) -> Deferred[None]:
        return self.run(_importRows, rows)


# On the history's thread; each function ends its own transaction.


def _append(
    samples: list[Sample], transitions: list[Transition], connection: Connection
) -> None:
    # One statement per table, whatever the batch's size (arrays, as the
    # store writes buckets). A row may come twice in a batch (a field's two
    # changes in one ms, one group commit): the last one stands, and an
    # upsert may touch a row once per statement, so only it is sent.
    bySample = {(s.serial, s.timeMs): s for s in samples}
    byTransition = {(t.serial, t.field, t.timeMs): t for t in transitions}
    with connection.transaction():
        if bySample:
            rows = list(bySample.values())
            connection.execute(
                _SAMPLES_UPSERT,
                [
                    [s.serial for s in rows],
                    [s.timeMs for s in rows],
                    *([s.values.get(name) for s in rows] for name in NUMBERS + WORDS),
                ],
            )
        if byTransition:
            changes = list(byTransition.values())
            connection.execute(
                _TRANSITIONS_UPSERT,
                [
                    [t.serial for t in changes],
                    [t.field for t in changes],
                    [t.timeMs for t in changes],
                    [t.on for t in changes],
                ],
            )


def _rolledUpTo(connection: Connection) -> int | None:
    row = connection.execute(
        "SELECT value FROM meta WHERE name = %s", (_ROLLED_UP_TO,)
    ).fetchone()
    return None if row is None else int(row[0])


def _setRolledUpTo(connection: Connection, timeMs: int) -> None:
    connection.execute(
        "INSERT INTO meta VALUES (%s, %s)"
        " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        (_ROLLED_UP_TO, timeMs),
    )


def _upsertHours(connection: Connection, rows: Sequence[Sequence[Any]]) -> None:
    if rows:
        with connection.cursor() as cursor:
            cursor.executemany(_HOURS_UPSERT, rows)


def _lockMaintenance(connection: Connection) -> bool:
    """
    Take the maintenance lock for this transaction, unless another process
    holds it: then C{False}. Once taken, this transaction's statements see
    what the last holder committed.
    """
    row = connection.execute(
        "SELECT pg_try_advisory_xact_lock(%s)", (_MAINTENANCE_LOCK,)
    ).fetchone()
    return row is not None and bool(row[0])


def _rollUp(untilMs: int, connection: Connection) -> int:
    with connection.transaction():
        if not _lockMaintenance(connection):
            return 0
        endMs = untilMs // HOUR_MS * HOUR_MS
        startMs = _rolledUpTo(connection)
        if startMs is None:
            row = connection.execute(
                "SELECT LEAST((SELECT MIN(time_ms) FROM history_samples),"
                " (SELECT MIN(time_ms) FROM history_transitions))"
            ).fetchone()
            first = None if row is None else row[0]
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
                " FROM history_samples WHERE time_ms >= %s AND time_ms < %s"
                f" GROUP BY serial, time_ms / {HOUR_MS}",
                (startMs, endMs),
            ).fetchall(),
            [
                (serial, name, state)
                for serial, name, state, _ in connection.execute(
                    _LAST_BEFORE.format(andSerial=""), {"before": startMs}
                ).fetchall()
            ],
            connection.execute(
                "SELECT serial, time_ms, field, state FROM history_transitions"
                " WHERE time_ms >= %s AND time_ms < %s ORDER BY time_ms",
                (startMs, endMs),
            ).fetchall(),
        )
        _upsertHours(connection, rows)
        _setRolledUpTo(connection, endMs)
        return (endMs - startMs) // HOUR_MS


def _prune(rawBeforeMs: int, hourlyBeforeMs: int, connection: Connection) -> None:
    with connection.transaction():
        if not _lockMaintenance(connection):
            return
        rolledUpTo = _rolledUpTo(connection)
        if rolledUpTo is not None:
            cutoff = min(rawBeforeMs, rolledUpTo)
            connection.execute(
                "DELETE FROM history_samples WHERE time_ms < %s", (cutoff,)
            )
            # A field's last transition before the cutoff says what it was
            # from then on: kept while it says on (off is the default).
            lastOn = (
                "SELECT serial, field, time_ms"
                f" FROM ({_LAST_BEFORE.format(andSerial='')}) AS last WHERE state"
            )
            connection.execute(
                "DELETE FROM history_transitions WHERE time_ms < %(before)s"
                f" AND (serial, field, time_ms) NOT IN ({lastOn})",
                {"before": cutoff},
            )
        connection.execute(
            "DELETE FROM history_hours WHERE hour_ms < %s", (hourlyBeforeMs,)
        )


def _forget(serial: str, connection: Connection) -> None:
    with connection.transaction():
        for table in ("history_samples", "history_transitions", "history_hours"):
            connection.execute(f"DELETE FROM {table} WHERE serial = %s", (serial,))


def _samples(
    serial: str, fromMs: int, toMs: int, connection: Connection
) -> list[Sample]:
    return readSamples(connection, "%s", serial, fromMs, toMs)


def _transitionsOf(
    serial: str, fromMs: int, toMs: int, connection: Connection
) -> Transitions:
    initial = {
        name: bool(state)
        for _, name, state, _ in connection.execute(
            _LAST_BEFORE.format(andSerial="AND serial = %(serial)s"),
            {"before": fromMs, "serial": serial},
        )
    }
    return Transitions(initial, readChanges(connection, "%s", serial, fromMs, toMs))


def _hours(serial: str, fromMs: int, toMs: int, connection: Connection) -> list[Hour]:
    return readHours(connection, "%s", serial, fromMs, toMs)


def _usage(
    serial: str, boundaries: list[int], rawFromMs: int, connection: Connection
) -> list[dict[str, int]]:
    columns = ", ".join(f"{name}_ms" for name in USAGE)

    def hourly(fromMs: int, toMs: int) -> Iterable[Sequence[Any]]:
        return connection.execute(
            f"SELECT hour_ms, {columns} FROM history_hours"
            " WHERE serial = %s AND hour_ms >= %s AND hour_ms < %s",
            (serial, fromMs, toMs),
        ).fetchall()

    def raw(fromMs: int, toMs: int) -> Transitions:
        return _transitionsOf(serial, fromMs, toMs, connection)

    # One snapshot for every read: a roll-up committing between them would
    # count its hours twice or not at all.
    with connection.transaction():
        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return usageTotals(boundaries, rawFromMs, _rolledUpTo(connection), hourly, raw)


def _exportRows(
    after: ExportPosition | None, limit: int, connection: Connection
) -> HistoryRows:
    def select(
        table: int, key: tuple[Any, ...] | None, count: int
    ) -> list[tuple[Any, ...]]:
        return connection.execute(*exportQuery(table, key, count, "%s")).fetchall()

    # One snapshot for the batch's reads, its tables and the mark.
    with connection.transaction():
        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return exportBatch(after, limit, select, _rolledUpTo(connection))


def _importRows(rows: HistoryRows, connection: Connection) -> None:
    with connection.transaction():
        _append(list(rows.samples), list(rows.transitions), connection)
        _upsertHours(connection, [_hourRow(hour) for hour in rows.hours])
        if rows.rolledUpTo is not None:
            _setRolledUpTo(connection, rows.rolledUpTo)


def _databaseBytes(connection: Connection) -> int:
    row = connection.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])
