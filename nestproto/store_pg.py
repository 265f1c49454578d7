# -*- test-case-name: tests.test_store_pg -*-
"""
The PostgreSQL engine of L{IBucketStore}: several nestproto processes on
one database.

How it keeps the store contract with other writers it cannot see:

 - A write is decided inside a database transaction, on the store's
   thread: the keys it names are locked (transaction-scoped advisory
   locks, taken in one sorted order so two processes never deadlock, and
   which also lock keys that do not exist yet), read, handed to each
   decision with the transaction's time, written, and COMMITted with
   C{synchronous_commit} on before anything is answered or shown.
 - Every commit appends one row per announced change to the C{changes}
   table. Its sequence comes from a counter row updated last in the
   transaction: the row lock is held until COMMIT, so sequence order is
   commit order and there are no gaps (a sequence object would hand out
   numbers that a rollback then skips, and a reader could see 11 committed
   before 10).
 - Reads come from memory, kept current from the change log only, in
   sequence order: this process's own commits and other processes' commits
   are applied the same way, so a reader never sees a newer value replaced
   by an older one.
 - The cross-process feed: a dedicated connection LISTENs; a NOTIFY (one
   per transaction, sent in it, so delivered only after its COMMIT) carries
   the last commit's C{key|revision|sequence} and is only a doorbell. On
   each one, on a poll every L{POLL_SECONDS} and after every reconnect,
   the log is re-read after the last sequence this process applied, so a
   lost notification or a dead connection loses nothing.

psycopg 3's blocking driver runs in thread pools handed in as
L{ThreadRunner}s: one thread for writes (so one process's writes are
decided in the order they were made, and a write made while another
commits joins the next transaction, as in the SQLite engine), one for the
listening connection, which spends its time waiting, and one for the
history's connection (L{PostgreSQLHistoryStorage}, L{runHistoryIn}), so
that no commit waits for a flush or a roll-up.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from attrs import define, field, frozen
from psycopg import IsolationLevel
from psycopg.pq import TransactionStatus
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from zope.interface import implementer

from .buckets import Bucket
from .errors import StoreUnavailable
from .history import IHistoryStorage
from .history_pg import HISTORY_SCHEMA, PostgreSQLHistoryStorage
from .model import BucketChanged, Commit, RecordChanged
from .presence import IPresence, Presence
from .store import (
    DROP_SPACED_KEYS,
    BucketUpdate,
    BucketWrite,
    CommittedState,
    Decided,
    IBucketStore,
    PendingWrite,
    RecordUpdate,
    RecordWrite,
    SchemaTooNew,
    ScopeDelete,
    ThreadRunner,
    decideRequest,
    logDroppedKeys,
    logFailedCommit,
)

#: The channel commits ring; the payload is C{key|revision|sequence}.
CHANNEL = "nestproto_changes"
#: The listening connection's application_name.
FEED_NAME = "nestproto-feed"
#: Seconds the listening connection waits for a notification before it
#: re-reads the log anyway (and so finds out whether it is still alive).
POLL_SECONDS = 5.0
#: Seconds between attempts to reconnect the listening connection.
RECONNECT_SECONDS = 1.0
#: Change-log rows kept: at least this many, and all younger than
#: L{CHANGES_KEPT_SECONDS}. A process further behind reloads everything.
CHANGES_KEPT = 100_000
CHANGES_KEPT_SECONDS = 600
#: A transaction takes one advisory lock per key; PostgreSQL's shared lock
#: table holds max_locks_per_transaction (64) x max_connections of them,
#: so a batch stops growing past this many keys.
MAX_KEYS_PER_TRANSACTION = 512
#: TCP keepalives unless the DSN says otherwise: a silently dead server or
#: network is noticed in about 20 s instead of never.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "2",
}

#: 2: the change log says which process wrote each change; history tables.
_SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS buckets (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    revision BIGINT NOT NULL,
    timestamp BIGINT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS changes (
    sequence BIGINT PRIMARY KEY,
    origin TEXT,
    committed TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    buckets TEXT NOT NULL,
    records TEXT NOT NULL,
    writer TEXT
);
CREATE TABLE IF NOT EXISTS presence (
    serial TEXT PRIMARY KEY,
    last_seen DOUBLE PRECISION NOT NULL,
    entry TEXT,
    updated TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS presence_updated ON presence (updated);
"""

#: Taken around schema creation so processes starting together do not race.
_SCHEMA_LOCK = 0x6E657374  # "nest"

Connection = psycopg.Connection[tuple[Any, ...]]
T = TypeVar("T")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def connect(dsn: str, name: str = "nestproto") -> Connection:
    """
    An autocommit connection to C{dsn} with keepalives unless the DSN sets
    them, named C{name} (in pg_stat_activity) unless the DSN names it.
    """
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    for option, value in KEEPALIVES.items():
        params.setdefault(option, value)
    params.setdefault("application_name", name)
    return psycopg.connect(
        psycopg.conninfo.make_conninfo("", **params), autocommit=True
    )


