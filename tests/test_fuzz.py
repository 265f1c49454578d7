# -*- test-case-name: tests.test_fuzz -*-
"""
Every endpoint of both ports gets generated requests: valid, nearly valid
and garbage bodies, headers and paths.

Whatever arrives, the answer is below 500 and a JSON document (DESIGN.md
"Principles": bad input gets a clear JSON error), and a refused request
changes nothing that is stored. The only answers without a JSON body are
deliberate: a held subscribe ending with no data (PROTOCOL.md §6.4), the
control API's event stream (text/event-stream) and a CORS preflight (204);
and one is the test harness's: StubTreq's site parses POST forms, so a POST
declaring a multipart body that does not parse gets twisted.web's bare 400
(the service's sites do not parse POST forms). Weather comes from
a source that answers: an unavailable upstream is a deliberate 503
(PROTOCOL.md §9), outside what fuzzing checks.
"""

from __future__ import annotations

import gzip
import json
from copy import deepcopy
from typing import Any
from urllib.parse import quote, urlsplit

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from nestproto.buckets import Bucket
from nestproto.control.api import ControlAPI, ControlSettings
from nestproto.membership import GLOBAL_SCOPE, OWNER_RECORD
from nestproto.pairing import ENTRY_KEY_RECORD
from nestproto.store import BucketWrite, RecordWrite
from nestproto.weather import IWeatherSource

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    Server,
    basicAuth,
    makeServer,
)
from .strategies import (
    CONTROL_PATHS,
    DEVICE_PATHS,
    START_MS,
    bucketValues,
    controlCommands,
    deviceHeaders,
    garbageBodies,
    nearlyValidBodies,
    paths,
    putBodies,
    subscribeBodies,
)
from .stub import StubClient
from .test_conformance import OBJECT_FIELDS, Body, chunksOf, objectsOf

#: Long enough for any held answer to end: the hold (§12) and the SSE
#: stream's keep-alive both end or tick within it.
LONGEST_HOLD_SECONDS = 300.0
RECORD_KINDS = (OWNER_RECORD, ENTRY_KEY_RECORD)
TOKEN = "s3cret-token"
METHODS = ("GET", "POST", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")


@implementer(IWeatherSource)
class FixedWeather:
    """A weather source that always answers, so weather is fuzzed, not missed."""

    def fetch(self, query: str) -> Deferred[dict[str, Any]]:
        return succeed({"current": {"temp_c": 10.0}, "location": {}, "forecast": {}})


def snapshot(server: Server) -> tuple[dict[str, list[Bucket]], dict[str, Any]]:
    """Everything stored: each scope's buckets and each kind of record."""
    store = server.store
    stored = {scope: store.buckets(scope) for scope in store.scopes()}
    return stored, {kind: deepcopy(store.records(kind)) for kind in RECORD_KINDS}


def seeded(data: st.DataObject) -> Server:
    """
    A server that knows two devices, one of them maybe claimed, with
    generated buckets, including the capabilities commands check.
    """
    server = makeServer(weatherSource=FixedWeather())
    writes: list[BucketWrite | RecordWrite] = []
    for serial in (SERIAL, OTHER_SERIAL):
        for bucketType in ("device", "shared", "schedule"):
            if data.draw(st.booleans(), label=f"has {bucketType}.{serial}"):
                value = data.draw(bucketValues(), label="value")
                value.update(
                    data.draw(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "can_heat": st.booleans(),
                                "can_cool": st.booleans(),
                                "has_fan": st.booleans(),
                            },
                        )
                    )
                )
                writes.append(
                    BucketWrite(
                        serial,
                        Bucket(
                            f"{bucketType}.{serial}",
                            data.draw(st.integers(0, 100)),
                            START_MS - data.draw(st.integers(0, 10**6)),
                            value,
                        ),
                    )
                )
    if data.draw(st.booleans(), label="claimed"):
        writes.append(RecordWrite(OWNER_RECORD, SERIAL, {"user": "homeowner"}))
        writes.append(
            BucketWrite(
                GLOBAL_SCOPE,
                Bucket("structure.homeowner", 1, START_MS - 5, {"name": "Home"}),
            )
        )
    server.store.write(writes)
    return server


def deviceBodies(serial: str) -> st.SearchStrategy[bytes]:
    """Any body a device endpoint may get."""
    return st.one_of(
        subscribeBodies(serial).map(lambda doc: json.dumps(doc).encode()),
        putBodies(serial).map(lambda doc: json.dumps(doc).encode()),
        nearlyValidBodies(serial),
        garbageBodies(),
        st.just(
            b"reset=FALSE&mac=18B430000001&model=Diamond-2.6&request_id=1"
            b"&software_version=5.9.3-5"
        ),
        st.just(b"mac=zz&&=="),
        st.binary(max_size=64).map(gzip.compress),
    )


