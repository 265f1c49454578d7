# -*- test-case-name: tests.test_channel -*-
"""
The HTTP channel both ports serve on.

twisted.web's C{Request.__init__} asks its channel for the connection's
local and peer addresses on every request; a TCP transport answers
C{getHost} with a C{getsockname} system call, and each with a new address
object; routing asks whether it is secure (an interface adaptation of the
transport). All are fixed for the life of a connection, so the channel asks
its transport once (bench/README.rst, issue 10: in-process instruction
counts).
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.web.http import HTTPChannel


class AddressKeepingHTTPChannel(HTTPChannel):
    """
    An L{HTTPChannel} that asks its transport for its addresses, and
    whether it is secure, once.
    """

    _host: IAddress | None = None
    _peer: IAddress | None = None
    _secure: bool | None = None

    def getHost(self) -> IAddress:
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> IAddress:
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure
