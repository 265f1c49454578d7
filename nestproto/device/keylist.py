# -*- test-case-name: tests.test_keylist -*-
"""
The key-list dialect's shapes (PROTOCOL.md §20): firmware 4.x on
C{/nest/transport/v3/…} and the apps of seed 001. Subscribes list keys and
get one bucket per answer as a bare value named by C{X-nl-skv-*} headers;
puts are nested C{type → id → fields} and are acknowledged with metadata
only. L{nestproto.device.dialect} names these as the key-list dialect.

Pure: no Twisted, no I/O. Every check happens here, before anything is
changed, so a refused body changes nothing.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import define, field, frozen

from ..buckets import INT32_MAX, INT32_MIN, TIMESTAMP_MAX, Bucket, isBucketKey
from ..errors import BadBody
from ..fields import badNumericField
from ..model import ClientObject, PutEntry
from . import wire
from .wire import Rendered, SubscribeBody

#: Bodies past this are refused before parsing (413).
MAX_BODY_BYTES = wire.MAX_BODY_BYTES
#: Keys named in one subscribe, buckets in one put.
MAX_KEYS = wire.MAX_OBJECTS

#: Fields of a put that describe the bucket and are never stored
#: (PROTOCOL.md §20.4).
META_FIELDS = frozenset(
    {
        "$version",
        "$timestamp",
        "object_key",
        "base_object_revision",
        "if_object_revision",
    }
)

_COMPACT = (",", ":")


def canonicalKey(text: str) -> str:
    """
    A key as 4.x firmware may mangle it (C{shared.S ._sync}), cut at its
    first space (PROTOCOL.md §20.2): the text before it names the bucket.
    """
    return text.split(" ", 1)[0]


def _bucketKey(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise BadBody(f"{what} must be a string")
    key = canonicalKey(text)
    if not isBucketKey(key):
        raise BadBody(f"{what} {key!r} is not a known bucket key")
    return key


def _optionalInteger(
    key: str, entry: Mapping[str, Any], name: str, low: int, high: int
) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadBody(f"{name} of {key} must be an integer")
    if not low <= value <= high:
        raise BadBody(f"{name} of {key} is out of range")
    return value


@frozen
class ListedKey:
    """
    One key of a key-list subscribe and what the client says it holds;
    C{timestamp} C{None}: the key came without a version or timestamp.
    """

    key: str
    version: int | None = None
    timestamp: int | None = None

    @property
    def unversioned(self) -> bool:
        return self.version is None and self.timestamp is None


def isKeyListBody(body: bytes) -> bool:
    """Whether C{body} is a subscribe with a top-level C{keys} array (§20.1)."""
    if b'"keys"' not in body:
        return False
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and isinstance(document.get("keys"), list)


def parseKeys(body: bytes) -> tuple[ListedKey, ...]:
    """
    The keys of a key-list subscribe, C{{"keys": [{"key": "shared.S",
    "version": 3, "timestamp": 1326038378000}, ...]}}, canonicalised, in
    order, each once; a plain C{"shared.S"} string names a key with no
    version.

    @raise BadBody: if the body or any key is malformed.
    """
    document = wire.parseJSONObject(body)
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise BadBody("keys must be a list")
    if len(keys) > MAX_KEYS:
        raise BadBody(f"at most {MAX_KEYS} keys per subscribe")
    listed: dict[str, ListedKey] = {}
    for entry in keys:
        if isinstance(entry, str):
            entry = {"key": entry}
        if not isinstance(entry, dict):
            raise BadBody("each key must be a JSON object")
        key = _bucketKey(entry.get("key"), "key")
        version = _optionalInteger(key, entry, "version", INT32_MIN, INT32_MAX)
        timestamp = _optionalInteger(key, entry, "timestamp", 0, TIMESTAMP_MAX)
        listed.setdefault(key, ListedKey(key, version, timestamp))
    return tuple(listed.values())


def parseSubscribe(body: bytes) -> SubscribeBody:
    """
    A key-list subscribe as the neutral L{SubscribeBody}: absent versions
    and timestamps count as 0 (the client has no data, §11.2).
    """
    return SubscribeBody(
        True,
        "",
        tuple(
            ClientObject(key.key, key.version or 0, key.timestamp or 0)
            for key in parseKeys(body)
        ),
    )


def _fields(key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadBody(f"value of {key} must be an object")
    fields = {name: v for name, v in value.items() if name not in META_FIELDS}
    if wire._depth(fields) > wire.MAX_VALUE_DEPTH:
        raise BadBody(f"value of {key} is nested too deeply")
    # As the v7 dialect's (wire._checkValue): clients read these as numbers.
    bad = badNumericField(key, fields)
    if bad is not None:
        raise BadBody(f"{bad} of {key} must be a number")
    return fields


def _putEntry(key: str, value: object) -> PutEntry | None:
    fields = _fields(key, value)
    assert isinstance(value, dict)
    ifRevision = _optionalInteger(
        key, value, "if_object_revision", INT32_MIN, INT32_MAX
    )
    if not fields:
        return None
    return PutEntry(key, fields, ifRevision)


def parsePut(body: bytes) -> list[PutEntry]:
    """
    A nested put, C{{"shared": {"S": {"target_temperature": 21.5}}}}
    (PROTOCOL.md §20.4); metadata fields are dropped, buckets left with no
    field are skipped. C{{"objects": [...]}} (4.2.5 sends an empty one) is
    read as the v7 put it is.

    @raise BadBody: if the body or any bucket is malformed.
    """
    document = wire.parseJSONObject(body)
    if "objects" in document:
        return wire.parsePut(body)
    puts: dict[str, PutEntry] = {}
    count = 0
    for type_, byId in document.items():
        if not isinstance(byId, dict):
            raise BadBody(f"{type_} must map ids to objects")
        for id_, value in byId.items():
            count += 1
            if count > MAX_KEYS:
                raise BadBody(f"at most {MAX_KEYS} buckets per put")
            key = _bucketKey(f"{type_}.{id_}", "key")
            entry = _putEntry(key, value)
            if entry is not None:
                earlier = puts.get(key)
                if earlier is not None:
                    entry = PutEntry(
                        key, {**earlier.fields, **entry.fields}, entry.ifRevision
                    )
                puts[key] = entry
    return list(puts.values())


def parseBucketPut(keyText: str, body: bytes) -> list[PutEntry]:
    """
    A put of one bucket named in the path (C{/v2/put/shared.S}) whose body
    is its bare fields (PROTOCOL.md §20.4).

    @raise BadBody: if the key or the body is malformed.
    """
    key = _bucketKey(keyText, "key")
    entry = _putEntry(key, wire.parseJSONObject(body))
    return [] if entry is None else [entry]


def _compact(document: object) -> bytes:
    # No spaces after : or , (the firmware's scanner skips none, §20.3).
    return json.dumps(document, separators=_COMPACT).encode("utf-8")


def skvHeaders(bucket: Bucket) -> tuple[tuple[bytes, bytes], ...]:
    """The C{X-nl-skv-*} headers naming C{bucket} (PROTOCOL.md §20.3)."""
    return (
        (b"x-nl-skv-key", bucket.key.encode("ascii")),
        (b"x-nl-skv-version", b"%d" % (bucket.revision,)),
        (b"x-nl-skv-timestamp", b"%d" % (bucket.timestamp,)),
    )


def renderBucket(bucket: Bucket) -> Rendered:
    """One subscribe answer: the bucket's bare full value, compact."""
    return Rendered(
        wire.JSON_HEADERS + skvHeaders(bucket), _compact(dict(bucket.value))
    )


