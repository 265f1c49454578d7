# -*- test-case-name: tests.test_transport -*-
"""
DeviceState: the one place where buckets change.

Changes come from a device (subscribe, put), from a user (control commands)
and from pairing. Each is applied to the store, awaited until durable, and
told to the hub when a device must see it. Which device may touch which
bucket is decided here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from . import buckets as rules
from .buckets import Bucket
from .debuglog import SwitchedLogger
from .errors import TooManyBuckets
from .membership import GLOBAL_SCOPE, IMembership, deviceMember
from .model import ClientObject, PutEntry
from .presence import IPresence
from .store import BucketUpdate, Decide, IBucketStore, RecordWrite, ScopeDelete, Write

#: Buckets one device may hold: the firmware knows 28 types, a few of them
#: (where, message, kryptonite, custom_schedule) with several ids each.
MAX_BUCKETS_PER_DEVICE = 256


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
    Decides every change to buckets and hands it to the store, which
    commits it and announces it on its feed; who sees a change is the
    feed's consumers' business.
    """

    log = SwitchedLogger()

    store: IBucketStore
    membership: IMembership
    presence: IPresence
    clock: IReactorTime
    #: Serials that have had their structure since this process started
    #: (PROTOCOL.md §6.2 step 6: forced once per process).
    _structureSent: set[str] = field(factory=set, init=False)

    def nowMs(self) -> int:
        return int(self.clock.seconds() * 1000)

    def bucket(self, serial: str, key: str) -> Bucket | None:
        """C{key} as device C{serial} sees it, or C{None}."""
        scope = self.membership.scopeFor(serial, key)
        return None if scope is None else self.store.get(scope, key)

    def listing(self, serial: str) -> list[Bucket]:
        """Every bucket C{serial} sees: its own, then its structure's and user."""
        linked = [
            self.store.get(GLOBAL_SCOPE, key)
            for key in self.membership.linkedKeys(serial)
        ]
        return self.store.buckets(serial) + [b for b in linked if b is not None]

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

        The decision is made once the subscribe's own writes are committed,
        in the same turn in which the caller holds the subscribe, so a
        change committed meanwhile is either in the answer or pushed to the
        hold.
        """
        self.presence.touch(serial)
        writes: list[Write] = []
        clientTimestamps: dict[str, int] = {}
        limit = self._bucketLimit(serial)
        for entry in objects:
            scope = self.membership.scopeFor(serial, entry.key)
            if scope is None:
                self.log.warn(
                    "{serial} subscribed to {key}, which is not its own",
                    serial=serial,
                    key=entry.key,
                )
                continue
            clientTimestamps[entry.key] = entry.timestamp
            if entry.value is not None:
                decide = self._subscribeEntry(entry, weaveDeviceId)
                writes.append(BucketUpdate(scope, entry.key, limit(scope, decide)))
        writes.extend(self._ensureLinked(serial))

        def answer(ignored: object) -> SubscribeOutcome:
            return SubscribeOutcome(
                self._newerFor(serial, clientTimestamps),
                lambda kept: self._replayable(serial, clientTimestamps, kept),
            )

        return self.store.write(writes, origin=serial).addCallback(answer)

    def _subscribeEntry(self, entry: ClientObject, weaveDeviceId: str | None) -> Decide:
        value = entry.value or {}

        def decide(stored: Bucket | None, nowMs: int) -> Bucket | None:
            before = stored or rules.empty(entry.key)
            after = before
            if (
                after.type == "shared"
                and value.get("target_change_pending") is False
                and after.value.get("target_change_pending") is True
            ):
                after = rules.clearPendingChange(after)
            if entry.isInlineUpdate:
                # An inline update does not move the timestamp when nothing
                # changed (PROTOCOL.md §18 item 21: the anchor's subscribe
                # path does, which resends unchanged buckets; its put path
                # does not).
                after = rules.merge(
                    after, self._deviceFields(after, value, weaveDeviceId), nowMs
                )
            elif entry.timestamp > after.timestamp:
                after = rules.adopt(after, value, entry.revision, entry.timestamp)
            return stored if after is before else after

        return decide

    def _deviceFields(
        self, stored: Bucket, fields: Mapping[str, Any], weaveDeviceId: str | None
    ) -> Mapping[str, Any]:
        # The Weave id is a property of the device, recorded on its device
        # bucket only (PROTOCOL.md §2.1; the anchor writes it everywhere).
        if weaveDeviceId and stored.type == "device":
            return {**fields, "weave_device_id": weaveDeviceId}
        return fields

    def _ensureLinked(self, serial: str) -> list[Write]:
        """
        A claimed device's user and structure buckets, created when missing
        (PROTOCOL.md §6.2 step 6, §13).
        """
        owner = self.membership.ownerOf(serial)
        if owner is None:
            return []
        return [
            BucketUpdate(GLOBAL_SCOPE, key, _createdWith(key, value))
            for key, value in (
                (f"user.{owner}", {"name": owner}),
                (
                    self.membership.structureKey(serial),
                    {"name": "Home", "devices": [deviceMember(serial)]},
                ),
            )
            if self.store.get(GLOBAL_SCOPE, key) is None
        ]

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
        structureKey = self.membership.structureKey(serial)
        for key in self.membership.linkedKeys(serial):
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

    def _bucketLimit(self, serial: str) -> Callable[[str, Decide], Decide]:
        """
        Wraps the decisions of one device request so that, together, they
        create no more than L{MAX_BUCKETS_PER_DEVICE} buckets in the device's
        scope: a device names its own buckets, so without a bound one client
        could grow the store without end. Refused inside the transaction, so
        the whole request changes nothing.
        """
        created: set[str] = set()

        def limited(scope: str, decide: Decide) -> Decide:
            if scope != serial:
                return decide

            def checked(stored: Bucket | None, nowMs: int) -> Bucket | None:
                after = decide(stored, nowMs)
                if stored is None and after is not None:
                    created.add(after.key)
                    if len(self.store.buckets(serial)) + len(created) > (
                        MAX_BUCKETS_PER_DEVICE
                    ):
                        raise TooManyBuckets(
                            f"a device holds at most {MAX_BUCKETS_PER_DEVICE} buckets"
                        )
                return after

            return checked

        return limited

    def put(
        self, serial: str, entries: Sequence[PutEntry], weaveDeviceId: str | None = None
    ) -> Deferred[list[Bucket]]:
        """
        Merge a device's put (PROTOCOL.md §7.2) and fire, once durable, with
        one receipt per bucket the device may write, in request order.

        Each entry's C{if_object_revision} is checked inside the transaction;
        a refused entry's receipt is the stored bucket. An entry naming a
        bucket named before builds on that earlier entry. The device's own
        subscribes are not pushed what it put (the stale-echo hazard of §12).
        """
        self.presence.touch(serial)
        writes: list[Write] = []
        #: Entries whose if_object_revision was refused, with our revision.
        refused: list[tuple[PutEntry, int]] = []
        limit = self._bucketLimit(serial)
        for entry in entries:
            scope = self.membership.scopeFor(serial, entry.key)
            if scope is None:
                self.log.warn(
                    "{serial} put {key}, which is not its own",
                    serial=serial,
                    key=entry.key,
                )
                continue
            decide = self._putEntry(entry, weaveDeviceId, refused)
            writes.append(BucketUpdate(scope, entry.key, limit(scope, decide)))

        def receipts(results: list[Bucket | None]) -> list[Bucket]:
            # Logged here, on the reactor thread, not where it was decided
            # (an engine may decide in its database thread).
            for entry, ours in refused:
                self.log.debug(
                    "{serial} put {key} at revision {theirs}, ours is {ours}",
                    serial=serial,
                    key=entry.key,
                    theirs=entry.ifRevision,
                    ours=ours,
                )
            return [
                bucket or rules.empty(write.key)
                for write, bucket in zip(writes, results, strict=True)
                if isinstance(write, BucketUpdate)
            ]

        return self.store.write(writes, origin=serial).addCallback(receipts)

    def _putEntry(
        self,
        entry: PutEntry,
        weaveDeviceId: str | None,
        refused: list[tuple[PutEntry, int]],
    ) -> Decide:
        def decide(stored: Bucket | None, nowMs: int) -> Bucket | None:
            before = stored or rules.empty(entry.key)
            fields = self._deviceFields(before, entry.fields, weaveDeviceId)
            after, conflict = rules.conditionalMerge(
                before, fields, entry.ifRevision, nowMs
            )
            if conflict:
                refused.append((entry, before.revision))
            return stored if after is before else after

        return decide

    # Changes from users and pairing

    def change(self, writes: Sequence[Write]) -> Deferred[list[Bucket | None]]:
        """
        Commit a change that is not a device's own (a command, pairing): one
        transaction, announced to every device and client that sees it.

        @return: fires once durable with, per write, the bucket after it.
        """
        return self.store.write(writes)

    def removeDevice(
        self,
        serial: str,
        structures: Sequence[Write],
        records: Sequence[RecordWrite],
    ) -> Deferred[None]:
        """
        Forget C{serial}: every bucket of its scope and C{records} (its owner,
        its entry key) in one transaction, with C{structures} (its owner's
        structure without it, for the devices still in it; the one it had
        on its own, deleted).
        """
        writes: list[Write] = [ScopeDelete(serial), *structures]
        writes.extend(records)
        self.presence.forget(serial)
        self._structureSent.discard(serial)
        return self.store.write(writes).addCallback(lambda ignored: None)


def _createdWith(key: str, value: Mapping[str, Any]) -> Decide:
    """Create C{key} with C{value} unless it exists by then."""

    def decide(stored: Bucket | None, nowMs: int) -> Bucket | None:
        if stored is not None:
            return stored
        return rules.changed(rules.empty(key), value, nowMs)

    return decide
