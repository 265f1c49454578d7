# -*- test-case-name: tests.test_wire -*-
"""
The v7 dialect's JSON shapes (PROTOCOL.md §6-§8): parsing subscribe and put
bodies (both forms) and rendering object lists in the field order the
firmware needs. L{nestproto.device.dialect} names these as the v7 dialect.

Pure: no Twisted, no I/O. Every check happens here, before anything is
changed, so a refused body changes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import frozen

from ..buckets import (
    INT32_MAX,
    INT32_MIN,
    KNOWN_TYPES,
    TIMESTAMP_MAX,
    Bucket,
    isBucketKey,
)
from ..errors import BadBody
from ..fields import badNumericField
from ..model import ClientObject, PutEntry

#: Bodies past this are refused before parsing (413).
MAX_BODY_BYTES = 1024 * 1024
#: Objects named in one subscribe or put; the firmware knows 28 types.
MAX_OBJECTS = 256
#: Nesting depth of a bucket value; real buckets nest three levels.
MAX_VALUE_DEPTH = 16

#: Fields whose presence in an immediate answer asks the device to PUT dial
#: changes at once for a while (PROTOCOL.md §6.3).
SETPOINT_FIELDS = frozenset(
    {
        "target_temperature",
        "target_temperature_high",
        "target_temperature_low",
        "target_temperature_type",
        "hvac_mode",
    }
)

# Keys of a put entry that are not bucket fields (PROTOCOL.md §7.1).
_PUT_META_KEYS = frozenset({"object_key", "base_object_revision", "if_object_revision"})


@frozen
class SubscribeBody:
    """A parsed subscribe request."""

    chunked: bool
    session: str
    objects: tuple[ClientObject, ...]


def _refuseConstant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finiteFloat(text: str) -> float:
    # A number too large for a float (1e999) would parse as infinity and be
    # rendered back as the non-JSON token Infinity, which no device parses.
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


# json.loads and json.dumps with arguments build a decoder or encoder per
# call; these are kept.
_DECODER = json.JSONDecoder(parse_constant=_refuseConstant, parse_float=_finiteFloat)
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def parseJSONObject(body: bytes) -> dict[str, Any]:
    """
    Decode a request body that must be one JSON object.

    @raise BadBody: on invalid UTF-8, invalid JSON, NaN/Infinity or a number
        too large for a float, nesting deep enough to exhaust the parser, or
        a document that is not an object.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("Body is not UTF-8") from None
    try:
        document = _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise BadBody("Invalid JSON") from None
    if not isinstance(document, dict):
        raise BadBody("Body must be a JSON object")
    return document


