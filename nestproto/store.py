# -*- test-case-name: tests.test_store_contract -*-
"""
Durable storage of buckets and of small records (owners, entry keys), and
the change feed that announces what was committed.

The contract every engine keeps (tests/store_contract.py pins it):

 - Reads show committed state only: a write is invisible to reads, to the
   feed and to its caller until its transaction is durable.
 - A write is decided inside its transaction: each L{BucketUpdate} sees the
   bucket as the transaction sees it and returns what to store, so a
   compare-and-set (C{if_object_revision}) and the next revision and
   timestamp can never race another writer.
 - A write is all or nothing; a failed one changes nothing anywhere and
   fires L{StoreUnavailable}.
 - Every committed write that changed something is announced once, in
   commit order, with a sequence number that only grows, even across
   restarts.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from .buckets import Bucket
from .errors import StoreClosed, StoreUnavailable
from .model import BucketChanged, Commit, RecordChanged

T = TypeVar("T")

#: Runs a blocking callable away from the reactor thread and fires with its
#: result, e.g. C{functools.partial(deferToThreadPool, reactor, pool)}.
ThreadRunner = Callable[..., "Deferred[Any]"]

#: Called with each commit, in order, once it is durable.
ChangeListener = Callable[[Commit], None]

#: Decides a bucket inside the transaction: called with the bucket as the
#: transaction sees it (C{None} when absent) and the transaction's time in
#: ms; returns the bucket to store, the same object to leave it as it is,
#: or C{None} to delete it.
Decide = Callable[[Bucket | None, int], Bucket | None]

#: Commits a reconnecting event-stream client may catch up on.
REPLAY_COMMITS = 1000


def runInline(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """
    A L{ThreadRunner} that runs C{f} at once on the calling thread: for
    tests and the in-memory replay server, where a blocked reactor does not
    matter and synchronous results do.
    """
    return maybeDeferred(f, *args)


@frozen
class BucketUpdate:
    """Decide bucket C{key} of C{scope} inside the transaction."""

    scope: str
    key: str
    decide: Decide


@frozen
class BucketWrite:
    """
    Store C{bucket} exactly as given (or delete its key when C{delete}):
    for seeding and copying state, where revision and timestamp are already
    decided. Every change of a running server is a L{BucketUpdate}.
    """

    scope: str
    bucket: Bucket
    delete: bool = False


@frozen
class ScopeDelete:
    """Delete every bucket of C{scope}."""

    scope: str


@frozen
class RecordWrite:
    """Store C{doc} as record C{kind}/C{name}; C{None} deletes it."""

    kind: str
    name: str
    doc: dict[str, Any] | None


@frozen
class RecordUpdate:
    """
    Decide record C{kind}/C{name} inside the transaction: C{decide} is
    called with the record as the transaction sees it (C{None} when absent)
    and returns the record to store (C{None} deletes it), or raises to
    refuse the whole write (a pairing code claimed meanwhile).
    """

    kind: str
    name: str
    decide: Callable[[dict[str, Any] | None], dict[str, Any] | None]


Write = BucketUpdate | BucketWrite | ScopeDelete | RecordWrite | RecordUpdate


class IChangeFeed(Interface):
    """The committed changes of a store, in commit order."""

    lastSequence = Attribute("The sequence number of the newest commit (0: none).")

    def listen(listener: ChangeListener) -> None:
        """
        Call C{listener} with every commit from now on, after the listeners
        added before it. A listener must not raise; one that does is logged.
        """

    def since(sequence: int) -> list[Commit] | None:
        """
        The commits after C{sequence}, oldest first; C{None} when some of
        them are no longer kept (or C{sequence} was never handed out), so a
        consumer must start over from current state.
        """


class IBucketStore(IChangeFeed):
    """
    Buckets by scope (a device serial, or C{""} for structures and users)
    and key, plus small JSON records by kind and name.
    """

    def get(scope: str, key: str) -> Bucket | None:
        """The committed bucket C{key} of C{scope}, or C{None}."""

    def buckets(scope: str) -> list[Bucket]:
        """Every committed bucket of C{scope}, ordered by key."""

    def scopes() -> list[str]:
        """Every scope holding at least one bucket."""

    def record(kind: str, name: str) -> dict[str, Any] | None:
        """The committed record C{kind}/C{name}, or C{None}."""

    def records(kind: str) -> dict[str, dict[str, Any]]:
        """Every committed record of C{kind}, by name."""

    def recordKinds() -> list[str]:
        """Every kind holding at least one record, this version's or not."""

    def write(
        writes: Sequence[Write], origin: str | None = None
    ) -> Deferred[list[Bucket | None]]:
        """
        Decide and commit C{writes} in order, in one transaction.

        @param origin: the serial of the device whose request this is, if
            any; announced with the commit.
        @return: fires once durable (and announced) with, per write, the
            bucket as it stands after it (C{None} for records, deletes and
            scope deletes). Fails with what a L{BucketUpdate} raised, or
            with L{StoreUnavailable} when the commit failed; either way
            nothing changed.
        """

    def deleteScope(scope: str) -> Deferred[list[Bucket | None]]:
        """Remove every bucket of C{scope}; fires once durable."""

    def close() -> Deferred[None]:
        """Commit what is pending and release the database."""

    onCommitted = Attribute(
        "C{None}, or called with the seconds each transaction that committed"
        " something took, from deciding its batch to its being durable."
    )


_SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    revision INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


#: Removes buckets whose key has a space in it, on every open, in either
#: engine: 4.x firmware mangles keys so (C{shared.S ._sync}); such a key
#: names no bucket and is never stored now, but an older nestproto stored
#: them (PROTOCOL.md §20.2).
DROP_SPACED_KEYS = "DELETE FROM buckets WHERE key LIKE '% %'"


def logDroppedKeys(log: Logger, count: int) -> None:
    if count:
        log.warn(
            "dropped {count} stored bucket(s) whose key has a space in it "
            "(a 4.x firmware's mangled key, PROTOCOL.md §20.2)",
            count=count,
        )


#: json.dumps with arguments builds an encoder per call; this one is kept.
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


class SchemaTooNew(Exception):
    """The database was written by a newer nestproto than this one."""


def _upgrade(connection: sqlite3.Connection) -> int:
    """
    Bring the file to L{_SCHEMA_VERSION}. Version 1 (the first release) had
    no C{meta} table; its buckets and records are kept as they are.

    @return: how many buckets with a spaced key were dropped.
    """
    connection.executescript(_SCHEMA)
    row = connection.execute(
        "SELECT value FROM meta WHERE name = 'schema_version'"
    ).fetchone()
    version = 1 if row is None else int(row[0])
    if version > _SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database was written by a newer nestproto (schema {version}, "
            f"this one knows {_SCHEMA_VERSION})"
        )
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(
        "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (_SCHEMA_VERSION,)
    )
    connection.execute("INSERT OR IGNORE INTO meta VALUES ('last_sequence', 0)")
    dropped = connection.execute(DROP_SPACED_KEYS).rowcount
    connection.execute("COMMIT")
    return dropped


def logFailedCommit(
    log: Logger, failure: Failure, count: int, databaseError: type[Exception]
) -> None:
    """
    Say why a commit failed: one error line when the database or the disk
    refused (full, read-only, gone), which is the operator's matter; the
    whole failure when it is a bug of ours.
    """
    if failure.check(databaseError, OSError):
        log.error(
            "committing {count} writes failed, nothing changed: {reason}",
            count=count,
            reason=failure.getErrorMessage(),
        )
    else:
        log.failure("committing {count} writes failed", failure, count=count)


@define
class Decided:
    """
    One write request, decided: what it writes and what it answers. Every
    engine decides with L{decideRequest}, so the rules are the same
    whichever database holds the rows.
    """

    results: list[Bucket | None]
    bucketOps: dict[tuple[str, str], Bucket | None] = field(factory=dict)
    recordOps: dict[tuple[str, str], dict[str, Any] | None] = field(factory=dict)
    sequence: int = 0

    def commit(self, origin: str | None) -> Commit:
        """What this request changed, as the feed announces it."""
        return Commit(
            self.sequence,
            origin,
            tuple(
                BucketChanged(scope, key, bucket)
                for (scope, key), bucket in self.bucketOps.items()
            ),
            tuple(
                RecordChanged(kind, name, doc)
                for (kind, name), doc in self.recordOps.items()
            ),
        )


