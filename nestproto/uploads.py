# -*- test-case-name: tests.test_uploads -*-
"""
Device logs sent to C{POST /nest/upload} (PROTOCOL.md §9).

The body is opaque, often gzip. With C{--keep-logs} it is kept decompressed as
C{<directory>/<SERIAL>/<YYYYmmdd_HHMMSS>[_n].log}, and each device's logs are
trimmed, oldest first, to a total size.
"""

from __future__ import annotations

import re
import zlib
from datetime import UTC, datetime
from gzip import BadGzipFile, GzipFile
from io import BytesIO

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from nestproto.errors import UploadTooLarge

#: The largest body C{/nest/upload} reads, and the largest log kept from it.
MAX_UPLOAD_BODY_BYTES = 4 * 1024 * 1024
#: The most log bytes kept per device.
MAX_DEVICE_LOG_BYTES = 32 * 1024 * 1024

_GZIP_MAGIC = b"\x1f\x8b"
_READ_BYTES = 64 * 1024
# A serial names a directory: letters and digits only, so never "..".
_SAFE_SERIAL = re.compile(r"[A-Za-z0-9]{1,64}")
_LOG_NAME = re.compile(r"(\d{8}_\d{6})(?:_(\d+))?\.log")

log = Logger()


def decompressedLog(body: bytes, limitBytes: int) -> bytes:
    """
    The log in an upload: gunzipped when it is gzip, as sent otherwise.

    Decompression stops as soon as the output passes C{limitBytes}, so a
    small gzip bomb costs no more than the limit.

    @raise UploadTooLarge: C{body} or its decompressed log is over C{limitBytes}.
    """
    if len(body) > limitBytes:
        raise UploadTooLarge(limitBytes)
    if not body.startswith(_GZIP_MAGIC):
        return body
    out = bytearray()
    # GzipFile reads its input in small buffers, so even thousands of
    # concatenated members cost linear time.
    with GzipFile(fileobj=BytesIO(body)) as stream:
        try:
            while chunk := stream.read1(min(_READ_BYTES, limitBytes + 1 - len(out))):
                out += chunk
                if len(out) > limitBytes:
                    raise UploadTooLarge(limitBytes)
        except EOFError:
            pass  # truncated: keep what arrived
        except (BadGzipFile, zlib.error):
            # Magic bytes but not gzip after all: keep the bytes as sent.
            return body
    return bytes(out)


def _logAge(path: FilePath[str]) -> tuple[str, int] | None:
    """
    Where a log sorts among its device's logs, or C{None} for another file.
    """
    match = _LOG_NAME.fullmatch(path.basename())
    if match is None:
        return None
    return (match.group(1), int(match.group(2) or 0))


def _logsOldestFirst(
    folder: FilePath[str],
) -> list[tuple[tuple[str, int], FilePath[str]]]:
    return sorted(
        (age, path) for path in folder.children() if (age := _logAge(path)) is not None
    )


@frozen
class LogStore:
    """
    Where device logs go.

    @ivar directory: the logs directory, or C{None} when logs are not kept
        (uploads are then checked and dropped).
    """

    directory: FilePath[str] | None
    clock: IReactorTime
    maxUploadBytes: int = MAX_UPLOAD_BODY_BYTES
    maxDeviceBytes: int = MAX_DEVICE_LOG_BYTES

    def save(self, serial: str | None, body: bytes) -> None:
        """
        Keep one uploaded log for C{serial}, then trim that device's logs,
        oldest first, to C{maxDeviceBytes}; the log just saved always stays.

        @param serial: the device serial, or C{None} when it is not known
            (the log goes under C{unknown}, PROTOCOL.md §2.3).
        @raise UploadTooLarge: the body or its decompressed log is over
            C{maxUploadBytes}; nothing is written.
        """
        content = decompressedLog(body, self.maxUploadBytes)
        if self.directory is None:
            return
        owner = serial if serial and _SAFE_SERIAL.fullmatch(serial) else "unknown"
        folder = self.directory.child(owner)
        folder.makedirs(ignoreExistingDirectory=True)
        logs = _logsOldestFirst(folder)
        target = folder.child(self._nextName([age for age, _ in logs]))
        # setContent writes a temporary sibling and renames it over the target,
        # so a crash never leaves half a log under a .log name.
        target.setContent(content)
        log.debug("kept {size} byte log for {serial}", size=len(content), serial=owner)
        total = sum(path.getsize() for _, path in logs) + len(content)
        for _, path in logs:
            if total <= self.maxDeviceBytes:
                break
            total -= path.getsize()
            path.remove()
            log.info(
                "removed old log {name} of {serial}", name=path.basename(), serial=owner
            )

    def _nextName(self, ages: list[tuple[str, int]]) -> str:
        """
        A new log's name: the clock's UTC second, numbered past any log of
        that second among C{ages}, so names keep the order logs were written in.
        """
        stamp = datetime.fromtimestamp(self.clock.seconds(), UTC).strftime(
            "%Y%m%d_%H%M%S"
        )
        taken = [n for logStamp, n in ages if logStamp == stamp]
        if not taken:
            return stamp + ".log"
        return f"{stamp}_{max(taken) + 1}.log"
