# -*- test-case-name: tests.test_auth -*-
"""
Who is calling: the device serial from the headers a thermostat sends
(PROTOCOL.md §2.2).
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode

from attrs import frozen
from twisted.web.iweb import IRequest

_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")
#: Real serials are 16 characters; anything under 10 is not one (§2.2).
MIN_SERIAL_LENGTH = 10
MAX_SERIAL_LENGTH = 64


def normaliseSerial(raw: str | None) -> str | None:
    """
    Uppercase alphanumerics of C{raw}, or C{None} when fewer than 10 remain
    (or implausibly many).
    """
    if raw is None:
        return None
    serial = _NOT_ALNUM.sub("", raw).upper()
    if not MIN_SERIAL_LENGTH <= len(serial) <= MAX_SERIAL_LENGTH:
        return None
    return serial


def serialFromUsername(username: str) -> str | None:
    """
    The serial in a Basic username or client id: the whole name, or its
    second dot-separated part (C{nest.SERIAL}, C{d.SERIAL.random}).
    """
    parts = username.split(".")
    return normaliseSerial(parts[1] if len(parts) > 1 else parts[0])


@frozen
class BasicCredentials:
    username: str
    password: str


def basicCredentials(header: bytes | None) -> BasicCredentials | None:
    """The decoded C{Authorization: Basic} credentials, if well formed."""
    if header is None:
        return None
    scheme, _, encoded = header.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, _, password = decoded.partition(":")
    return BasicCredentials(username, password)


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else value


def deviceSerial(request: IRequest, pathSerial: str | None = None) -> str | None:
    """
    The calling device's serial, tried in the order of PROTOCOL.md §2.2:
    Basic username, C{X-nl-client-id}, C{X-nl-device-id},
    C{X-NL-Device-Serial}, C{?serial=}, then the serial named in the path.
    """
    credentials = basicCredentials(request.getHeader(b"authorization"))
    candidates: list[str | None] = [
        serialFromUsername(credentials.username) if credentials else None,
    ]
    clientId = _header(request, b"x-nl-client-id")
    candidates.append(serialFromUsername(clientId) if clientId else None)
    candidates.append(normaliseSerial(_header(request, b"x-nl-device-id")))
    candidates.append(normaliseSerial(_header(request, b"x-nl-device-serial")))
    query = request.args.get(b"serial")
    candidates.append(normaliseSerial(query[0].decode("latin-1")) if query else None)
    candidates.append(normaliseSerial(pathSerial))
    for serial in candidates:
        if serial is not None:
            return serial
    return None
