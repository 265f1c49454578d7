# -*- test-case-name: tests.test_admission -*-
"""
Which devices may talk to this server, and as whom (PROTOCOL.md §2).

Three rules, applied to every device request that names a serial:

 - Trust on first use: the first Basic password seen for a serial is bound
   to it (kept hashed, as a record in the store). A later request for that
   serial giving another password is refused with a 401, and so is a write
   as the device (subscribe, put, upload) without it. What only reads (the
   front door: entry, passphrase, the bucket listing) is answered without a
   password, as the firmware asks entry and passphrase before it has
   credentials (PROTOCOL.md §2.1). A claim of the device, or its deletion,
   releases the binding.
 - New serials per client address are capped per hour, so that a client
   cannot make the server store an unbounded number of invented devices.
 - With pairing required (PROTOCOL.md §2.3, §19 scenario 59), a device no
   account has claimed may do what pairing needs (entry, passphrase, and
   subscribe once it shows a code), its puts are answered and dropped, and
   the control API does not list it until it is claimed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from .device.auth import basicCredentials, serialFromUsername
from .errors import (
    DeviceUnauthorized,
    NestError,
    PairingRequired,
    TooManyNewDevices,
)
from .pairing import DEVICE_SECRET_RECORD, ENTRY_KEY_RECORD, EntryKey
from .state import DeviceState
from .store import RecordUpdate

#: New serials one client address may bring per hour by default. A
#: household has a handful of thermostats; a reboot of all of them behind
#: one NAT is well under this.
DEFAULT_NEW_SERIALS_PER_HOUR = 20
_HOUR_SECONDS = 3600.0

#: What a device request does, for L{Admission.admit}: read (entry,
#: passphrase, the listing), which the firmware may do without credentials...
FRONT_DOOR = "front door"
#: ...or write device state (subscribe, put, upload), which pairing, when
#: required, gates.
TRANSPORT = "transport"


@frozen
class AdmissionSettings:
    """
    @ivar pairingRequired: only devices a user claimed (or that show a code)
        may use the transport, and only claimed ones are shown.
    @ivar newSerialsPerHour: new serials one client address may bring per
        hour; 0 for no limit (a load test from one address).
    """

    pairingRequired: bool = False
    newSerialsPerHour: int = DEFAULT_NEW_SERIALS_PER_HOUR


def secretRecord(password: str, nowMs: int) -> dict[str, Any]:
    """
    The record binding C{password} to a serial: a salted SHA-256, never the
    password.

    The password is the firmware's device token (PROTOCOL.md §2.1), made by
    a machine, not chosen by a person, and it is checked on every request
    of every device: a memory-hard hash (scrypt) would cost each long-poll
    tens of milliseconds of the reactor thread on a Raspberry Pi and buy
    nothing against a guess of a high-entropy token. Where the firmware's
    password is guessable (NLE-docs says it is the serial), no hash would
    protect it.
    """
    salt = secrets.token_bytes(16)
    return {"salt": salt.hex(), "sha256": _digest(salt, password), "boundAt": nowMs}


def _digest(salt: bytes, password: str) -> str:
    return hashlib.sha256(salt + password.encode("utf-8")).hexdigest()


def _matches(record: dict[str, Any], password: str) -> bool:
    try:
        salt = bytes.fromhex(str(record["salt"]))
        expected = str(record["sha256"])
    except (KeyError, ValueError):
        return False
    return hmac.compare_digest(_digest(salt, password), expected)


def devicePassword(request: IRequest, serial: str) -> str | None:
    """
    The Basic password C{request} gives for C{serial}: only when its
    username names that serial, and not empty.
    """
    credentials = basicCredentials(request.getHeader(b"authorization"))
    if credentials is None or not credentials.password:
        return None
    if serialFromUsername(credentials.username) != serial:
        return None
    return credentials.password


def clientAddress(request: IRequest) -> str:
    client = request.getClientAddress()
    return str(getattr(client, "host", client))


@define
class Admission:
    """
    Decides, before anything is changed, whether a device request may go
    on (L{admit}), and which devices the control side shows (L{listed}).
    """

    log = Logger()

    state: DeviceState
    settings: AdmissionSettings = field(factory=AdmissionSettings)
    #: Client addresses whose new serials are tracked at most; the oldest
    #: are forgotten past it.
    maxTrackedAddresses: int = 10000
    #: Bindings written but not yet durable, so a second request in the
    #: meantime is held to the same password.
    _binding: dict[str, dict[str, Any]] = field(factory=dict, init=False, repr=False)
    #: Per client address, the new serials it brought and when.
    _newSerials: dict[str, dict[str, float]] = field(
        factory=dict, init=False, repr=False
    )

    def admit(self, request: IRequest, serial: str, kind: str) -> bool:
        """
        Let C{serial}'s request go on, or refuse it with nothing changed.

        @param kind: L{FRONT_DOOR} or L{TRANSPORT}: with pairing required,
            only a claimed device, or one showing a code, may make a
            transport request.
        @return: whether the device's own writes are kept; C{False} for a
            device that is pairing but not claimed yet (its put is answered
            and dropped, PROTOCOL.md §19 scenario 59).
        @raise DeviceUnauthorized: the serial is bound to another password,
            or to one this transport request does not give.
        @raise TooManyNewDevices: the client brought too many new serials.
        @raise PairingRequired: a transport request of an unknown device
            while pairing is required.
        """
        password = devicePassword(request, serial)
        bound = self._binding.get(serial) or self.state.store.record(
            DEVICE_SECRET_RECORD, serial
        )
        if bound is not None and (
            (password is None and kind == TRANSPORT)
            or (password is not None and not _matches(bound, password))
        ):
            self.log.warn(
                "{serial} from {address} did not give the password bound to it; "
                "refused (delete or claim the device again to release it)",
                serial=serial,
                address=clientAddress(request),
            )
            raise DeviceUnauthorized()
        self._countNew(clientAddress(request), serial)
        keeps = True
        if kind == TRANSPORT and self.settings.pairingRequired:
            if self.state.membership.ownerOf(serial) is None:
                if not self._pairing(serial):
                    raise PairingRequired()
                keeps = False
        if bound is None and password is not None:
            self._bind(serial, password)
        return keeps

    def listed(self, serial: str) -> bool:
        """Whether the control side shows C{serial}, a known device."""
        return (
            not self.settings.pairingRequired
            or self.state.membership.ownerOf(serial) is not None
        )

    def shown(self, serial: str) -> bool:
        """
        Whether every control surface (the API, its event stream, MQTT)
        shows C{serial}: a known device, and with pairing required a
        claimed one.
        """
        return self.state.membership.isKnown(serial) and self.listed(serial)

    def hidden(self, serial: str) -> bool:
        """Whether C{serial} is a known device the control surfaces hide."""
        return self.state.membership.isKnown(serial) and not self.listed(serial)

    def _pairing(self, serial: str) -> bool:
        """Whether C{serial} shows a code that can be claimed now."""
        doc = self.state.store.record(ENTRY_KEY_RECORD, serial)
        return doc is not None and EntryKey.fromRecord(serial, doc).claimable(
            self.state.nowMs()
        )

    def _isKnown(self, serial: str) -> bool:
        store = self.state.store
        return (
            self.state.membership.isKnown(serial)
            or serial in self._binding
            or store.record(DEVICE_SECRET_RECORD, serial) is not None
            or store.record(ENTRY_KEY_RECORD, serial) is not None
            or self.state.presence.lastSeen(serial) is not None
        )

    def _countNew(self, address: str, serial: str) -> None:
        """
        @raise TooManyNewDevices: C{serial} is new and C{address} brought
            L{AdmissionSettings.newSerialsPerHour} new ones within the hour.
        """
        cap = self.settings.newSerialsPerHour
        if cap <= 0 or self._isKnown(serial):
            return
        now = self.state.clock.seconds()
        # Taken out and put back last: the dict's order is least recent first.
        recent = {
            name: at
            for name, at in self._newSerials.pop(address, {}).items()
            if now - at < _HOUR_SECONDS
        }
        try:
            if serial not in recent:
                if len(recent) >= cap:
                    retryAfter = min(recent.values()) + _HOUR_SECONDS - now
                    self.log.warn(
                        "{address} brought {cap} new serials within an hour; "
                        "refused {serial}",
                        address=address,
                        cap=cap,
                        serial=serial,
                    )
                    raise TooManyNewDevices(int(retryAfter + 0.999))
                recent[serial] = now
        finally:
            if recent:
                self._newSerials[address] = recent
            while len(self._newSerials) > self.maxTrackedAddresses:
                del self._newSerials[next(iter(self._newSerials))]

    def _bind(self, serial: str, password: str) -> None:
        """
        Bind C{password} to C{serial}. The record is committed in order
        before the request's own writes; until it is durable, L{_binding}
        holds other requests of the serial to it.
        """
        record = secretRecord(password, self.state.nowMs())
        self._binding[serial] = record
        self.log.debug("{serial} bound to the password it gave", serial=serial)

        def done(result: object) -> None:
            if self._binding.get(serial) is record:
                del self._binding[serial]
            if isinstance(result, Failure):
                if result.check(NestError):
                    # The store said why (a full disk): the next request of
                    # the serial binds again.
                    self.log.error(
                        "binding a password to {serial} failed: {reason}",
                        serial=serial,
                        reason=result.getErrorMessage(),
                    )
                else:
                    self.log.failure(
                        "binding a password to {serial} failed", result, serial=serial
                    )

        def firstWins(bound: dict[str, Any] | None) -> dict[str, Any]:
            # Decided in the transaction: of two first passwords (two
            # processes on one PostgreSQL), the one committed first stays.
            return record if bound is None else bound

        d: Deferred[Any] = self.state.change(
            [RecordUpdate(DEVICE_SECRET_RECORD, serial, firstWins)]
        )
        d.addBoth(done)
