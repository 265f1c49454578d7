# -*- test-case-name: tests.test_bad_input -*-
"""
Hostile and malformed requests on the device port: each gets a JSON 4xx
(never a 5xx), changes nothing in the store, holds nothing, and leaves the
server serving (DESIGN.md "Principles").
"""

from __future__ import annotations

import json
from typing import Any

from nestproto.buckets import Bucket
from nestproto.device.wire import MAX_BODY_BYTES, MAX_OBJECTS, MAX_VALUE_DEPTH
from nestproto.fields import NUMERIC_FIELDS
from nestproto.state import MAX_BUCKETS_PER_DEVICE
from tests.helpers import DEVICE_URL, SERIAL, basicAuth, clientObject
from tests.test_transport import DEVICE, SHARED, TransportTestCase

SUBSCRIBE = "/nest/transport"
PUT = "/nest/transport/put"
SUBSCRIBES = [SUBSCRIBE, "/nest/transport/v7/subscribe"]
PUTS = [PUT, "/nest/transport/v7/put"]
PATHS = SUBSCRIBES + PUTS
#: The fields each request kind reads as integers: a subscribe names what
#: the device holds, a put the revision it writes over (PROTOCOL.md §6.1,
#: §7.1); each ignores the other's.
INTEGER_FIELDS = [
    ("object_revision", SUBSCRIBES),
    ("object_timestamp", SUBSCRIBES),
    ("if_object_revision", PUTS),
    ("base_object_revision", PUTS),
]
# A valid entry that would change the stored shared bucket: placed before a
# bad one, it shows that nothing of a refused body is applied.
GOOD_ENTRY = b'{"object_key":"%s","value":{"target_temperature":30.0}}' % (
    SHARED.encode(),
)


def withEntry(entry: bytes) -> bytes:
    """An objects-array body: the good entry, then C{entry}."""
    return b'{"chunked":true,"objects":[' + GOOD_ENTRY + b"," + entry + b"]}"


def entry(**fields: Any) -> bytes:
    return json.dumps({"object_key": DEVICE, **fields}).encode()


def sized(total: int) -> bytes:
    """A valid JSON object body of exactly C{total} bytes."""
    head, tail = b'{"chunked":false,"objects":[],"pad":"', b'"}'
    return head + b"x" * (total - len(head) - len(tail)) + tail


