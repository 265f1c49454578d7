# -*- test-case-name: tests.test_backup -*-
"""
Tests for C{python -m nestproto.backup} and C{python -m nestproto.restore}:
a copy made while a real server runs, restored into a fresh directory,
serves the same state.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sqlite3
import subprocess
import sys
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nestproto import backup, restore
from nestproto.backup import NotANestprotoDatabase, checkDatabase, copyDatabase
from nestproto.buckets import Bucket
from nestproto.datadir import STORE_FILE, DataLock
from nestproto.store import BucketWrite, SQLiteStore, runInline

from .helpers import SERIAL
from .twistd import PROJECT_ROOT, Twistd, http, loopbackServer, thermostatReports

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"


def tool(name: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """C{python -m nestproto.NAME ARGUMENTS}, from the source tree."""
    return subprocess.run(
        [sys.executable, "-m", f"nestproto.{name}", *arguments],
        env=dict(os.environ, PYTHONPATH=PROJECT_ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )


class BackupWhileRunningTests(SynchronousTestCase):
    def serve(self, data: str) -> tuple[Twistd, str, str]:
        server, device, control = loopbackServer(self, data)
        return server, f"http://127.0.0.1:{device}", f"http://127.0.0.1:{control}"

    def get(self, url: str) -> Any:
        """A JSON GET that must succeed; its document."""
        status, document = http("GET", url)
        self.assertEqual(status, 200, document)
        return document

    def listing(self, device: str) -> Any:
        return self.get(f"{device}/nest/transport/device/{SERIAL}")

    def test_backupRestoreRoundTrip(self) -> None:
        """
        State put through both APIs of a running server is in a backup made
        while it runs; restore refuses the running server's directory;
        restored into a fresh directory, a new server lists the same
        buckets, revisions and timestamps, and the same status (but for
        when the device was last seen).
        """
        data = os.path.abspath(self.mktemp())
        server, device, control = self.serve(data)
        status, receipts = thermostatReports(device, SERIAL)
        self.assertEqual(status, 200, receipts)
        _status, answer = http(
            "POST",
            f"{control}/command",
            {"serial": SERIAL, "command": "set_temperature", "value": 21.5},
        )
        self.assertIs(answer["success"], True)
        before = self.listing(device)
        self.assertEqual({o["object_key"] for o in before["objects"]}, {SHARED, DEVICE})
        status = self.get(f"{control}/status?serial={SERIAL}")

        copy = os.path.abspath(self.mktemp())
        done = tool("backup", data, copy)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("(1 devices)", done.stdout)
        # The server keeps serving, and still holds its directory.
        self.assertEqual(self.listing(device), before)
        refused = tool("restore", copy, data)
        self.assertEqual(refused.returncode, 1)
        self.assertEqual(
            refused.stderr.strip().splitlines(),
            [
                f"nestproto.restore: refused: the data directory {data} is in use "
                f"by process {server.process.pid} (a nestproto server or restore); "
                "stop it first"
            ],
        )
        self.assertIn(server.stop(), (0, -15))

        fresh = os.path.abspath(self.mktemp())
        done = tool("restore", copy, fresh)
        self.assertEqual(done.returncode, 0, done.stderr)
        restarted, device, control = self.serve(fresh)
        restarted.waitFor("devices loaded: 1")
        self.assertEqual(self.listing(device), before)
        after = self.get(f"{control}/status?serial={SERIAL}")
        self.assertEqual(after["target_temperature"], 21.5)
        # When the device was last heard from is kept in memory only (and
        # the listing above was a device request).
        for answer in (after, status):
            del answer["last_seen"], answer["last_seen_ms"]
        self.assertEqual(after, status)
        self.assertIn(restarted.stop(), (0, -15))


def _storeWith(path: str, *buckets: tuple[str, Bucket]) -> SQLiteStore:
    store = SQLiteStore.open(path, runInline, Clock())
    store.write([BucketWrite(scope, bucket) for scope, bucket in buckets])
    return store


def _keys(path: str) -> set[tuple[str, str]]:
    connection = sqlite3.connect(path)
    try:
        return set(connection.execute("SELECT scope, key FROM buckets"))
    finally:
        connection.close()


def _run(main: Any, *arguments: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(arguments))
    return status, out.getvalue(), err.getvalue()


class BackupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = self.mktemp()
        os.makedirs(self.data)
        self.database = os.path.join(self.data, STORE_FILE)

    def test_copyHoldsWhatIsInTheWAL(self) -> None:
        """
        A copy made while the store is open holds its commits (still in
        the WAL), and is one file in rollback-journal mode.
        """
        store = _storeWith(
            self.database, (SERIAL, Bucket(DEVICE, 1, 1000, {"current_humidity": 41}))
        )
        self.addCleanup(store.close)
        self.assertTrue(os.path.exists(self.database + "-wal"))
        copy = self.mktemp()
        self.assertEqual(copyDatabase(self.database, copy), 1)
        self.assertEqual(_keys(copy), {(SERIAL, DEVICE)})
        connection = sqlite3.connect(copy)
        [(mode,)] = connection.execute("PRAGMA journal_mode")
        connection.close()
        self.assertEqual(mode, "delete")
        self.assertEqual(
            sorted(os.listdir(os.path.dirname(os.path.abspath(copy)))),
            [os.path.basename(copy)],
        )

    def test_stoppedServerLeavesNoWAL(self) -> None:
        """
        Backing up a directory no server holds leaves no WAL or shared
        memory file in it.
        """
        _storeWith(self.database, ("", Bucket("structure.s", 1, 1000, {}))).close()
        status, out, err = _run(backup.main, self.data, self.mktemp())
        self.assertEqual(status, 0, err)
        self.assertEqual(
            sorted(os.listdir(self.data)), ["nestproto.lock", "nestproto.sqlite3"]
        )

    def test_noDatabase(self) -> None:
        """A directory without a database is one line on stderr, status 1."""
        status, out, err = _run(backup.main, self.data, self.mktemp())
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("no nestproto database", err)


class CheckDatabaseTests(SynchronousTestCase):
    def test_notSQLite(self) -> None:
        """A file that is not SQLite is refused."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not a database, not at all" * 100)
        error = self.assertRaises(NotANestprotoDatabase, checkDatabase, path)
        self.assertIn("not a SQLite database", str(error))

    def test_otherSQLite(self) -> None:
        """A SQLite database without nestproto's tables is refused."""
        path = self.mktemp()
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE buckets (x)")
        connection.commit()
        connection.close()
        error = self.assertRaises(NotANestprotoDatabase, checkDatabase, path)
        self.assertIn("no table records", str(error))

    def test_damaged(self) -> None:
        """A database whose pages are damaged fails the integrity check."""
        path = self.mktemp()
        connection = sqlite3.connect(path)
        connection.execute("PRAGMA page_size=1024")
        connection.execute("CREATE TABLE buckets (scope, key, value)")
        connection.execute("CREATE TABLE records (kind, name, doc)")
        connection.execute("CREATE INDEX byKey ON buckets (key)")
        connection.executemany(
            "INSERT INTO buckets VALUES (?, ?, ?)",
            [(str(i), f"k{i}", "v" * 50) for i in range(500)],
        )
        connection.commit()
        connection.close()
        with open(path, "r+b") as f:
            size = f.seek(0, 2)
            f.seek(size - 3 * 1024 + 100)
            f.write(b"\xff" * 600)
        self.assertRaises(NotANestprotoDatabase, checkDatabase, path)


class RestoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = self.mktemp()
        os.makedirs(self.data)
        self.database = os.path.join(self.data, STORE_FILE)
        self.backup = self.mktemp()
        _storeWith(
            self.backup, (SERIAL, Bucket(DEVICE, 3, 3000, {"current_humidity": 40}))
        ).close()

    def test_heldDirectoryRefused(self) -> None:
        """
        A directory another process holds is refused with one line, and
        nothing in it changes.
        """
        lock = DataLock.acquire(self.data)
        self.addCleanup(lock.release)
        status, out, err = _run(restore.main, self.backup, self.data)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("refused", err)
        self.assertIn(f"process {os.getpid()}", err)
        self.assertEqual(os.listdir(self.data), ["nestproto.lock"])

    def test_badBackupRefused(self) -> None:
        """A file that is not a nestproto database replaces nothing."""
        old = _storeWith(self.database, ("", Bucket("structure.s", 1, 1000, {})))
        old.close()
        bogus = self.mktemp()
        with open(bogus, "wb") as f:
            f.write(b"\x00" * 4096)
        status, out, err = _run(restore.main, bogus, self.data)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertEqual(_keys(self.database), {("", "structure.s")})

    def test_replacesAndKeepsThePrevious(self) -> None:
        """
        Restoring over a database (one with its last commit in its WAL)
        puts the backup in place, keeps the old one with its WAL
        as C{nestproto.sqlite3.before-restore}, and leaves no stale WAL or
        shared memory beside the new one.
        """
        # A server that crashed: its last commit is only in the WAL.
        elsewhere = os.path.join(self.mktemp(), STORE_FILE)
        os.makedirs(os.path.dirname(elsewhere))
        old = _storeWith(elsewhere, ("", Bucket("structure.s", 1, 1000, {})))
        self.addCleanup(old.close)
        for suffix in ("", "-wal", "-shm"):
            shutil.copyfile(elsewhere + suffix, self.database + suffix)
        status, out, err = _run(restore.main, self.backup, self.data)
        self.assertEqual(status, 0, err)
        self.assertIn("(1 devices)", out)
        self.assertIn("before-restore", out)
        names = set(os.listdir(self.data))
        self.assertNotIn("nestproto.sqlite3-wal", names)
        self.assertNotIn("nestproto.sqlite3-shm", names)
        self.assertIn("nestproto.sqlite3.before-restore-wal", names)
        self.assertEqual(_keys(self.database), {(SERIAL, DEVICE)})
        self.assertEqual(
            _keys(self.database + ".before-restore"), {("", "structure.s")}
        )
        store = SQLiteStore.open(self.database, runInline, Clock())
        self.addCleanup(store.close)
        self.assertEqual(
            store.get(SERIAL, DEVICE), Bucket(DEVICE, 3, 3000, {"current_humidity": 40})
        )

    def test_freshDirectory(self) -> None:
        """A directory that does not exist yet is made."""
        fresh = os.path.join(self.mktemp(), "data")
        status, out, err = _run(restore.main, self.backup, fresh)
        self.assertEqual(status, 0, err)
        self.assertNotIn("before-restore", out)
        self.assertEqual(_keys(os.path.join(fresh, STORE_FILE)), {(SERIAL, DEVICE)})