def renderAnswer(buckets: Sequence[Bucket]) -> Rendered:
    """
    A key-list answer from the buckets to send: the first one, alone (the
    others go out on the following polls); none: an empty body.
    """
    if not buckets:
        return Rendered((), b"")
    return renderBucket(buckets[0])


def nested(buckets: Iterable[Bucket], withValues: bool) -> dict[str, Any]:
    """
    C{{"<type>": {"<id>": {"$version": N, "$timestamp": T, ...}}}}, the
    buckets' fields included when C{withValues}.
    """
    document: dict[str, dict[str, Any]] = {}
    for bucket in buckets:
        entry: dict[str, Any] = {
            "$version": bucket.revision,
            "$timestamp": bucket.timestamp,
        }
        if withValues:
            entry.update(
                (name, v) for name, v in bucket.value.items() if name not in entry
            )
        document.setdefault(bucket.type, {})[bucket.id] = entry
    return document


def renderReceipts(buckets: Sequence[Bucket]) -> Rendered:
    """
    A put's acknowledgement: compact, nested, metadata only, never a value
    (PROTOCOL.md §20.4).
    """
    return Rendered(wire.JSON_HEADERS, _compact(nested(buckets, withValues=False)))


def renderWholeState(buckets: Sequence[Bucket]) -> Rendered:
    """The device's BigGet (PROTOCOL.md §20.5): every bucket with its fields."""
    return Rendered(wire.JSON_HEADERS, _compact(nested(buckets, withValues=True)))


#: Maps an app indexes blindly, present even when empty (PROTOCOL.md §20.5).
MOBILE_TYPES = (
    "user",
    "structure",
    "device",
    "shared",
    "schedule",
    "link",
    "track",
    "where",
    "topaz",
)


@frozen
class MobileState:
    """
    What an app's user sees: its user bucket, its structures each with the
    serials in it, and each of its devices' buckets.
    """

    user: Bucket
    structures: list[tuple[Bucket, list[str]]]
    devices: list[tuple[str, list[Bucket]]]


