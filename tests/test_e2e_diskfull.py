# -*- test-case-name: tests.test_e2e_diskfull -*-
"""
A full disk end to end: a real C{twistd -n nestproto} whose data directory
is a small tmpfs the test fills up. A command that cannot be made durable
is a JSON 503 that changes nothing anyone sees; once space is back the
next command works, reaches the held device and survives a restart.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import socket
import sys
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .helpers import SERIAL, basicAuth
from .twistd import Twistd, http, loopbackServer, thermostatReports

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"
DEVICE_HEADERS = {
    **basicAuth(),
    "X-nl-protocol-version": "1",
    "Content-Type": "application/json",
}
#: Room for the database, its WAL and shared memory (a few tens of KiB)
#: with plenty to spare; the test fills the rest.
TMPFS_SIZE = "4m"
#: umount2(2)'s flag to detach a busy mount (linux/fs.h).
_MNT_DETACH = 2


def mountTmpfs(case: SynchronousTestCase, size: str) -> str:
    """
    Mount a tmpfs of C{size} on a new directory; the test case's cleanup
    unmounts it.

    @raise SkipTest: this process may not mount (not root, or a container
        without CAP_SYS_ADMIN), or this is not Linux. Mounting is a kernel
        capability of where the tests run, not a service CI provides, so
        this is a skip under CI too.
    """
    if not sys.platform.startswith("linux"):
        raise SkipTest("mounting a tmpfs needs Linux")
    target: str = os.path.abspath(case.mktemp())
    os.makedirs(target)
    libc = ctypes.CDLL(None, use_errno=True)
    if (
        libc.mount(
            b"nestproto-diskfull",
            os.fsencode(target),
            b"tmpfs",
            0,
            f"size={size},mode=0755".encode(),
        )
        != 0
    ):
        code = ctypes.get_errno()
        raise SkipTest(
            f"cannot mount a tmpfs on {target} ({os.strerror(code)}): "
            "mounting needs root with CAP_SYS_ADMIN"
        )

    def unmount() -> None:
        if libc.umount2(os.fsencode(target), 0) == 0:
            return
        code = ctypes.get_errno()
        # Still detach it, so nothing outlives the test, then say so.
        libc.umount2(os.fsencode(target), _MNT_DETACH)
        raise AssertionError(f"unmounting {target} failed: {os.strerror(code)}")

    case.addCleanup(unmount)
    return target


def fill(directory: str) -> str:
    """
    Write a file in C{directory} until the filesystem refuses one more
    byte; its path.

    tmpfs allocates whole pages, so a file's last page may have a few bytes
    free; SQLite appends to its WAL in frames of a page and a header (4120
    bytes by default), so no commit fits in that slack and every commit
    fails. (The WAL is only reused from its start after a checkpoint,
    which SQLite runs from 1000 pages on; this test stays far below.)
    """
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                size //= 2
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


class HeldSubscribe:
    """
    A thermostat's chunked subscribe on a raw socket, so the test sees
    exactly what arrives and when.
    """

    def __init__(self, case: SynchronousTestCase, port: int, body: Any) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        case.addCleanup(self.socket.close)
        encoded = json.dumps(body).encode()
        head = [
            "POST /nest/transport HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            f"Content-Length: {len(encoded)}",
            *(f"{name}: {value}" for name, value in DEVICE_HEADERS.items()),
        ]
        self.socket.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + encoded)
        self.buffered = b""
        while b"\r\n\r\n" not in self.buffered:
            self._receive()
        headers, self.buffered = self.buffered.split(b"\r\n\r\n", 1)
        self.status, *fields = headers.decode("latin-1").split("\r\n")
        self.headers = {
            name.strip().lower(): value.strip()
            for name, value in (field.split(":", 1) for field in fields)
        }

    def _receive(self) -> None:
        data = self.socket.recv(65536)
        if not data:
            raise AssertionError(f"the server closed the subscribe: {self.buffered!r}")
        self.buffered += data

    def quietFor(self, seconds: float) -> bytes:
        """Whatever arrives within C{seconds} (nothing, when still held)."""
        readable, _, _ = select.select([self.socket], [], [], seconds)
        if readable:
            self._receive()
        return self.buffered

    def document(self) -> Any:
        """The next JSON document of the chunked body."""
        body = b""
        while True:
            while b"\r\n" not in self.buffered:
                self._receive()
            sizeLine, rest = self.buffered.split(b"\r\n", 1)
            size = int(sizeLine.split(b";")[0], 16)
            if size == 0:
                raise AssertionError(f"the body ended before a document: {body!r}")
            while len(rest) < size + 2:
                self._receive()
                rest = self.buffered.split(b"\r\n", 1)[1]
            body += rest[:size]
            self.buffered = rest[size + 2 :]
            try:
                return json.loads(body)
            except ValueError:
                continue


class DiskFullTests(SynchronousTestCase):
    def serve(self, data: str) -> tuple[Twistd, int, str]:
        """A server on C{data}: it, its device port and its control origin."""
        server, device, control = loopbackServer(self, data)
        return server, device, f"http://127.0.0.1:{control}"

    def setTemperature(self, control: str, value: float) -> tuple[int, Any]:
        return http(
            "POST",
            f"{control}/command",
            {"serial": SERIAL, "command": "set_temperature", "value": value},
        )

    def targetTemperature(self, control: str) -> Any:
        code, status = http("GET", f"{control}/status?serial={SERIAL}")
        self.assertEqual(code, 200, status)
        return status["target_temperature"]

    def test_fullDiskRefusesThenRecovers(self) -> None:
        """
        With the data directory's filesystem full, a command is a JSON 503,
        the status keeps the old setpoint, the server keeps running and the
        held device receives nothing. With space back, the next command is
        a 200 at the next revision, reaches the held device, shows in the
        status, and is what a restarted server serves; the refused value
        is never seen anywhere.
        """
        data = os.path.join(mountTmpfs(self, TMPFS_SIZE), "data")
        server, devicePort, control = self.serve(data)
        device = f"http://127.0.0.1:{devicePort}"

        code, receipts = thermostatReports(device, SERIAL)
        self.assertEqual(code, 200, receipts)
        held = {o["object_key"]: o for o in receipts["objects"]}
        self.assertEqual(set(held), {SHARED, DEVICE})
        inSync = {"chunked": True, "session": "s", "objects": list(held.values())}
        subscribe = HeldSubscribe(self, devicePort, inSync)
        self.assertEqual(subscribe.status, "HTTP/1.1 200 OK")
        self.assertEqual(subscribe.headers.get("transfer-encoding"), "chunked")
        self.assertEqual(subscribe.quietFor(0.3), b"")

        filler = fill(data)
        code, refused = self.setTemperature(control, 23)
        self.assertEqual(code, 503, refused)
        self.assertIs(refused["success"], False)
        self.assertEqual(refused["code"], "store_unavailable")
        self.assertIn("nothing was changed", refused["message"])
        self.assertEqual(self.targetTemperature(control), 20.0)
        self.assertEqual(subscribe.quietFor(0.5), b"")
        self.assertIsNone(server.process.poll(), server.output)
        server.waitFor("committing 1 writes failed")
        self.assertIn("database or disk is full", server.output)

        os.remove(filler)
        code, answer = self.setTemperature(control, 21.5)
        self.assertEqual(code, 200, answer)
        self.assertIs(answer["success"], True)
        pushed = subscribe.document()
        [bucket] = pushed["objects"]
        self.assertEqual(bucket["object_key"], SHARED)
        # The refused command took no revision.
        self.assertEqual(bucket["object_revision"], held[SHARED]["object_revision"] + 1)
        self.assertEqual(bucket["value"]["target_temperature"], 21.5)
        self.assertEqual(subscribe.quietFor(0.1), b"")
        self.assertEqual(self.targetTemperature(control), 21.5)

        self.assertIn(server.stop(), (0, -15))
        self.assertNotIn("Traceback", "\n".join(server.stderr))
        restarted, devicePort, control = self.serve(data)
        restarted.waitFor("devices loaded: 1")
        self.assertEqual(self.targetTemperature(control), 21.5)
        # The device comes back as it was before the push: it is answered
        # at once with the one change it missed.
        code, answer = http(
            "POST",
            f"http://127.0.0.1:{devicePort}/nest/transport",
            {**inSync, "chunked": False},
            DEVICE_HEADERS,
        )
        self.assertEqual(code, 200, answer)
        self.assertEqual(answer["objects"], [bucket])
        self.assertIn(restarted.stop(), (0, -15))
        self.assertNotIn("Traceback", "\n".join(restarted.stderr))