def controlBodies(serial: str) -> st.SearchStrategy[bytes]:
    """Any body a control endpoint may get."""
    return st.one_of(
        controlCommands(serial).map(lambda doc: json.dumps(doc).encode()),
        st.fixed_dictionaries(
            {
                "code": st.sampled_from(["123ABCD", "123-abcd", "", 7, None]),
                "userId": st.sampled_from(["homeowner", "", "x" * 300, 1, None]),
            }
        ).map(lambda doc: json.dumps(doc).encode()),
        st.sampled_from(
            [
                json.dumps({"serial": serial}).encode(),
                json.dumps({"serial": serial, "command": "set_mode"}).encode(),
                json.dumps({"command": "set_away", "value": True}).encode(),
            ]
        ),
        garbageBodies(),
    )


class Fuzzer:
    """
    Sends one generated request and checks its answer; the checks fail
    the test case they are given.
    """

    def __init__(self, case: SynchronousTestCase, server: Server) -> None:
        self.case = case
        self.server = server
        self.held: Body | None = None

    def send(
        self,
        client: StubClient,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
    ) -> tuple[int, bytes, str]:
        """
        Send one request and see it through to its end (letting held
        answers end by time); return status, body and content type.
        """
        d = client.request(
            method, url, data=body or None, headers=headers, allow_redirects=False
        )
        client.flush()
        response = self.case.successResultOf(d)
        collected = Body()
        response.deliverBody(collected)
        client.flush()
        if collected.ended is None:
            self.server.clock.advance(LONGEST_HOLD_SECONDS)
            client.flush()
        if collected.ended is None:
            # A stream that does not end by itself (SSE): the client leaves.
            assert collected.transport is not None
            collected.transport.loseConnection()
            client.flush()
        self.case.assertIsNot(collected.ended, None)
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        return response.code, collected.data, types[0].decode("latin-1")

    def check(
        self,
        client: StubClient,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
    ) -> int:
        """
        Send one request and check its answer; return its status.
        """
        before = snapshot(self.server)
        status, answer, contentType = self.send(client, method, url, headers, body)
        request = (method, url, headers, body[:200], status, answer[:300], contentType)
        self.case.assertLess(status, 500, request)
        self.case.assertFalse(300 <= status < 400, request)
        document: Any = None
        if contentType.startswith(
            ("text/event-stream", "text/csv", "text/plain", "text/html")
        ):
            # Event streams, history as CSV, metrics, the dashboard's page.
            self.case.assertEqual(status, 200, request)
        elif contentType.startswith(
            ("text/html", "text/javascript", "text/css", "image/svg+xml")
        ):
            # The dashboard's page and its assets (a GET at / or /assets/).
            self.case.assertIn(status, (200, 304), request)
            self.case.assertIn(method, ("GET", "HEAD"), request)
        elif status == 204 or (status == 200 and answer == b""):
            self.case.assertEqual(answer, b"", request)
        elif status == 400 and answer == b"" and _multipart(headers):
            # StubTreq's site parses POST forms, and Twisted refuses a
            # multipart body that does not parse with a bare 400 before any
            # resource runs; the service's sites do not parse POST forms
            # (parsePOSTFormSubmission=False), so a real server never does.
            pass
        else:
            self.case.assertTrue(contentType.startswith("application/json"), request)
            document = json.loads(answer)
        refused = status >= 400 or (
            isinstance(document, dict) and document.get("success") is False
        )
        if refused:
            self.case.assertEqual(snapshot(self.server), before, request)
        self.endHeld(request)
        return status

    def holdSubscriber(self) -> None:
        """
        Hold a subscribe of C{SERIAL}, announcing what is stored, so that
        whatever the fuzzed request changes may be pushed to it.
        """
        server = self.server
        for _ in range(3):
            entries = [
                {
                    "object_key": bucket.key,
                    "object_revision": bucket.revision,
                    "object_timestamp": bucket.timestamp,
                }
                for bucket in server.state.listing(SERIAL)
                if bucket.timestamp
            ]
            d = server.deviceClient.post(
                DEVICE_URL + "/nest/transport",
                data=json.dumps({"chunked": True, "objects": entries}).encode(),
                headers=basicAuth(SERIAL),
            )
            server.deviceClient.flush()
            body = Body()
            self.case.successResultOf(d).deliverBody(body)
            server.deviceClient.flush()
            if body.ended is None:
                self.held = body
                return
        self.case.fail("a subscribe announcing what is stored is held")

    def endHeld(self, request: object) -> None:
        """
        Let every hold end: the held subscriber got only complete JSON
        chunks in the wire field order, and no waiter or timer is left.
        """
        self.server.clock.advance(LONGEST_HOLD_SECONDS)
        self.server.deviceClient.flush()
        if self.held is not None:
            self.case.assertIsNot(self.held.ended, None, request)
            for chunk in chunksOf(self.held.data):
                objectsOf(chunk, OBJECT_FIELDS)
        self.case.assertEqual(self.server.hub.total(), 0, request)
        self.case.assertEqual(self.server.clock.getDelayedCalls(), [], request)


