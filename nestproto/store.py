# -*- test-case-name: tests.test_store -*-
"""
Durable storage of buckets and of small records (owners, entry keys).

Reads come from memory. Writes change memory at once (so the next change to
the same bucket builds on this one) and are committed to disk in the
background; the Deferred a write returns fires only once its transaction is
on disk, and callers acknowledge nothing before that. Writes that arrive while
a commit runs are committed together in the next transaction (group commit).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from .buckets import Bucket
from .errors import StoreClosed

T = TypeVar("T")

#: Runs a blocking callable away from the reactor thread and fires with its
#: result, e.g. C{functools.partial(deferToThreadPool, reactor, pool)}.
ThreadRunner = Callable[..., "Deferred[Any]"]


def runInline(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """
    A L{ThreadRunner} that runs C{f} at once on the calling thread: for
    tests and the in-memory replay server, where a blocked reactor does not
    matter and synchronous results do.
    """
    return maybeDeferred(f, *args)


@frozen
class BucketWrite:
    """Store C{bucket} in C{scope}, or delete its key when C{delete}."""

    scope: str
    bucket: Bucket
    delete: bool = False


@frozen
class RecordWrite:
    """Store C{doc} as record C{kind}/C{name}; C{None} deletes it."""

    kind: str
    name: str
    doc: dict[str, Any] | None


Write = BucketWrite | RecordWrite


class IBucketStore(Interface):
    """
    Buckets by scope (a device serial, or C{""} for structures and users)
    and key, plus small JSON records by kind and name.
    """

    def get(scope: str, key: str) -> Bucket | None:
        """The bucket C{key} of C{scope}, or C{None}."""

    def buckets(scope: str) -> list[Bucket]:
        """Every bucket of C{scope}, ordered by key."""

    def scopes() -> list[str]:
        """Every scope holding at least one bucket."""

    def record(kind: str, name: str) -> dict[str, Any] | None:
        """The record C{kind}/C{name}, or C{None}."""

    def records(kind: str) -> dict[str, dict[str, Any]]:
        """Every record of C{kind}, by name."""

    def write(writes: Sequence[Write]) -> Deferred[None]:
        """
        Apply C{writes} in order, all or nothing on disk; fires once they
        are durable.
        """

    def deleteScope(scope: str) -> Deferred[None]:
        """Remove every bucket of C{scope}; fires once durable."""

    def close() -> Deferred[None]:
        """Commit what is pending and release the file."""


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
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@frozen
class _Pending:
    writes: Sequence[Write]
    done: Deferred[None]


@implementer(IBucketStore)
@define
class SQLiteStore:
    """
    The embedded default L{IBucketStore}: one SQLite file in WAL mode with
    C{synchronous=FULL}, so a commit survives power loss, not only a crash.
    """

    log = Logger()

    _connection: sqlite3.Connection
    _runInThread: ThreadRunner
    # Contents stay out of the repr: a Logger on a class puts the instance
    # (and whatever holds the store) into every event as log_source, and a
    # JSON log observer would write out every bucket and entry key.
    _buckets: dict[str, dict[str, Bucket]] = field(factory=dict, repr=False)
    _records: dict[str, dict[str, dict[str, Any]]] = field(factory=dict, repr=False)
    _queue: list[_Pending] = field(factory=list, repr=False)
    _committing: bool = False
    _closed: bool = False

    @classmethod
    def open(cls, path: str, runInThread: ThreadRunner) -> SQLiteStore:
        """
        Open (or create) the store at C{path} and load it into memory.

        Blocks while loading: call it at start-up, before serving.
        """
        connection = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(_SCHEMA)
        store = cls(connection, runInThread)
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
        return store

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

    def write(self, writes: Sequence[Write]) -> Deferred[None]:
        if self._closed:
            raise StoreClosed()
        writes = list(writes)
        for one in writes:
            self._applyInMemory(one)
        done: Deferred[None] = Deferred()
        if not writes:
            done.callback(None)
            return done
        self._queue.append(_Pending(writes, done))
        self._commitQueued()
        return done

    def deleteScope(self, scope: str) -> Deferred[None]:
        return self.write(
            [BucketWrite(scope, bucket, delete=True) for bucket in self.buckets(scope)]
        )

    def close(self) -> Deferred[None]:
        """
        Fire once every accepted write is committed, then close the file.
        """
        self._closed = True
        drained: Deferred[None] = Deferred()
        if self._queue or self._committing:
            self._queue.append(_Pending([], drained))
            self._commitQueued()
        else:
            drained.callback(None)

        def closeConnection(result: None) -> None:
            self._connection.close()

        return drained.addCallback(closeConnection)

    def _applyInMemory(self, one: Write) -> None:
        if isinstance(one, BucketWrite):
            scope = self._buckets.setdefault(one.scope, {})
            if one.delete:
                scope.pop(one.bucket.key, None)
            else:
                scope[one.bucket.key] = one.bucket
        elif one.doc is None:
            self._records.get(one.kind, {}).pop(one.name, None)
        else:
            self._records.setdefault(one.kind, {})[one.name] = one.doc

    def _commitQueued(self) -> None:
        if self._committing or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._committing = True
        writes = [one for pending in batch for one in pending.writes]
        d = self._runInThread(self._commitToDisk, writes)

        def finished(result: object) -> None:
            self._committing = False
            for pending in batch:
                if isinstance(result, BaseException):
                    pending.done.errback(result)
                else:
                    pending.done.callback(None)
            self._commitQueued()

        def failed(failure: Any) -> None:
            self.log.failure(
                "committing {count} writes failed", failure, count=len(writes)
            )
            finished(failure.value)

        d.addCallbacks(finished, failed)

    def _commitToDisk(self, writes: Iterable[Write]) -> None:
        """One transaction for a whole batch: runs on the store's thread."""
        cursor = self._connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for one in writes:
                if isinstance(one, BucketWrite):
                    if one.delete:
                        cursor.execute(
                            "DELETE FROM buckets WHERE scope = ? AND key = ?",
                            (one.scope, one.bucket.key),
                        )
                    else:
                        bucket = one.bucket
                        cursor.execute(
                            "INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?)",
                            (
                                one.scope,
                                bucket.key,
                                bucket.revision,
                                bucket.timestamp,
                                _dumps(bucket.value),
                            ),
                        )
                elif one.doc is None:
                    cursor.execute(
                        "DELETE FROM records WHERE kind = ? AND name = ?",
                        (one.kind, one.name),
                    )
                else:
                    cursor.execute(
                        "INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                        (one.kind, one.name, _dumps(one.doc)),
                    )
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")
