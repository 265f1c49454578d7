# -*- test-case-name: tests.test_transport -*-
"""
DeviceState: the one place where buckets change.

Changes come from a device (subscribe, put), from a user (control commands)
and from pairing. Each is applied to the store, awaited until durable, and
told to the hub when a device must see it. Which device may touch which
bucket is decided here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from . import buckets as rules
from .buckets import GLOBAL_TYPES, SERIAL_KEYED_TYPES, Bucket
from .device.wire import ClientObject, PutEntry
from .errors import TooManyBuckets
from .hub import SubscriberHub
from .store import BucketWrite, IBucketStore, RecordWrite, Write

#: Scope of the buckets no single device owns (structures, users).
GLOBAL_SCOPE = ""
#: Structure of every device nobody has claimed (PROTOCOL.md §10.5).
DEFAULT_STRUCTURE_ID = "default"
OWNER_RECORD = "owner"
#: Buckets one device may hold: the firmware knows 28 types, a few of them
#: (where, message, kryptonite, custom_schedule) with several ids each.
MAX_BUCKETS_PER_DEVICE = 256


def structureIdFor(userId: str) -> str:
    """An owner's structure id: the user id without a C{user_} prefix (§10.5)."""
    return userId.removeprefix("user_")


@frozen
class SubscribeOutcome:
    """
    What a subscribe answers at once: C{buckets} newer than the device's
    copies (empty when the subscribe is to be held), and C{replayFilter}
    for pushes an earlier subscribe of the device missed.
    """

    buckets: list[Bucket]
    replayFilter: Callable[[Sequence[Bucket]], list[Bucket]]


@define
class DeviceState:
    """
    Applies every change to buckets, persists it, and wakes the devices
    that must see it.
    """

    log = Logger()

    store: IBucketStore
    hub: SubscriberHub
    clock: IReactorTime
    #: Serials that have had their structure since this process started
    #: (PROTOCOL.md §6.2 step 6: forced once per process).
    _structureSent: set[str] = field(factory=set, init=False)
    #: Server time (s) of each device's last request: availability.
    lastSeen: dict[str, float] = field(factory=dict, init=False)
    #: The fields of each device's last entry request (model, firmware...).
    entryFields: dict[str, dict[str, str]] = field(factory=dict, init=False)
    #: Called with a serial once a change that device sees is durable (the
    #: control API's event stream); a listener must not raise.
    changeListeners: list[Callable[[str], None]] = field(factory=list, init=False)

    def nowMs(self) -> int:
        return int(self.clock.seconds() * 1000)

    # Who may see what

    def ownerOf(self, serial: str) -> str | None:
        """The user id that claimed C{serial}, if any."""
        record = self.store.record(OWNER_RECORD, serial)
        return None if record is None else str(record["user"])

    def structureKey(self, serial: str) -> str:
        """The key of the structure C{serial} belongs to."""
        owner = self.ownerOf(serial)
        structureId = DEFAULT_STRUCTURE_ID if owner is None else structureIdFor(owner)
        return f"structure.{structureId}"

    def linkedKeys(self, serial: str) -> list[str]:
        """The buckets outside its own that C{serial} may read."""
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

    def knownSerials(self) -> list[str]:
        """Every device with buckets or an owner."""
        serials = set(self.store.scopes()) | set(self.store.records(OWNER_RECORD))
        serials.discard(GLOBAL_SCOPE)
        return sorted(serials)

    def isKnown(self, serial: str) -> bool:
        """
        Whether C{serial} is one of L{knownSerials}, found without listing
        every device: commands and removals ask this once per request.
        """
        if serial == GLOBAL_SCOPE:
            return False
        return bool(self.store.buckets(serial)) or (
            self.store.record(OWNER_RECORD, serial) is not None
        )

    def devicesSeeing(self, scope: str, key: str) -> list[str]:
        """The devices that receive a change of C{key} in C{scope}."""
        if scope != GLOBAL_SCOPE:
            return [scope]
        return [
            serial for serial in self.knownSerials() if key in self.linkedKeys(serial)
        ]

    def bucket(self, serial: str, key: str) -> Bucket | None:
        """C{key} as device C{serial} sees it, or C{None}."""
        scope = self.scopeFor(serial, key)
        return None if scope is None else self.store.get(scope, key)

    def listing(self, serial: str) -> list[Bucket]:
        """Every bucket C{serial} sees: its own, then its structure's and user."""
        linked = [self.store.get(GLOBAL_SCOPE, key) for key in self.linkedKeys(serial)]
        return self.store.buckets(serial) + [b for b in linked if b is not None]

    def touch(self, serial: str) -> None:
        """Note that C{serial} was heard from now."""
        self.lastSeen[serial] = self.clock.seconds()

    def noteEntry(self, serial: str, fields: Mapping[str, str]) -> None:
        """Remember what C{serial} said of itself when it last booted."""
        self.touch(serial)
        self.entryFields[serial] = dict(fields)

    # Changes from a device

    def subscribe(
        self,
        serial: str,
        objects: Sequence[ClientObject],
        weaveDeviceId: str | None = None,
    ) -> Deferred[SubscribeOutcome]:
        """
        Apply what a subscribe carries (PROTOCOL.md §6.2) and decide what
        the device gets at once.

        The decision is made after the subscribe's own writes are durable,
        in the same turn in which the caller holds the subscribe, so a
        change made meanwhile is either in the answer or pushed to the hold.
        """
        self.touch(serial)
        nowMs = self.nowMs()
        writes: list[Write] = []
        clientTimestamps: dict[str, int] = {}
        for entry in objects:
            scope = self.scopeFor(serial, entry.key)
            if scope is None:
                self.log.warn(
                    "{serial} subscribed to {key}, which is not its own",
                    serial=serial,
                    key=entry.key,
                )
                continue
            clientTimestamps[entry.key] = entry.timestamp
            stored = self.store.get(scope, entry.key) or rules.empty(entry.key)
            updated = self._applySubscribeEntry(stored, entry, nowMs, weaveDeviceId)
            if updated is not stored:
                writes.append(BucketWrite(scope, updated))
        self._checkBucketLimit(serial, writes)
        writes.extend(self._ensureLinked(serial, nowMs))

        def decide(ignored: None) -> SubscribeOutcome:
            if writes:
                self.notifyChanged([serial])
            return SubscribeOutcome(
                self._newerFor(serial, clientTimestamps),
                lambda kept: self._replayable(serial, clientTimestamps, kept),
            )

        return self.store.write(writes).addCallback(decide)

    def _applySubscribeEntry(
        self,
        stored: Bucket,
        entry: ClientObject,
        nowMs: int,
        weaveDeviceId: str | None,
    ) -> Bucket:
        if entry.value is None:
            return stored
        if (
            stored.type == "shared"
            and entry.value.get("target_change_pending") is False
            and stored.value.get("target_change_pending") is True
        ):
            stored = rules.clearPendingChange(stored)
        if entry.isInlineUpdate:
            # An inline update does not move the timestamp when nothing
            # changed (PROTOCOL.md §18 item 21: the anchor's subscribe path
            # does, which resends unchanged buckets; its put path does not).
            return rules.merge(
                stored, self._deviceFields(stored, entry.value, weaveDeviceId), nowMs
            )
        if entry.timestamp > stored.timestamp:
            return rules.adopt(stored, entry.value, entry.revision, entry.timestamp)
        return stored

    def _deviceFields(
        self, stored: Bucket, fields: Mapping[str, Any], weaveDeviceId: str | None
    ) -> Mapping[str, Any]:
        # The Weave id is a property of the device, recorded on its device
        # bucket only (PROTOCOL.md §2.1; the anchor writes it everywhere).
        if weaveDeviceId and stored.type == "device":
            return {**fields, "weave_device_id": weaveDeviceId}
        return fields

    def _ensureLinked(self, serial: str, nowMs: int) -> list[Write]:
        """
        A claimed device's user and structure buckets, created when missing
        (PROTOCOL.md §6.2 step 6, §13).
        """
        owner = self.ownerOf(serial)
        if owner is None:
            return []
        writes: list[Write] = []
        userKey = f"user.{owner}"
        if self.store.get(GLOBAL_SCOPE, userKey) is None:
            user = rules.changed(rules.empty(userKey), {"name": owner}, nowMs)
            writes.append(BucketWrite(GLOBAL_SCOPE, user))
        structureKey = self.structureKey(serial)
        structure = self.store.get(GLOBAL_SCOPE, structureKey)
        member = deviceMember(serial)
        if structure is None:
            structure = rules.changed(
                rules.empty(structureKey), {"name": "Home", "devices": [member]}, nowMs
            )
            writes.append(BucketWrite(GLOBAL_SCOPE, structure))
        return writes

    def _newerFor(
        self, serial: str, clientTimestamps: Mapping[str, int]
    ) -> list[Bucket]:
        """
        The buckets of C{serial} newer than the device's copies, the linked
        ones included: a linked bucket the device did not name counts as
        timestamp 0, and the structure goes once per process regardless.
        """
        newer: list[Bucket] = []
        for key, clientTimestamp in clientTimestamps.items():
            current = self.bucket(serial, key) or rules.empty(key)
            if rules.serverIsNewer(clientTimestamp, current.timestamp):
                newer.append(current)
        structureKey = self.structureKey(serial)
        for key in self.linkedKeys(serial):
            linked = self.store.get(GLOBAL_SCOPE, key)
            if linked is None or linked in newer:
                continue
            forced = key == structureKey and serial not in self._structureSent
            if key not in clientTimestamps or forced:
                newer.append(linked)
        if any(bucket.key == structureKey for bucket in newer):
            self._structureSent.add(serial)
        return newer

    def _replayable(
        self, serial: str, clientTimestamps: Mapping[str, int], kept: Sequence[Bucket]
    ) -> list[Bucket]:
        """
        Of pushes an earlier subscribe missed, the current copies this
        subscribe's device does not hold yet. Sending the current copy, not
        the kept one, never moves the device back to an older value.
        """
        replay = []
        for missed in kept:
            current = self.bucket(serial, missed.key)
            if current is not None and rules.serverIsNewer(
                clientTimestamps.get(missed.key, 0), current.timestamp
            ):
                replay.append(current)
        return replay

    def _checkBucketLimit(self, serial: str, writes: Sequence[Write]) -> None:
        """
        Refuse a device's change that would give it more than
        L{MAX_BUCKETS_PER_DEVICE} buckets: a device names its own buckets, so
        without a bound one client could grow the store without end.

        @raise TooManyBuckets: before anything is written.
        """
        created = {
            one.bucket.key
            for one in writes
            if isinstance(one, BucketWrite)
            and one.scope == serial
            and self.store.get(serial, one.bucket.key) is None
        }
        if (
            created
            and len(self.store.buckets(serial)) + len(created) > MAX_BUCKETS_PER_DEVICE
        ):
            raise TooManyBuckets(
                f"a device holds at most {MAX_BUCKETS_PER_DEVICE} buckets"
            )

    def put(
        self, serial: str, entries: Sequence[PutEntry], weaveDeviceId: str | None = None
    ) -> Deferred[list[Bucket]]:
        """
        Merge a device's put (PROTOCOL.md §7.2) and fire, once durable, with
        one receipt per bucket the device may write, in request order.

        Nothing is pushed: the device already has what it put, and pushing
        shared on a put is the stale-echo hazard of §12.
        """
        self.touch(serial)
        nowMs = self.nowMs()
        writes: list[Write] = []
        receipts: list[Bucket] = []
        # A bucket named twice builds on its first entry: each receipt is
        # then true, and the last one is what is stored.
        updates: dict[tuple[str, str], Bucket] = {}
        for entry in entries:
            scope = self.scopeFor(serial, entry.key)
            if scope is None:
                self.log.warn(
                    "{serial} put {key}, which is not its own",
                    serial=serial,
                    key=entry.key,
                )
                continue
            stored = (
                updates.get((scope, entry.key))
                or self.store.get(scope, entry.key)
                or rules.empty(entry.key)
            )
            fields = self._deviceFields(stored, entry.fields, weaveDeviceId)
            updated, conflict = rules.conditionalMerge(
                stored, fields, entry.ifRevision, nowMs
            )
            if conflict:
                self.log.info(
                    "{serial} put {key} at revision {theirs}, ours is {ours}",
                    serial=serial,
                    key=entry.key,
                    theirs=entry.ifRevision,
                    ours=stored.revision,
                )
            elif updated is not stored:
                writes.append(BucketWrite(scope, updated))
                updates[scope, entry.key] = updated
            receipts.append(updated)
        self._checkBucketLimit(serial, writes)

        def written(ignored: None) -> list[Bucket]:
            if writes:
                self.notifyChanged([serial])
            return receipts

        return self.store.write(writes).addCallback(written)

    # Changes from users and pairing

    def change(
        self,
        scope: str,
        bucketsNow: Callable[[int], Iterable[Bucket]],
        records: Iterable[RecordWrite] = (),
    ) -> Deferred[list[Bucket]]:
        """
        Apply a change that is not a device's own, then push it.

        @param bucketsNow: called with the time (ms) once, returns the new
            versions of the buckets to write in C{scope}.
        @param records: record writes committed in the same transaction.
        @return: fires with the written buckets once durable and pushed to
            every device that sees them.
        """
        written = list(bucketsNow(self.nowMs()))
        writes: list[Write] = [BucketWrite(scope, bucket) for bucket in written]
        writes.extend(records)

        def pushWritten(ignored: None) -> list[Bucket]:
            self.pushToDevices(scope, written)
            self.notifyChanged(
                serial
                for bucket in written
                for serial in self.devicesSeeing(scope, bucket.key)
            )
            return written

        return self.store.write(writes).addCallback(pushWritten)

    def removeDevice(
        self, serial: str, structure: Bucket | None, records: Iterable[RecordWrite]
    ) -> Deferred[None]:
        """
        Forget C{serial}: every bucket of its scope and C{records} (its owner,
        its entry key) in one transaction, with C{structure} (its structure
        without it) written and pushed to the devices still in it.
        """
        writes: list[Write] = [
            BucketWrite(serial, bucket, delete=True)
            for bucket in self.store.buckets(serial)
        ]
        if structure is not None:
            writes.append(BucketWrite(GLOBAL_SCOPE, structure))
        writes.extend(records)
        self.lastSeen.pop(serial, None)
        self.entryFields.pop(serial, None)
        self._structureSent.discard(serial)

        def removed(ignored: None) -> None:
            if structure is not None:
                self.pushToDevices(GLOBAL_SCOPE, [structure])
            self.notifyChanged([serial])

        return self.store.write(writes).addCallback(removed)

    def notifyChanged(self, serials: Iterable[str]) -> None:
        """Tell the change listeners, once per serial, in order."""
        for serial in dict.fromkeys(serials):
            for listener in list(self.changeListeners):
                try:
                    listener(serial)
                except Exception:
                    self.log.failure(
                        "change listener failed for {serial}", serial=serial
                    )

    def pushToDevices(self, scope: str, written: Sequence[Bucket]) -> None:
        """Push the current copies of C{written} to every device seeing them."""
        byDevice: dict[str, list[Bucket]] = {}
        for bucket in written:
            for serial in self.devicesSeeing(scope, bucket.key):
                byDevice.setdefault(serial, []).append(bucket)
        for serial, batch in byDevice.items():
            self.hub.push(serial, batch)


def deviceMember(serial: str) -> str:
    """
    How a structure's C{devices} names a device: as its device bucket key,
    which is what the Nest cloud itself sent (PROTOCOL.md §10.5, §18 item 10;
    the bare serial is the anchor's choice).
    """
    return f"device.{serial}"
