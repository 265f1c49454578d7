# -*- test-case-name: tests.test_pairing -*-
"""
Pairing: entry keys shown on the thermostat and claimed by a user
(PROTOCOL.md §5, §13).

An entry key is one record per device serial (minting a new one replaces
the old, which is how older keys of a serial go away), kept in the store so
a restart keeps it. Claiming a key writes the owner record, the user bucket
whose C{name} completes pairing on the device, and the structure that lists
the device, in one transaction, and pushes both buckets to the device.
"""

from __future__ import annotations

import hmac
import re
import secrets
import string
from collections.abc import Callable
from typing import Any, ClassVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import buckets as rules
from .buckets import Bucket, isBucketKey
from .errors import BadClaim, NotPaired, TooManyAttempts, UnknownDevice
from .membership import (
    GLOBAL_SCOPE,
    OWNER_RECORD,
    deviceMember,
    isReservedStructureId,
    structureIdFor,
    unpairedStructureKey,
)
from .state import DeviceState
from .store import (
    BucketUpdate,
    Decide,
    IBucketStore,
    RecordUpdate,
    RecordWrite,
    Write,
)

ENTRY_KEY_RECORD = "entry_key"
#: Record kind binding a serial to the device password it first gave
#: (nestproto.admission); a claim or a deletion of the device removes it.
DEVICE_SECRET_RECORD = "device_secret"
#: How long a minted entry key is valid (PROTOCOL.md §5, the anchor's default).
DEFAULT_TTL_SECONDS = 3600
#: The device ignores a key that expires sooner than this (PROTOCOL.md §5).
MIN_REMAINING_SECONDS = 1800
#: The pairing dialog the device shows while it waits to be claimed.
CONFIRM_PAIRING = {"dialog_id": "confirm-pairing", "dialog_data": ""}

_CODE_PATTERN = re.compile(r"^[A-Z0-9]{7}$")
_USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.@\-]{1,64}$")


@frozen
class EntryKey:
    """
    A pairing code for one device.

    @ivar code: 3 digits and 4 uppercase letters; the device shows
        C{123-ABCD}.
    @ivar expiresMs: ms since the epoch.
    @ivar claimedBy: the user who claimed it, or C{None}.
    """

    serial: str
    code: str
    expiresMs: int
    createdMs: int
    claimedBy: str | None = None
    claimedAtMs: int | None = None

    def toRecord(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "expires": self.expiresMs,
            "created": self.createdMs,
            "claimedBy": self.claimedBy,
            "claimedAt": self.claimedAtMs,
        }

    @classmethod
    def fromRecord(cls, serial: str, doc: dict[str, Any]) -> EntryKey:
        return cls(
            serial,
            str(doc["code"]),
            int(doc["expires"]),
            int(doc.get("created", 0)),
            doc.get("claimedBy"),
            doc.get("claimedAt"),
        )

    def claimable(self, nowMs: int) -> bool:
        return self.claimedBy is None and self.expiresMs > nowMs


def newCode() -> str:
    """A fresh code from the system's CSPRNG: C{123ABCD}."""
    digits = "".join(secrets.choice(string.digits) for _ in range(3))
    letters = "".join(secrets.choice(string.ascii_uppercase) for _ in range(4))
    return digits + letters


def normaliseCode(raw: object) -> str:
    """
    A code as typed by a user: case-insensitive, with or without the hyphen
    the device displays (C{123-abcd}).

    @raise BadClaim: when it is not 7 letters and digits.
    """
    if not isinstance(raw, str):
        raise BadClaim("Entry code must be a string")
    code = raw.strip().replace("-", "").upper()
    if not _CODE_PATTERN.match(code):
        raise BadClaim(
            "Invalid entry code format. Must be exactly 7 alphanumeric characters."
        )
    return code


def checkUserId(raw: object) -> str:
    """
    A user id that names valid user and structure buckets.

    @raise BadClaim: otherwise.
    """
    if not isinstance(raw, str) or not _USER_ID_PATTERN.match(raw):
        raise BadClaim("userId must be 1-64 letters, digits or _.@-")
    if not isBucketKey(f"structure.{structureIdFor(raw)}"):
        raise BadClaim("userId must name a structure")
    if isReservedStructureId(structureIdFor(raw)):
        # Its structure would be an unclaimed device's (membership.py).
        raise BadClaim("userId must not begin with 'unpaired-'")
    return raw


