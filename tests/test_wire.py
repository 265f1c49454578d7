# -*- test-case-name: tests.test_wire -*-
"""
Tests for L{nestproto.device.wire}: parsing subscribe and put bodies in both
forms, rendering objects in the firmware's field order, and the bounds.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nestproto.buckets import INT32_MAX, INT32_MIN, TIMESTAMP_MAX, Bucket
from nestproto.device import wire
from nestproto.device.wire import (
    MAX_BODY_BYTES,
    MAX_OBJECTS,
    MAX_VALUE_DEPTH,
    ClientObject,
    PutEntry,
    SubscribeBody,
    objectJSON,
    parseJSONObject,
    parsePut,
    parseSubscribe,
    renderObjects,
    touchesSetpoint,
)
from nestproto.errors import BadBody

SERIAL = "02AA01AC0000000001"
SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def nested(depth: int) -> dict[str, Any]:
    """A value C{depth} objects deep."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


class ParseJSONObjectTests(SynchronousTestCase):
    """L{parseJSONObject}."""

    def test_object(self) -> None:
        """A JSON object is returned as a dict, numbers and strings intact."""
        self.assertEqual(
            parseJSONObject(b'{"a": 1, "b": [1.5, "\\u00e9"], "c": null}'),
            {"a": 1, "b": [1.5, "é"], "c": None},
        )

    def test_refused(self) -> None:
        """
        Invalid UTF-8, invalid JSON, the non-JSON constants, numbers beyond
        a float, absurd nesting, and documents that are not objects are
        refused with L{BadBody}.
        """
        for body in [
            b"\xff\xfe{}",
            b'{"a": "\xc3"}',
            b"",
            b"   ",
            b"{",
            b"{'a': 1}",
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": -Infinity}',
            b'{"a": 1e999}',
            b'{"a": -1e400}',
            b"[" * 100000 + b"]" * 100000,
            b'{"a":' * 100000 + b"1" + b"}" * 100000,
            b"[]",
            b"[{}]",
            b"1",
            b'"text"',
            b"null",
            b"true",
            b'{"a": 1} {"b": 2}',
        ]:
            with self.assertRaises(BadBody, msg=repr(body[:40])):
                parseJSONObject(body)

    def test_largeFiniteNumbersKept(self) -> None:
        """The largest finite floats are still numbers."""
        self.assertEqual(parseJSONObject(b'{"a": 1.7e308}'), {"a": 1.7e308})


