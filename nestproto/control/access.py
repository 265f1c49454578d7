# -*- test-case-name: tests.test_access -*-
"""
Who may use the control API, and from where (issue 12 items 5 and 6): the
pure rules the control port's gate applies. No HTTP here; the gate in
L{nestproto.control.api} reads the request and calls these.

- A browser page may call the API only from the API's own origin or one
  given with C{--allow-origin}; CORS is closed otherwise.
- A request that changes something says its body is JSON, so a page cannot
  make one with a form or a "simple" cross-site request.
- With a token, a request carries it as C{Authorization: Bearer}, or under
  the secret path prefix C{/k/<token>/} (for clients that cannot send a
  header), or comes from a C{--trusted-network}.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from attrs import frozen

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Methods that change something: refused unless their body is JSON.
CHANGING_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
#: What a CORS preflight from an allowed origin is told.
CORS_ALLOW_HEADERS = b"Authorization, Content-Type, Accept, Last-Event-ID"
CORS_ALLOW_METHODS = b"GET, POST, DELETE, OPTIONS"
CORS_MAX_AGE_SECONDS = 600

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normaliseOrigin(text: str) -> str | None:
    """
    C{scheme://host:port}, lower case and always with the port, of an
    origin as a browser sends it (C{Origin: http://nest.home.arpa}), or
    C{None} when C{text} is not one: another scheme, a path, credentials,
    C{null}.
    """
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def parseNetwork(text: str) -> IPNetwork:
    """
    A C{--trusted-network}: C{192.168.1.0/24}, C{fd00::/8}, or one address.

    @raise ValueError: when C{text} is neither.
    """
    return ipaddress.ip_network(text.strip(), strict=False)


def isTrusted(host: str, networks: Iterable[IPNetwork]) -> bool:
    """
    Whether the client address C{host} is in one of C{networks}. An IPv4
    client reaching an IPv6 listener (C{::ffff:192.168.1.5}) counts as its
    IPv4 address.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def isJSONType(contentType: bytes | None) -> bool:
    """Whether a C{Content-Type} is C{application/json}, parameters aside."""
    if contentType is None:
        return False
    return contentType.split(b";", 1)[0].strip().lower() == b"application/json"


def sameSecret(given: bytes, token: str) -> bool:
    """C{given} is C{token}, compared in constant time."""
    return hmac.compare_digest(given, token.encode("utf-8"))


@frozen
class OriginVerdict:
    """
    What a request's C{Origin} header means.

    @ivar allowed: the request may go on.
    @ivar cors: the C{Origin} to name in CORS headers, exactly as the
        browser sent it (it compares them as strings), when it is one given
        with C{--allow-origin}; C{None}: send none.
    """

    allowed: bool
    cors: str | None = None


def judgeOrigin(
    origin: bytes | None, ownOrigin: str, allowOrigins: frozenset[str]
) -> OriginVerdict:
    """
    Whether a request with C{origin} may use the API reached at
    C{ownOrigin}. No C{Origin} header (curl, Home Assistant, Homebridge,
    anything but a browser) is allowed; a browser page's origin must be the
    API's own or one of C{allowOrigins} (normalised).
    """
    if origin is None:
        return OriginVerdict(True)
    sent = origin.decode("latin-1")
    normal = normaliseOrigin(sent)
    if normal is None:
        return OriginVerdict(False)
    if normal in allowOrigins:
        return OriginVerdict(True, sent.strip())
    return OriginVerdict(normal == normaliseOrigin(ownOrigin))
