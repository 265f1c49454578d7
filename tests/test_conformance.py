# -*- test-case-name: tests.test_conformance -*-
"""
A stateful model of bucket versioning (PROTOCOL.md §6, §7, §11, §12)
checked against the whole server.

L{ConformanceMachine} runs a real server (a SQLite file in a temporary
directory, a L{Clock}, the device resource through StubTreq) and simulated
thermostats that boot, subscribe with what they believe, put changes, get
pushes from control commands, drop connections, and see the server restart.
Beside it, L{Model} states §11's rules in plain Python; after every step the
server must agree with it and with the invariants listed on the machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from os.path import join
from typing import Any

import treq
from attrs import define, field
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from nestproto import buckets
from nestproto.buckets import INT32_MAX, INT32_MIN, SERIAL_KEYED_TYPES
from nestproto.fields import NUMERIC_FIELDS
from nestproto.membership import OWNER_RECORD
from nestproto.store import BucketUpdate, RecordWrite

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    SERIAL,
    Server,
    basicAuth,
    clientObject,
    makeServer,
)
from .strategies import (
    FORMS,
    PUT_META_KEYS,
    SUBSCRIBE_FORMS,
    bucketKeys,
    commandChanges,
    controlCommands,
    deviceValues,
    putDocument,
    putEntries,
    serials,
    subscribeDocument,
    subscribeEntries,
)
from .strategies import (
    buckets as bucketStrategy,
)

HOLD_SECONDS = 290.0
#: Subscribes a device may hold at once: the server's 100, made small
#: so that the limit is reached (PROTOCOL.md §6.4, §19 scenario 29).
MAX_HELD = 4
BATCH_SECONDS = 3.0
USER = "homeowner"
OBJECT_FIELDS = ["object_revision", "object_timestamp", "object_key", "value"]
RECEIPT_FIELDS = ["object_revision", "object_timestamp", "object_key"]
#: Fields whose presence in an immediate answer asks the device to put dial
#: changes at once for a while (PROTOCOL.md §6.3). Stated again rather than
#: imported from wire.py: the model must not inherit the server's mistakes.
SETPOINT_FIELDS = frozenset(
    {
        "target_temperature",
        "target_temperature_high",
        "target_temperature_low",
        "target_temperature_type",
        "hvac_mode",
    }
)
#: Time steps: inside and at the edges of the batch window and the hold.
STEPS = (0.001, 0.5, 1.0, 2.999, 3.0, 10.0, 100.0, 289.999, 290.0, 300.0)


class ConformanceError(AssertionError):
    """The server broke one of the machine's invariants; the message names it."""


def check(condition: object, invariant: str, detail: object = "") -> None:
    """Raise L{ConformanceError} naming C{invariant} unless C{condition}."""
    if not condition:
        raise ConformanceError(f"{invariant}: {detail}")


# The model: PROTOCOL.md §11 in plain Python


@define
class Copy:
    """A bucket as the model, or a device, holds it."""

    revision: int
    timestamp: int
    value: dict[str, Any]

    @classmethod
    def fromWire(cls, obj: Mapping[str, Any]) -> Copy:
        return cls(obj["object_revision"], obj["object_timestamp"], obj["value"])


PLACEHOLDER = Copy(0, 0, {})


def afterChange(copy: Copy, value: dict[str, Any], nowMs: int) -> Copy:
    """
    A change to C{copy} at C{nowMs} (§11.1): the revision moves by one,
    wrapping within int32, and the timestamp to now, or just past the old
    one when now is not later (a device compares timestamps only).
    """
    revision = INT32_MIN if copy.revision == INT32_MAX else copy.revision + 1
    return Copy(revision, max(nowMs, copy.timestamp + 1), value)


