# -*- test-case-name: tests.test_backup -*-
"""
C{python -m nestproto.restore FILE DATA_DIR}: put a backup made by
C{python -m nestproto.backup} back as the data directory's database.

It refuses a data directory a running server holds (and holds it itself
while it works, so no server starts half-way), checks the backup before
touching anything, keeps the database it replaces as
C{nestproto.sqlite3.before-restore} (with its WAL, so nothing committed is
lost), and leaves no WAL or shared-memory file of the old database beside
the new one: SQLite would apply an old WAL to the new file.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys

from .backup import NotANestprotoDatabase, checkDatabase, copyDatabase, fsyncDirectory
from .datadir import LOCK_FILE, STORE_FILE, DataDirectoryInUse, DataLock

#: The name the replaced database is kept under, in the data directory.
PREVIOUS_SUFFIX = ".before-restore"


def _unlinkIfPresent(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _renameIfPresent(source: str, target: str) -> bool:
    try:
        os.replace(source, target)
    except FileNotFoundError:
        return False
    return True


def _ownLikeDirectory(directory: str, names: list[str]) -> None:
    """
    Run as root for a server that runs as its own user: give the files the
    data directory's owner, or the server could not write them.
    """
    if os.geteuid() != 0:
        return
    owner = os.stat(directory)
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.chown(path, owner.st_uid, owner.st_gid)


def restore(backup: str, directory: str) -> tuple[int, str | None]:
    """
    Replace the database of C{directory} with C{backup}.

    @return: how many devices the restored database holds, and where the
        replaced database was kept (C{None} when there was none).
    @raise NotANestprotoDatabase: C{backup} is not a sound nestproto
        database; nothing was changed.
    @raise DataDirectoryInUse: a server (or another restore) holds
        C{directory}; nothing was changed.
    """
    checkDatabase(backup)
    os.makedirs(directory, exist_ok=True)
    lock = DataLock.acquire(directory)
    try:
        database = os.path.join(directory, STORE_FILE)
        incoming = os.path.join(directory, f".{STORE_FILE}.restoring")
        devices = copyDatabase(backup, incoming)
        previous = database + PREVIOUS_SUFFIX
        # The old database and its WAL move together (SQLite pairs a
        # database with the file of its name plus -wal); shared memory is
        # rebuilt from the WAL, so it goes.
        for stale in (previous + "-wal", previous + "-shm", previous + "-journal"):
            _unlinkIfPresent(stale)
        kept = _renameIfPresent(database, previous)
        if kept:
            _renameIfPresent(database + "-wal", previous + "-wal")
            _renameIfPresent(database + "-journal", previous + "-journal")
        for stale in (database + "-wal", database + "-shm", database + "-journal"):
            _unlinkIfPresent(stale)
        os.replace(incoming, database)
        fsyncDirectory(directory)
        _ownLikeDirectory(directory, [STORE_FILE, LOCK_FILE])
        return devices, previous if kept else None
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nestproto.restore",
        description="Restore a backup made by 'python -m nestproto.backup' "
        "into a data directory. Stop the server first; the database it "
        "replaces is kept as nestproto.sqlite3.before-restore.",
    )
    parser.add_argument("file", metavar="FILE", help="the backup file")
    parser.add_argument("data", metavar="DATA_DIR", help="the server's --data")
    arguments = parser.parse_args(argv)
    try:
        devices, previous = restore(arguments.file, arguments.data)
    except DataDirectoryInUse as e:
        print(f"nestproto.restore: refused: {e}", file=sys.stderr)
        return 1
    except (NotANestprotoDatabase, OSError, sqlite3.Error) as e:
        print(f"nestproto.restore: {e}", file=sys.stderr)
        return 1
    database = os.path.join(arguments.data, STORE_FILE)
    print(f"restored {arguments.file} to {database} ({devices} devices)")
    if previous is not None:
        print(f"the database it replaced is kept as {previous}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