class ParseSubscribeTests(SynchronousTestCase):
    """L{parseSubscribe}, both body forms."""

    def test_objectsForm(self) -> None:
        """
        The objects-array form gives one L{ClientObject} per entry, in
        order, with C{chunked} and C{session}.
        """
        parsed = parseSubscribe(
            encode(
                {
                    "chunked": True,
                    "session": "18b43000000102AA01AC0000000001",
                    "objects": [
                        {
                            "object_key": DEVICE,
                            "object_revision": 17,
                            "object_timestamp": 1767225600123,
                        },
                        {
                            "object_key": "user.homeowner",
                            "object_revision": -3,
                            "object_timestamp": 5,
                            "value": {"name": "x"},
                        },
                    ],
                }
            )
        )
        self.assertEqual(
            parsed,
            SubscribeBody(
                True,
                "18b43000000102AA01AC0000000001",
                (
                    ClientObject(DEVICE, 17, 1767225600123),
                    ClientObject("user.homeowner", -3, 5, {"name": "x"}),
                ),
            ),
        )

    def test_namedForm(self) -> None:
        """
        The named form takes every top-level known bucket type (or bucket
        key) whose value carries an C{object_key}; other names are ignored.
        """
        parsed = parseSubscribe(
            encode(
                {
                    "chunked": True,
                    "session": "s",
                    "device": {
                        "object_key": DEVICE,
                        "object_revision": 1,
                        "object_timestamp": 2,
                    },
                    SHARED: {"object_key": SHARED, "object_timestamp": 3},
                    "nonsense": {"object_key": f"schedule.{SERIAL}"},
                    "structure": {"no_key": True},
                    "user": "not an object",
                }
            )
        )
        self.assertEqual(
            parsed.objects, (ClientObject(DEVICE, 1, 2), ClientObject(SHARED, 0, 3))
        )

    def test_formsAgree(self) -> None:
        """Both forms of the same subscribe parse to the same objects."""
        entries = [
            {"object_key": DEVICE, "object_revision": 4, "object_timestamp": 9},
            {"object_key": SHARED, "value": {"target_change_pending": False}},
        ]
        arrayed = parseSubscribe(encode({"chunked": True, "objects": entries}))
        named = parseSubscribe(
            encode({"chunked": True, "device": entries[0], "shared": entries[1]})
        )
        self.assertEqual(arrayed, named)

    def test_objectsWinOverNamed(self) -> None:
        """When C{objects} is present, named entries are ignored."""
        parsed = parseSubscribe(
            encode(
                {
                    "objects": [{"object_key": SHARED}],
                    "device": {"object_key": DEVICE},
                }
            )
        )
        self.assertEqual(parsed.objects, (ClientObject(SHARED),))

    def test_defaults(self) -> None:
        """
        Absent C{chunked} means non-chunked, absent C{session} is empty,
        absent revision and timestamp are 0 and an absent or null value is
        no value.
        """
        parsed = parseSubscribe(
            encode({"objects": [{"object_key": SHARED, "value": None}]})
        )
        self.assertEqual(parsed, SubscribeBody(False, "", (ClientObject(SHARED),)))
        self.assertEqual(parseSubscribe(b"{}"), SubscribeBody(False, "", ()))

    def test_duplicateKeyLastWins(self) -> None:
        """A key named twice counts once, with its last entry."""
        parsed = parseSubscribe(
            encode(
                {
                    "objects": [
                        {"object_key": SHARED, "object_timestamp": 1},
                        {"object_key": SHARED, "object_timestamp": 2},
                    ]
                }
            )
        )
        self.assertEqual(parsed.objects, (ClientObject(SHARED, 0, 2),))

    def test_inlineUpdate(self) -> None:
        """
        An entry is an inline update when it has a value and revision and
        timestamp are 0 (PROTOCOL.md §11.4).
        """
        self.assertTrue(ClientObject(SHARED, 0, 0, {}).isInlineUpdate)
        self.assertFalse(ClientObject(SHARED, 0, 0).isInlineUpdate)
        self.assertFalse(ClientObject(SHARED, 1, 0, {}).isInlineUpdate)
        self.assertFalse(ClientObject(SHARED, 0, 1, {}).isInlineUpdate)

    def test_bounds(self) -> None:
        """
        Revisions span int32 (negative included); timestamps span 0 to the
        end of year 9999 in ms.
        """
        parsed = parseSubscribe(
            encode(
                {
                    "objects": [
                        {
                            "object_key": SHARED,
                            "object_revision": INT32_MIN,
                            "object_timestamp": 0,
                        },
                        {
                            "object_key": DEVICE,
                            "object_revision": INT32_MAX,
                            "object_timestamp": TIMESTAMP_MAX,
                        },
                    ]
                }
            )
        )
        self.assertEqual(
            parsed.objects,
            (
                ClientObject(SHARED, INT32_MIN, 0),
                ClientObject(DEVICE, INT32_MAX, TIMESTAMP_MAX),
            ),
        )

    def test_maximumObjects(self) -> None:
        """
        Up to L{MAX_OBJECTS} objects are accepted; one more is refused.
        """
        keys = [f"message.m{i}" for i in range(MAX_OBJECTS + 1)]
        parsed = parseSubscribe(
            encode({"objects": [{"object_key": k} for k in keys[:-1]]})
        )
        self.assertEqual(len(parsed.objects), MAX_OBJECTS)
        with self.assertRaises(BadBody):
            parseSubscribe(encode({"objects": [{"object_key": k} for k in keys]}))

    def test_maximumDepth(self) -> None:
        """
        A value nested L{MAX_VALUE_DEPTH} levels is accepted; one level
        deeper is refused.
        """
        ok = parseSubscribe(
            encode(
                {"objects": [{"object_key": SHARED, "value": nested(MAX_VALUE_DEPTH)}]}
            )
        )
        self.assertEqual(ok.objects[0].value, nested(MAX_VALUE_DEPTH))
        with self.assertRaises(BadBody):
            parseSubscribe(
                encode(
                    {
                        "objects": [
                            {"object_key": SHARED, "value": nested(MAX_VALUE_DEPTH + 1)}
                        ]
                    }
                )
            )

    def test_refusedEntries(self) -> None:
        """
        Malformed entries and fields are refused with L{BadBody}: wrong types
        (bools are not integers), out-of-range numbers, unknown or malformed
        keys.
        """
        bad: list[Any] = [
            {"objects": {"object_key": SHARED}},
            {"objects": "x"},
            {"objects": [SHARED]},
            {"objects": [None]},
            {"objects": [{"object_key": 5}]},
            {"objects": [{"object_key": None}]},
            {"objects": [{"object_key": ["shared", SERIAL]}]},
            {"objects": [{"object_key": "nosuchtype.1"}]},
            {"objects": [{"object_key": "shared"}]},
            {"objects": [{"object_key": "shared."}]},
            {"objects": [{"object_key": "Shared." + SERIAL}]},
            {"objects": [{"object_key": "shared." + "A" * 81}]},
            {"objects": [{"object_key": "shared.a b"}]},
            {"objects": [{"object_key": SHARED, "object_revision": True}]},
            {"objects": [{"object_key": SHARED, "object_revision": False}]},
            {"objects": [{"object_key": SHARED, "object_revision": "1"}]},
            {"objects": [{"object_key": SHARED, "object_revision": 1.0}]},
            {"objects": [{"object_key": SHARED, "object_revision": INT32_MAX + 1}]},
            {"objects": [{"object_key": SHARED, "object_revision": INT32_MIN - 1}]},
            {"objects": [{"object_key": SHARED, "object_timestamp": True}]},
            {"objects": [{"object_key": SHARED, "object_timestamp": -1}]},
            {"objects": [{"object_key": SHARED, "object_timestamp": 1.5}]},
            {"objects": [{"object_key": SHARED, "object_timestamp": "0"}]},
            {
                "objects": [
                    {"object_key": SHARED, "object_timestamp": TIMESTAMP_MAX + 1}
                ]
            },
            {"objects": [{"object_key": SHARED, "value": []}]},
            {"objects": [{"object_key": SHARED, "value": "x"}]},
            {"objects": [{"object_key": SHARED, "value": 1}]},
            {"objects": [{"object_key": SHARED, "value": True}]},
            {"session": 5},
            {"session": None, "objects": []},
            {"chunked": "true"},
            {"chunked": 1},
            {"chunked": None},
            {"device": {"object_key": "device"}},
        ]
        for document in bad:
            with self.assertRaises(BadBody, msg=repr(document)[:80]):
                parseSubscribe(encode(document))