@define
class ClaimThrottle:
    """
    Locks out a client address after repeated wrong codes: C{maxFailures}
    are free, then each further failure doubles the lockout, from
    C{baseLockSeconds} up to C{maxLockSeconds}, on the injected clock.
    A correct claim forgets the address.
    """

    clock: Any
    maxFailures: int = 5
    baseLockSeconds: float = 60.0
    maxLockSeconds: float = 3600.0
    #: Addresses tracked at most; the oldest are forgotten past it.
    maxTracked: int = 10000
    _failures: dict[str, tuple[int, float]] = field(factory=dict, init=False)

    def check(self, client: str) -> None:
        """
        @raise TooManyAttempts: while C{client} is locked out.
        """
        count, lockedUntil = self._failures.get(client, (0, 0.0))
        now = self.clock.seconds()
        if now < lockedUntil:
            raise TooManyAttempts(int(lockedUntil - now + 0.999))

    def failed(self, client: str) -> None:
        count, lockedUntil = self._failures.pop(client, (0, 0.0))
        count += 1
        if count >= self.maxFailures:
            lock = min(
                self.baseLockSeconds * 2 ** (count - self.maxFailures),
                self.maxLockSeconds,
            )
            lockedUntil = self.clock.seconds() + lock
        # Re-inserted last: the dict's order is oldest failure first.
        self._failures[client] = (count, lockedUntil)
        while len(self._failures) > self.maxTracked:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


#: Records of a L{SharedClaimThrottle}: the wrong codes of one client
#: address, per throttle.
CLAIM_THROTTLE_RECORD = "claim-throttle"
LOGIN_THROTTLE_RECORD = "login-throttle"


@define
class SharedClaimThrottle(ClaimThrottle):
    """
    A L{ClaimThrottle} whose failures are records in C{store} (C{kind}, one
    per client address): with a store several processes share, a wrong code
    sent to one process counts on every one, so a client cannot try
    C{maxFailures} codes per process behind a load balancer.

    Each failure is counted in the database (a L{RecordUpdate}: two
    processes' failures at once both count) and at once in this process's
    memory, before the write commits; a process sees another's failures as
    soon as its change feed brings them. Past C{maxTracked} addresses the
    oldest failures are deleted, as the in-memory throttle forgets them.
    """

    log: ClassVar[Logger] = Logger()

    store: IBucketStore = field(kw_only=True)
    kind: str = field(default=CLAIM_THROTTLE_RECORD, kw_only=True)
    _sinceTrim: int = field(default=0, init=False)

    def _lockSeconds(self, count: int) -> float:
        return float(
            min(
                self.baseLockSeconds * 2 ** (count - self.maxFailures),
                self.maxLockSeconds,
            )
        )

    def check(self, client: str) -> None:
        """
        @raise TooManyAttempts: while C{client} is locked out here or by
            failures on any process.
        """
        super().check(client)
        doc = self.store.record(self.kind, client)
        if doc is not None:
            now = self.clock.seconds()
            lockedUntil = float(doc.get("lockedUntil", 0.0))
            if now < lockedUntil:
                raise TooManyAttempts(int(lockedUntil - now + 0.999))

    def failed(self, client: str) -> None:
        # This process's count, now (its own next attempt sees it at once).
        super().failed(client)
        now = self.clock.seconds()

        def decide(doc: dict[str, Any] | None) -> dict[str, Any]:
            count = 1 + (0 if doc is None else int(doc.get("count", 0)))
            lockedUntil = 0.0 if doc is None else float(doc.get("lockedUntil", 0.0))
            if count >= self.maxFailures:
                lockedUntil = max(lockedUntil, now + self._lockSeconds(count))
            return {"count": count, "lockedUntil": lockedUntil, "at": now}

        writes: list[Write] = [RecordUpdate(self.kind, client, decide)]
        self._sinceTrim += 1
        if self._sinceTrim >= 100:
            self._sinceTrim = 0
            tracked = self.store.records(self.kind)
            excess = len(tracked) - self.maxTracked
            if excess > 0:
                oldest = sorted(tracked, key=lambda name: tracked[name].get("at", 0))
                writes += [
                    RecordWrite(self.kind, name, None)
                    for name in oldest[:excess]
                    if name != client
                ]
        # Once committed, the store counts it: this process's memory need
        # not (and must not outlive a correct claim made on another process).
        self._write(writes, lambda: self._failures.pop(client, None))

    def succeeded(self, client: str) -> None:
        super().succeeded(client)
        if self.store.record(self.kind, client) is not None:
            self._write([RecordWrite(self.kind, client, None)])

    def _write(
        self, writes: list[Write], committed: Callable[[], object] | None = None
    ) -> None:
        """Write, then call C{committed}; a failure is logged."""

        def failed(failure: Failure) -> None:
            self.log.warn(
                "claim throttle not recorded: {error}",
                error=failure.getErrorMessage(),
            )

        try:
            d = self.store.write(writes)
        except Exception:
            failed(Failure())
            return
        if committed is not None:
            d.addCallback(lambda ignored: committed())
        d.addErrback(failed)


