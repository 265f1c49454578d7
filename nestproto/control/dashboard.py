# -*- test-case-name: tests.test_dashboard -*-
"""
The dashboard: the web page the control port serves at C{/} (issue 13),
its assets, and the browser sessions it logs in with.

The page is plain HTML, CSS and ES modules shipped in
C{nestproto/control/web/}; it calls the same control API as every other
client. When a control token is set the page asks for it (or an account's
name and password, when accounts exist) once and gets a session cookie
(C{HttpOnly}, C{SameSite=Strict}, C{Secure} under TLS). A request
authenticated by that cookie that changes something must also carry the
session's CSRF token in C{X-CSRF-Token}: a cross-site page can
neither read it nor (being cross-site) send the cookie, and the gate's
C{Origin} and JSON rules refuse it before that.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
import secrets
from importlib import resources
from typing import Any, cast

from attrs import define, field, frozen
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.web.iweb import IRequest

from ..errors import NotFound

#: The cookie a logged-in browser carries.
SESSION_COOKIE = b"nestproto_session"
#: The header a cookie session's changing requests carry its CSRF token in.
CSRF_HEADER = b"x-csrf-token"
SESSION_SECONDS = 30 * 24 * 3600.0
MAX_SESSIONS = 256

#: Asset names the page may load, and their content types.
ASSET_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
_ASSET_NAME = re.compile(r"^[a-z][a-z0-9-]*\.(js|css|svg)$")
#: What a path prefix from Home Assistant's ingress may look like.
_INGRESS_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")

#: Nothing outside the control port: no CDN, font or beacon can load.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"img-src 'self' data:; connect-src 'self'; form-action 'self'; "
    b"base-uri 'self'; frame-ancestors 'self'"
)


@frozen
class Session:
    csrf: str
    expires: float
    #: The account the browser logged in as; C{None}: with the token.
    user: str | None = None


def _digest(sessionId: bytes) -> bytes:
    return hashlib.sha256(sessionId).digest()


@define
class Sessions:
    """
    Logged-in browsers, in memory: a restart logs them out. Only a hash of
    each session id is kept.
    """

    clock: IReactorTime
    lifetimeSeconds: float = SESSION_SECONDS
    maxSessions: int = MAX_SESSIONS
    _sessions: dict[bytes, Session] = field(factory=dict, init=False)

    def open(self, user: str | None = None) -> tuple[str, Session]:
        """
        A new session: its id (the cookie) and its CSRF token.

        @param user: the account it logged in as; C{None}: with the token.
        """
        now = self.clock.seconds()
        for key, session in list(self._sessions.items()):
            if session.expires <= now:
                del self._sessions[key]
        while len(self._sessions) >= self.maxSessions:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].expires)
            del self._sessions[oldest]
        sessionId = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now + self.lifetimeSeconds, user)
        self._sessions[_digest(sessionId.encode("ascii"))] = session
        return sessionId, session

    def find(self, request: IRequest) -> Session | None:
        """The live session C{request}'s cookie names, if any."""
        cookie = request.getCookie(SESSION_COOKIE)
        if not cookie:
            return None
        key = _digest(cookie)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self.clock.seconds():
            del self._sessions[key]
            return None
        return session

    def close(self, request: IRequest) -> None:
        """Forget C{request}'s session."""
        cookie = request.getCookie(SESSION_COOKIE)
        if cookie:
            self._sessions.pop(_digest(cookie), None)


def csrfMatches(request: IRequest, session: Session) -> bool:
    """Whether C{request} carries C{session}'s CSRF token."""
    given = request.getHeader(CSRF_HEADER) or b""
    return hmac.compare_digest(given, session.csrf.encode("ascii"))


def setSessionCookie(request: IRequest, sessionId: str | None) -> None:
    """Set (or, with C{None}, clear) the session cookie."""
    secure = request.isSecure()
    # IRequest does not declare Request's httpOnly and sameSite.
    cast(Any, request).addCookie(
        SESSION_COOKIE,
        b"" if sessionId is None else sessionId.encode("ascii"),
        path=b"/",
        httpOnly=True,
        secure=secure,
        sameSite="strict",
        max_age=b"0" if sessionId is None else b"%d" % (SESSION_SECONDS,),
    )


@define
class Dashboard:
    """
    What the page needs besides the API: sessions, and where thermostats
    connect (learnt when the device port listens).
    """

    clock: IReactorTime
    sessions: Sessions = field()
    #: C{--origin}, when given: the origin thermostats are told.
    deviceOrigin: str | None = None
    devicePort: int | None = None
    deviceSecure: bool = False

    @sessions.default
    def _sessions(self) -> Sessions:
        return Sessions(self.clock)

    def deviceListening(self, port: IListeningPort, secure: bool) -> None:
        """The device port listens on C{port}."""
        self.devicePort = getattr(port.getHost(), "port", None)
        self.deviceSecure = secure

    def entryURL(self, request: IRequest) -> str | None:
        """The URL to give a thermostat, as this request's host reaches us."""
        if self.deviceOrigin is not None:
            return self.deviceOrigin + "/entry"
        if self.devicePort is None:
            return None
        raw = request.getHeader(b"host") or b""
        host = raw.decode("latin-1")
        host = re.sub(r":[0-9]+$", "", host) if not host.endswith("]") else host
        if not host or not re.match(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)$", host):
            local = request.getHost()
            host = f"[{local.host}]" if ":" in local.host else local.host
        scheme = "https" if self.deviceSecure else "http"
        return f"{scheme}://{host}:{self.devicePort}/entry"


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("web", name).read_bytes()


def _etag(body: bytes) -> bytes:
    return b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'


def _pageHeaders(request: IRequest) -> None:
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")


def basePath(request: IRequest) -> str:
    """
    The path the page's links start from: Home Assistant's ingress prefix
    (C{X-Ingress-Path}), then the prefix the request came under
    (C{/k/<token>}), then C{/}.
    """
    ingress = (request.getHeader(b"x-ingress-path") or b"").decode("latin-1")
    ingress = ingress.rstrip("/")
    if ingress and not _INGRESS_PATH.match(ingress):
        ingress = ""
    prefix = b"".join(b"/" + segment for segment in request.prepath if segment)
    return ingress + prefix.decode("latin-1") + "/"


def renderPage(request: IRequest) -> bytes:
    """The page, with its links under L{basePath}."""
    body = _read("index.html").replace(
        b"{{base}}", html.escape(basePath(request), quote=True).encode("utf-8")
    )
    _pageHeaders(request)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    # The page names the path it was served under: never cached.
    request.setHeader(b"cache-control", b"no-store")
    return body


def renderAsset(request: IRequest, name: str) -> bytes:
    """One asset, revalidated by its ETag at every load."""
    if not _ASSET_NAME.match(name):
        raise NotFound("Not Found")
    try:
        body = _read(name)
    except (FileNotFoundError, IsADirectoryError):
        raise NotFound("Not Found") from None
    etag = _etag(body)
    _pageHeaders(request)
    request.setHeader(b"content-type", ASSET_TYPES["." + name.rsplit(".", 1)[1]])
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"etag", etag)
    if request.getHeader(b"if-none-match") == etag:
        request.setResponseCode(304)
        return b""
    return body
