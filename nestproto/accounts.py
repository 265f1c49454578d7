# -*- test-case-name: tests.test_accounts -*-
"""
App accounts and their login tokens (PROTOCOL.md §20.6).

An account is the user that owns devices through pairing: its name is the
C{userId} a claim names (C{/api/register}), so its buckets are
C{user.<name>} and its structure. Passwords are kept only as scrypt hashes;
tokens come from L{secrets} and are kept only as SHA-256 digests, each with
its expiry. Both live as store records, committed like every other change.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from base64 import b64decode, b64encode
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .errors import AccountExists, BadBody, BadClaim, NoSuchAccount
from .pairing import checkUserId
from .store import IBucketStore, RecordWrite, ThreadRunner

ACCOUNT_RECORD = "account"
TOKEN_RECORD = "app_token"
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
#: Tokens last at least 30 days (§20.6): a 401 makes python-nest re-login
#: until it crashes.
TOKEN_SECONDS = 90 * 24 * 3600.0
#: scrypt's cost: 16 MiB and some 50 ms per hash on a Raspberry Pi 4.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1


def checkUsername(raw: object) -> str:
    """
    A name an account may have: one a pairing claim may name as its user.

    @raise BadBody: otherwise.
    """
    try:
        return checkUserId(raw)
    except BadClaim as e:
        raise BadBody(str(e).replace("userId", "username")) from None


def checkPassword(raw: object) -> str:
    """
    @raise BadBody: unless C{raw} is a string of 8 to 1024 characters.
    """
    if not isinstance(raw, str):
        raise BadBody("password must be a string")
    if len(raw) < MIN_PASSWORD_LENGTH:
        raise BadBody(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(raw) > MAX_PASSWORD_LENGTH:
        raise BadBody(f"password must have at most {MAX_PASSWORD_LENGTH} characters")
    return raw


def hashPassword(password: str, salt: bytes, n: int = SCRYPT_N) -> str:
    """C{scrypt$n$r$p$salt$hash}, salt and hash in base64. Blocking."""
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=128 * n * SCRYPT_R * 2,
        dklen=32,
    )
    encoded = [b64encode(salt).decode(), b64encode(digest).decode()]
    return "$".join(["scrypt", str(n), str(SCRYPT_R), str(SCRYPT_P), *encoded])


def verifyPassword(password: str, stored: str) -> bool:
    """Whether C{password} hashes to C{stored}, compared in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=128 * int(n) * int(r) * 2,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def tokenDigest(token: str) -> str:
    """The name a token is kept under: its SHA-256, never the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@frozen
class Login:
    """A successful login: the new token, its user and its expiry."""

    token: str
    userId: str
    expiresSeconds: float


@define
class Accounts:
    """Creates, removes and logs in accounts; tells a token's user."""

    log = Logger()

    store: IBucketStore
    clock: IReactorTime
    #: Where scrypt runs: it is slow on purpose.
    runInThread: ThreadRunner
    tokenSeconds: float = TOKEN_SECONDS
    scryptN: int = SCRYPT_N
    #: Names being created now (their hash is being computed).
    _creating: set[str] = field(factory=set, init=False)

    def exists(self, username: str) -> bool:
        return self.store.record(ACCOUNT_RECORD, username) is not None

    def create(self, username: object, password: object) -> Deferred[str]:
        """
        Create an account; fires with its user id (its name).

        @raise BadBody: a malformed name or a short password.
        @raise AccountExists: the name is taken.
        """
        name = checkUsername(username)
        secret = checkPassword(password)
        if self.exists(name) or name in self._creating:
            raise AccountExists(f"An account named {name} exists")
        self._creating.add(name)
        salt = secrets.token_bytes(16)

        def store(hashed: str) -> Deferred[str]:
            doc = {"userId": name, "hash": hashed, "createdMs": self._nowMs()}
            return self.store.write(
                [RecordWrite(ACCOUNT_RECORD, name, doc)]
            ).addCallback(lambda ignored: name)

        def done(result: Any) -> Any:
            self._creating.discard(name)
            return result

        d: Deferred[str] = self.runInThread(hashPassword, secret, salt, self.scryptN)
        d.addCallback(store)
        return d.addBoth(done)

    def remove(self, username: object) -> Deferred[None]:
        """
        Remove an account and every token of it. Its devices stay paired.

        @raise NoSuchAccount: no account has that name.
        """
        name = checkUsername(username)
        if not self.exists(name):
            raise NoSuchAccount(f"No account named {name}")
        writes = [RecordWrite(ACCOUNT_RECORD, name, None)] + [
            RecordWrite(TOKEN_RECORD, digest, None)
            for digest, doc in self.store.records(TOKEN_RECORD).items()
            if doc.get("userId") == name
        ]
        return self.store.write(writes).addCallback(lambda ignored: None)

    def anyExist(self) -> bool:
        """Whether there is at least one account."""
        return bool(self.store.records(ACCOUNT_RECORD))

    def verify(self, username: str, password: str) -> Deferred[bool]:
        """Whether C{password} is the password of the account C{username}."""
        account = self.store.record(ACCOUNT_RECORD, username)
        if account is None or len(password) > MAX_PASSWORD_LENGTH:
            # Hash anyway, so a missing account takes as long as a wrong
            # password.
            return self.runInThread(
                hashPassword, password[:MAX_PASSWORD_LENGTH], b"\0" * 16, self.scryptN
            ).addCallback(lambda ignored: False)
        stored = str(account.get("hash", ""))
        d: Deferred[bool] = self.runInThread(verifyPassword, password, stored)
        return d

    def login(self, username: str, password: str) -> Deferred[Login | None]:
        """A new token when C{password} is the account's; else C{None}."""

        def issue(right: bool) -> Deferred[Login | None]:
            if not right:
                return succeed(None)
            token = secrets.token_urlsafe(32)
            expires = self.clock.seconds() + self.tokenSeconds
            doc = {"userId": username, "expiresMs": int(expires * 1000)}
            return self.store.write(
                [RecordWrite(TOKEN_RECORD, tokenDigest(token), doc)]
            ).addCallback(lambda ignored: Login(token, username, expires))

        return self.verify(username, password).addCallback(issue)

    def userFor(self, token: str) -> str | None:
        """The user id of a live token, or C{None}."""
        doc = self.store.record(TOKEN_RECORD, tokenDigest(token))
        if doc is None or doc.get("expiresMs", 0) <= self._nowMs():
            return None
        user = doc.get("userId")
        if not isinstance(user, str) or not self.exists(user):
            return None
        return user

    def _nowMs(self) -> int:
        return int(self.clock.seconds() * 1000)