@define
class Pairing:
    """
    Issues entry keys to devices and lets users claim them.

    @ivar ttlSeconds: lifetime of a new key; a key is served again only
        while at least L{MIN_REMAINING_SECONDS} of it remain.
    """

    log = Logger()

    state: DeviceState
    ttlSeconds: int = DEFAULT_TTL_SECONDS

    def entryKey(self, serial: str) -> EntryKey | None:
        """The stored entry key of C{serial}, claimed or not, if any."""
        doc = self.state.store.record(ENTRY_KEY_RECORD, serial)
        return None if doc is None else EntryKey.fromRecord(serial, doc)

    def passphrase(self, serial: str) -> Deferred[EntryKey]:
        """
        The key C{serial} should show: the same unclaimed one on every poll
        while it is valid (PROTOCOL.md §5), else a new one, stored durably
        before it is handed out.

        A key is served again only while at least 30 minutes of it remain,
        then a fresh one is minted: the device ignores a key that expires
        sooner than that (PROTOCOL.md §5 ⚠; the anchor serves the old key
        until it expires, so for the last half of its hour the device would
        get a key below its minimum).
        """
        self.state.presence.touch(serial)
        nowMs = self.state.nowMs()
        current = self.entryKey(serial)
        if (
            current is not None
            and current.claimedBy is None
            and current.expiresMs - nowMs >= MIN_REMAINING_SECONDS * 1000
        ):
            return succeed(current)
        return self._mint(serial, nowMs)

    def _mint(self, serial: str, nowMs: int) -> Deferred[EntryKey]:
        taken = {
            str(doc.get("code"))
            for name, doc in self.state.store.records(ENTRY_KEY_RECORD).items()
            if name != serial
        }
        code = newCode()
        while code in taken:
            code = newCode()
        key = EntryKey(serial, code, nowMs + self.ttlSeconds * 1000, nowMs)
        dialogKey = f"device_alert_dialog.{serial}"

        def dialog(stored: Bucket | None, nowMs: int) -> Bucket | None:
            if stored is not None:
                return stored
            return rules.changed(rules.empty(dialogKey), CONFIRM_PAIRING, nowMs)

        self.log.info("new entry key for {serial}", serial=serial)
        # One record per serial: writing it replaces (deletes) older keys.
        record = RecordWrite(ENTRY_KEY_RECORD, serial, key.toRecord())
        return self.state.change(
            [BucketUpdate(serial, dialogKey, dialog), record]
        ).addCallback(lambda ignored: key)

    def status(self, serial: str) -> dict[str, Any]:
        """The anchor's C{/nest/passphrase/status} document (PROTOCOL.md §5)."""
        owner = self.state.store.record(OWNER_RECORD, serial)
        if owner is not None:
            return {
                "status": "claimed",
                "claimed": True,
                "claimedBy": owner["user"],
                "claimedAt": owner.get("claimedAt"),
            }
        key = self.entryKey(serial)
        if key is not None and key.claimable(self.state.nowMs()):
            return {"status": "pending", "claimed": False, "expiresAt": key.expiresMs}
        return {
            "status": "no_key",
            "claimed": False,
            "message": "No active entry key; the device requests one when it boots",
        }

    def _findKey(self, code: str) -> EntryKey | None:
        found = None
        for serial, doc in self.state.store.records(ENTRY_KEY_RECORD).items():
            # Compare every key in constant time: how long a wrong guess
            # takes says nothing about the codes.
            if hmac.compare_digest(str(doc.get("code", "")).encode(), code.encode()):
                found = EntryKey.fromRecord(serial, doc)
        return found

    def claim(self, code: str, userId: str) -> Deferred[str | None]:
        """
        Claim the device showing C{code} for C{userId} (PROTOCOL.md §13).

        @param code: as returned by L{normaliseCode}.
        @param userId: as returned by L{checkUserId}.
        @return: fires with the serial once the owner record, the user and
            the structure are durable and pushed; with C{None}, having
            changed nothing, when the code is unknown, expired or claimed.
        """
        nowMs = self.state.nowMs()
        key = self._findKey(code)
        if key is None or not key.claimable(nowMs):
            return succeed(None)
        serial = key.serial
        member = deviceMember(serial)
        previous = self.state.membership.ownerOf(serial)
        userKey = f"user.{userId}"
        structureKey = f"structure.{structureIdFor(userId)}"
        oldStructureKey = (
            None if previous is None else f"structure.{structureIdFor(previous)}"
        )

        def user(stored: Bucket | None, nowMs: int) -> Bucket:
            if stored is None:
                return rules.changed(rules.empty(userKey), {"name": userId}, nowMs)
            return rules.forceMerge(stored, {"name": userId}, nowMs)

        def structure(stored: Bucket | None, nowMs: int) -> Bucket:
            if stored is None:
                return rules.changed(
                    rules.empty(structureKey),
                    {"name": "Home", "devices": [member]},
                    nowMs,
                )
            devices = _deviceList(stored)
            if member not in devices:
                devices.append(member)
            return rules.forceMerge(stored, {"devices": devices}, nowMs)

        writes: list[Write] = [
            BucketUpdate(GLOBAL_SCOPE, userKey, user),
            BucketUpdate(GLOBAL_SCOPE, structureKey, structure),
        ]
        if oldStructureKey is None:
            # The device moves into its owner's structure, and the one it had
            # on its own while unclaimed is emptied: emptied, not deleted, so
            # that should the device be released again, that structure's
            # timestamps still only move forward for the copy it may hold.
            writes.append(
                BucketUpdate(GLOBAL_SCOPE, unpairedStructureKey(serial), _emptied)
            )
        elif oldStructureKey != structureKey:
            writes.append(
                BucketUpdate(GLOBAL_SCOPE, oldStructureKey, _withoutMember(member))
            )
        claimed = EntryKey(
            serial, key.code, key.expiresMs, key.createdMs, userId, nowMs
        )

        def stillClaimable(doc: dict[str, Any] | None) -> dict[str, Any]:
            # Decided in the transaction: of two claims of one code (on one
            # process or two) only the first finds it unclaimed.
            if doc is None or EntryKey.fromRecord(serial, doc) != key:
                raise _CodeTaken()
            return claimed.toRecord()

        writes += [
            RecordUpdate(ENTRY_KEY_RECORD, serial, stillClaimable),
            RecordWrite(OWNER_RECORD, serial, {"user": userId, "claimedAt": nowMs}),
            # Claiming is how an owner vouches for the device in front of
            # them: whatever password it gives next is bound anew.
            RecordWrite(DEVICE_SECRET_RECORD, serial, None),
        ]

        def claimedNow(ignored: object) -> str:
            self.log.info("{serial} claimed by {user}", serial=serial, user=userId)
            return serial

        def takenMeanwhile(failure: Failure) -> None:
            failure.trap(_CodeTaken)
            return None

        return self.state.change(writes).addCallbacks(claimedNow, takenMeanwhile)

    def dismissDialog(self, serial: str) -> Deferred[bool]:
        """
        Empty C{serial}'s pairing dialog, pushed to the device (PROTOCOL.md
        §13 step 5).

        @return: fires with whether there was a dialog to dismiss.
        """
        dialogKey = f"device_alert_dialog.{serial}"
        if self.state.store.get(serial, dialogKey) is None:
            return succeed(False)

        def dismissed(stored: Bucket | None, nowMs: int) -> Bucket:
            return rules.replace(stored or rules.empty(dialogKey), {}, nowMs)

        return self.state.change(
            [BucketUpdate(serial, dialogKey, dismissed)]
        ).addCallback(lambda ignored: True)

    def unclaim(self, serial: str) -> Deferred[str]:
        """
        Remove C{serial}'s owner and take it out of the owner's structure.

        @return: fires with the former owner's user id.
        @raise NotPaired: when C{serial} has no owner.
        """
        owner = self.state.membership.ownerOf(serial)
        if owner is None:
            raise NotPaired(f"Device {serial} is not registered")
        structureKey = f"structure.{structureIdFor(owner)}"
        member = deviceMember(serial)

        writes: list[Write] = [
            BucketUpdate(GLOBAL_SCOPE, structureKey, _withoutMember(member)),
            RecordWrite(OWNER_RECORD, serial, None),
            RecordWrite(ENTRY_KEY_RECORD, serial, None),
        ]
        self.log.info("{serial} unregistered from {user}", serial=serial, user=owner)
        return self.state.change(writes).addCallback(lambda ignored: owner)

    def removeDevice(self, serial: str) -> Deferred[None]:
        """
        Forget C{serial} entirely: its buckets, owner, entry key and bound
        password; its structure no longer lists it.

        @raise UnknownDevice: when nothing is known of C{serial}.
        """
        store = self.state.store
        if not (
            self.state.membership.isKnown(serial)
            or store.record(ENTRY_KEY_RECORD, serial) is not None
            or store.record(DEVICE_SECRET_RECORD, serial) is not None
        ):
            raise UnknownDevice()
        owner = self.state.membership.ownerOf(serial)
        structures: list[Write] = [
            BucketUpdate(GLOBAL_SCOPE, unpairedStructureKey(serial), _deleted)
        ]
        if owner is not None:
            structures.append(
                BucketUpdate(
                    GLOBAL_SCOPE,
                    f"structure.{structureIdFor(owner)}",
                    _withoutMember(deviceMember(serial)),
                )
            )
        records = [
            RecordWrite(OWNER_RECORD, serial, None),
            RecordWrite(ENTRY_KEY_RECORD, serial, None),
            RecordWrite(DEVICE_SECRET_RECORD, serial, None),
        ]
        return self.state.removeDevice(serial, structures, records)


class _CodeTaken(Exception):
    """The code was claimed, replaced or removed while a claim was decided."""


def _deviceList(structure: Bucket) -> list[str]:
    devices = structure.value.get("devices")
    return (
        [d for d in devices if isinstance(d, str)] if isinstance(devices, list) else []
    )


def _emptied(stored: Bucket | None, nowMs: int) -> Bucket | None:
    """The bucket with an empty value (left absent when it is absent)."""
    if stored is None or not stored.value:
        return stored
    return rules.replace(stored, {}, nowMs)


def _deleted(stored: Bucket | None, nowMs: int) -> None:
    """Delete the bucket (nothing changes when it is absent)."""
    return None


def _withoutMember(member: str) -> Decide:
    """A structure without C{member}; left as it is when it does not list it."""
    # The bare serial is how the anchor listed devices; drop that form too.
    bare = member.removeprefix("device.")

    def decide(stored: Bucket | None, nowMs: int) -> Bucket | None:
        if stored is None or member not in _deviceList(stored):
            return stored
        devices = [d for d in _deviceList(stored) if d not in (member, bare)]
        return rules.forceMerge(stored, {"devices": devices}, nowMs)

    return decide
