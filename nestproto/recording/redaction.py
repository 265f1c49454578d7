# -*- test-case-name: tests.test_fixtures -*-
"""
Redaction of recordings: serials and MACs become synthetic ones, Basic
passwords and control tokens (in headers and in the C{/k/<token>/} path
prefix) a fixed word, entry codes synthetic codes, consistently within one
recorder run. The apps' secrets (PROTOCOL.md §20.6) too: account passwords
(in forms and JSON) become synthetic ones, and app tokens (in a login's
answer, in C{Authorization: Basic <token>} and in a JSONP query) synthetic
tokens, distinct ones staying distinct so that a replay logs in, and fails
to, as the recording did; a token never seen in a login's answer becomes a
fixed word.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote, unquote_plus

from attrs import define, field

from ..buckets import SERIAL_KEYED_TYPES
from ..device.auth import basicCredentials, normaliseSerial
from .bindings import codeKey, styledLike

#: What a redacted Basic password becomes.
REDACTED_PASSWORD = "redacted"
#: Synthetic serials: the invented range of PROTOCOL.md with another prefix.
_SYNTHETIC_SERIAL = "09AA01AC{:010d}"
#: Synthetic MACs: locally administered addresses.
_SYNTHETIC_MAC = "02005E{:06X}"
#: Synthetic entry codes, in the firmware's 3 digits + 4 letters form.
_SYNTHETIC_CODE = "{:03d}CODE"

#: Synthetic account passwords (at least 8 characters, as accounts need).
SYNTHETIC_PASSWORD = "password-{}"
#: Synthetic app tokens.
SYNTHETIC_TOKEN = "apptoken-{}"
#: A JSONP subscribe's token in its query (§20.6).
QUERY_AUTHORIZATION = re.compile(
    r"([?&]Authorization=Basic(?:\+|%20))([^&#]*)", re.IGNORECASE
)

_MAC_PLAIN = re.compile(r"^[0-9A-Fa-f]{12}$")
#: The control port's secret path prefix (nestproto.control.access).
_SECRET_PATH = re.compile(r"^/k/[^/?#]*")
#: A bucket key whose id is a device serial (buckets.SERIAL_KEYED_TYPES).
_SERIAL_KEY = re.compile(
    r"^(?:" + "|".join(sorted(SERIAL_KEYED_TYPES)) + r")\.([A-Za-z0-9]{10,64})$"
)


@define
class Redactor:
    """
    Replaces secrets and identities consistently within one recorder run:
    serials and MACs by synthetic ones (inside keys, values, paths and
    headers too), Basic passwords by a fixed word, entry codes by
    synthetic codes. With C{raw}, changes nothing.
    """

    raw: bool = False
    _serials: dict[str, str] = field(factory=dict, init=False)
    _macs: dict[str, str] = field(factory=dict, init=False)
    _codes: dict[str, str] = field(factory=dict, init=False)
    _passwords: dict[str, str] = field(factory=dict, init=False)
    _tokens: dict[str, str] = field(factory=dict, init=False)
    _pattern: re.Pattern[str] | None = field(default=None, init=False)

    def learnSerial(self, serial: str | None) -> None:
        serial = normaliseSerial(serial)
        if self.raw or serial is None or serial in self._serials:
            return
        self._serials[serial] = _SYNTHETIC_SERIAL.format(len(self._serials) + 1)
        self._pattern = None

    def learnMAC(self, mac: object) -> None:
        if self.raw or not isinstance(mac, str):
            return
        plain = mac.replace(":", "").replace("-", "").upper()
        if not _MAC_PLAIN.match(plain) or plain in self._macs:
            return
        self._macs[plain] = _SYNTHETIC_MAC.format(len(self._macs) + 1)
        self._pattern = None

    def learnCode(self, code: object) -> None:
        if self.raw or not isinstance(code, str) or not code:
            return
        if codeKey(code) not in self._codes:
            self._codes[codeKey(code)] = _SYNTHETIC_CODE.format(len(self._codes) + 1)

    def serial(self, serial: str) -> str:
        """The name C{serial} has in the recording."""
        return self._serials.get(serial, serial)

    def _regex(self) -> re.Pattern[str] | None:
        if self._pattern is None:
            alternatives = sorted(self._serials, key=len, reverse=True)
            for mac in self._macs:
                alternatives.append(mac)
                alternatives.append(":".join(mac[i : i + 2] for i in range(0, 12, 2)))
            if not alternatives:
                return None
            self._pattern = re.compile(
                "|".join(re.escape(a) for a in alternatives), re.IGNORECASE
            )
        return self._pattern

    def text(self, text: str) -> str:
        """C{text} with every known serial and MAC replaced."""
        if self.raw:
            return text
        # A code as the user typed it: with the hyphen, in any case.
        code = self._codes.get(codeKey(text))
        if code is not None:
            return styledLike(code, text)
        pattern = self._regex()
        if pattern is None:
            return text

        def substitute(match: re.Match[str]) -> str:
            found = match.group(0).upper()
            if found in self._serials:
                return self._serials[found]
            return self._macs[found.replace(":", "")]

        return pattern.sub(substitute, text)

    def path(self, path: str) -> str:
        """A request path with its control token and known names replaced."""
        if self.raw:
            return path
        path = _SECRET_PATH.sub("/k/" + REDACTED_PASSWORD, path, count=1)
        path = QUERY_AUTHORIZATION.sub(
            lambda match: match.group(1) + self.appToken(unquote(match.group(2))),
            path,
        )
        return self.text(path)

    def document(self, document: Any) -> Any:
        """A JSON document with L{text} applied to every key and string."""
        if self.raw:
            return document
        if isinstance(document, dict):
            return {self.text(k): self._secret(k, v) for k, v in document.items()}
        if isinstance(document, list):
            return [self.document(item) for item in document]
        if isinstance(document, str):
            return self.text(document)
        return document

    def body(self, body: dict[str, Any] | None) -> dict[str, Any] | None:
        if self.raw or body is None:
            return body
        if "json" in body:
            return {"json": self.document(body["json"])}
        if "text" in body:
            return {"text": self.text(self._form(body["text"]))}
        return body

    def header(self, name: str, value: str) -> str:
        """A header value with its secrets and identities replaced."""
        if self.raw:
            return value
        lowered = name.lower()
        if lowered == "authorization":
            scheme, _, token = value.partition(" ")
            if token.strip() in self._tokens:
                return f"{scheme} {self._tokens[token.strip()]}"
            credentials = basicCredentials(value.encode("latin-1"))
            if credentials is None or ":" not in _decoded(value):
                # An app token (PROTOCOL.md §20.6) is not user:password, even
                # when it happens to be valid base64: all of it is secret.
                # A control token (Bearer) or anything else: only its scheme.
                return value.split(" ", 1)[0] + " " + REDACTED_PASSWORD
            token = f"{self.text(credentials.username)}:{REDACTED_PASSWORD}"
            return "Basic " + base64.b64encode(token.encode("utf-8")).decode("ascii")
        if lowered == "x-nl-set-client-credentials":
            user = value.split(" ", 1)[0]
            return f"{self.text(user)} {REDACTED_PASSWORD}"
        return self.text(value)

    def appToken(self, token: str) -> str:
        """What an app token sent by a client becomes."""
        return self._tokens.get(token.strip(), REDACTED_PASSWORD)

    def _secret(self, name: str, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return self.document(value)
        if name == "password":
            return self._synthetic(self._passwords, value, SYNTHETIC_PASSWORD)
        if name == "access_token":
            return self._synthetic(self._tokens, value, SYNTHETIC_TOKEN)
        return self.document(value)

    @staticmethod
    def _synthetic(table: dict[str, str], value: str, form: str) -> str:
        if value not in table:
            table[value] = form.format(len(table) + 1)
        return table[value]

    def _form(self, text: str) -> str:
        """A form body with its passwords replaced."""
        pairs = []
        for pair in text.split("&"):
            name, equals, value = pair.partition("=")
            if equals and name == "password":
                value = self._synthetic(
                    self._passwords, unquote_plus(value), SYNTHETIC_PASSWORD
                )
            pairs.append(name + equals + value)
        return "&".join(pairs)

    def learnFrom(self, document: Any) -> None:
        """
        Learn the serials and MACs a JSON document names: C{serial} and
        C{serial_number} fields, keys of serial-keyed buckets (also as
        field names and in lists), C{mac} and C{mac_address} fields.
        """
        stack = [document]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for key, value in item.items():
                    self._learnKey(key)
                    if key in ("mac", "mac_address"):
                        self.learnMAC(value)
                    elif key in ("serial", "serial_number") and isinstance(value, str):
                        self.learnSerial(value)
                    elif key == "session" and isinstance(value, str):
                        self._learnSession(value)
                    stack.append(value)
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, str):
                self._learnKey(item)

    def _learnKey(self, text: str) -> None:
        match = _SERIAL_KEY.match(text)
        if match is not None:
            self.learnSerial(match.group(1))

    def _learnSession(self, session: str) -> None:
        # The firmware's session is "<mac><serial>" (PROTOCOL.md §6.1).
        for serial in list(self._serials):
            if session.upper().endswith(serial) and len(session) == len(serial) + 12:
                self.learnMAC(session[:12])


def _decoded(value: str) -> str:
    """The text of a Basic header's credentials, or C{""}."""
    try:
        encoded = value.split(" ", 1)[1].strip()
        return base64.b64decode(encoded, validate=True).decode("utf-8")
    except (IndexError, ValueError, UnicodeDecodeError):
        return ""