class BadInputTestCase(TransportTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.seed(
            Bucket(SHARED, 5, self.start - 100, {"target_temperature": 20.0}),
            Bucket(DEVICE, 6, self.start - 100, {"current_humidity": 40}),
        )

    def assertRefused(
        self,
        body: bytes,
        status: int = 400,
        paths: list[str] = PATHS,
        headers: dict[str, str] | None = None,
    ) -> None:
        """
        C{body} posted to each of C{paths} is refused with C{status} and a
        JSON error, and changes and holds nothing.
        """
        for path in paths:
            label = f"{path} {body[:60]!r}"
            before = self.snapshot()
            answer, document = self.answered(
                self.stub.post(
                    DEVICE_URL + path,
                    data=body,
                    headers=basicAuth() if headers is None else headers,
                )
            )
            self.assertEqual(answer.response.code, status, label)
            self.assertEqual(answer.header("content-type"), "application/json", label)
            self.assertIsInstance(document["error"], str, label)
            self.assertIsInstance(document["code"], str, label)
            self.assertEqual(self.snapshot(), before, label)
            self.assertClean()

    def assertServes(self) -> None:
        """A good subscribe and a good put are still answered normally."""
        answer, body = self.answered(
            self.subscribe([clientObject(SHARED, 0, 0)], chunked=False)
        )
        self.assertEqual(answer.response.code, 200)
        self.assertEqual(
            body["objects"][0]["value"],
            self.current(SHARED).value,
        )
        before = self.stored(DEVICE)
        assert before is not None
        answer, body = self.answered(
            self.put({"objects": [{"object_key": DEVICE, "value": {"served": True}}]})
        )
        self.assertEqual(answer.response.code, 200)
        self.assertEqual(body["objects"][0]["object_revision"], before.revision + 1)
        self.assertClean()


class TransportBodyTests(BadInputTestCase):
    """Malformed subscribe and put bodies."""

    def test_invalidJSON(self) -> None:
        """Text that is not JSON is refused."""
        for body in [b"{", b"{'a': 1}", b'{"objects": [}', b"objects=1", b"{} {}"]:
            self.assertRefused(body)
        self.assertServes()

    def test_jsonArray(self) -> None:
        """A JSON array (or any non-object document) is refused."""
        for body in [b"[]", b"[" + GOOD_ENTRY + b"]", b"1", b"null", b'"x"']:
            self.assertRefused(body)
        self.assertServes()

    def test_emptyBody(self) -> None:
        """An empty or blank body is refused."""
        for body in [b"", b" \r\n"]:
            self.assertRefused(body)
        self.assertServes()

    def test_wrongObjectKey(self) -> None:
        """
        An C{object_key} that is missing, not a string, or not a known
        bucket key is refused, and the good entry before it is not applied.
        """
        for bad in [
            b"{}",
            b'{"object_key":5}',
            b'{"object_key":null}',
            b'{"object_key":["device","x"]}',
            b'{"object_key":{"k":1}}',
            b'{"object_key":"nosuchtype.X"}',
            b'{"object_key":"device"}',
            b'{"object_key":"device.\\u0000"}',
            b'{"object_key":"' + b"device." + b"9" * 200 + b'"}',
        ]:
            self.assertRefused(withEntry(bad))
        self.assertServes()

    def test_wrongRevisionTypes(self) -> None:
        """
        Revisions that are strings, floats, nulls in lists, out of int32, or
        absurdly long integers are refused.
        """
        for field, paths in INTEGER_FIELDS:
            if field == "object_timestamp":
                continue
            for value in ["1", 1.5, [1], {"a": 1}, 2**31, -(2**31) - 1, 10**30]:
                self.assertRefused(withEntry(entry(**{field: value})), paths=paths)
        self.assertRefused(
            withEntry(
                b'{"object_key":"%s","object_revision":%s}'
                % (DEVICE.encode(), b"9" * 5000)
            )
        )
        self.assertServes()

    def test_wrongTimestampTypes(self) -> None:
        """Timestamps that are not integers from 0 to year 9999 are refused."""
        for value in ["1767225600000", 1.5, -1, 10**16, [0], {"ms": 0}]:
            self.assertRefused(
                withEntry(entry(object_timestamp=value)), paths=SUBSCRIBES
            )
        self.assertServes()

    def test_boolsAsInts(self) -> None:
        """C{true} and C{false} are not revisions or timestamps."""
        for field, paths in INTEGER_FIELDS:
            for value in [True, False]:
                self.assertRefused(withEntry(entry(**{field: value})), paths=paths)
        self.assertServes()

    def test_wrongValueTypes(self) -> None:
        """A value that is not an object is refused."""
        for value in [[], [1, 2], "x", 5, True]:
            self.assertRefused(withEntry(entry(value=value)))
        self.assertServes()

    def test_wrongEnvelopeTypes(self) -> None:
        """
        C{objects} that is not a list of objects, a C{session} that is not a
        string and a C{chunked} that is not a bool are refused.
        """
        for body in [
            b'{"objects":{}}',
            b'{"objects":"x"}',
            b'{"objects":[1]}',
            b'{"objects":[' + GOOD_ENTRY + b',"x"]}',
        ]:
            self.assertRefused(body)
        for body in [
            b'{"objects":[' + GOOD_ENTRY + b'],"session":5}',
            b'{"objects":[' + GOOD_ENTRY + b'],"chunked":"true"}',
            b'{"objects":[' + GOOD_ENTRY + b'],"chunked":1}',
        ]:
            self.assertRefused(body, paths=SUBSCRIBES)
        self.assertServes()

    def test_tooManyObjects(self) -> None:
        """More objects than L{MAX_OBJECTS} in one request are refused."""
        entries = b",".join(
            b'{"object_key":"message.m%d","value":{"a":1}}' % (i,)
            for i in range(MAX_OBJECTS + 1)
        )
        self.assertRefused(b'{"objects":[' + entries + b"]}")
        self.assertServes()

    def test_invalidUTF8(self) -> None:
        """Bodies that are not UTF-8, wholly or in one string, are refused."""
        for body in [
            b"\xff\xfe\x00{",
            withEntry(
                b'{"object_key":"%s","value":{"a":"\xc3\x28"}}' % DEVICE.encode()
            ),
            withEntry(b'{"object_key":"%s\xe9"}' % DEVICE.encode()),
        ]:
            self.assertRefused(body)
        self.assertServes()

    def test_absurdNesting(self) -> None:
        """
        100000 nested lists, 100000 nested objects (deeper than the parser's
        stack), and a value just past L{MAX_VALUE_DEPTH} are refused.
        """
        deep = 100000
        for body in [
            b"[" * deep + b"]" * deep,
            b'{"a":' * deep + b"1" + b"}" * deep,
            withEntry(
                b'{"object_key":"%s","value":{"a":' % DEVICE.encode()
                + b"[" * deep
                + b"]" * deep
                + b"}}"
            ),
            withEntry(
                b'{"object_key":"%s","value":' % DEVICE.encode()
                + b'{"a":' * MAX_VALUE_DEPTH
                + b"{}"
                + b"}" * MAX_VALUE_DEPTH
                + b"}"
            ),
        ]:
            self.assertRefused(body)
        self.assertServes()

    def test_nonFiniteNumbers(self) -> None:
        """
        C{NaN}, C{Infinity} and numbers beyond a float (which would be stored
        as infinity and rendered as the non-JSON C{Infinity}) are refused.
        """
        for token in [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"]:
            self.assertRefused(
                withEntry(
                    b'{"object_key":"%s","value":{"a":%s}}' % (DEVICE.encode(), token)
                )
            )
        self.assertServes()

    def test_nonNumbersInNumericFields(self) -> None:
        """
        A put or a subscribe (inline update, or a later copy the server
        would adopt) giving a field clients read as a number text, a
        boolean, a list, an object or an integer too large for a float is
        refused with 400 as a whole,
        whichever of shared or device it names.
        """
        for name in sorted(NUMERIC_FIELDS):
            for key in (SHARED, DEVICE):
                for value in ["20.5", True, False, [20], {"c": 20}, "", 10**400]:
                    bad = json.dumps(
                        {"object_key": key, "value": {name: value, "other": 1}}
                    ).encode()
                    self.assertRefused(withEntry(bad))
                    later = json.dumps(
                        {
                            "object_key": key,
                            "object_revision": 9,
                            "object_timestamp": self.start + 10_000,
                            "value": {name: value},
                        }
                    ).encode()
                    self.assertRefused(withEntry(later), paths=SUBSCRIBES)
                    inline = {"object_key": key, name: value}
                    self.assertRefused(json.dumps({key: inline}).encode(), paths=PUTS)
        self.assertServes()

    def test_numbersAndNullInNumericFields(self) -> None:
        """
        Integers, floats and C{null} (no reading) are taken in those
        fields; other bucket types may hold anything there.
        """
        answer, body = self.answered(
            self.put(
                {
                    "objects": [
                        {
                            "object_key": SHARED,
                            "value": {
                                "current_temperature": 21,
                                "target_temperature": None,
                            },
                        },
                        {
                            "object_key": DEVICE,
                            "value": {"battery_level": 3.9, "current_humidity": 41},
                        },
                        {
                            "object_key": "kryptonite.k1",
                            "value": {"current_temperature": "n/a"},
                        },
                    ]
                }
            )
        )
        self.assertEqual(answer.response.code, 200)
        self.assertEqual(self.current(SHARED).value["current_temperature"], 21)
        self.assertEqual(self.current(DEVICE).value["battery_level"], 3.9)
        self.assertClean()

    def test_oversizedBody(self) -> None:
        """
        A body of 1 MiB + 1 byte is refused with 413; one of exactly 1 MiB
        is read.
        """
        self.assertRefused(sized(MAX_BODY_BYTES + 1), status=413)
        answer, body = self.answered(
            self.stub.post(
                DEVICE_URL + SUBSCRIBE, data=sized(MAX_BODY_BYTES), headers=basicAuth()
            )
        )
        self.assertEqual(answer.response.code, 200)
        self.assertEqual(body, {"objects": []})
        self.assertServes()

    def test_bucketLimit(self) -> None:
        """
        A device at the bucket limit cannot create another bucket, by put or
        by inline subscribe (400, nothing changed); its existing buckets
        still take changes.
        """
        self.seed(
            *(
                Bucket(f"where.w{n}", 1, self.start - 100, {"n": n})
                for n in range(MAX_BUCKETS_PER_DEVICE - 2)
            )
        )
        self.assertEqual(len(self.server.store.buckets(SERIAL)), MAX_BUCKETS_PER_DEVICE)
        put = json.dumps(
            {"objects": [{"object_key": "message.new", "value": {"a": 1}}]}
        ).encode()
        self.assertRefused(put, paths=[PUT])
        inline = json.dumps(
            {"chunked": True, "objects": [clientObject("message.new", value={"a": 1})]}
        ).encode()
        self.assertRefused(inline, paths=[SUBSCRIBE])
        self.assertServes()

    def test_noSerial(self) -> None:
        """
        Without a usable serial (none, a malformed Basic header, one too
        short) subscribe and put answer 400 "Device serial required".
        """
        for headers in [
            {},
            {"Authorization": "Basic !!!not-base64"},
            {"Authorization": "Basic //79"},
            {"Authorization": "Bearer x"},
            {"X-nl-client-id": "d.SHORT.1"},
        ]:
            self.assertRefused(withEntry(entry()), headers=headers)
        self.assertServes()

    def test_hostileHeaders(self) -> None:
        """
        An oversized Weave id header is cut to 128 characters, not stored
        whole.
        """
        answer, body = self.answered(
            self.stub.post(
                DEVICE_URL + PUT,
                data=json.dumps(
                    {"objects": [{"object_key": DEVICE, "value": {"b": 1}}]}
                ).encode(),
                headers={**basicAuth(), "X-nl-weave-device-id": "W" * 10000},
            )
        )
        self.assertEqual(answer.response.code, 200)
        stored = self.stored(DEVICE)
        assert stored is not None
        self.assertLessEqual(len(stored.value["weave_device_id"]), 128)
        self.assertServes()


class OtherRequestTests(BadInputTestCase):
    """Entry bodies, unknown paths and wrong methods."""

    def assertJSONError(
        self, method: str, path: str, status: int, **kwargs: Any
    ) -> None:
        before = self.snapshot()
        answer, document = self.answered(
            self.stub.request(method, DEVICE_URL + path, **kwargs)
        )
        self.assertEqual(answer.response.code, status, f"{method} {path}")
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertIsInstance(document["error"], str)
        self.assertEqual(self.snapshot(), before)
        self.assertClean()

    def test_entryBadForm(self) -> None:
        """
        An entry POST whose form is malformed, not UTF-8, has a malformed
        field, or is too large is refused with a JSON 4xx and recorded
        nowhere.
        """
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for body, status in [
            (b"\xff\xfe=1", 400),
            (b"mac=\xc3\x28", 400),
            (b"a&&b", 400),
            (b"reset", 400),
            (b"mac=zz", 400),
            (b"mac=18B430000001&request_id=-1", 400),
            (b"model=" + b"x" * 200, 400),
            (b"model=" + b"x" * 5000, 413),
        ]:
            self.assertJSONError(
                "POST",
                "/nest/entry",
                status,
                data=body,
                headers={**form, "X-nl-device-id": SERIAL},
            )
        self.assertEqual(self.server.state.presence.entryFields(SERIAL), {})

    def test_entryBadJSON(self) -> None:
        """A JSON entry body that is not a JSON object is refused."""
        for body in [b"{", b"[]", b"\xff"]:
            self.assertJSONError(
                "POST",
                "/nest/entry",
                400,
                data=body,
                headers={"Content-Type": "application/json"},
            )
        answer, document = self.answered(self.stub.get(DEVICE_URL + "/nest/entry"))
        self.assertEqual(answer.response.code, 200)
        self.assertIn("transport_url", document)

    def test_unknownPath(self) -> None:
        """Unknown paths answer a JSON 404."""
        for method, path in [
            ("GET", "/"),
            ("GET", "/nest/nothing"),
            ("POST", "/nest/nothing"),
            ("GET", "/nest"),
            ("POST", "/v9/put"),
        ]:
            self.assertJSONError(method, path, 404)

    def test_wrongMethod(self) -> None:
        """Known paths with the wrong method answer a JSON 405."""
        for method, path in [
            ("DELETE", "/nest/transport"),
            ("PUT", "/nest/transport/put"),
            ("PUT", "/nest/entry"),
            ("POST", "/nest/ping"),
            ("DELETE", f"/nest/transport/device/{SERIAL}"),
        ]:
            self.assertJSONError(method, path, 405)
        self.assertServes()

    def test_nonUTF8Path(self) -> None:
        """
        A path that is not UTF-8 once percent-decoded answers a JSON 400,
        logs no error, and the server keeps serving.
        """
        for method, path in [
            ("GET", "/nest/transport/%ff"),
            ("POST", "/nest/transport/%ff/put"),
            ("GET", "/nest/%c3%28"),
        ]:
            self.assertJSONError(method, path, 400)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertServes()

    def test_listingWithoutUsableSerial(self) -> None:
        """
        A listing naming no usable serial (too short, too long, only
        punctuation) and sent without credentials answers a JSON 400.
        """
        for name in ["abc", "A" * 10000, "-.-.-.-.-.-.", "device."]:
            self.assertJSONError("GET", f"/nest/transport/device/{name}", 400)