def _multipart(headers: dict[str, str]) -> bool:
    return any(
        name.lower() == "content-type" and value.startswith("multipart/")
        for name, value in headers.items()
    )


def _url(origin: str, path: str) -> str:
    # Paths are sent as generated, but must be a valid request target.
    return origin + quote(path, safe="/?=&,.:-_%@")


class DeviceFuzzTests(SynchronousTestCase):
    """
    The device port answers every request with a JSON document below 500,
    and a refused request changes nothing.
    """

    @given(st.data())
    def test_deviceEndpoints(self, data: st.DataObject) -> None:
        """
        Generated method, path, headers and body on any device endpoint:
        never a 5xx or non-JSON answer, never a change when refused.
        """
        fuzzDevice(self, data)

    @given(st.data())
    def test_transport(self, data: st.DataObject) -> None:
        """
        Generated subscribe and put bodies, valid and nearly valid, on
        every transport path and with every way of naming the device.
        """
        server = seeded(data)
        self.addCleanup(server.store.close)
        path = data.draw(
            st.sampled_from(
                [p for p in DEVICE_PATHS if "transport" in p or "czfe" in p]
            )
        )
        Fuzzer(self, server).check(
            server.deviceClient,
            "POST",
            _url(DEVICE_URL, path.format(serial=SERIAL)),
            data.draw(deviceHeaders(SERIAL)),
            data.draw(
                st.one_of(
                    subscribeBodies(SERIAL).map(lambda d: json.dumps(d).encode()),
                    putBodies(SERIAL).map(lambda d: json.dumps(d).encode()),
                    nearlyValidBodies(SERIAL),
                )
            ),
        )


def fuzzDevice(case: SynchronousTestCase, data: st.DataObject) -> None:
    """One generated request to the device port, checked."""
    server = seeded(data)
    case.addCleanup(server.store.close)
    fuzzer = Fuzzer(case, server)
    if data.draw(st.booleans(), label="held subscriber"):
        fuzzer.holdSubscriber()
    fuzzer.check(
        server.deviceClient,
        data.draw(st.sampled_from(METHODS)),
        _url(DEVICE_URL, data.draw(paths(DEVICE_PATHS, SERIAL))),
        data.draw(deviceHeaders(SERIAL)),
        data.draw(deviceBodies(SERIAL)),
    )


def fuzzControl(case: SynchronousTestCase, data: st.DataObject) -> None:
    """
    One generated request to the control port, open or protected by a
    token, checked; without the token a protected port grants nothing.
    """
    server = seeded(data)
    case.addCleanup(server.store.close)
    client = server.controlClient
    protected = data.draw(st.booleans(), label="token required")
    if protected:
        api = ControlAPI(
            state=server.state,
            hub=server.hub,
            settings=ControlSettings(token=TOKEN),
            pairing=server.device.pairing,
            events=server.control.events,
        )
        client = StubClient(api.app.resource())
    headers: dict[str, str] = {}
    if data.draw(st.booleans()):
        headers["Authorization"] = data.draw(
            st.sampled_from(
                [
                    f"Bearer {TOKEN}",
                    f"bearer {TOKEN}",
                    "Bearer x",
                    "Bearer",
                    "Basic eA==",
                    "",
                ]
            )
        )
    if data.draw(st.booleans()):
        headers["Content-Type"] = "application/json"
    fuzzer = Fuzzer(case, server)
    if data.draw(st.booleans(), label="held subscriber"):
        fuzzer.holdSubscriber()
    method = data.draw(st.sampled_from(METHODS))
    path = data.draw(paths(CONTROL_PATHS + _PREFIXED_CONTROL_PATHS, SERIAL))
    status = fuzzer.check(
        client,
        method,
        _url(CONTROL_URL, path),
        headers,
        data.draw(controlBodies(SERIAL)),
    )
    authorized = headers.get(
        "Authorization", ""
    ).lower() == f"bearer {TOKEN}" or path.startswith(f"/k/{TOKEN}/")
    if protected and not authorized:
        # An empty path is a request for "/", the dashboard's public page.
        endpoint = _route(method, path.removeprefix("/k/wrong") if path else "/")
        if endpoint is None or method == "OPTIONS":
            case.assertNotEqual(status, 200, (method, path, headers))
        elif not ControlAPI.app.isPublic(endpoint):
            # Whatever else is wrong with it: no route answers before the
            # token is checked.
            case.assertEqual(status, 401, (method, path, headers))


