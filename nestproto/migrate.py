# -*- test-case-name: tests.test_migrate -*-
"""
C{python -m nestproto.migrate --from SOURCE --to TARGET}: move a home's
state between a data directory (SQLite) and a PostgreSQL database, either
way.

Every bucket is copied exactly as stored (key, revision, timestamp and
value), and every record (owners, entry keys, accounts and whatever else
the store holds); a thermostat moved this way sees nothing change. So is
the thermostats' history: every sample, transition and hourly row, and
where hourly rows end, a batch at a time (L{IHistoryStorage.exportRows}).
The target must be empty, history included, so nothing is merged by
accident; a data directory is held while copying from or to it, so no
server runs on it meanwhile (stop the servers of a PostgreSQL database
yourself). The change feed is not copied: the target's feed starts after
the copy.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from .datadir import STORE_FILE, DataDirectoryInUse, DataLock
from .history import ExportPosition, IHistoryStorage
from .store import (
    BucketWrite,
    IBucketStore,
    RecordWrite,
    SQLiteStore,
    Write,
    runInline,
)

T = TypeVar("T")

#: Writes per transaction of the copy.
CHUNK = 200
#: History rows per transaction of the copy (and in memory at a time).
HISTORY_BATCH = 2000


class MigrationError(Exception):
    """The copy cannot be made; the message says why and what to do."""


@frozen
class Copied:
    """How much a migration copied."""

    buckets: int
    records: int
    samples: int
    transitions: int
    hours: int


def _result(d: Deferred[T], failed: str) -> T:
    """
    What C{d}, run inline, fired with.

    @raise MigrationError: it failed; C{failed} says what did.
    """
    results: list[T | Failure] = []
    d.addBoth(results.append)
    (result,) = results
    if isinstance(result, Failure):
        raise MigrationError(f"{failed}: {result.getErrorMessage()}")
    return result


def isDatabaseURL(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def _open(location: str, locks: list[DataLock], source: bool) -> IBucketStore:
    """The store at C{location}: a PostgreSQL URL or a data directory."""
    clock = Clock()
    if isDatabaseURL(location):
        try:
            from .store_pg import PostgreSQLStore
        except ImportError:
            raise MigrationError(
                "PostgreSQL needs psycopg: pip install 'nestproto[postgresql]'"
            ) from None
        try:
            return PostgreSQLStore.open(location, runInline, clock)
        except Exception as e:
            raise MigrationError(f"{location} cannot be opened: {e}") from None
    if source and not os.path.exists(os.path.join(location, STORE_FILE)):
        raise MigrationError(f"{location} holds no nestproto state ({STORE_FILE})")
    try:
        os.makedirs(location, exist_ok=True)
        locks.append(DataLock.acquire(location))
    except DataDirectoryInUse as e:
        raise MigrationError(str(e)) from None
    except OSError as e:
        raise MigrationError(f"{location} cannot be used: {e.strerror}") from None
    return SQLiteStore.open(os.path.join(location, STORE_FILE), runInline, clock)


def _everything(store: IBucketStore) -> Iterator[Write]:
    # Exact writes: revision and timestamp as they were decided.
    for scope in store.scopes():
        for bucket in store.buckets(scope):
            yield BucketWrite(scope, bucket)
    for kind in store.recordKinds():
        for name, doc in sorted(store.records(kind).items()):
            yield RecordWrite(kind, name, doc)


def _isEmpty(store: IBucketStore, history: IHistoryStorage, location: str) -> bool:
    if store.scopes() or store.recordKinds():
        return False
    first = _result(history.exportRows(None, 1), f"reading {location} failed")
    # Where hourly rows end counts too: a copy keeps the source's.
    rows = first.samples or first.transitions or first.hours
    return not rows and first.rolledUpTo is None


def _copyHistory(
    origin: IHistoryStorage,
    destination: IHistoryStorage,
    source: str,
    target: str,
    batchRows: int,
) -> tuple[int, int, int]:
    """Copy every row of C{origin}'s history to C{destination}'s."""
    samples = transitions = hours = 0
    after: ExportPosition | None = None
    while True:
        rows = _result(
            origin.exportRows(after, batchRows), f"reading from {source} failed"
        )
        _result(destination.importRows(rows), f"writing to {target} failed")
        samples += len(rows.samples)
        transitions += len(rows.transitions)
        hours += len(rows.hours)
        if rows.following is None:
            return samples, transitions, hours
        after = rows.following


def migrate(source: str, target: str, batchRows: int = HISTORY_BATCH) -> Copied:
    """
    Copy everything stored at C{source} to the empty C{target}.

    @param batchRows: history rows read and written at a time.
    @return: how much was copied.
    @raise MigrationError: either cannot be opened, or the target holds
        something already (state or history).
    """
    locks: list[DataLock] = []
    stores: list[IBucketStore] = []
    try:
        origin = _open(source, locks, source=True)
        stores.append(origin)
        destination = _open(target, locks, source=False)
        stores.append(destination)
        originHistory, targetHistory = (
            IHistoryStorage(origin),
            IHistoryStorage(destination),
        )
        if not _isEmpty(destination, targetHistory, target):
            raise MigrationError(
                f"{target} already holds a nestproto state or history; migrate "
                "only into an empty one"
            )
        counts = [0, 0]
        chunk: list[Write] = []

        def flush() -> None:
            _result(destination.write(chunk), f"writing to {target} failed")
            chunk.clear()

        for write in _everything(origin):
            counts[isinstance(write, RecordWrite)] += 1
            chunk.append(write)
            if len(chunk) >= CHUNK:
                flush()
        if chunk:
            flush()
        history = _copyHistory(originHistory, targetHistory, source, target, batchRows)
        return Copied(counts[0], counts[1], *history)
    finally:
        for store in stores:
            store.close()
        for lock in locks:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nestproto.migrate",
        description="Copy a nestproto state exactly between a data directory "
        "(SQLite) and a PostgreSQL database, either way, history included. "
        "Stop the servers "
        "first; the target must be empty.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        help="DATA_DIR or postgresql://USER@HOST/DB",
    )
    parser.add_argument(
        "--to", dest="target", required=True, help="DATA_DIR or postgresql://..."
    )
    arguments = parser.parse_args(argv)
    try:
        copied = migrate(arguments.source, arguments.target)
    except MigrationError as e:
        print(f"nestproto.migrate: {e}", file=sys.stderr)
        return 1
    print(
        f"copied {copied.buckets} buckets and {copied.records} records, and a"
        f" history of {copied.samples} samples, {copied.transitions} transitions"
        f" and {copied.hours} hourly rows, to {arguments.target}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
