# -*- test-case-name: tests.test_membership -*-
"""
Which devices see which user and structure buckets (PROTOCOL.md §10.5, §13).

A device sees its own scope, its structure and, once claimed, its owner's
user bucket. Who owns what is a record in the store; this module keeps an
index of it, built at start and kept current from the store's change feed,
so finding the devices a structure change goes to is a lookup, not a scan
of every device. A change committed by any writer (another process
included) reaches the index the same way.
"""

from __future__ import annotations

from attrs import define, field
from zope.interface import Interface, implementer

from . import buckets as rules
from .buckets import GLOBAL_TYPES, SERIAL_KEYED_TYPES
from .model import Commit
from .store import IBucketStore

#: Scope of the buckets no single device owns (structures, users).
GLOBAL_SCOPE = ""
#: How the structure id of a device nobody has claimed begins. Each such
#: device has a structure of its own, C{structure.unpaired-<serial>}: the
#: anchor puts them all in C{structure.default} (PROTOCOL.md §10.5), so eco
#: set on one is set on every unclaimed thermostat in reach. No owner's
#: structure id begins so: pairing refuses such user ids
#: (L{isReservedStructureId}).
UNPAIRED_STRUCTURE_PREFIX = "unpaired-"
#: Record kind naming the user that claimed a serial: C{{"user": ...}}.
OWNER_RECORD = "owner"


def structureIdFor(userId: str) -> str:
    """An owner's structure id: the user id without a C{user_} prefix (§10.5)."""
    return userId.removeprefix("user_")


def unpairedStructureKey(serial: str) -> str:
    """The structure of C{serial} while nobody has claimed it."""
    return f"structure.{UNPAIRED_STRUCTURE_PREFIX}{serial}"


def isReservedStructureId(structureId: str) -> bool:
    """
    Whether C{structureId} could be an unclaimed device's, in any case, so
    that no user's structure can be taken for one.
    """
    return structureId.lower().startswith(UNPAIRED_STRUCTURE_PREFIX)


def deviceMember(serial: str) -> str:
    """
    How a structure's C{devices} names a device: as its device bucket key,
    which is what the Nest cloud itself sent (PROTOCOL.md §10.5, §18 item 10;
    the bare serial is the anchor's choice).
    """
    return f"device.{serial}"


class IMembership(Interface):
    """Who owns which device, and which devices see which bucket."""

    def ownerOf(serial: str) -> str | None:
        """The user id that claimed C{serial}, if any."""

    def structureKey(serial: str) -> str:
        """The key of the structure C{serial} belongs to."""

    def linkedKeys(serial: str) -> list[str]:
        """The buckets outside its own scope that C{serial} may read."""

    def scopeFor(serial: str, key: str) -> str | None:
        """Where C{key} lives for C{serial}, or C{None} when it may not touch it."""

    def devicesSeeing(scope: str, key: str) -> list[str]:
        """The devices that receive a change of C{key} in C{scope}."""

    def knownSerials() -> list[str]:
        """Every device with buckets or an owner, sorted."""

    def isKnown(serial: str) -> bool:
        """Whether C{serial} is one of L{knownSerials}."""


@implementer(IMembership)
@define
class Membership:
    """
    L{IMembership} read from a store's owner records and scopes, indexed.

    Build it with L{following}, which also keeps it current.
    """

    store: IBucketStore
    #: Each known device's linked keys.
    _links: dict[str, tuple[str, ...]] = field(factory=dict, init=False, repr=False)
    #: Each linked key's devices.
    _seers: dict[str, set[str]] = field(factory=dict, init=False, repr=False)

    @classmethod
    def following(cls, store: IBucketStore) -> Membership:
        """The membership of C{store}'s devices, kept current from its feed."""
        membership = cls(store)
        for serial in {*store.scopes(), *store.records(OWNER_RECORD)}:
            membership._relink(serial)
        store.listen(membership.apply)
        return membership

    def apply(self, commit: Commit) -> None:
        """Re-index the devices whose scope or owner C{commit} changed."""
        # A bucket written to a known device changes nothing here: only a
        # device's first bucket, a deletion or an owner change can.
        touched = {
            change.scope
            for change in commit.buckets
            if change.bucket is None or change.scope not in self._links
        }
        touched.update(
            change.name for change in commit.records if change.kind == OWNER_RECORD
        )
        for serial in touched:
            self._relink(serial)

    def ownerOf(self, serial: str) -> str | None:
        record = self.store.record(OWNER_RECORD, serial)
        return None if record is None else str(record["user"])

    def structureKey(self, serial: str) -> str:
        owner = self.ownerOf(serial)
        if owner is None:
            return unpairedStructureKey(serial)
        return f"structure.{structureIdFor(owner)}"

    def linkedKeys(self, serial: str) -> list[str]:
        owner = self.ownerOf(serial)
        keys = [self.structureKey(serial)]
        if owner is not None:
            keys.append(f"user.{owner}")
        return keys

    def scopeFor(self, serial: str, key: str) -> str | None:
        """
        Where C{key} lives for device C{serial}, or C{None} when that device
        may not touch it: another device's serial-keyed bucket, or a user or
        structure it is not linked to.
        """
        bucketType, bucketId = rules.splitKey(key)
        if bucketType in GLOBAL_TYPES:
            return GLOBAL_SCOPE if key in self.linkedKeys(serial) else None
        if bucketType in SERIAL_KEYED_TYPES and bucketId != serial:
            return None
        return serial

    def devicesSeeing(self, scope: str, key: str) -> list[str]:
        if scope != GLOBAL_SCOPE:
            return [scope]
        return sorted(self._seers.get(key, ()))

    def knownSerials(self) -> list[str]:
        return sorted(self._links)

    def isKnown(self, serial: str) -> bool:
        return serial in self._links

    def _relink(self, serial: str) -> None:
        if serial == GLOBAL_SCOPE:
            return
        for key in self._links.pop(serial, ()):
            seers = self._seers[key]
            seers.discard(serial)
            if not seers:
                del self._seers[key]
        known = bool(self.store.buckets(serial)) or self.ownerOf(serial) is not None
        if not known:
            return
        links = tuple(self.linkedKeys(serial))
        self._links[serial] = links
        for key in links:
            self._seers.setdefault(key, set()).add(serial)