#: Control paths under the token's path prefix, and under a wrong one.
_PREFIXED_CONTROL_PATHS = (
    f"/k/{TOKEN}/status?serial={{serial}}",
    f"/k/{TOKEN}/command",
    f"/k/{TOKEN}/api/device",
    "/k/wrong/command",
    "/k/wrong/api/devices",
)


def _route(method: str, path: str) -> str | None:
    """The control API's route C{method} and C{path} name, if any."""
    adapter = ControlAPI.app.url_map.bind("localhost")
    try:
        # An empty path is sent as "/", as every HTTP client does.
        target = urlsplit(path).path or "/"
        endpoint, _arguments = adapter.match(target, method=method)
    except HTTPException:
        return None
    return str(endpoint)


class ControlFuzzTests(SynchronousTestCase):
    """
    The control port answers every request with a JSON document below 500,
    and a refused request changes nothing.
    """

    @given(st.data())
    def test_controlEndpoints(self, data: st.DataObject) -> None:
        """
        Generated method, path, headers and body on any control endpoint:
        never a 5xx or non-JSON answer, never a change when refused.
        """
        fuzzControl(self, data)

    @given(st.data())
    def test_commands(self, data: st.DataObject) -> None:
        """
        Generated commands, valid and nearly valid, for a device the server
        knows: applied, or refused with nothing changed.
        """
        server = seeded(data)
        self.addCleanup(server.store.close)
        fuzzer = Fuzzer(self, server)
        fuzzer.holdSubscriber()
        fuzzer.check(
            server.controlClient,
            "POST",
            CONTROL_URL + "/command",
            {"Content-Type": "application/json"},
            data.draw(controlCommands(SERIAL).map(lambda d: json.dumps(d).encode())),
        )


class FoundByFuzzingTests(SynchronousTestCase):
    """
    Requests with which the fuzzers found bugs.

    A URL that is not UTF-8 once percent-decoded got Klein's own text
    answer and an error in the log; a path with a doubled slash got a 308
    without a Location. Both ports now answer both with JSON.
    """

    def test_devicePort(self) -> None:
        """A device path with C{%ff} gets a JSON 400 naming the problem."""
        server = makeServer()
        self.addCleanup(server.store.close)
        fuzzer = Fuzzer(self, server)
        status, answer, contentType = fuzzer.send(
            server.deviceClient, "POST", DEVICE_URL + "/nest/transport/%ff", {}, b"{}"
        )
        self.assertEqual(
            (status, contentType, json.loads(answer)["code"]),
            (400, "application/json", "bad_url"),
        )

    def test_controlPort(self) -> None:
        """A control path with C{%ff%fe} gets a JSON 400 naming the problem."""
        server = makeServer()
        self.addCleanup(server.store.close)
        fuzzer = Fuzzer(self, server)
        status, answer, contentType = fuzzer.send(
            server.controlClient, "GET", CONTROL_URL + "/health/%ff%fe", {}, b""
        )
        document = json.loads(answer)
        self.assertEqual(
            (status, contentType, document["code"], document["success"]),
            (400, "application/json", "bad_url", False),
        )

    def test_doubledSlash(self) -> None:
        """
        A path with a doubled slash is not found (a JSON 404), on either
        port, instead of a redirect that leads nowhere.
        """
        server = makeServer()
        self.addCleanup(server.store.close)
        fuzzer = Fuzzer(self, server)
        for client, url in [
            (server.deviceClient, DEVICE_URL + "/nest/transport//put"),
            (server.deviceClient, DEVICE_URL + "/nest//entry"),
            (server.controlClient, CONTROL_URL + "/api//devices"),
        ]:
            status, answer, contentType = fuzzer.send(client, "POST", url, {}, b"{}")
            self.assertEqual(
                (status, contentType, json.loads(answer)["code"]),
                (404, "application/json", "not_found"),
            )