def _depth(value: Any) -> int:
    # Iterative, so a hostile document cannot exhaust the stack here.
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _checkValue(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadBody(f"value of {key} must be an object")
    if _depth(value) > MAX_VALUE_DEPTH:
        raise BadBody(f"value of {key} is nested too deeply")
    # Refused here, with the whole request, before anything is written:
    # clients read these fields as numbers (nestproto.fields).
    bad = badNumericField(key, value)
    if bad is not None:
        raise BadBody(f"{bad} of {key} must be a number")
    return value


def _checkInteger(key: str, name: str, value: Any, low: int, high: int) -> int:
    # bool is an int in Python but never a revision or timestamp.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadBody(f"{name} of {key} must be an integer")
    if not low <= value <= high:
        raise BadBody(f"{name} of {key} is out of range")
    return value


def _checkKey(entry: Mapping[str, Any]) -> str:
    key = entry.get("object_key")
    if not isBucketKey(key):
        raise BadBody(f"object_key {key!r} is not a known bucket key")
    assert isinstance(key, str)
    return key


def _entries(
    document: Mapping[str, Any], namedOnlyIfKnown: bool
) -> list[Mapping[str, Any]]:
    """
    The per-bucket entries of a body: the C{objects} list when there is one,
    else every top-level object carrying an C{object_key} (PROTOCOL.md §6.1,
    §7.1). Subscribe's named form names buckets by type (C{"device": {...}}),
    so only known type names count there.
    """
    objects = document.get("objects")
    if objects is not None:
        if not isinstance(objects, list):
            raise BadBody("objects must be a list")
        entries = objects
    else:
        entries = [
            value
            for name, value in document.items()
            if isinstance(value, dict)
            and "object_key" in value
            and (not namedOnlyIfKnown or name in KNOWN_TYPES or isBucketKey(name))
        ]
    if len(entries) > MAX_OBJECTS:
        raise BadBody(f"at most {MAX_OBJECTS} objects per request")
    for entry in entries:
        if not isinstance(entry, dict):
            raise BadBody("each object must be a JSON object")
    return entries


def parseSubscribe(body: bytes) -> SubscribeBody:
    """
    Parse a subscribe body in either form.

    @raise BadBody: if the body or any entry is malformed.
    """
    document = parseJSONObject(body)
    byKey: dict[str, ClientObject] = {}
    for entry in _entries(document, namedOnlyIfKnown=True):
        key = _checkKey(entry)
        revision = entry.get("object_revision")
        timestamp = entry.get("object_timestamp")
        value = entry.get("value")
        byKey[key] = ClientObject(
            key,
            0
            if revision is None
            else _checkInteger(key, "object_revision", revision, INT32_MIN, INT32_MAX),
            0
            if timestamp is None
            else _checkInteger(key, "object_timestamp", timestamp, 0, TIMESTAMP_MAX),
            None if value is None else _checkValue(key, value),
        )
    session = document.get("session", "")
    if not isinstance(session, str):
        raise BadBody("session must be a string")
    chunked = document.get("chunked", False)
    if not isinstance(chunked, bool):
        raise BadBody("chunked must be true or false")
    return SubscribeBody(chunked, session, tuple(byKey.values()))


def _optionalRevision(key: str, entry: Mapping[str, Any], name: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    return _checkInteger(key, name, value, INT32_MIN, INT32_MAX)


def parsePut(body: bytes) -> list[PutEntry]:
    """
    Parse a put body in either form: C{objects} entries carry a nested
    C{value}; bucket-keyed entries carry their fields inline.

    Entries with no fields are dropped (nothing to write).

    @raise BadBody: if the body or any entry is malformed.
    """
    document = parseJSONObject(body)
    hasObjects = document.get("objects") is not None
    puts: list[PutEntry] = []
    for entry in _entries(document, namedOnlyIfKnown=False):
        key = _checkKey(entry)
        if hasObjects:
            fields = entry.get("value")
            fields = {} if fields is None else _checkValue(key, fields)
        else:
            fields = _checkValue(
                key,
                {name: v for name, v in entry.items() if name not in _PUT_META_KEYS},
            )
        ifRevision = _optionalRevision(key, entry, "if_object_revision")
        baseRevision = _optionalRevision(key, entry, "base_object_revision")
        if fields:
            puts.append(PutEntry(key, fields, ifRevision, baseRevision))
    return puts


def objectJSON(bucket: Bucket, withValue: bool = True) -> dict[str, Any]:
    """
    One response object, fields in the order C{object_revision},
    C{object_timestamp}, C{object_key}, C{value}: the firmware may ignore an
    update whose revision and timestamp come after the key (PROTOCOL.md §6.3).
    """
    rendered: dict[str, Any] = {
        "object_revision": bucket.revision,
        "object_timestamp": bucket.timestamp,
        "object_key": bucket.key,
    }
    if withValue:
        rendered["value"] = bucket.value
    return rendered


def renderObjects(buckets: Iterable[Bucket], withValues: bool = True) -> bytes:
    """
    C{{"objects": [...]}} as bytes: one complete JSON document, as each chunk
    of a subscribe answer must be.
    """
    return _COMPACT.encode(
        {"objects": [objectJSON(bucket, withValues) for bucket in buckets]}
    ).encode("utf-8")


#: Headers of every v7 answer that carries objects.
JSON_HEADERS = ((b"content-type", b"application/json"),)


@frozen
class Rendered:
    """An answer's body and the headers that describe it."""

    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def renderAnswer(buckets: Iterable[Bucket]) -> Rendered:
    """A subscribe's answer, or one chunk of it: the buckets with values."""
    return Rendered(JSON_HEADERS, renderObjects(buckets))


def renderReceipts(buckets: Iterable[Bucket]) -> Rendered:
    """
    A put's receipts or a listing: keys, revisions and timestamps, never a
    value; a device takes a value as authoritative and would lose edits
    made since (PROTOCOL.md §7.3, §8).
    """
    return Rendered(JSON_HEADERS, renderObjects(buckets, withValues=False))


def touchesSetpoint(buckets: Iterable[Bucket]) -> bool:
    """Whether any of C{buckets} carries a temperature or mode field."""
    return any(SETPOINT_FIELDS.intersection(bucket.value) for bucket in buckets)
