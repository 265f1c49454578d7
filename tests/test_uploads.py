# -*- test-case-name: tests.test_uploads -*-
"""
Tests for L{nestproto.uploads}.
"""

from __future__ import annotations

import gzip

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from nestproto.errors import UploadTooLarge
from nestproto.uploads import MAX_UPLOAD_BODY_BYTES, LogStore, decompressedLog

SERIAL = "02AA01AC0000000001"
OTHER_SERIAL = "02AA01AC0000000002"
# 2026-01-01T00:00:00Z
NOW = 1767225600
STAMP = "20260101_000000"
LOG = b"boot: wifi up\nboot: subscribed\n"


class LogStoreTests(SynchronousTestCase):
    """
    L{LogStore.save}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.directory = FilePath(self.mktemp())
        self.store = LogStore(self.directory, self.clock)

    def logNames(self, serial: str = SERIAL) -> list[str]:
        return sorted(self.directory.child(serial).listdir())

    def test_plainBody(self) -> None:
        """
        A plain log is kept as sent, named by the clock's UTC time.
        """
        self.store.save(SERIAL, LOG)
        self.assertEqual(self.logNames(), [STAMP + ".log"])
        path = self.directory.child(SERIAL).child(STAMP + ".log")
        self.assertEqual(path.getContent(), LOG)

    def test_gzipBody(self) -> None:
        """
        A gzip log is kept decompressed.
        """
        self.store.save(SERIAL, gzip.compress(LOG))
        path = self.directory.child(SERIAL).child(STAMP + ".log")
        self.assertEqual(path.getContent(), LOG)

    def test_gzipMembers(self) -> None:
        """
        A gzip log of several members is kept whole.
        """
        self.store.save(SERIAL, gzip.compress(b"one\n") + gzip.compress(b"two\n"))
        path = self.directory.child(SERIAL).child(STAMP + ".log")
        self.assertEqual(path.getContent(), b"one\ntwo\n")

    def test_sameSecond(self) -> None:
        """
        Logs uploaded within one second get numbered names and all are kept.
        """
        for _ in range(3):
            self.store.save(SERIAL, LOG)
        self.assertEqual(
            self.logNames(),
            [STAMP + ".log", STAMP + "_1.log", STAMP + "_2.log"],
        )

    def test_unknownSerial(self) -> None:
        """
        Without a serial, or with one that is not only letters and digits, the
        log goes under C{unknown} and never outside the directory.
        """
        self.store.save(None, LOG)
        self.store.save("../../etc", LOG)
        self.assertEqual(self.directory.listdir(), ["unknown"])
        self.assertEqual(len(self.logNames("unknown")), 2)

    def test_onlyLogsAreLeft(self) -> None:
        """
        Writing leaves no temporary file behind.
        """
        self.store.save(SERIAL, LOG)
        self.assertEqual(self.logNames(), [STAMP + ".log"])

    def test_compressedTooLarge(self) -> None:
        """
        A body over the upload limit is a 413 and nothing is written.
        """
        store = LogStore(self.directory, self.clock, maxUploadBytes=10)
        error = self.assertRaises(UploadTooLarge, store.save, SERIAL, b"x" * 11)
        self.assertEqual(error.status, 413)
        self.assertFalse(self.directory.exists())

    def test_gzipBomb(self) -> None:
        """
        A small gzip body that decompresses past the upload limit is a 413 and
        nothing is written.
        """
        store = LogStore(self.directory, self.clock, maxUploadBytes=64 * 1024)
        bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))
        self.assertLess(len(bomb), 64 * 1024)
        self.assertRaises(UploadTooLarge, store.save, SERIAL, bomb)
        self.assertFalse(self.directory.exists())

    def test_exactlyAtLimit(self) -> None:
        """
        A log exactly at the upload limit is kept.
        """
        store = LogStore(self.directory, self.clock, maxUploadBytes=1024)
        store.save(SERIAL, gzip.compress(b"a" * 1024))
        self.assertEqual(self.logNames(), [STAMP + ".log"])

    def test_deviceCap(self) -> None:
        """
        A device's oldest logs are removed until its logs fit the per-device
        total; other devices' logs stay.
        """
        store = LogStore(self.directory, self.clock, maxDeviceBytes=250)
        store.save(OTHER_SERIAL, b"o" * 100)
        for second in range(3):
            self.clock.advance(1)
            store.save(SERIAL, bytes([ord("a") + second]) * 100)
        self.assertEqual(
            self.logNames(), ["20260101_000002.log", "20260101_000003.log"]
        )
        self.assertEqual(self.logNames(OTHER_SERIAL), [STAMP + ".log"])

    def test_deviceCapOrdersNumberedNames(self) -> None:
        """
        Numbered logs of one second are removed in the order they were
        written, C{_2} before C{_10}.
        """
        store = LogStore(self.directory, self.clock, maxDeviceBytes=100)
        for _ in range(12):
            store.save(SERIAL, b"x" * 10)
        store.save(SERIAL, b"y" * 90)
        self.assertEqual(self.logNames(), [STAMP + "_11.log", STAMP + "_12.log"])

    def test_newestAlwaysKept(self) -> None:
        """
        A log larger than the per-device total is still kept, alone.
        """
        store = LogStore(self.directory, self.clock, maxDeviceBytes=50)
        store.save(SERIAL, b"a" * 10)
        self.clock.advance(1)
        store.save(SERIAL, b"b" * 100)
        self.assertEqual(self.logNames(), ["20260101_000001.log"])

    def test_otherFilesUntouched(self) -> None:
        """
        Files that are not logs are neither counted nor removed.
        """
        folder = self.directory.child(SERIAL)
        folder.makedirs()
        folder.child("notes.txt").setContent(b"n" * 1000)
        store = LogStore(self.directory, self.clock, maxDeviceBytes=100)
        store.save(SERIAL, LOG)
        self.assertEqual(self.logNames(), ["20260101_000000.log", "notes.txt"])

    def test_notKept(self) -> None:
        """
        Without a logs directory an upload is accepted and dropped; limits
        still apply.
        """
        store = LogStore(None, self.clock, maxUploadBytes=1024)
        store.save(SERIAL, gzip.compress(LOG))
        self.assertRaises(
            UploadTooLarge, store.save, SERIAL, gzip.compress(b"\0" * 4096)
        )
        self.assertFalse(self.directory.exists())


class DecompressedLogTests(SynchronousTestCase):
    """
    L{decompressedLog}.
    """

    def test_defaultLimit(self) -> None:
        """
        The default upload limit is 4 MiB.
        """
        self.assertEqual(MAX_UPLOAD_BODY_BYTES, 4 * 1024 * 1024)

    def test_notReallyGzip(self) -> None:
        """
        A body that starts like gzip but is not is kept as sent.
        """
        body = b"\x1f\x8bnot gzip at all"
        self.assertEqual(decompressedLog(body, 1024), body)

    def test_truncatedGzip(self) -> None:
        """
        A gzip body cut short keeps what arrived.
        """
        body = gzip.compress(LOG)[:-8]
        self.assertEqual(decompressedLog(body, 1024), LOG)
