# -*- test-case-name: tests.test_datadir -*-
"""
Tests for L{nestproto.datadir}: one owner per data directory.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from nestproto.datadir import LOCK_FILE, DataDirectoryInUse, DataLock


class DataLockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, LOCK_FILE)

    def contents(self) -> str:
        with open(self.path) as f:
            return f.read()

    def test_holderPidWritten(self) -> None:
        """The lock file holds the holder's pid while it is held."""
        lock = DataLock.acquire(self.directory)
        self.addCleanup(lock.release)
        self.assertTrue(lock.held)
        self.assertEqual(self.contents(), f"{os.getpid()}\n")
        lock.writePid(4242)
        self.assertEqual(self.contents(), "4242\n")

    def test_secondRefused(self) -> None:
        """
        A second acquire (another open of the file, as another process
        makes) is refused with the holder's pid and the directory.
        """
        lock = DataLock.acquire(self.directory)
        self.addCleanup(lock.release)
        lock.writePid(4242)
        error = self.assertRaises(DataDirectoryInUse, DataLock.acquire, self.directory)
        self.assertEqual(error.pid, 4242)
        self.assertEqual(error.directory, os.path.abspath(self.directory))
        self.assertIn("process 4242", str(error))
        self.assertIn(os.path.abspath(self.directory), str(error))

    def test_unknownPid(self) -> None:
        """A lock file without a pid yet names no pid."""
        lock = DataLock.acquire(self.directory)
        self.addCleanup(lock.release)
        with open(self.path, "w"):
            pass
        error = self.assertRaises(DataDirectoryInUse, DataLock.acquire, self.directory)
        self.assertIsNone(error.pid)
        self.assertIn("another process", str(error))

    def test_releaseFrees(self) -> None:
        """After release the directory can be taken again; the file is empty."""
        lock = DataLock.acquire(self.directory)
        lock.release()
        self.assertFalse(lock.held)
        self.assertEqual(self.contents(), "")
        lock.release()
        DataLock.acquire(self.directory).release()

    def test_unwritable(self) -> None:
        """A directory where the lock file cannot be made raises OSError."""
        self.assertRaises(OSError, DataLock.acquire, self.path + ".missing/x")
