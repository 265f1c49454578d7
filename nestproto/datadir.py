# -*- test-case-name: tests.test_datadir -*-
"""
The data directory: its file names, and the lock that lets one process at a
time own it (the server, or a restore).

The lock is C{flock} on L{LOCK_FILE}: the kernel drops it when its holder
exits, however it exits, so a crash leaves no stale lock behind. The file
holds the holder's pid, for the message a second process prints.
"""

from __future__ import annotations

import fcntl
import os
from typing import IO

from attrs import define, field

#: The SQLite database in the data directory.
STORE_FILE = "nestproto.sqlite3"
#: The lock file in the data directory.
LOCK_FILE = "nestproto.lock"


class DataDirectoryInUse(Exception):
    """Another process holds the data directory's lock."""

    def __init__(self, directory: str, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        holder = "another process" if pid is None else f"process {pid}"
        super().__init__(
            f"the data directory {directory} is in use by {holder} "
            "(a nestproto server or restore); stop it first"
        )


def _readPid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        # Not written yet (the holder locks, then writes) or unreadable.
        return None


@define
class DataLock:
    """
    The held lock of one data directory; L{release} (or the end of the
    process) lets it go.
    """

    directory: str
    _file: IO[str] | None = field(repr=False)

    @classmethod
    def acquire(cls, directory: str) -> DataLock:
        """
        Lock C{directory} for this process and write its pid into the lock.

        @raise DataDirectoryInUse: another process holds it.
        @raise OSError: the lock file cannot be opened or created.
        """
        path = os.path.join(directory, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        lockFile = os.fdopen(fd, "r+", encoding="ascii")
        try:
            if os.geteuid() == 0:
                # Root (a restore, or twistd before --uid) must not leave a
                # lock file the server's own user cannot open.
                owner = os.stat(directory)
                os.fchown(fd, owner.st_uid, owner.st_gid)
            fcntl.flock(lockFile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lockFile.close()
            raise DataDirectoryInUse(
                os.path.abspath(directory), _readPid(path)
            ) from None
        except BaseException:
            lockFile.close()
            raise
        lock = cls(os.path.abspath(directory), lockFile)
        lock.writePid()
        return lock

    @property
    def held(self) -> bool:
        return self._file is not None

    def writePid(self, pid: int | None = None) -> None:
        """
        Write C{pid} (this process's by default) into the lock file: again
        after twistd forks into the background, where the pid changes and
        the lock, inherited, stays held.
        """
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid() if pid is None else pid}\n")
        self._file.flush()

    def release(self) -> None:
        """Let the directory go; the lock file stays, empty."""
        if self._file is None:
            return
        lockFile, self._file = self._file, None
        try:
            lockFile.seek(0)
            lockFile.truncate()
        finally:
            lockFile.close()
