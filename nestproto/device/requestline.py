# -*- test-case-name: tests.test_requestline -*-
"""
A request line with spaces inside its target (PROTOCOL.md §20.2): 4.x
firmware that once got a malformed answer echoes mutated keys in its
request line (C{GET /nest/transport/v3/device/device.S ._sync HTTP/1.1}).
A strict parser answers 400 and the device never recovers, so the device
port reads such a line as method, target (its spaces kept as C{%20}) and
version. Well-formed lines, headers and bodies are untouched.
"""

from __future__ import annotations

import re

from ..channel import AddressKeepingHTTPChannel

# A method token, a target that has spaces in it, an HTTP/1.x version. A
# header line never matches: its name ends with a colon, and a folded
# continuation line starts with whitespace.
_SPACED_REQUEST_LINE = re.compile(
    rb"^([A-Z]{1,16}) +(/[\x21-\x7e][\x20-\x7e]*?) +(HTTP/1\.[01])$"
)


#: How a line the pattern can match ends (its C{$} also matches before a
#: final newline).
_VERSION_ENDINGS = (b" HTTP/1.1", b" HTTP/1.0", b" HTTP/1.1\n", b" HTTP/1.0\n")


def tolerantRequestLine(line: bytes) -> bytes:
    """
    C{line} with the spaces inside its target escaped as C{%20} when it is
    a request line of more than three tokens; any other line as it is.
    """
    match = _SPACED_REQUEST_LINE.match(line)
    if match is None or b" " not in match.group(2):
        return line
    method, target, version = match.groups()
    return b"%s %s %s" % (method, target.replace(b" ", b"%20"), version)


class TolerantHTTPChannel(AddressKeepingHTTPChannel):
    """
    An L{AddressKeepingHTTPChannel} that serves request lines with a spaced
    target.
    """

    def lineReceived(self, line: bytes) -> None:
        # Only a line ending with the version can be rewritten: the header
        # lines of every request skip the pattern.
        if line.endswith(_VERSION_ENDINGS):
            line = tolerantRequestLine(line)
        super().lineReceived(line)