@define
class Model:
    """
    What the server must hold: buckets by (scope, key), owners, and which
    devices had their structure since the process started (§6.2 step 6).
    """

    buckets: dict[tuple[str, str], Copy] = field(factory=dict)
    owners: dict[str, str] = field(factory=dict)
    structureSent: set[str] = field(factory=set)

    def structureKey(self, serial: str) -> str:
        """
        An owned device's is its owner's; an unowned one has its own, so eco
        on one unowned device is not eco on all.
        """
        owner = self.owners.get(serial)
        return f"structure.unpaired-{serial}" if owner is None else f"structure.{owner}"

    def linked(self, serial: str) -> list[str]:
        owner = self.owners.get(serial)
        keys = [self.structureKey(serial)]
        if owner is not None:
            keys.append(f"user.{owner}")
        return keys

    def scopeFor(self, serial: str, key: str) -> str | None:
        """A device touches its own buckets and those it is linked to."""
        bucketType, bucketId = key.split(".", 1)
        if bucketType in ("structure", "user"):
            return "" if key in self.linked(serial) else None
        if bucketType in SERIAL_KEYED_TYPES and bucketId != serial:
            return None
        return serial

    def view(self, serial: str, key: str) -> Copy | None:
        scope = self.scopeFor(serial, key)
        return None if scope is None else self.buckets.get((scope, key))

    def known(self) -> set[str]:
        return {scope for scope, key in self.buckets if scope} | set(self.owners)

    def devicesSeeing(self, scope: str, key: str) -> list[str]:
        if scope:
            return [scope]
        return sorted(s for s in self.known() if key in self.linked(s))

    def subscribe(
        self,
        serial: str,
        entries: Sequence[tuple[str, int, int, dict[str, Any] | None]],
        nowMs: int,
    ) -> dict[str, Copy]:
        """
        Apply a subscribe's entries (§6.2) and return what is answered at
        once, by key.
        """
        announced: dict[str, int] = {}
        for key, revision, timestamp, value in entries:
            scope = self.scopeFor(serial, key)
            if scope is None:
                continue
            announced[key] = timestamp
            if value is None:
                continue
            stored = self.buckets.get((scope, key))
            current = stored or PLACEHOLDER
            new = current
            if (
                key.startswith("shared.")
                and value.get("target_change_pending") is False
                and current.value.get("target_change_pending") is True
            ):
                # The acknowledgement of a setpoint push keeps rev/ts (§11.6).
                new = Copy(
                    current.revision,
                    current.timestamp,
                    {**current.value, "target_change_pending": False},
                )
            if revision == 0 and timestamp == 0:
                # Inline update (§11.4).
                merged = {**new.value, **value}
                if merged != new.value:
                    new = afterChange(new, merged, nowMs)
            elif timestamp > new.timestamp:
                # The device is ahead: its copy is adopted (§6.2 step 5).
                new = Copy(
                    max(revision, new.revision), timestamp, {**new.value, **value}
                )
            if new is not current:
                self.buckets[scope, key] = new
        owner = self.owners.get(serial)
        if owner is not None:
            created: list[tuple[str, dict[str, Any]]] = [
                (f"user.{owner}", {"name": owner}),
                (
                    self.structureKey(serial),
                    {"name": "Home", "devices": [f"device.{serial}"]},
                ),
            ]
            for key, initial in created:
                if ("", key) not in self.buckets:
                    self.buckets["", key] = afterChange(PLACEHOLDER, initial, nowMs)
        answer: dict[str, Copy] = {}
        for key, clientTimestamp in announced.items():
            current = self.view(serial, key) or PLACEHOLDER
            if clientTimestamp == 0 or current.timestamp > clientTimestamp:
                answer[key] = current
        structureKey = self.structureKey(serial)
        for key in self.linked(serial):
            linked = self.buckets.get(("", key))
            if linked is None or key in answer:
                continue
            forced = key == structureKey and serial not in self.structureSent
            if key not in announced or forced:
                answer[key] = linked
        if structureKey in answer:
            self.structureSent.add(serial)
        return answer

    def put(
        self,
        serial: str,
        entries: Sequence[tuple[str, dict[str, Any], int | None]],
        nowMs: int,
    ) -> list[tuple[str, Copy, bool]]:
        """
        Apply a put (§7.2): C{(key, receipt, refused)} per entry the device
        may write, in order. A later entry for the same key builds on the
        earlier one, as if sent in two puts.
        """
        receipts = []
        for key, fields, ifRevision in entries:
            scope = self.scopeFor(serial, key)
            if scope is None:
                continue
            current = self.buckets.get((scope, key)) or PLACEHOLDER
            if ifRevision is not None and ifRevision != current.revision:
                receipts.append((key, current, True))
                continue
            merged = {**current.value, **fields}
            if merged != current.value:
                current = afterChange(current, merged, nowMs)
                self.buckets[scope, key] = current
            receipts.append((key, current, False))
        return receipts

    def command(
        self, scope: str, key: str, fields: dict[str, Any], replaces: bool, nowMs: int
    ) -> Copy:
        """A control command: always moves revision and timestamp (§11.5)."""
        current = self.buckets.get((scope, key)) or PLACEHOLDER
        value = dict(fields) if replaces else {**current.value, **fields}
        self.buckets[scope, key] = afterChange(current, value, nowMs)
        return self.buckets[scope, key]


# Simulated thermostats and their connections


@define
class SimDevice:
    """
    A thermostat: its own buckets and its copies of what the server sent.
    """

    serial: str
    ownKeys: list[str]
    copies: dict[str, Copy] = field(factory=dict)

    def interest(self, model: Model) -> list[str]:
        """Its own buckets, and the linked ones it has received (§10.1)."""
        return self.ownKeys + [k for k in model.linked(self.serial) if k in self.copies]

    def receive(self, key: str, copy: Copy) -> None:
        """Keep the server's copy when newer than ours (§11.3)."""
        mine = self.copies.get(key)
        if mine is None or mine.timestamp == 0 or copy.timestamp > mine.timestamp:
            self.copies[key] = copy


class Body(Protocol):
    """A response body as it arrives; can drop the connection."""

    def __init__(self) -> None:
        self.data = b""
        self.read = 0
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason

    def unread(self) -> bytes:
        fresh, self.read = self.data[self.read :], len(self.data)
        return fresh


@define(eq=False)
class Held:
    """A held subscribe and what the model expects of it."""

    serial: str
    body: Body
    announced: dict[str, int]
    deadline: float
    received: set[tuple[str, int]] = field(factory=set)


