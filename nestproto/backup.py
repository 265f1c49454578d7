# -*- test-case-name: tests.test_backup -*-
"""
C{python -m nestproto.backup DATA_DIR FILE}: a consistent single-file copy
of the store, safe while the server runs.

Copying C{nestproto.sqlite3} by hand while the server runs is not a
backup: recent commits live in C{nestproto.sqlite3-wal} until SQLite
checkpoints them, and a lone copy of the main file misses them. SQLite's
online backup copies the database as one reader sees it, WAL included, in
one read transaction (the server keeps writing meanwhile).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from urllib.parse import quote

from .datadir import STORE_FILE, DataDirectoryInUse, DataLock

#: Tables every nestproto database has (later schemas add more).
REQUIRED_TABLES = frozenset({"buckets", "records"})


class NotANestprotoDatabase(Exception):
    """A file is not a sound nestproto database; the message says why."""


def _connect(path: str, mode: str = "ro") -> sqlite3.Connection:
    """A connection to the existing database C{path}; C{mode} ro or rw."""
    uri = f"file:{quote(os.path.abspath(path))}?mode={mode}"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def checkDatabase(path: str) -> int:
    """
    Make sure C{path} is a nestproto database that SQLite finds intact.

    @return: how many devices it holds.
    @raise NotANestprotoDatabase: it is missing, not SQLite, fails
        C{PRAGMA integrity_check}, or lacks nestproto's tables.
    """
    if not os.path.isfile(path):
        raise NotANestprotoDatabase(f"{path} is not a file")
    try:
        connection = _connect(path)
        try:
            problems = [row[0] for row in connection.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise NotANestprotoDatabase(
                    f"{path} fails SQLite's integrity check: {problems[0]}"
                )
            tables = {
                row[0]
                for row in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            missing = REQUIRED_TABLES - tables
            if missing:
                raise NotANestprotoDatabase(
                    f"{path} is not a nestproto database: no table "
                    f"{', '.join(sorted(missing))}"
                )
            [(devices,)] = connection.execute(
                "SELECT COUNT(DISTINCT scope) FROM buckets WHERE scope != ''"
            )
            return int(devices)
        finally:
            connection.close()
    except sqlite3.DatabaseError as e:
        raise NotANestprotoDatabase(f"{path} is not a SQLite database: {e}") from None


def fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copyDatabase(source: str, target: str, mode: str = "ro") -> int:
    """
    Copy the database C{source} to C{target} with SQLite's online backup;
    C{target} is replaced only once the copy is complete, checked and on
    disk. The copy is one self-contained file (rollback journal, not WAL).

    @param mode: how C{source} is opened: C{"ro"}, or C{"rw"} when no
        other process has it open, so SQLite may recover and then remove
        its WAL as the last connection closes.
    @return: how many devices the copy holds.
    @raise NotANestprotoDatabase: C{source} or the copy is not sound.
    """
    checkDatabase(source)
    directory = os.path.dirname(os.path.abspath(target))
    partial = os.path.join(directory, f".{os.path.basename(target)}.partial")
    for stale in (partial, partial + "-journal"):
        if os.path.exists(stale):
            os.unlink(stale)
    try:
        sourceConnection = _connect(source, mode)
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            # pages=-1: the whole database in one step, so one read
            # transaction sees it, however the server writes meanwhile.
            sourceConnection.backup(copy, pages=-1)
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
            sourceConnection.close()
        devices = checkDatabase(partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
        fsyncDirectory(directory)
        return devices
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise


def backup(directory: str, target: str) -> int:
    """
    Copy the database of the data directory C{directory} to C{target}.

    While a server runs it holds the directory, and its WAL and shared
    memory stay in place: the copy reads beside it, read-only. Otherwise
    this holds the directory (no server starts meanwhile) and opens the
    database as the server would: a WAL left by a crash is read, not
    skipped, and no WAL or shared-memory file made by this process (owned
    by whoever ran it) is left behind.

    @return: how many devices the copy holds.
    """
    source = os.path.join(directory, STORE_FILE)
    try:
        lock = DataLock.acquire(directory)
    except DataDirectoryInUse:
        return copyDatabase(source, target, "ro")
    try:
        return copyDatabase(source, target, "rw")
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nestproto.backup",
        description="Copy a nestproto data directory's database to FILE, "
        "consistently, while the server runs. Restore it with "
        "'python -m nestproto.restore FILE DATA_DIR'.",
    )
    parser.add_argument("data", metavar="DATA_DIR", help="the server's --data")
    parser.add_argument("file", metavar="FILE", help="the backup file to write")
    arguments = parser.parse_args(argv)
    source = os.path.join(arguments.data, STORE_FILE)
    if not os.path.isfile(source):
        print(
            f"nestproto.backup: no nestproto database in {arguments.data} "
            f"({STORE_FILE} is missing)",
            file=sys.stderr,
        )
        return 1
    if os.path.isdir(arguments.file):
        print(
            f"nestproto.backup: {arguments.file} is a directory; name the file "
            "to write",
            file=sys.stderr,
        )
        return 1
    try:
        devices = backup(arguments.data, arguments.file)
    except (NotANestprotoDatabase, OSError, sqlite3.Error) as e:
        print(f"nestproto.backup: {e}", file=sys.stderr)
        return 1
    print(f"backed up {source} to {arguments.file} ({devices} devices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