def decideRequest(
    writes: Sequence[Write],
    earlier: Sequence[Decided],
    storedBucket: Callable[[str, str], Bucket | None],
    keysInScope: Callable[[str], Iterable[str]],
    storedRecord: Callable[[str, str], dict[str, Any] | None],
    nowMs: int,
) -> Decided:
    """
    Decide one write request on top of what the transaction sees (the
    C{stored*} lookups) and the C{earlier} requests of its batch.

    @raise Exception: whatever a decision raises; nothing is then written.
    """
    one = Decided([])

    def current(scope: str, key: str) -> Bucket | None:
        for layer in (one, *reversed(earlier)):
            if (scope, key) in layer.bucketOps:
                return layer.bucketOps[scope, key]
        return storedBucket(scope, key)

    def currentRecord(kind: str, name: str) -> dict[str, Any] | None:
        for layer in (one, *reversed(earlier)):
            if (kind, name) in layer.recordOps:
                return layer.recordOps[kind, name]
        return storedRecord(kind, name)

    for write in writes:
        if isinstance(write, BucketUpdate):
            before = current(write.scope, write.key)
            after = write.decide(before, nowMs)
            if after is not None and after.key != write.key:
                raise ValueError(f"decided {after.key} for {write.key}")
            if after is not before:
                one.bucketOps[write.scope, write.key] = after
            one.results.append(after)
        elif isinstance(write, BucketWrite):
            after = None if write.delete else write.bucket
            one.bucketOps[write.scope, write.bucket.key] = after
            one.results.append(after)
        elif isinstance(write, ScopeDelete):
            keys = set(keysInScope(write.scope))
            for layer in (*earlier, one):
                keys.update(k for s, k in layer.bucketOps if s == write.scope)
            for key in keys:
                if current(write.scope, key) is not None:
                    one.bucketOps[write.scope, key] = None
            one.results.append(None)
        elif isinstance(write, RecordUpdate):
            previous = currentRecord(write.kind, write.name)
            doc = write.decide(previous)
            if doc != previous:
                one.recordOps[write.kind, write.name] = doc
            one.results.append(None)
        else:
            one.recordOps[write.kind, write.name] = write.doc
            one.results.append(None)
    # A delete of what was absent all along changes nothing.
    for (scope, key), after in list(one.bucketOps.items()):
        if after is None and _absentBefore(scope, key, earlier, storedBucket):
            del one.bucketOps[scope, key]
    return one


def _absentBefore(
    scope: str,
    key: str,
    earlier: Sequence[Decided],
    storedBucket: Callable[[str, str], Bucket | None],
) -> bool:
    for layer in reversed(earlier):
        if (scope, key) in layer.bucketOps:
            return layer.bucketOps[scope, key] is None
    return storedBucket(scope, key) is None


@frozen
class PendingWrite:
    """A write request waiting for its batch: what it writes and who asks."""

    writes: Sequence[Write]
    origin: str | None
    done: Deferred[list[Bucket | None]]