def _durable(connection: Connection) -> None:
    """A COMMIT returns once on disk, whatever the server's default."""
    connection.execute("SET synchronous_commit TO on")


def createSchema(connection: Connection) -> int:
    """
    Create (or check) the schema, once, whoever else is starting.

    @return: how many buckets with a spaced key were dropped.
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        connection.execute(_SCHEMA)
        row = connection.execute(
            "SELECT value FROM meta WHERE name = 'schema_version'"
        ).fetchone()
        if row is not None and int(row[0]) > _SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database was written by a newer nestproto (schema {row[0]}, "
                f"this one knows {_SCHEMA_VERSION})"
            )
        if row is not None and int(row[0]) < 2:
            # Version 1's change log did not say which process wrote a change.
            connection.execute("ALTER TABLE changes ADD COLUMN writer TEXT")
        connection.execute(HISTORY_SCHEMA)
        connection.execute(
            "INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (name) "
            "DO UPDATE SET value = EXCLUDED.value",
            (_SCHEMA_VERSION,),
        )
        connection.execute(
            "INSERT INTO meta VALUES ('last_sequence', 0) ON CONFLICT DO NOTHING"
        )
        return connection.execute(DROP_SPACED_KEYS).rowcount


def _lockId(*parts: str) -> int:
    """A 64-bit advisory lock id for a bucket or record, the same everywhere."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@frozen
class _Snapshot:
    """Everything committed as of C{sequence}: for start-up and resyncs."""

    sequence: int
    buckets: dict[str, dict[str, Bucket]]
    records: dict[str, dict[str, dict[str, Any]]]


def _loadSnapshot(connection: Connection) -> _Snapshot:
    """Read the whole state in one consistent snapshot."""
    previous = connection.isolation_level
    connection.isolation_level = IsolationLevel.REPEATABLE_READ
    try:
        with connection.transaction():
            row = connection.execute(
                "SELECT value FROM meta WHERE name = 'last_sequence'"
            ).fetchone()
            sequence = 0 if row is None else int(row[0])
            buckets: dict[str, dict[str, Bucket]] = {}
            for scope, key, revision, timestamp, value in connection.execute(
                "SELECT scope, key, revision, timestamp, value FROM buckets"
            ):
                buckets.setdefault(scope, {})[key] = Bucket(
                    key, revision, timestamp, json.loads(value)
                )
            records: dict[str, dict[str, dict[str, Any]]] = {}
            for kind, name, doc in connection.execute(
                "SELECT kind, name, doc FROM records"
            ):
                records.setdefault(kind, {})[name] = json.loads(doc)
    finally:
        connection.isolation_level = previous
    return _Snapshot(sequence, buckets, records)


#: The columns of the change log L{_commitFromRow} reads.
_CHANGE_COLUMNS = "sequence, origin, buckets, records, writer"


def _commitFromRow(
    me: str,
    sequence: int,
    origin: str | None,
    bucketsText: str,
    recordsText: str,
    writer: str | None,
) -> Commit:
    """A change-log row as the commit it announces to process C{me}."""
    buckets = tuple(
        BucketChanged(
            scope,
            key,
            None if revision is None else Bucket(key, revision, timestamp, value),
        )
        for scope, key, revision, timestamp, value in json.loads(bucketsText)
    )
    records = tuple(
        RecordChanged(kind, name, doc) for kind, name, doc in json.loads(recordsText)
    )
    return Commit(sequence, origin, buckets, records, local=writer == me)


@frozen
class _Outcome:
    """
    What a transaction did: per request, its decision or why it was
    refused; and the commits to apply, in order (other processes' commits
    since the last one this process applied, then its own).
    """

    decided: list[Decided | Failure]
    commits: list[Commit]


@frozen
class _Heard:
    """What one turn of the listening connection found."""

    commits: list[Commit]
    snapshot: _Snapshot | None = None