def renderMobile(state: MobileState) -> Rendered:
    """
    C{GET /v2/mobile/user.<uid>} (PROTOCOL.md §20.5): nested like the
    BigGet, maps keyed by bare id, C{user.structures} and
    C{structure.devices} listing keys, C{link[S].structure} the device's
    structure key.
    """
    buckets: list[Bucket] = []
    structureOf: dict[str, str] = {}
    for structure, serials in state.structures:
        devices = [f"device.{serial}" for serial in serials]
        buckets.append(
            Bucket(
                structure.key,
                structure.revision,
                structure.timestamp,
                {**structure.value, "devices": devices},
            )
        )
        structureOf.update((serial, structure.key) for serial in serials)
    user = state.user
    buckets.insert(
        0,
        Bucket(
            user.key,
            user.revision,
            user.timestamp,
            {**user.value, "structures": [s.key for s, _ in state.structures]},
        ),
    )
    for serial, owned in state.devices:
        link = f"link.{serial}"
        if not any(bucket.key == link for bucket in owned):
            owned = [*owned, Bucket(link)]
        for bucket in owned:
            if bucket.key == link:
                bucket = Bucket(
                    bucket.key,
                    bucket.revision,
                    bucket.timestamp,
                    {**bucket.value, "structure": structureOf[serial]},
                )
            buckets.append(bucket)
    buckets = [
        Bucket(
            b.key, b.revision, b.timestamp, {**b.value, "structure": structureOf[b.id]}
        )
        if b.type == "link" and b.id in structureOf and "structure" not in b.value
        else b
        for b in buckets
    ]
    document: dict[str, Any] = {name: {} for name in MOBILE_TYPES}
    document.update(nested(buckets, withValues=True))
    return Rendered(wire.JSON_HEADERS, _compact(document))


def parseSubscribeTimeout(value: bytes | None) -> float | None:
    """
    C{X-nl-subscribe-timeout} (seconds), which shortens a hold.

    @raise BadBody: when it is not a whole number from 1 to 3600.
    """
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if not text.isdigit() or not 1 <= int(text) <= 3600:
        raise BadBody("X-nl-subscribe-timeout must be whole seconds from 1 to 3600")
    return float(text)


#: What a session remembers of a key whose bucket it has not been sent yet.
_PENDING = None


@define
class KeyListSessions:
    """
    What each key-list session was last sent, for keys sent without
    versions (PROTOCOL.md §20.3, L's "first contact" rule): 4.3.3 may list
    its keys bare on every poll. Until a session's first answer a bare key
    counts as "no data"; afterwards a bare key counts as holding what the
    session was sent, and a key the session first lists later as in sync.
    Otherwise every poll would be answered with the same bucket.

    @ivar maxSessions: sessions remembered, least recently used forgotten.
    """

    maxSessions: int = 4096
    _sessions: OrderedDict[tuple[str, str], dict[str, int | None]] = field(
        factory=OrderedDict, init=False
    )

    def clientObjects(
        self,
        serial: str,
        session: str,
        listed: Sequence[ListedKey],
        currentTimestamp: Callable[[str], int],
    ) -> list[ClientObject]:
        """
        What the client holds of each listed key, bare keys filled in from
        the session.

        @param currentTimestamp: the server copy's timestamp of a key.
        """
        known = self._sessions.get((serial, session))
        if known is not None:
            self._sessions.move_to_end((serial, session))
        objects = []
        for entry in listed:
            if not entry.unversioned:
                objects.append(
                    ClientObject(entry.key, entry.version or 0, entry.timestamp or 0)
                )
                continue
            if known is None:
                timestamp: int | None = _PENDING
            elif entry.key not in known:
                timestamp = known[entry.key] = currentTimestamp(entry.key)
            else:
                timestamp = known[entry.key]
            objects.append(ClientObject(entry.key, 0, _held(timestamp)))
        return objects

    def sent(
        self, serial: str, session: str, listed: Sequence[ListedKey], bucket: Bucket
    ) -> None:
        """
        The session was answered with C{bucket}; the other bare keys it
        listed are still to be sent, on the following polls.
        """
        key = (serial, session)
        known = self._sessions.get(key)
        if known is None:
            known = self._sessions[key] = {
                entry.key: _PENDING for entry in listed if entry.unversioned
            }
            while len(self._sessions) > self.maxSessions:
                self._sessions.popitem(last=False)
        known[bucket.key] = bucket.timestamp

    def wrote(self, serial: str, buckets: Iterable[Bucket]) -> None:
        """
        The device C{serial} put C{buckets}: its sessions hold them now, so
        they are not sent back to it (the stale echo of PROTOCOL.md §12).
        """
        for (owner, _), known in self._sessions.items():
            if owner != serial:
                continue
            for bucket in buckets:
                if bucket.key in known:
                    known[bucket.key] = bucket.timestamp


def _held(timestamp: int | None) -> int:
    # A session sent the empty placeholder (timestamp 0) holds it: any
    # timestamp above 0 says "has data", and the server's 0 is not newer.
    if timestamp is None:
        return 0
    return max(timestamp, 1)