@define
class CommittedState:
    """
    What every engine keeps in memory: the committed buckets and records it
    serves reads from, and its change feed. An engine shows a commit with
    L{_show} once it is durable, and at no other time.
    """

    log = Logger()

    # Contents stay out of the repr: a Logger on a class puts the instance
    # (and whatever holds the store) into every event as log_source, and a
    # JSON log observer would write out every bucket and entry key.
    _buckets: dict[str, dict[str, Bucket]] = field(
        factory=dict, repr=False, kw_only=True
    )
    _records: dict[str, dict[str, dict[str, Any]]] = field(
        factory=dict, repr=False, kw_only=True
    )
    _listeners: list[ChangeListener] = field(factory=list, repr=False, kw_only=True)
    _recent: deque[Commit] = field(
        factory=lambda: deque(maxlen=REPLAY_COMMITS), repr=False, kw_only=True
    )
    lastSequence: int = field(default=0, kw_only=True)
    #: Write requests not yet decided; each engine's L{_commitQueued} takes
    #: them a batch at a time.
    _queue: list[PendingWrite] = field(factory=list, repr=False, kw_only=True)
    _closed: bool = field(default=False, kw_only=True)
    #: Called with the seconds each transaction that committed something
    #: took, from deciding its batch to its being durable (metrics).
    onCommitted: Callable[[float], object] | None = field(
        default=None, repr=False, kw_only=True
    )

    # Reads: committed state only

    def get(self, scope: str, key: str) -> Bucket | None:
        return self._buckets.get(scope, {}).get(key)

    def buckets(self, scope: str) -> list[Bucket]:
        found = self._buckets.get(scope, {})
        return [found[key] for key in sorted(found)]

    def scopes(self) -> list[str]:
        return sorted(scope for scope, found in self._buckets.items() if found)

    def record(self, kind: str, name: str) -> dict[str, Any] | None:
        return self._records.get(kind, {}).get(name)

    def records(self, kind: str) -> dict[str, dict[str, Any]]:
        return dict(self._records.get(kind, {}))

    def recordKinds(self) -> list[str]:
        return sorted(kind for kind, found in self._records.items() if found)

    # The feed

    def listen(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def since(self, sequence: int) -> list[Commit] | None:
        if sequence == self.lastSequence:
            return []
        if (
            sequence > self.lastSequence
            or not self._recent
            or self._recent[0].sequence > sequence + 1
        ):
            return None
        return [commit for commit in self._recent if commit.sequence > sequence]

    def write(
        self, writes: Sequence[Write], origin: str | None = None
    ) -> Deferred[list[Bucket | None]]:
        if self._closed:
            raise StoreClosed()
        if not writes:
            # Nothing to decide: committed state is already what it shows.
            return succeed([])
        done: Deferred[list[Bucket | None]] = Deferred()
        self._queue.append(PendingWrite(list(writes), origin, done))
        self._commitQueued()
        return done

    def deleteScope(self, scope: str) -> Deferred[list[Bucket | None]]:
        return self.write([ScopeDelete(scope)])

    def _commitQueued(self) -> None:
        """Decide and commit what is queued, a batch at a time (the engine's)."""
        raise NotImplementedError()

    def _show(self, commit: Commit) -> None:
        """Make a durable C{commit} visible to reads, then announce it."""
        for change in commit.buckets:
            inScope = self._buckets.setdefault(change.scope, {})
            if change.bucket is None:
                inScope.pop(change.key, None)
                if not inScope:
                    del self._buckets[change.scope]
            else:
                inScope[change.key] = change.bucket
        for record in commit.records:
            if record.doc is None:
                self._records.get(record.kind, {}).pop(record.name, None)
            else:
                self._records.setdefault(record.kind, {})[record.name] = record.doc
        self.lastSequence = commit.sequence
        self._recent.append(commit)
        for listener in list(self._listeners):
            try:
                listener(commit)
            except Exception:
                self.log.failure(
                    "change listener failed for commit {sequence}",
                    sequence=commit.sequence,
                )


@implementer(IBucketStore)
@define
class SQLiteStore(CommittedState):
    """
    The embedded default L{IBucketStore}: one SQLite file in WAL mode with
    C{synchronous=FULL}, so a commit survives power loss, not only a crash.

    One process owns the file, so committed state is kept in memory for
    reads, and writes are decided on the reactor thread against it in
    commit order: a batch is decided only once the batch before it has
    committed, which is the same as deciding inside the transaction.
    Writes that arrive while a commit runs are committed together in the
    next transaction (group commit).
    """

    _connection: sqlite3.Connection
    _runInThread: ThreadRunner
    _clock: IReactorTime
    #: Fired once nothing is queued or committing (L{close}).
    _drained: list[Deferred[None]] = field(factory=list, repr=False)
    _committing: bool = False
    #: Calls of L{withConnection} not yet done (L{close} waits for them).
    _jobs: int = 0

    @classmethod
    def open(
        cls, path: str, runInThread: ThreadRunner, clock: IReactorTime
    ) -> SQLiteStore:
        """
        Open (or create, or upgrade) the store at C{path} and load it into
        memory.

        Blocks while loading: call it at start-up, before serving.
        """
        connection = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        dropped = _upgrade(connection)
        store = cls(connection, runInThread, clock)
        logDroppedKeys(store.log, dropped)
        for scope, key, revision, timestamp, value in connection.execute(
            "SELECT scope, key, revision, timestamp, value FROM buckets"
        ):
            store._buckets.setdefault(scope, {})[key] = Bucket(
                key, revision, timestamp, json.loads(value)
            )
        for kind, name, doc in connection.execute(
            "SELECT kind, name, doc FROM records"
        ):
            store._records.setdefault(kind, {})[name] = json.loads(doc)
        (store.lastSequence,) = connection.execute(
            "SELECT value FROM meta WHERE name = 'last_sequence'"
        ).fetchone()
        return store

    # Writes

    def withConnection(self, f: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        """
        Run C{f} with the database connection on the store's own thread, in
        turn with its commits, and fire with what it returns: for tables
        beside the buckets (history) whose writes are not decided against
        committed state. C{f} commits or rolls back what it begins.

        @raise StoreClosed: when the store is closing.
        """
        if self._closed:
            raise StoreClosed()
        self._jobs += 1

        def done(result: T | Failure) -> T | Failure:
            self._jobs -= 1
            self._closeIfDrained()
            return result

        return self._runInThread(f, self._connection).addBoth(done)

    def close(self) -> Deferred[None]:
        """
        Fire once every accepted write and L{withConnection} call is done,
        then close the file.
        """
        self._closed = True
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        self._closeIfDrained()

        def closeConnection(result: None) -> None:
            self._connection.close()

        return drained.addCallback(closeConnection)

    def _closeIfDrained(self) -> None:
        if self._queue or self._committing or self._jobs:
            return
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def _commitQueued(self) -> None:
        if self._committing or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._committing = True
        nowMs = int(self._clock.seconds() * 1000)
        accepted: list[tuple[PendingWrite, Decided]] = []
        refused: list[tuple[PendingWrite, Failure]] = []
        sequence = self.lastSequence
        for pending in batch:
            try:
                one = decideRequest(
                    pending.writes,
                    [decided for _pending, decided in accepted],
                    self.get,
                    lambda scope: self._buckets.get(scope, {}),
                    self.record,
                    nowMs,
                )
            except Exception:
                refused.append((pending, Failure()))
                continue
            if one.bucketOps or one.recordOps:
                sequence += 1
                one.sequence = sequence
            accepted.append((pending, one))
        for pending, failure in refused:
            pending.done.errback(failure)
        if not any(one.sequence for _pending, one in accepted):
            self._finish(accepted)
            return
        started = self._clock.seconds()
        d = self._runInThread(
            self._commitToDisk, [one for _pending, one in accepted], sequence
        )
        d.addCallbacks(
            lambda ignored: self._finish(accepted, started),
            lambda failure: self._fail(accepted, failure),
        )

    def _commitToDisk(self, decided: list[Decided], lastSequence: int) -> None:
        """One transaction for a whole batch: runs on the store's thread."""
        cursor = self._connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for one in decided:
                for (scope, key), bucket in one.bucketOps.items():
                    if bucket is None:
                        cursor.execute(
                            "DELETE FROM buckets WHERE scope = ? AND key = ?",
                            (scope, key),
                        )
                    else:
                        cursor.execute(
                            "INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?)",
                            (
                                scope,
                                key,
                                bucket.revision,
                                bucket.timestamp,
                                _dumps(bucket.value),
                            ),
                        )
                for (kind, name), doc in one.recordOps.items():
                    if doc is None:
                        cursor.execute(
                            "DELETE FROM records WHERE kind = ? AND name = ?",
                            (kind, name),
                        )
                    else:
                        cursor.execute(
                            "INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                            (kind, name, _dumps(doc)),
                        )
            cursor.execute(
                "UPDATE meta SET value = ? WHERE name = 'last_sequence'",
                (lastSequence,),
            )
            cursor.execute("COMMIT")
        except BaseException:
            if self._connection.in_transaction:
                cursor.execute("ROLLBACK")
            raise

    def _finish(
        self, decided: list[tuple[PendingWrite, Decided]], started: float | None = None
    ) -> None:
        """The batch is durable: show it, announce it, answer it, in order."""
        if started is not None and self.onCommitted is not None:
            self.onCommitted(self._clock.seconds() - started)
        for pending, one in decided:
            if one.sequence:
                self._show(one.commit(pending.origin))
            pending.done.callback(one.results)
        self._committing = False
        self._commitQueued()
        self._closeIfDrained()

    def _fail(
        self, decided: list[tuple[PendingWrite, Decided]], failure: Failure
    ) -> None:
        """The batch did not commit: nothing changes, every request fails."""
        logFailedCommit(self.log, failure, len(decided), sqlite3.Error)
        self._committing = False
        for pending, _one in decided:
            pending.done.errback(StoreUnavailable())
        self._commitQueued()
        self._closeIfDrained()