class ParsePutTests(SynchronousTestCase):
    """L{parsePut}, both body forms."""

    def test_keyedForm(self) -> None:
        """
        Bucket-keyed entries carry their fields inline; C{object_key},
        C{if_object_revision} and C{base_object_revision} are not fields.
        """
        parsed = parsePut(
            encode(
                {
                    "session": "s",
                    SHARED: {
                        "object_key": SHARED,
                        "if_object_revision": 457,
                        "target_temperature": 21.5,
                        "target_temperature_type": "heat",
                    },
                    DEVICE: {
                        "object_key": DEVICE,
                        "base_object_revision": 122,
                        "current_humidity": 44,
                    },
                }
            )
        )
        self.assertEqual(
            parsed,
            [
                PutEntry(
                    SHARED,
                    {"target_temperature": 21.5, "target_temperature_type": "heat"},
                    457,
                    None,
                ),
                PutEntry(DEVICE, {"current_humidity": 44}, None, 122),
            ],
        )

    def test_objectsForm(self) -> None:
        """Objects-array entries carry their fields nested in C{value}."""
        parsed = parsePut(
            encode(
                {
                    "session": "s",
                    "objects": [
                        {
                            "object_key": SHARED,
                            "base_object_revision": 1545,
                            "value": {"hvac_heater_state": True},
                        }
                    ],
                }
            )
        )
        self.assertEqual(
            parsed, [PutEntry(SHARED, {"hvac_heater_state": True}, None, 1545)]
        )

    def test_formsAgree(self) -> None:
        """Both forms of the same put parse alike."""
        keyed = parsePut(
            encode({SHARED: {"object_key": SHARED, "if_object_revision": 3, "a": 1}})
        )
        arrayed = parsePut(
            encode(
                {
                    "objects": [
                        {
                            "object_key": SHARED,
                            "if_object_revision": 3,
                            "value": {"a": 1},
                        }
                    ]
                }
            )
        )
        self.assertEqual(keyed, arrayed)

    def test_emptyEntriesDropped(self) -> None:
        """Entries without fields, or with an empty value, are dropped."""
        self.assertEqual(
            parsePut(
                encode(
                    {
                        "objects": [
                            {"object_key": SHARED},
                            {"object_key": DEVICE, "value": {}},
                            {"object_key": DEVICE, "value": None},
                        ]
                    }
                )
            ),
            [],
        )
        self.assertEqual(
            parsePut(encode({SHARED: {"object_key": SHARED, "if_object_revision": 1}})),
            [],
        )

    def test_refused(self) -> None:
        """Malformed put entries are refused with L{BadBody}."""
        bad: list[Any] = [
            {"objects": {}},
            {"objects": [1]},
            {"objects": [{"object_key": "bogus.1", "value": {"a": 1}}]},
            {"objects": [{"object_key": SHARED, "value": [1]}]},
            {
                "objects": [
                    {
                        "object_key": SHARED,
                        "value": {"a": 1},
                        "if_object_revision": True,
                    }
                ]
            },
            {
                "objects": [
                    {"object_key": SHARED, "value": {"a": 1}, "if_object_revision": "3"}
                ]
            },
            {
                "objects": [
                    {
                        "object_key": SHARED,
                        "value": {"a": 1},
                        "base_object_revision": 2**40,
                    }
                ]
            },
            {SHARED: {"object_key": 7, "a": 1}},
            {SHARED: {"object_key": SHARED, "a": nested(MAX_VALUE_DEPTH)}},
        ]
        for document in bad:
            with self.assertRaises(BadBody, msg=repr(document)[:80]):
                parsePut(encode(document))