@implementer(IBucketStore)
@define
class PostgreSQLStore(CommittedState):
    """
    L{IBucketStore} on PostgreSQL, shared by every process on the database.

    @ivar _runInThread: runs transactions, one at a time.
    @ivar _listenInThread: runs the listening connection's waits; C{None}
        for a store that sees only its own commits (tools, the migration).
    """

    _dsn: str = field(repr=False)
    _runInThread: ThreadRunner
    _clock: IReactorTime
    _listenInThread: ThreadRunner | None = None
    _drained: list[Deferred[None]] = field(factory=list, repr=False)
    _committing: bool = False
    #: Used on the writing thread only.
    _writer: Connection | None = field(default=None, repr=False)
    #: The applied sequence when this process last pruned the change log.
    _prunedAt: int = field(default=0, repr=False)
    #: Used on the listening thread only.
    _listening: Connection | None = field(default=None, repr=False)
    _listenFailures: int = 0
    #: The next turn of the listening loop reloads the whole state.
    _reload: bool = False
    #: Fired when the listening loop has stopped (after L{close}).
    _feedStopped: Deferred[None] | None = field(default=None, repr=False)
    _wakeChannel: str = field(
        factory=lambda: "nestproto_wake_" + secrets.token_hex(8), repr=False
    )
    #: Names this store's commits in the change log, so that it tells them
    #: from other processes' however it hears of them (L{Commit.local}).
    _processId: str = field(factory=lambda: secrets.token_hex(8), repr=False)
    #: When the transaction under way began deciding its batch.
    _commitStarted: float = field(default=0.0, repr=False)
    #: This store's history tables (L{IHistoryStorage}), on a connection of
    #: their own, run in C{runInThread} unless given a thread of their own
    #: (L{runHistoryIn}).
    history: PostgreSQLHistoryStorage = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.history = PostgreSQLHistoryStorage(self._dsn, self._runInThread)

    @classmethod
    def open(
        cls,
        dsn: str,
        runInThread: ThreadRunner,
        clock: IReactorTime,
        listenInThread: ThreadRunner | None = None,
    ) -> PostgreSQLStore:
        """
        Connect to C{dsn}, create or check the schema and load the state
        into memory; with C{listenInThread}, follow other processes'
        commits from then on.

        Blocks while loading: call it at start-up, before serving.

        @raise psycopg.Error: the database cannot be reached or read.
        @raise SchemaTooNew: a newer nestproto wrote the database.
        """
        connection = connect(dsn)
        try:
            dropped = createSchema(connection)
            snapshot = _loadSnapshot(connection)
        except BaseException:
            connection.close()
            raise
        store = cls(dsn, runInThread, clock, listenInThread)
        logDroppedKeys(store.log, dropped)
        _durable(connection)
        store._writer = connection
        store._buckets = snapshot.buckets
        store._records = snapshot.records
        store.lastSequence = snapshot.sequence
        if listenInThread is not None:
            store.follow(listenInThread)
        return store

    def follow(self, listenInThread: ThreadRunner) -> None:
        """
        From now on, apply and announce other processes' commits too, with
        a listening connection whose waits run in C{listenInThread}.
        """
        if self._feedStopped is not None:
            return
        self._listenInThread = listenInThread
        self._feedStopped = Deferred()
        self._listenNext(wait=False)

    def runHistoryIn(self, historyInThread: ThreadRunner) -> None:
        """
        Run the history's transactions in C{historyInThread}, so that no
        commit waits for them; call it before the history is used.
        """
        # The one being replaced has opened nothing unless it was used.
        self.history.close()
        self.history = PostgreSQLHistoryStorage(
            self._dsn, historyInThread, self.history.settleMs
        )

    # Writes

    def close(self) -> Deferred[None]:
        """
        Fire once every accepted write is committed, the listening loop
        has stopped, the history's jobs are done and the three connections
        are closed.

        (The history's last flush at shutdown, queued before this is
        called, is among its jobs.)
        """
        self._closed = True
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        self._closeIfDrained()

        def wakeListener(ignored: None) -> Deferred[None]:
            stopped = self._feedStopped
            if stopped is None or stopped.called:
                return succeed(None)
            # The listening thread is waiting for a notification: ring it.
            d: Deferred[None] = self._runInThread(self._notifyWake)
            d.addErrback(lambda f: None)
            return d.addCallback(lambda ignored: stopped)

        def closeWriter(ignored: None) -> Deferred[None]:
            return self._runInThread(self._closeWriter)

        def closeListener(ignored: None) -> Deferred[None] | None:
            if self._listenInThread is None:
                self._closeListening()
                return None
            return self._listenInThread(self._closeListening)

        def closeHistory(ignored: object) -> Deferred[None]:
            return self.history.close()

        return (
            drained.addCallback(wakeListener)
            .addCallback(closeWriter)
            .addCallback(closeListener)
            .addCallback(closeHistory)
        )

    def _closeIfDrained(self) -> None:
        if self._queue or self._committing:
            return
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def _commitQueued(self) -> None:
        if self._committing or not self._queue:
            return
        batch: list[PendingWrite] = []
        keys = 0
        while self._queue and (not batch or keys < MAX_KEYS_PER_TRANSACTION):
            pending = self._queue.pop(0)
            batch.append(pending)
            keys += len(pending.writes)
        self._committing = True
        self._commitStarted = self._clock.seconds()
        nowMs = int(self._commitStarted * 1000)
        d = self._runInThread(self._transact, batch, nowMs, self.lastSequence)
        d.addCallbacks(
            lambda outcome: self._finish(batch, outcome),
            lambda failure: self._fail(batch, failure),
        )

    # On the writing thread

    def _writerConnection(self) -> Connection:
        if self._writer is None or self._writer.closed:
            self._writer = connect(self._dsn)
            _durable(self._writer)
        return self._writer

    def _transact(
        self, batch: list[PendingWrite], nowMs: int, applied: int
    ) -> _Outcome:
        """
        Decide and commit C{batch} in one transaction; C{applied} is the
        last sequence this process's memory shows.

        The statements go in psycopg's pipeline mode: one round trip sends
        BEGIN, the locks and the reads the decisions need; a second sends
        every write, the counter, the change log, the doorbell and COMMIT,
        and waits for COMMIT. The counter's row lock, which orders every
        process's commits, is so held for one round trip and the fsync.
        """
        connection = self._writerConnection()
        try:
            with connection.pipeline():
                with connection.transaction():
                    finish = self._decideAndWrite(connection, batch, nowMs, applied)
            # Past the pipeline: COMMIT has returned.
            return finish()
        except BaseException:
            if connection.broken:
                connection.close()
            elif connection.info.transaction_status != TransactionStatus.IDLE:
                # psycopg ends a transaction whose pipeline the server
                # refused (tested); should one be left open, end it here.
                try:
                    connection.execute("ROLLBACK")
                except psycopg.Error:
                    connection.close()
            raise

    def _decideAndWrite(
        self,
        connection: Connection,
        batch: list[PendingWrite],
        nowMs: int,
        applied: int,
    ) -> Callable[[], _Outcome]:
        """
        Queue the transaction's statements; return what reads their results
        once the pipeline has been synchronised (after COMMIT).
        """
        scopes = {
            w.scope for p in batch for w in p.writes if isinstance(w, ScopeDelete)
        }
        named: set[tuple[str, str]] = set()
        recordNames: set[tuple[str, str]] = set()
        for pending in batch:
            for write in pending.writes:
                if isinstance(write, BucketUpdate):
                    named.add((write.scope, write.key))
                elif isinstance(write, BucketWrite):
                    named.add((write.scope, write.bucket.key))
                elif isinstance(write, RecordWrite | RecordUpdate):
                    recordNames.add((write.kind, write.name))
        inScopes: dict[str, set[str]] = {scope: set() for scope in scopes}
        if scopes:
            for scope, key in connection.execute(
                "SELECT scope, key FROM buckets WHERE scope = ANY(%s)", (list(scopes),)
            ):
                inScopes[scope].add(key)
                named.add((scope, key))
        # Every writer locks what it touches in one order (by lock id): no
        # deadlocks, and a key that does not exist yet is locked too.
        lockIds = sorted(
            {_lockId("b", scope, key) for scope, key in named}
            | {_lockId("r", kind, name) for kind, name in recordNames}
        )
        connection.execute(
            "SELECT pg_advisory_xact_lock(id) FROM unnest(%s::bigint[]) "
            "WITH ORDINALITY AS t(id, n) ORDER BY n",
            (lockIds,),
        )
        # Queued behind the locks: each read starts once they are held.
        bucketRows = None
        if named:
            pairs = sorted(named)
            bucketRows = connection.execute(
                "SELECT b.scope, b.key, b.revision, b.timestamp, b.value "
                "FROM buckets b JOIN unnest(%s::text[], %s::text[]) AS k(scope, key) "
                "ON b.scope = k.scope AND b.key = k.key",
                ([s for s, k in pairs], [k for s, k in pairs]),
            )
        # Records a decision reads, as the transaction sees them (locked above).
        updated = sorted(
            (w.kind, w.name)
            for p in batch
            for w in p.writes
            if isinstance(w, RecordUpdate)
        )
        recordRows = None
        if updated:
            recordRows = connection.execute(
                "SELECT r.kind, r.name, r.doc FROM records r "
                "JOIN unnest(%s::text[], %s::text[]) AS k(kind, name) "
                "ON r.kind = k.kind AND r.name = k.name",
                ([k for k, n in updated], [n for k, n in updated]),
            )
        stored: dict[tuple[str, str], Bucket | None] = dict.fromkeys(named)
        if bucketRows is not None:
            for scope, key, revision, timestamp, value in bucketRows:
                stored[scope, key] = Bucket(key, revision, timestamp, json.loads(value))
                inScopes.get(scope, set()).add(key)
        storedRecords: dict[tuple[str, str], dict[str, Any] | None] = {}
        if recordRows is not None:
            for kind, name, doc in recordRows:
                storedRecords[kind, name] = json.loads(doc)
        decided: list[Decided | Failure] = []
        accepted: list[Decided] = []
        for pending in batch:
            try:
                one = decideRequest(
                    pending.writes,
                    accepted,
                    lambda scope, key: stored.get((scope, key)),
                    lambda scope: inScopes.get(scope, set()),
                    lambda kind, name: storedRecords.get((kind, name)),
                    nowMs,
                )
            except Exception:
                decided.append(Failure())
                continue
            decided.append(one)
            accepted.append(one)

        # What the batch leaves, key by key (later requests win).
        finalBuckets: dict[tuple[str, str], Bucket | None] = {}
        finalRecords: dict[tuple[str, str], dict[str, Any] | None] = {}
        announced: list[tuple[Decided, str | None]] = [
            (each, pending.origin)
            for pending, each in zip(batch, decided, strict=True)
            if isinstance(each, Decided) and (each.bucketOps or each.recordOps)
        ]
        if not announced:
            # Nothing to commit, but the decisions saw the database: show
            # at least as much, so a refused compare-and-set is not
            # followed by a read of an older bucket.
            seen = connection.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM changes "
                "WHERE sequence > %s AND sequence <= "
                "(SELECT value FROM meta WHERE name = 'last_sequence') "
                "ORDER BY sequence",
                (applied,),
            )
            return lambda: _Outcome(
                decided, [_commitFromRow(self._processId, *r) for r in seen]
            )
        for one, _origin in announced:
            finalBuckets.update(one.bucketOps)
            finalRecords.update(one.recordOps)
        _writeRows(connection, finalBuckets, finalRecords)

        # Last: the counter's row lock orders commits until this COMMIT.
        count = len(announced)
        counter = connection.execute(
            "UPDATE meta SET value = value + %s WHERE name = 'last_sequence' "
            "RETURNING value",
            (count,),
        )
        # Every commit before ours is committed (it held the counter): read
        # those this process has not applied yet, to apply them first.
        earlier = connection.execute(
            f"SELECT {_CHANGE_COLUMNS} FROM changes "
            "WHERE sequence > %s AND sequence <= "
            "(SELECT value FROM meta WHERE name = 'last_sequence') - %s "
            "ORDER BY sequence",
            (applied, count),
        )
        _logCommits(connection, count, announced, self._processId)
        if applied - self._prunedAt >= 1000:
            self._prunedAt = applied
            connection.execute(
                "DELETE FROM changes WHERE sequence <= %s "
                "AND committed < clock_timestamp() - make_interval(secs => %s)",
                (applied - CHANGES_KEPT, CHANGES_KEPT_SECONDS),
            )

        def outcome() -> _Outcome:
            row = counter.fetchone()
            assert row is not None
            first = int(row[0]) - count + 1
            commits = [_commitFromRow(self._processId, *r) for r in earlier]
            for sequence, (one, origin) in enumerate(announced, start=first):
                one.sequence = sequence
                commits.append(
                    Commit(
                        sequence,
                        origin,
                        tuple(
                            BucketChanged(scope, key, bucket)
                            for (scope, key), bucket in one.bucketOps.items()
                        ),
                        tuple(
                            RecordChanged(kind, name, doc)
                            for (kind, name), doc in one.recordOps.items()
                        ),
                    )
                )
            return _Outcome(decided, commits)

        return outcome

    def _notifyWake(self) -> None:
        self._writerConnection().execute(f'NOTIFY "{self._wakeChannel}"')

    def _closeWriter(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # On the reactor thread: answers

    def _finish(self, batch: list[PendingWrite], outcome: _Outcome) -> None:
        """The batch is durable: show it, announce it, answer it, in order."""
        if self.onCommitted is not None and any(c.local for c in outcome.commits):
            self.onCommitted(self._clock.seconds() - self._commitStarted)
        self._apply(outcome.commits)
        for pending, one in zip(batch, outcome.decided, strict=True):
            if isinstance(one, Failure):
                pending.done.errback(one)
            else:
                pending.done.callback(one.results)
        self._committing = False
        self._commitQueued()
        self._closeIfDrained()

    def _fail(self, batch: list[PendingWrite], failure: Failure) -> None:
        """
        The batch did not commit: nothing changes, every request fails.

        (When the connection dies during COMMIT the database may have
        committed all the same; then the feed brings the change a moment
        later, as it would another process's.)
        """
        logFailedCommit(self.log, failure, len(batch), psycopg.Error)
        self._committing = False
        for pending in batch:
            pending.done.errback(StoreUnavailable())
        self._commitQueued()
        self._closeIfDrained()

    def _apply(self, commits: Iterable[Commit]) -> None:
        """Show and announce C{commits}, skipping those already applied."""
        for commit in commits:
            if commit.sequence <= self.lastSequence:
                continue
            if commit.sequence != self.lastSequence + 1:
                # Cannot happen while every reader starts from lastSequence;
                # were it to, reload rather than show a wrong state.
                self.log.error(
                    "change feed gap: at {last}, got {sequence}; reloading",
                    last=self.lastSequence,
                    sequence=commit.sequence,
                )
                self._reload = True
                return
            self._show(commit)

    # The cross-process feed

    def _listenNext(self, wait: bool) -> None:
        assert self._listenInThread is not None
        if self._closed and not self._committing and not self._queue:
            assert self._feedStopped is not None
            if not self._feedStopped.called:
                self._feedStopped.callback(None)
            return
        reload, self._reload = self._reload, False
        d = self._listenInThread(self._listenOnce, self.lastSequence, wait, reload)
        d.addCallbacks(self._heard, self._deaf)

    def _heard(self, heard: _Heard) -> None:
        self._receive(heard)
        self._listenNext(wait=True)

    def _receive(self, heard: _Heard) -> None:
        if heard.snapshot is not None:
            self._resync(heard.snapshot)
        self._apply(heard.commits)

    def _deaf(self, failure: Failure) -> None:
        self.log.warn(
            "change feed connection lost ({error}); reconnecting and re-reading "
            "after sequence {sequence}",
            error=failure.getErrorMessage(),
            sequence=self.lastSequence,
        )
        self._listenNext(wait=False)

    def _resync(self, snapshot: _Snapshot) -> None:
        """
        The log no longer holds what this process missed: take the whole
        state and announce the difference as one commit.
        """
        if snapshot.sequence <= self.lastSequence:
            return
        self.log.warn(
            "change feed fell behind (at {last}, log pruned); reloaded state as "
            "of {sequence}",
            last=self.lastSequence,
            sequence=snapshot.sequence,
        )
        buckets: list[BucketChanged] = []
        for scope in set(self._buckets) | set(snapshot.buckets):
            old = self._buckets.get(scope, {})
            new = snapshot.buckets.get(scope, {})
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    buckets.append(BucketChanged(scope, key, new.get(key)))
        records: list[RecordChanged] = []
        for kind in set(self._records) | set(snapshot.records):
            oldDocs = self._records.get(kind, {})
            newDocs = snapshot.records.get(kind, {})
            for name in sorted(set(oldDocs) | set(newDocs)):
                if oldDocs.get(name) != newDocs.get(name):
                    records.append(RecordChanged(kind, name, newDocs.get(name)))
        # since() cannot bridge the jump; the differences, shown as one
        # commit, bring memory to the snapshot.
        self._recent.clear()
        self._show(
            Commit(snapshot.sequence, None, tuple(buckets), tuple(records), local=False)
        )

    # On the listening thread

    def _listenOnce(self, after: int, wait: bool, reload: bool = False) -> _Heard:
        """
        Wait for a doorbell (or the poll interval), then read the log after
        C{after}; (re)connect first when there is no live connection.
        """
        connection = self._listening
        try:
            if connection is None or connection.closed:
                if self._listenFailures > 1:
                    # Reconnecting failed too: do not spin while it is down.
                    time.sleep(RECONNECT_SECONDS)
                connection = self._listening = connect(self._dsn, FEED_NAME)
                connection.execute(f'LISTEN "{CHANNEL}"')
                connection.execute(f'LISTEN "{self._wakeChannel}"')
            elif wait:
                for _ in connection.notifies(timeout=POLL_SECONDS, stop_after=1):
                    break
                # Coalesce the doorbells that rang meanwhile: one read serves all.
                for _ in connection.notifies(timeout=0):
                    pass
            if connection.broken or connection.closed:
                raise psycopg.OperationalError("the listening connection is closed")
            if reload:
                heard = _Heard([], _loadSnapshot(connection))
            else:
                heard = self._readAfter(connection, after)
        except BaseException:
            self._listenFailures += 1
            if connection is not None:
                connection.close()
            self._listening = None
            raise
        self._listenFailures = 0
        return heard

    def _readAfter(self, connection: Connection, after: int) -> _Heard:
        # One round trip: BEGIN, both reads and COMMIT in a pipeline.
        connection.isolation_level = IsolationLevel.REPEATABLE_READ
        try:
            with connection.pipeline():
                with connection.transaction():
                    rows = connection.execute(
                        f"SELECT {_CHANGE_COLUMNS} FROM changes "
                        "WHERE sequence > %s ORDER BY sequence",
                        (after,),
                    )
                    counter = connection.execute(
                        "SELECT value FROM meta WHERE name = 'last_sequence'"
                    )
        finally:
            connection.isolation_level = None
        commits = [_commitFromRow(self._processId, *r) for r in rows]
        row = counter.fetchone()
        last = 0 if row is None else int(row[0])
        if (
            commits
            and commits[0].sequence == after + 1
            or not commits
            and last <= after
        ):
            return _Heard(commits)
        # The log was pruned past what this process saw.
        return _Heard([], _loadSnapshot(connection))

    def _closeListening(self) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None


def _writeRows(
    connection: Connection,
    buckets: dict[tuple[str, str], Bucket | None],
    records: dict[tuple[str, str], dict[str, Any] | None],
) -> None:
    """Store what a batch leaves: a few statements, whatever its size."""
    puts = [(s, k, b) for (s, k), b in buckets.items() if b is not None]
    gone = [(s, k) for (s, k), b in buckets.items() if b is None]
    if puts:
        connection.execute(
            "INSERT INTO buckets (scope, key, revision, timestamp, value) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], "
            "%s::bigint[], %s::text[]) "
            "ON CONFLICT (scope, key) DO UPDATE SET revision = EXCLUDED.revision, "
            "timestamp = EXCLUDED.timestamp, value = EXCLUDED.value",
            (
                [s for s, k, b in puts],
                [k for s, k, b in puts],
                [b.revision for s, k, b in puts],
                [b.timestamp for s, k, b in puts],
                [_dumps(b.value) for s, k, b in puts],
            ),
        )
    if gone:
        connection.execute(
            "DELETE FROM buckets b "
            "USING unnest(%s::text[], %s::text[]) AS g(scope, key) "
            "WHERE b.scope = g.scope AND b.key = g.key",
            ([s for s, k in gone], [k for s, k in gone]),
        )
    docs = [(k, n, d) for (k, n), d in records.items() if d is not None]
    dropped = [(k, n) for (k, n), d in records.items() if d is None]
    if docs:
        connection.execute(
            "INSERT INTO records (kind, name, doc) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]) "
            "ON CONFLICT (kind, name) DO UPDATE SET doc = EXCLUDED.doc",
            (
                [k for k, n, d in docs],
                [n for k, n, d in docs],
                [_dumps(d) for k, n, d in docs],
            ),
        )
    if dropped:
        connection.execute(
            "DELETE FROM records r "
            "USING unnest(%s::text[], %s::text[]) AS g(kind, name) "
            "WHERE r.kind = g.kind AND r.name = g.name",
            ([k for k, n in dropped], [n for k, n in dropped]),
        )


def _logCommits(
    connection: Connection,
    count: int,
    announced: list[tuple[Decided, str | None]],
    writer: str,
) -> None:
    """
    Queue the change log's rows for C{announced}, written by process
    C{writer}, and one doorbell for the transaction: their sequences are
    the last C{count} the counter (updated before, in this transaction)
    handed out.

    One doorbell serves every commit of a transaction: a listener re-reads
    the log after the last sequence it applied whenever it rings, and
    carries the last commit's C{key|revision|sequence}.
    """
    connection.execute(
        "INSERT INTO changes (sequence, origin, buckets, records, writer) "
        "SELECT m.value - %s + t.n, t.origin, t.buckets, t.records, %s "
        "FROM meta m, unnest(%s::text[], %s::text[], %s::text[]) "
        "WITH ORDINALITY AS t(origin, buckets, records, n) "
        "WHERE m.name = 'last_sequence'",
        (
            count,
            writer,
            [origin for one, origin in announced],
            [
                _dumps(
                    [
                        [scope, key, None, None, None]
                        if bucket is None
                        else [
                            scope,
                            key,
                            bucket.revision,
                            bucket.timestamp,
                            bucket.value,
                        ]
                        for (scope, key), bucket in one.bucketOps.items()
                    ]
                )
                for one, origin in announced
            ],
            [
                _dumps(
                    [[kind, name, doc] for (kind, name), doc in one.recordOps.items()]
                )
                for one, origin in announced
            ],
        ),
    )
    connection.execute(
        "SELECT pg_notify(%s, %s || value) FROM meta WHERE name = 'last_sequence'",
        (CHANNEL, _doorbell(announced[-1][0])),
    )


def _doorbell(last: Decided) -> str:
    """
    C{key|revision|} of a transaction's last commit's first bucket (C{||}
    for records); the database appends the sequence.
    """
    for (_scope, key), bucket in last.bucketOps.items():
        revision = "" if bucket is None else str(bucket.revision)
        return f"{key}|{revision}|"
    return "||"


def _history(store: PostgreSQLStore) -> IHistoryStorage:
    return store.history


registerAdapter(_history, PostgreSQLStore, IHistoryStorage)


#: Seconds between a process's presence writes and reads of the others'.
PRESENCE_SYNC_SECONDS = 2.0


def _syncPresence(
    touched: dict[str, tuple[float | None, dict[str, str] | None]],
    forgotten: list[str],
    readUpTo: datetime | None,
    connection: Connection,
) -> tuple[list[tuple[str, float, str | None]], datetime | None]:
    """
    For L{SharedPresence}, on the history's connection: write, then read
    what changed since C{readUpTo} (a little before: a slow writer's row may
    carry an earlier time than one already read).
    """
    rows = [
        (serial, seen, None if entry is None else _dumps(entry))
        for serial, (seen, entry) in sorted(touched.items())
        if seen is not None
    ]
    with connection.transaction():
        if rows:
            connection.execute(
                "INSERT INTO presence (serial, last_seen, entry) "
                "SELECT * FROM unnest(%s::text[], %s::float8[], %s::text[]) "
                "ON CONFLICT (serial) DO UPDATE SET "
                "last_seen = GREATEST(presence.last_seen, EXCLUDED.last_seen), "
                "entry = COALESCE(EXCLUDED.entry, presence.entry), "
                "updated = clock_timestamp()",
                (
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2] for r in rows],
                ),
            )
        if forgotten:
            connection.execute(
                "DELETE FROM presence WHERE serial = ANY(%s)", (forgotten,)
            )
    if readUpTo is None:
        found = connection.execute(
            "SELECT serial, last_seen, entry, updated FROM presence"
        ).fetchall()
    else:
        found = connection.execute(
            "SELECT serial, last_seen, entry, updated FROM presence "
            "WHERE updated > %s - interval '10 seconds'",
            (readUpTo,),
        ).fetchall()
    newest = max((row[3] for row in found), default=readUpTo)
    return [(row[0], row[1], row[2]) for row in found], newest


