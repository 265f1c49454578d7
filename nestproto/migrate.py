# -*- test-case-name: tests.test_migrate -*-
"""
C{python -m nestproto.migrate --from SOURCE --to TARGET}: move a home's
state between a data directory (SQLite) and a PostgreSQL database, either
way.

Every bucket is copied exactly as stored (key, revision, timestamp and
value), and every record (owners, entry keys, accounts and whatever else
the store holds); a thermostat moved this way sees nothing change. The
target must be empty, so nothing is merged by accident; a data directory
is held while copying from or to it, so no server runs on it meanwhile
(stop the servers of a PostgreSQL database yourself). The change feed's
history is not copied: the target's feed starts after the copy.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

from twisted.internet.task import Clock

from .datadir import STORE_FILE, DataDirectoryInUse, DataLock
from .store import (
    BucketWrite,
    IBucketStore,
    RecordWrite,
    SQLiteStore,
    Write,
    runInline,
)

#: Writes per transaction of the copy.
CHUNK = 200


class MigrationError(Exception):
    """The copy cannot be made; the message says why and what to do."""


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


def _isEmpty(store: IBucketStore) -> bool:
    return not store.scopes() and not store.recordKinds()


def migrate(source: str, target: str) -> tuple[int, int]:
    """
    Copy everything stored at C{source} to the empty C{target}.

    @return: how many buckets and records were copied.
    @raise MigrationError: either cannot be opened, or the target holds
        something already.
    """
    locks: list[DataLock] = []
    stores: list[IBucketStore] = []
    try:
        origin = _open(source, locks, source=True)
        stores.append(origin)
        destination = _open(target, locks, source=False)
        stores.append(destination)
        if not _isEmpty(destination):
            raise MigrationError(
                f"{target} already holds a nestproto state; migrate only into "
                "an empty one"
            )
        counts = [0, 0]
        chunk: list[Write] = []

        def flush() -> None:
            failures: list[Any] = []
            destination.write(chunk).addErrback(failures.append)
            if failures:
                raise MigrationError(
                    f"writing to {target} failed: {failures[0].getErrorMessage()}"
                )
            chunk.clear()

        for write in _everything(origin):
            counts[isinstance(write, RecordWrite)] += 1
            chunk.append(write)
            if len(chunk) >= CHUNK:
                flush()
        if chunk:
            flush()
        return counts[0], counts[1]
    finally:
        for store in stores:
            store.close()
        for lock in locks:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nestproto.migrate",
        description="Copy a nestproto state exactly between a data directory "
        "(SQLite) and a PostgreSQL database, either way. Stop the servers "
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
        buckets, records = migrate(arguments.source, arguments.target)
    except MigrationError as e:
        print(f"nestproto.migrate: {e}", file=sys.stderr)
        return 1
    print(f"copied {buckets} buckets and {records} records to {arguments.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