class RenderTests(SynchronousTestCase):
    """L{objectJSON}, L{renderObjects} and L{touchesSetpoint}."""

    bucket = Bucket(SHARED, -7, 1767225600400, {"target_temperature": 21.5, "é": "ü"})

    def test_fieldOrder(self) -> None:
        """
        Objects are rendered C{object_revision}, C{object_timestamp},
        C{object_key}, C{value} (PROTOCOL.md §6.3).
        """
        self.assertEqual(
            list(objectJSON(self.bucket)),
            ["object_revision", "object_timestamp", "object_key", "value"],
        )
        self.assertEqual(
            list(objectJSON(self.bucket, withValue=False)),
            ["object_revision", "object_timestamp", "object_key"],
        )

    def test_renderedBytes(self) -> None:
        """
        C{renderObjects} is one compact JSON document whose bytes keep the
        field order.
        """
        rendered = renderObjects([self.bucket, Bucket(DEVICE)])
        self.assertEqual(
            rendered,
            b'{"objects":[{"object_revision":-7,"object_timestamp":1767225600400,'
            b'"object_key":"shared.02AA01AC0000000001","value":'
            b'{"target_temperature":21.5,"\\u00e9":"\\u00fc"}},'
            b'{"object_revision":0,"object_timestamp":0,'
            b'"object_key":"device.02AA01AC0000000001","value":{}}]}',
        )

    def test_renderedWithoutValues(self) -> None:
        """Receipts and listings leave the value out."""
        self.assertEqual(
            json.loads(renderObjects([self.bucket], withValues=False)),
            {
                "objects": [
                    {
                        "object_revision": -7,
                        "object_timestamp": 1767225600400,
                        "object_key": SHARED,
                    }
                ]
            },
        )

    def test_renderNothing(self) -> None:
        """No buckets render as an empty object list."""
        self.assertEqual(renderObjects([]), b'{"objects":[]}')

    def test_roundTrip(self) -> None:
        """What is rendered parses back as a subscribe naming the same state."""
        parsed = parseSubscribe(renderObjects([self.bucket]))
        self.assertEqual(
            parsed.objects,
            (ClientObject(SHARED, -7, 1767225600400, dict(self.bucket.value)),),
        )

    def test_touchesSetpoint(self) -> None:
        """
        Only temperature and mode fields count as setpoint changes
        (PROTOCOL.md §6.3).
        """
        for name in sorted(wire.SETPOINT_FIELDS):
            self.assertTrue(touchesSetpoint([Bucket(SHARED, value={name: 1})]))
        self.assertFalse(
            touchesSetpoint([Bucket(DEVICE, value={"current_temperature": 20.0})])
        )
        self.assertFalse(touchesSetpoint([]))

    def test_bodyLimit(self) -> None:
        """The body limit is 1 MiB."""
        self.assertEqual(MAX_BODY_BYTES, 1024 * 1024)