@implementer(IPresence)
@define
class SharedPresence:
    """
    L{IPresence} shared by every process on the database.

    A device talks to one process at a time, but any process may be asked
    about it. Noting each request in the database would be a write per
    request, so each process keeps what it heard in memory and, every
    L{PRESENCE_SYNC_SECONDS}, writes what changed and reads what the others
    wrote (last seen only moves forward). What another process heard shows
    here within two sync intervals.
    """

    log = Logger()

    _store: PostgreSQLStore
    _clock: IReactorTime
    _local: Presence = field(init=False)
    _touched: set[str] = field(factory=set, init=False, repr=False)
    _entries: dict[str, dict[str, str]] = field(factory=dict, init=False, repr=False)
    _forgotten: set[str] = field(factory=set, init=False, repr=False)
    #: Each serial's entry as last read from the database, as stored (JSON).
    _entryTexts: dict[str, str] = field(factory=dict, init=False, repr=False)
    #: The newest C{updated} (server time) read so far.
    _readUpTo: datetime | None = field(default=None, init=False)
    _syncing: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._local = Presence(self._clock)

    def touch(self, serial: str) -> None:
        self._local.touch(serial)
        self._touched.add(serial)
        self._forgotten.discard(serial)

    def noteEntry(self, serial: str, fields: Mapping[str, str]) -> None:
        self._local.noteEntry(serial, fields)
        self._touched.add(serial)
        self._entries[serial] = dict(fields)
        self._forgotten.discard(serial)

    def lastSeen(self, serial: str) -> float | None:
        return self._local.lastSeen(serial)

    def entryFields(self, serial: str) -> dict[str, str]:
        return self._local.entryFields(serial)

    def forget(self, serial: str) -> None:
        self._local.forget(serial)
        self._touched.discard(serial)
        self._entries.pop(serial, None)
        self._entryTexts.pop(serial, None)
        self._forgotten.add(serial)

    def heardFrom(self) -> list[str]:
        return self._local.heardFrom()

    def sync(self) -> Deferred[None]:
        """Write what this process heard; read what the others did."""
        if self._syncing:
            return succeed(None)
        self._syncing = True
        touched = {
            serial: (self._local.lastSeen(serial), self._entries.get(serial))
            for serial in self._touched
        }
        forgotten = sorted(self._forgotten)
        self._touched, self._entries, self._forgotten = set(), {}, set()
        d: Deferred[tuple[list[tuple[str, float, str | None]], datetime | None]]
        # On the history's thread and connection: no commit waits for it.
        d = self._store.history.run(_syncPresence, touched, forgotten, self._readUpTo)

        def merge(
            result: tuple[list[tuple[str, float, str | None]], datetime | None],
        ) -> None:
            rows, readUpTo = result
            self._readUpTo = readUpTo
            # Each read overlaps the last by seconds and returns this
            # process's own rows too: thousands a sync once a few hundred
            # thermostats renew a second, all on the reactor thread. Only
            # an entry whose text changed is parsed.
            parsed = self._entryTexts
            for serial, lastSeen, entry in rows:
                if serial not in self._forgotten:
                    fields = None
                    if (
                        entry is not None
                        and parsed.get(serial) != entry
                        and serial not in self._entries
                    ):
                        parsed[serial] = entry
                        fields = json.loads(entry)
                    self._local.merge(serial, lastSeen, fields)

        def retry(failure: Failure) -> None:
            # Keep what was not written for the next sync.
            for serial, (_, entry) in touched.items():
                self._touched.add(serial)
                if entry is not None:
                    self._entries.setdefault(serial, entry)
            self._forgotten.update(forgotten)
            self.log.warn(
                "presence sync failed: {error}", error=failure.getErrorMessage()
            )

        def done(result: None) -> None:
            self._syncing = False

        return d.addCallbacks(merge, retry).addBoth(done)