def fieldsHeld(value: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """
    Some fields of C{value} with the values they have there: what a device
    re-sends when nothing changed (PROTOCOL.md §19 scenario 35).
    """
    names = sorted(name for name in value if name not in PUT_META_KEYS)
    if not names:
        return st.nothing()
    return st.sets(st.sampled_from(names), min_size=1).map(
        lambda chosen: {name: value[name] for name in sorted(chosen)}
    )


def chunksOf(data: bytes) -> list[bytes]:
    """
    The JSON documents of a stretch of pushed body: each chunk is one
    complete document (PROTOCOL.md §6.4), and several may have arrived.
    """
    decoder = json.JSONDecoder()
    text = data.decode("utf-8")
    chunks = []
    position = 0
    while position < len(text):
        document, end = decoder.raw_decode(text, position)
        chunks.append(text[position:end].encode("utf-8"))
        position = end
    return chunks


def objectsOf(document: bytes, fields: list[str]) -> list[dict[str, Any]]:
    """
    The objects of a JSON answer, each checked to have exactly C{fields}
    in that order (§6.3: revision and timestamp before the key).
    """
    parsed = json.loads(document)
    check(
        isinstance(parsed, dict) and list(parsed) == ["objects"], "answer shape", parsed
    )
    for obj in parsed["objects"]:
        if "value" in obj and fields == RECEIPT_FIELDS:
            check(False, "no value in a put answer", obj)
        check(list(obj) == fields, "field order", list(obj))
    return list(parsed["objects"])


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must have fired, successfully."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    check(outcome, "synchronous answer", d)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class ConformanceMachine(RuleBasedStateMachine):
    """
    Simulated thermostats against a real server, with invariants checked
    after every step:

      - revisions and timestamps never go back, and move only when the
        value changed, except on a command's write (§11.5) and when a
        device's later copy is adopted (§6.2 step 5);
      - the store holds exactly what the model says, across restarts
        (every acknowledged put survives);
      - a device that keeps subscribing converges to the server's buckets;
      - a device never receives a bucket it holds (no spurious resend; the
        structure is force-sent once per process, §6.2 step 6) nor its own
        put back, and never a value in a put answer;
      - objects keep the order revision, timestamp, key, value;
      - a device never sees or changes another device's buckets;
      - the hub holds exactly the live subscribes, and each has exactly
        one pending timer at the time the model expects.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="nestproto-conformance-")
        self.path = join(self.directory, "nestproto.sqlite3")
        self.server: Server = makeServer(path=self.path)
        self.server.hub.maxPerDevice = MAX_HELD
        self.clock = self.server.clock
        self.model = Model()
        self.devices: dict[str, SimDevice] = {}
        self.held: list[Held] = []
        self.history: dict[tuple[str, str], Copy] = {}
        self.movedUnchanged: set[tuple[str, str]] = set()

    def teardown(self) -> None:
        self.server.hub.endAll()
        self.server.deviceClient.flush()
        result(self.server.store.close())
        shutil.rmtree(self.directory, ignore_errors=True)

    # Helpers

    def nowMs(self) -> int:
        return int(self.clock.seconds() * 1000)

    def request(
        self, path: str, document: Mapping[str, Any], serial: str
    ) -> tuple[Any, Body]:
        """POST C{document} as C{serial}; the response and its body so far."""
        client = self.server.deviceClient
        d = client.post(
            DEVICE_URL + path,
            data=json.dumps(document).encode("utf-8"),
            headers=basicAuth(serial),
        )
        client.flush()
        response = result(d)
        body = Body()
        response.deliverBody(body)
        client.flush()
        return response, body

    def addDevice(self, serial: str, extraId: str) -> SimDevice:
        device = SimDevice(
            serial,
            [
                f"device.{serial}",
                f"shared.{serial}",
                f"schedule.{serial}",
                f"where.{extraId}",
            ],
        )
        self.devices[serial] = device
        if self.owned:
            result(
                self.server.store.write(
                    [RecordWrite(OWNER_RECORD, serial, {"user": USER})]
                )
            )
            self.model.owners[serial] = USER
        return device

    def deviceList(self) -> list[SimDevice]:
        return [self.devices[serial] for serial in sorted(self.devices)]

    def foreignKeys(self, device: SimDevice) -> st.SearchStrategy[str]:
        """Keys of other devices' buckets, and of a user it is not linked to."""
        others = [s for s in self.devices if s != device.serial]
        stranger = serials().filter(lambda serial: serial != device.serial)
        return st.one_of(
            st.sampled_from(
                [f"{t}.{s}" for s in others for t in ("shared", "device")]
                + ["user.intruder", "structure.intruder"]
            ),
            stranger.map(lambda serial: f"shared.{serial}"),
        )

    def live(self, serial: str | None = None) -> list[Held]:
        return [h for h in self.held if serial is None or h.serial == serial]

    def takeObjects(
        self,
        device: SimDevice,
        objects: Sequence[Mapping[str, Any]],
        expected: Mapping[str, Copy],
    ) -> None:
        """Check an answer or push against the model, then let the device keep it."""
        keys = [obj["object_key"] for obj in objects]
        check(len(keys) == len(set(keys)), "one object per key", keys)
        for obj in objects:
            check(
                self.model.scopeFor(device.serial, obj["object_key"]) is not None,
                "isolation: a device sees only its own and linked buckets",
                (device.serial, obj["object_key"]),
            )
        got = {obj["object_key"]: Copy.fromWire(obj) for obj in objects}
        check(got == dict(expected), "answer matches the model", (got, expected))
        for key, copy in got.items():
            device.receive(key, copy)

    def checkImmediate(
        self,
        device: SimDevice,
        objects: Sequence[Mapping[str, Any]],
        announced: Mapping[str, int],
        structureForced: bool,
    ) -> None:
        """No bucket the device announced holding comes back (§11.2)."""
        structureKey = self.model.structureKey(device.serial)
        for obj in objects:
            key = obj["object_key"]
            if key not in announced or (key == structureKey and structureForced):
                continue
            check(
                announced[key] == 0 or obj["object_timestamp"] > announced[key],
                "no spurious resend",
                (obj, announced[key]),
            )

    def subscribeAs(
        self,
        device: SimDevice,
        entries: list[tuple[str, int, int, dict[str, Any] | None]],
        form: str,
        chunked: bool = True,
        path: str = "/nest/transport",
    ) -> Held | None:
        """
        Send a subscribe, check the answer against the model, and return
        the held connection when it is held.
        """
        documentEntries = [
            clientObject(key, revision, timestamp, value)
            for key, revision, timestamp, value in entries
        ]
        document: dict[str, Any] = {"chunked": chunked, "session": "s"}
        if form == "objects":
            document["objects"] = documentEntries
        else:
            types = [entry["object_key"].split(".")[0] for entry in documentEntries]
            for entry, bucketType in zip(documentEntries, types, strict=True):
                # Named by type as the firmware does ("device": {...}), or by
                # key when a type comes twice (PROTOCOL.md §6.1).
                typed = form == "typed" and types.count(bucketType) == 1
                document[bucketType if typed else entry["object_key"]] = entry
        firstOfProcess = device.serial not in self.model.structureSent
        expected = self.model.subscribe(device.serial, entries, self.nowMs())
        announced = {
            key: ts
            for key, _, ts, _ in entries
            if self.model.scopeFor(device.serial, key) is not None
        }
        response, body = self.request(path, document, device.serial)
        check(response.code == 200, "subscribe answered 200", response.code)
        headers = response.headers
        check(
            headers.getRawHeaders(b"x-nl-service-timestamp") == [b"%d" % self.nowMs()],
            "the service timestamp is now, in ms (§6.3)",
            headers,
        )
        setpoint = any(
            SETPOINT_FIELDS.intersection(copy.value) for copy in expected.values()
        )
        check(
            headers.hasHeader(b"x-nl-disable-defer-window") == setpoint,
            "disable-defer-window only with a setpoint in the answer (§6.3)",
            (headers, expected),
        )
        full = len(self.live(device.serial)) >= MAX_HELD
        if expected or not chunked or full:
            # A device holding the most subscribes gets an empty answer at
            # once (§6.4), as does a non-chunked subscribe with nothing new.
            ended = body.ended
            check(ended is not None, "an answer with data ends at once", body)
            assert ended is not None
            check(ended.check(ResponseDone), "ends cleanly", ended)
            objects = objectsOf(body.unread(), OBJECT_FIELDS)
            self.checkImmediate(device, objects, announced, firstOfProcess)
            self.takeObjects(device, objects, expected)
            return None
        check(body.ended is None, "a subscribe with nothing newer is held", body.data)
        check(body.unread() == b"", "held with headers only", body.data)
        held = Held(device.serial, body, announced, self.clock.seconds() + HOLD_SECONDS)
        self.held.append(held)
        return held

    def beliefs(
        self, device: SimDevice
    ) -> list[tuple[str, int, int, dict[str, Any] | None]]:
        """What the device announces: its copies, and its acknowledgements."""
        entries: list[tuple[str, int, int, dict[str, Any] | None]] = []
        for key in device.interest(self.model):
            copy = device.copies.get(key, PLACEHOLDER)
            value = None
            if copy.value.get("target_change_pending") is True and key.startswith(
                "shared."
            ):
                # The device acknowledges a setpoint push (§11.6).
                value = {"target_change_pending": False}
                device.copies[key] = Copy(
                    copy.revision,
                    copy.timestamp,
                    {**copy.value, "target_change_pending": False},
                )
            entries.append((key, copy.revision, copy.timestamp, value))
        return entries

    def collectPushes(self) -> None:
        """
        Read what held connections received in this step: each must be a
        push the model expects, or a clean end at the expected time.
        """
        self.server.deviceClient.flush()
        nowSeconds = self.clock.seconds()
        for held in list(self.held):
            fresh = held.body.unread()
            check(fresh == b"", "nothing pushed unexpectedly", (held.serial, fresh))
            if held.deadline <= nowSeconds:
                ended = held.body.ended
                check(ended is not None, "a hold ends on time", held)
                assert ended is not None
                check(ended.check(ResponseDone), "ends cleanly", held)
                self.held.remove(held)
            else:
                check(held.body.ended is None, "a hold lasts until its time", held)

    # Rules

    @initialize(
        owned=st.booleans(),
        serial=serials(),
        extraId=st.sampled_from("ab"),
        data=st.data(),
    )
    def start(
        self, owned: bool, serial: str, extraId: str, data: st.DataObject
    ) -> None:
        self.owned = owned
        self.bootDevice(self.addDevice(serial, extraId), data)

    @rule(data=st.data())
    def boot(self, data: st.DataObject) -> None:
        """
        A device boots: it forgets what the server sent and subscribes with
        rev 0, ts 0 and inline values of what it knows itself (§11.3, §11.4).
        """
        self.bootDevice(data.draw(st.sampled_from(self.deviceList())), data)

    def bootDevice(self, device: SimDevice, data: st.DataObject) -> None:
        previous, device.copies = device.copies, {}
        entries: list[tuple[str, int, int, dict[str, Any] | None]] = []
        for key in device.ownKeys:
            # What it knows of itself: new values, or those it had.
            held = fieldsHeld(previous.get(key, PLACEHOLDER).value)
            value = data.draw(deviceValues(minSize=1, maxSize=3) | held)
            entries.append((key, 0, 0, value))
        self.subscribeAs(device, entries, data.draw(st.sampled_from(SUBSCRIBE_FORMS)))

    @rule(data=st.data())
    def subscribe(self, data: st.DataObject) -> None:
        """
        A device subscribes with what it believes, sometimes naming
        another device's or another user's buckets too.
        """
        device = data.draw(st.sampled_from(self.deviceList()))
        entries = self.beliefs(device)
        if data.draw(st.booleans()):
            # Reading it, writing it inline, or claiming a later copy of it.
            foreign = data.draw(self.foreignKeys(device))
            revision, timestamp, value = data.draw(
                st.sampled_from(
                    [(1, 1, None), (0, 0, {"x": 1}), (9, 2 * self.nowMs(), {"x": 2})]
                )
            )
            entries.append((foreign, revision, timestamp, value))
        self.subscribeAs(
            device,
            entries,
            data.draw(st.sampled_from(SUBSCRIBE_FORMS)),
            chunked=data.draw(st.sampled_from([True, True, True, False])),
            path=data.draw(
                st.sampled_from(
                    [
                        "/nest/transport",
                        "/nest/transport/v7/subscribe",
                        "/transport",
                        "/czfe/v7/subscribe",
                    ]
                )
            ),
        )

    @rule(data=st.data())
    def subscribeAhead(self, data: st.DataObject) -> None:
        """
        A device whose copy is current edits it and subscribes with a later
        timestamp and the value: the server adopts it (§6.2 step 5).
        """
        device = data.draw(st.sampled_from(self.deviceList()))
        key = data.draw(st.sampled_from(device.ownKeys))
        mine = device.copies.get(key)
        if (
            mine is None
            or mine.timestamp == 0
            or mine != self.model.view(device.serial, key)
        ):
            return
        value = {**mine.value, **data.draw(deviceValues(minSize=1, maxSize=2))}
        timestamp = mine.timestamp + data.draw(st.integers(1, 10_000))
        entries: list[tuple[str, int, int, dict[str, Any] | None]] = [
            (k, c.revision, c.timestamp, None)
            for k, c in ((k, device.copies.get(k, PLACEHOLDER)) for k in device.ownKeys)
            if k != key
        ]
        entries.append((key, mine.revision, timestamp, value))
        device.copies[key] = Copy(mine.revision, timestamp, value)
        # The device's timestamp is adopted even when its value adds nothing:
        # otherwise it would hold a later timestamp than the server's.
        self.movedUnchanged.add((device.serial, key))
        self.subscribeAs(device, entries, data.draw(st.sampled_from(SUBSCRIBE_FORMS)))

    @rule(data=st.data())
    def put(self, data: st.DataObject) -> None:
        """
        A device puts changes to some of its buckets, each unconditional or
        conditional on its current or a stale revision (§7.2).
        """
        device = data.draw(st.sampled_from(self.deviceList()))
        keys = data.draw(
            st.lists(st.sampled_from(device.ownKeys), min_size=1, max_size=3)
        )
        if data.draw(st.booleans()):
            keys.append(data.draw(self.foreignKeys(device)))
        form = data.draw(st.sampled_from(FORMS))
        if form == "named":
            # The named form can name a bucket once only.
            keys = list(dict.fromkeys(keys))
        entries: list[tuple[str, dict[str, Any], int | None]] = []
        rendered = []
        for key in keys:
            mine = device.copies.get(key, PLACEHOLDER)
            fields = data.draw(
                deviceValues(minSize=1, maxSize=3, exclude=PUT_META_KEYS)
                | fieldsHeld(mine.value)
            )
            condition = data.draw(st.sampled_from(["none", "current", "stale"]))
            ifRevision = {
                "none": None,
                "current": mine.revision,
                "stale": mine.revision - 1 if mine.revision > INT32_MIN else 5,
            }[condition]
            entries.append((key, fields, ifRevision))
            # base_object_revision is informational only, so a wrong one is
            # accepted (§7.2 step 2, §19 scenario 38).
            one: dict[str, Any] = {"object_key": key, "base_object_revision": 0}
            if ifRevision is not None:
                one["if_object_revision"] = ifRevision
            if form == "objects":
                one["value"] = fields
            else:
                one.update(fields)
            rendered.append(one)
        document: dict[str, Any] = {"session": "s"}
        if form == "objects":
            document["objects"] = rendered
        else:
            document.update((one["object_key"], one) for one in rendered)
        before = {key: self.model.view(device.serial, key) for key in device.ownKeys}
        expected = self.model.put(device.serial, entries, self.nowMs())
        for key in keys:
            if keys.count(key) > 1:
                # Two changes in one put may end where they started.
                self.movedUnchanged.add((device.serial, key))
        response, body = self.request(
            data.draw(
                st.sampled_from(
                    ["/nest/transport/put", "/nest/transport/v7/put", "/czfe/v7/put"]
                )
            ),
            document,
            device.serial,
        )
        check(response.code == 200, "put answered 200", response.code)
        check(body.ended is not None, "a put answers at once", body)
        receipts = objectsOf(body.unread(), RECEIPT_FIELDS)
        check(
            [
                (r["object_key"], r["object_revision"], r["object_timestamp"])
                for r in receipts
            ]
            == [(k, c.revision, c.timestamp) for k, c, refused in expected],
            "put receipts match the model",
            (receipts, expected),
        )
        mayWrite = [e for e in entries if self.model.scopeFor(device.serial, e[0])]
        for (key, receipt, refused), (_, fields, _) in zip(
            expected, mayWrite, strict=True
        ):
            mine = device.copies.get(key, PLACEHOLDER)
            # A device applies a receipt over a copy that was current; one
            # that missed a change keeps its older copy and gets the
            # server's on its next subscribe, by timestamp.
            if not refused and mine == (before.get(key) or PLACEHOLDER):
                device.copies[key] = Copy(
                    receipt.revision, receipt.timestamp, {**mine.value, **fields}
                )
        # A put pushes nothing, not even to the device's other connections.
        self.collectPushes()

    @rule(data=st.data())
    def nonNumber(self, data: st.DataObject) -> None:
        """
        A device gives a field clients read as a number a non-number, in a
        put or a subscribe, after a valid entry: the whole request is
        refused with a 400, and nothing changes or is held.
        """
        device = data.draw(st.sampled_from(self.deviceList()))
        key = data.draw(
            st.sampled_from([f"shared.{device.serial}", f"device.{device.serial}"])
        )
        name = data.draw(st.sampled_from(sorted(NUMERIC_FIELDS)))
        bad = data.draw(st.sampled_from(["20.5", True, False, [20], {"c": 1}]))
        good = clientObject(f"schedule.{device.serial}", value={"changed": True})
        subscribe = data.draw(st.booleans())
        document = {
            "chunked": True,
            "objects": [good, clientObject(key, value={name: bad})],
        }
        response, body = self.request(
            "/nest/transport" if subscribe else "/nest/transport/put",
            document,
            device.serial,
        )
        check(response.code == 400, "a non-number is refused", response.code)
        check(body.ended is not None, "a refusal answers at once", body)
        self.collectPushes()

    @rule(data=st.data(), change=commandChanges())
    def command(
        self, data: st.DataObject, change: tuple[str, dict[str, Any], bool]
    ) -> None:
        """
        A change made the way every control write is made, through
        L{DeviceState.change}, predicted exactly by the model: a setpoint,
        a setting, away, a whole schedule, or the same values again.
        """
        device = data.draw(st.sampled_from(self.deviceList()))
        bucketType, fields, replaces = change
        if bucketType == "structure":
            scope, key = "", self.model.structureKey(device.serial)
        else:
            scope, key = device.serial, f"{bucketType}.{device.serial}"
        nowMs = self.nowMs()
        expected = self.model.command(scope, key, fields, replaces, nowMs)
        self.movedUnchanged.add((scope, key))

        def write(stored: buckets.Bucket | None, nowMs: int) -> buckets.Bucket:
            current = stored or buckets.empty(key)
            if replaces:
                return buckets.replace(current, fields, nowMs)
            return buckets.forceMerge(current, fields, nowMs)

        result(self.server.state.change([BucketUpdate(scope, key, write)]))
        self.server.deviceClient.flush()
        pushedTo = self.model.devicesSeeing(scope, key)
        for held in list(self.held):
            if held.serial not in pushedTo:
                continue
            pushed = held.body.unread()
            check(pushed, "a command is pushed to every held device that sees it", held)
            objects = objectsOf(pushed, OBJECT_FIELDS)
            seen = (key, expected.revision)
            check(
                seen not in held.received
                and (
                    held.announced.get(key, 0) == 0
                    or expected.timestamp > held.announced[key]
                ),
                "no spurious resend",
                (held, objects),
            )
            held.received.add(seen)
            self.takeObjects(self.devices[held.serial], objects, {key: expected})
            held.deadline = self.clock.seconds() + BATCH_SECONDS
        self.collectPushes()

    @precondition(lambda self: self.held)
    @rule(data=st.data(), change=commandChanges())
    def commandWhileHeld(
        self, data: st.DataObject, change: tuple[str, dict[str, Any], bool]
    ) -> None:
        """A control command while a device is held: it is pushed (§6.4)."""
        self.command(data, change)

    @rule(data=st.data())
    def controlCommand(self, data: st.DataObject) -> None:
        """
        A user's command through C{POST /command} (PROTOCOL.md §16.1):
        applied, moving revision and timestamp of every bucket it writes
        (§11.5) and pushed to every held device that sees them, or refused
        with nothing changed.
        """
        device = data.draw(st.sampled_from(self.deviceList()))
        document = data.draw(controlCommands(device.serial, garbage=False))
        before = self.storedCopies()
        nowMs = self.nowMs()
        status, answer = self.control("POST", "/command", document)
        check(status < 500, "a command never fails", answer)
        if status != 200 or answer.get("success") is not True:
            check(
                self.storedCopies() == before,
                "a refused command changes nothing",
                answer,
            )
            self.collectPushes()
            return
        structureMembers = self.model.devicesSeeing(
            "", self.model.structureKey(device.serial)
        )
        written = self.serverWrites(
            before, nowMs, {device.serial, "", *structureMembers}, "a command"
        )
        check(written, "a command writes", answer)

    @precondition(lambda self: bool(set(self.devices) - set(self.model.owners)))
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        """
        An unclaimed device shows its entry key (PROTOCOL.md §5) and the
        user claims it (§13): the user and structure buckets are written,
        moving revision and timestamp, and pushed to every held device that
        now sees them.
        """
        serial = data.draw(
            st.sampled_from(sorted(set(self.devices) - set(self.model.owners)))
        )
        before = self.storedCopies()
        nowMs = self.nowMs()
        client = self.server.deviceClient
        d = client.get(DEVICE_URL + "/nest/passphrase", headers=basicAuth(serial))
        client.flush()
        response = result(d)
        key = json.loads(result(treq.content(response)))
        check(response.code == 200, "an unclaimed device gets an entry key", key)
        self.serverWrites(before, nowMs, {serial}, "an entry key")
        before = self.storedCopies()
        status, answer = self.control(
            "POST", "/api/register", {"code": key["value"], "userId": USER}
        )
        check(status == 200 and answer["success"], "a valid code claims", answer)
        alone = self.model.structureKey(serial)
        self.model.owners[serial] = USER
        written = self.serverWrites(before, nowMs, {""}, "a claim")
        if self.model.buckets.get(("", alone), PLACEHOLDER).value:
            check(
                written["", alone].value == {},
                "a claimed device's own structure is emptied",
                written.get(("", alone)),
            )

    @precondition(lambda self: bool(self.model.owners))
    @rule(data=st.data())
    def unclaim(self, data: st.DataObject) -> None:
        """
        The user unregisters a device: it leaves the owner's structure,
        which is pushed to the devices still in it, and it sees its user
        and that structure no more.
        """
        serial = data.draw(st.sampled_from(sorted(self.model.owners)))
        before = self.storedCopies()
        nowMs = self.nowMs()
        status, answer = self.control("DELETE", f"/api/registered-devices/{serial}", {})
        check(status == 200 and answer["success"], "an owned device unclaims", answer)
        del self.model.owners[serial]
        self.serverWrites(before, nowMs, {""}, "an unclaim")

    @rule(data=st.data())
    def dismissDialog(self, data: st.DataObject) -> None:
        """
        The user dismisses a device's pairing dialog (PROTOCOL.md §13 step
        5): emptied, revision and timestamp moved, pushed to the device.
        """
        serial = data.draw(st.sampled_from(sorted(self.devices)))
        before = self.storedCopies()
        nowMs = self.nowMs()
        status, answer = self.control("POST", f"/api/dismiss-pairing/{serial}", {})
        check(status < 500, "a dismissal never fails", answer)
        if status != 200:
            check(
                self.storedCopies() == before,
                "a refused dismissal changes nothing",
                answer,
            )
            return
        self.serverWrites(before, nowMs, {serial}, "a dismissal")

    @precondition(lambda self: len(self.devices) > 1)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        """
        The user deletes a device (C{DELETE /api/device}): its buckets,
        owner and key are gone, its structure no longer lists it (pushed to
        the devices still in it), and the thermostat is taken away.
        """
        serial = data.draw(st.sampled_from(sorted(self.devices)))
        before = self.storedCopies()
        nowMs = self.nowMs()
        status, answer = self.control("DELETE", "/api/device", {"serial": serial})
        check(status == 200 and answer["success"], "a known device is removed", answer)
        remaining = self.storedCopies()
        alone = ("", f"structure.unpaired-{serial}")
        for where in [w for w in before if w[0] == serial or w == alone]:
            check(where not in remaining, "a removed device's buckets are gone", where)
            self.model.buckets.pop(where, None)
            self.history.pop(where, None)
            del before[where]
        self.model.owners.pop(serial, None)
        self.model.structureSent.discard(serial)
        del self.devices[serial]
        self.serverWrites(before, nowMs, {""}, "a removal")

    def storedCopies(self) -> dict[tuple[str, str], Copy]:
        store = self.server.store
        return {
            (scope, bucket.key): Copy(bucket.revision, bucket.timestamp, bucket.value)
            for scope in store.scopes()
            for bucket in store.buckets(scope)
        }

    def control(
        self, method: str, path: str, document: Mapping[str, Any]
    ) -> tuple[int, Any]:
        """A control API request; its status and JSON answer."""
        client = self.server.controlClient
        d = client.request(
            method,
            CONTROL_URL + path,
            data=json.dumps(document).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        client.flush()
        response = result(d)
        answer = json.loads(result(treq.content(response)))
        self.server.deviceClient.flush()
        return response.code, answer

    def serverWrites(
        self,
        before: Mapping[tuple[str, str], Copy],
        nowMs: int,
        scopes: set[str],
        what: str,
    ) -> dict[tuple[str, str], Copy]:
        """
        Check what a change not made by a device (a command, pairing) wrote
        since C{before}: only in C{scopes}, each bucket's revision and
        timestamp moved (§11.5), each pushed to every held device that sees
        it. The model takes the writes.
        """
        written = {
            where: copy
            for where, copy in self.storedCopies().items()
            if before.get(where) != copy
        }
        for (scope, key), copy in written.items():
            check(scope in scopes, f"{what} changes only its own", (scope, key))
            previous = self.model.buckets.get((scope, key), PLACEHOLDER)
            check(
                copy == afterChange(previous, copy.value, nowMs),
                f"{what} always moves revision and timestamp (§11.5)",
                (key, previous, copy),
            )
            self.model.buckets[scope, key] = copy
            self.movedUnchanged.add((scope, key))
        for held in self.held:
            expected = {
                key: copy
                for (scope, key), copy in written.items()
                if held.serial in self.model.devicesSeeing(scope, key)
            }
            if not expected:
                continue
            pushed = held.body.unread()
            check(pushed, "a command is pushed to every held device that sees it", held)
            objects = [
                obj
                for chunk in chunksOf(pushed)
                for obj in objectsOf(chunk, OBJECT_FIELDS)
            ]
            self.takeObjects(self.devices[held.serial], objects, expected)
            held.deadline = self.clock.seconds() + BATCH_SECONDS
        self.collectPushes()
        return written

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def controlCommandWhileHeld(self, data: st.DataObject) -> None:
        """A user's command while a device is held: pushed to it (§6.4)."""
        self.controlCommand(data)

    @rule(seconds=st.sampled_from(STEPS))
    def advance(self, seconds: float) -> None:
        """Time passes: holds and batch windows end (§6.4)."""
        self.clock.advance(seconds)
        self.collectPushes()

    @rule(seconds=st.sampled_from([0.001, 1.0, 10.0]))
    def clockStepsBack(self, seconds: float) -> None:
        """
        The server's clock steps back (an NTP correction on a board without
        a real-time clock): changes must still move timestamps forward.
        """
        self.clock.advance(-seconds)
        self.collectPushes()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        """A device's held connection drops (its wake timer, a reset)."""
        held = data.draw(st.sampled_from(self.held))
        assert held.body.transport is not None
        held.body.transport.loseConnection()
        self.held.remove(held)
        self.collectPushes()

    @rule()
    def restart(self) -> None:
        """
        The server stops (ending held subscribes cleanly, committing and
        closing the store) and starts again from its SQLite file.
        """
        old = self.server
        old.hub.endAll()
        old.deviceClient.flush()
        for held in self.held:
            check(held.body.unread() == b"", "ended without a body", held)
            check(held.body.ended is not None, "a stop ends every hold", held)
        self.held.clear()
        result(old.store.close())
        self.server = makeServer(path=self.path, clock=self.clock)
        self.server.hub.maxPerDevice = MAX_HELD
        self.model.structureSent.clear()

    @precondition(lambda self: len(self.devices) < 3)
    @rule(serial=serials(), extraId=st.sampled_from("ab"), data=st.data())
    def join(self, serial: str, extraId: str, data: st.DataObject) -> None:
        """A second thermostat of the same home boots."""
        if serial not in self.devices:
            self.bootDevice(self.addDevice(serial, extraId), data)

    @rule(data=st.data())
    def listing(self, data: st.DataObject) -> None:
        """The object listing shows what the device sees, without values (§8)."""
        device = data.draw(st.sampled_from(self.deviceList()))
        client = self.server.deviceClient
        d = client.get(
            f"{DEVICE_URL}/nest/transport/device/{device.serial}",
            headers=basicAuth(device.serial),
        )
        client.flush()
        response = result(d)
        body = Body()
        response.deliverBody(body)
        client.flush()
        check(response.code == 200, "listing answered 200", response.code)
        objects = objectsOf(body.unread(), RECEIPT_FIELDS)
        own = sorted(
            (key, copy)
            for (scope, key), copy in self.model.buckets.items()
            if scope == device.serial
        )
        linked = [
            (key, self.model.buckets["", key])
            for key in self.model.linked(device.serial)
            if ("", key) in self.model.buckets
        ]
        check(
            [
                (o["object_key"], o["object_revision"], o["object_timestamp"])
                for o in objects
            ]
            == [(k, c.revision, c.timestamp) for k, c in own + linked],
            "listing matches the model",
            objects,
        )

    @rule()
    def settle(self) -> None:
        """
        No more changes: every device that keeps subscribing ends up with
        the server's buckets, revisions and timestamps.
        """
        for device in self.devices.values():
            for _ in range(4):
                entries = self.beliefs(device)
                # Only placeholders (rev 0, ts 0) are left to come: the
                # server has nothing for them (§11.2 first row).
                structureDone = (
                    device.serial in self.model.structureSent
                    or (
                        "",
                        self.model.structureKey(device.serial),
                    )
                    not in self.model.buckets
                )
                onlyPlaceholders = (
                    structureDone
                    and all(
                        (self.model.view(device.serial, key) or PLACEHOLDER).timestamp
                        <= timestamp
                        for key, _, timestamp, _ in entries
                    )
                    and all(
                        key in device.copies
                        for key in self.model.linked(device.serial)
                        if ("", key) in self.model.buckets
                    )
                )
                held = self.subscribeAs(device, entries, "objects")
                if held is not None or onlyPlaceholders:
                    break
            else:
                check(False, "convergence: subscribing settles", device)
            for key in device.interest(self.model):
                check(
                    device.copies.get(key)
                    == (self.model.view(device.serial, key) or PLACEHOLDER),
                    "convergence: the device holds the server's copy",
                    (key, device.copies.get(key), self.model.view(device.serial, key)),
                )
            for key in self.model.linked(device.serial):
                if ("", key) in self.model.buckets:
                    check(
                        key in device.copies,
                        "convergence: linked buckets reach the device",
                        key,
                    )

    # Invariants

    @invariant()
    def conforms(self) -> None:
        hub = self.server.hub
        for serial in self.devices:
            check(
                hub.count(serial) == len(self.live(serial)),
                "the hub holds exactly the live subscribes",
                (serial, hub.count(serial), len(self.live(serial))),
            )
            check(
                hub.undelivered(serial) == [],
                "nothing is kept for dropped connections",
                hub.undelivered(serial),
            )
        check(
            hub.total() == len(self.held),
            "the hub holds exactly the live subscribes",
            hub.total(),
        )
        check(
            sorted(call.getTime() for call in self.clock.getDelayedCalls())
            == sorted(held.deadline for held in self.held),
            "one timer per held subscribe, none outliving its request",
            self.clock.getDelayedCalls(),
        )
        stored = {
            (scope, bucket.key): Copy(bucket.revision, bucket.timestamp, bucket.value)
            for scope in self.server.store.scopes()
            for bucket in self.server.store.buckets(scope)
        }
        for where, copy in stored.items():
            previous = self.history.get(where)
            if previous is None:
                continue
            check(
                copy.timestamp >= previous.timestamp,
                "timestamps never go back",
                (where, previous, copy),
            )
            check(
                copy.revision >= previous.revision
                or (previous.revision == INT32_MAX and copy.revision == INT32_MIN),
                "revisions never go back",
                (where, previous, copy),
            )
            moved = (copy.revision, copy.timestamp) != (
                previous.revision,
                previous.timestamp,
            )
            check(
                not moved
                or copy.value != previous.value
                or where in self.movedUnchanged,
                "revision and timestamp move only when the value changed",
                (where, previous, copy),
            )
        check(
            set(self.history) <= set(stored),
            "acknowledged writes survive",
            self.history,
        )
        self.history = stored
        self.movedUnchanged.clear()
        check(
            {
                name: doc["user"]
                for name, doc in self.server.store.records(OWNER_RECORD).items()
            }
            == self.model.owners,
            "owners survive",
            self.model.owners,
        )
        check(stored == self.model.buckets, "the store holds what the model says", "")


class ConformanceTests(SynchronousTestCase):
    """
    The server conforms to the model under generated sequences of device
    and control actions.
    """

    def test_machine(self) -> None:
        """
        Every generated sequence of boots, subscribes, puts, commands, time
        steps, dropped connections, restarts and joining devices keeps the
        server equal to the model and every invariant true.
        """
        run_state_machine_as_test(
            ConformanceMachine,
            settings=settings(settings.default, stateful_step_count=50),
        )

    def test_putNamingABucketTwice(self) -> None:
        """
        A put naming one bucket twice applies both entries in order: the
        second builds on the first, each receipt is true, and both fields
        are stored (found by the machine: the second entry used to merge
        into the stored copy and silently drop the first, acknowledged).
        """
        server = makeServer()
        self.addCleanup(server.store.close)
        key = f"device.{SERIAL}"
        document = {
            "objects": [
                {"object_key": key, "value": {"a": 1}},
                {"object_key": key, "value": {"b": 2}},
            ]
        }
        d = server.deviceClient.post(
            DEVICE_URL + "/nest/transport/put",
            data=json.dumps(document).encode(),
            headers=basicAuth(SERIAL),
        )
        server.deviceClient.flush()
        receipts = json.loads(
            self.successResultOf(treq.content(self.successResultOf(d)))
        )["objects"]
        nowMs = server.nowMs()
        self.assertEqual(
            [(r["object_revision"], r["object_timestamp"]) for r in receipts],
            [(1, nowMs), (2, nowMs + 1)],
        )
        stored = server.store.get(SERIAL, key)
        assert stored is not None
        self.assertEqual(
            (stored.revision, stored.timestamp, stored.value),
            (2, nowMs + 1, {"a": 1, "b": 2}),
        )


class BodyFormTests(SynchronousTestCase):
    """
    Both body forms mean the same (PROTOCOL.md §19 scenarios 22 and 33):
    the same entries as an C{objects} list or named (by key, or by type)
    get the same answer and leave the same buckets.
    """

    def outcome(
        self, seeded: Sequence[buckets.Bucket], path: str, document: dict[str, Any]
    ) -> tuple[int, Any, dict[str, list[buckets.Bucket]]]:
        server = makeServer()
        self.addCleanup(server.store.close)
        server.seed(SERIAL, *seeded)
        d = server.deviceClient.post(
            DEVICE_URL + path,
            data=json.dumps(document).encode("utf-8"),
            headers=basicAuth(SERIAL),
        )
        server.deviceClient.flush()
        response = self.successResultOf(d)
        answer = json.loads(self.successResultOf(treq.content(response)))
        store = server.store
        return (
            response.code,
            answer,
            {scope: store.buckets(scope) for scope in store.scopes()},
        )

    def seeded(self, data: st.DataObject) -> list[buckets.Bucket]:
        own = [f"{t}.{SERIAL}" for t in ("device", "shared", "schedule")]
        keys = st.sampled_from(own) | bucketKeys(SERIAL).filter(
            lambda key: not key.startswith(("user.", "structure."))
        )
        return data.draw(
            st.lists(
                keys.flatmap(bucketStrategy),
                max_size=4,
                unique_by=lambda bucket: bucket.key,
            )
        )

    @given(st.data())
    def test_subscribe(self, data: st.DataObject) -> None:
        """A non-chunked subscribe answers and stores alike in every form."""
        seeded = self.seeded(data)
        entries = data.draw(
            st.lists(
                subscribeEntries(SERIAL),
                max_size=5,
                unique_by=lambda entry: entry["object_key"],
            )
        )
        outcomes = [
            self.outcome(
                seeded,
                "/nest/transport",
                subscribeDocument(entries, form, chunked=False),
            )
            for form in SUBSCRIBE_FORMS
        ]
        self.assertEqual(outcomes[1], outcomes[0])
        self.assertEqual(outcomes[2], outcomes[0])

    @given(st.data())
    def test_put(self, data: st.DataObject) -> None:
        """A put answers and stores alike in both forms."""
        seeded = self.seeded(data)
        entries = data.draw(
            st.lists(
                putEntries(SERIAL),
                max_size=5,
                unique_by=lambda entry: entry["object_key"],
            )
        )
        objects, named = [
            self.outcome(seeded, "/nest/transport/put", putDocument(entries, form))
            for form in FORMS
        ]
        self.assertEqual(named, objects)
