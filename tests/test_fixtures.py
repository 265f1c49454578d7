# -*- test-case-name: tests.test_fixtures -*-
"""
Tests for L{nestproto.recording} and the C{nestproto.replay} command: the
recorder's file format and redaction, the replayer's matching, and its
errors on bad files.
"""

from __future__ import annotations

import io
import json
import os
from base64 import b64decode
from collections.abc import Callable
from functools import partial
from typing import Any

import treq
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from nestproto import replay
from nestproto.device.api import DeviceAPI
from nestproto.device.auth import deviceSerial
from nestproto.device.dialect import Dialect
from nestproto.recording.bindings import Bindings
from nestproto.recording.compare import compareDocuments
from nestproto.recording.format import (
    CONTROL,
    DEVICE,
    FORMAT_VERSION,
    FixtureError,
    loadFixture,
)
from nestproto.recording.recorder import Recorder, RecordingResource
from nestproto.recording.replayer import Replayer, replayInMemory
from nestproto.recording.targets import MemoryTarget, memoryServer
from nestproto.service import Options, makeService

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    OTHER_SERIAL,
    SERIAL,
    START_SECONDS,
    basicAuth,
    clientObject,
    objectsBody,
)
from .stub import StubClient

MAC = "18B430000001"
PASSWORD = "s3cr3t-device-token"


class _Session:
    """An in-memory server behind a recorder, and clients of both ports."""

    def __init__(
        self,
        directory: str,
        raw: bool = False,
        controlToken: str | None = None,
        tokenInPath: bool = False,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START_SECONDS)
        self.recorder = Recorder(directory, self.clock, raw=raw)
        self.controlToken = controlToken
        self.tokenInPath = tokenInPath
        device, control = memoryServer(self.clock, controlToken=controlToken)
        self.device = StubClient(self.recorder.wrap(device, DEVICE))
        self.control = StubClient(self.recorder.wrap(control, CONTROL))

    def flush(self) -> None:
        for _round in range(2):
            self.device.flush()
            self.control.flush()

    def request(self, client: StubClient, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Send a request; the returned dict fills in as the answer comes."""
        exchange: dict[str, Any] = {"chunks": [], "ended": False}

        def arrived(response: Any) -> Deferred[None]:
            exchange["response"] = response
            return treq.collect(response, exchange["chunks"].append)

        def ended(ignored: object) -> None:
            exchange["ended"] = True

        def failed(failure: Any) -> None:
            exchange["failure"] = failure

        d = client.request(*args, unbuffered=True, **kwargs)
        d.addCallback(arrived).addCallbacks(ended, failed)
        self.flush()
        return exchange

    def boot(self) -> dict[str, Any]:
        """Entry, a first subscribe with inline state, then a held one."""
        self.request(
            self.device,
            "POST",
            DEVICE_URL + "/nest/entry",
            data=f"mac={MAC}&model=Diamond-2.6".encode(),
            headers={
                "X-nl-device-id": SERIAL,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        self.clock.advance(0.25)
        key = f"shared.{SERIAL}"
        first = self.request(
            self.device,
            "POST",
            DEVICE_URL + "/nest/transport",
            data=objectsBody(
                [clientObject(key, value={"target_temperature": 20.0})],
                session=MAC.lower() + SERIAL,
            ),
            headers=basicAuth(password=PASSWORD),
        )
        (document,) = [json.loads(chunk) for chunk in first["chunks"]]
        (shared,) = document["objects"]
        self.clock.advance(0.25)
        held = self.request(
            self.device,
            "POST",
            DEVICE_URL + "/nest/transport",
            data=objectsBody(
                [
                    clientObject(
                        key, shared["object_revision"], shared["object_timestamp"]
                    )
                ]
            ),
            headers=basicAuth(password=PASSWORD),
        )
        return held

    def command(self, value: float) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        base = CONTROL_URL
        if self.controlToken is not None and self.tokenInPath:
            base += f"/k/{self.controlToken}"
        elif self.controlToken is not None:
            headers["Authorization"] = f"Bearer {self.controlToken}"
        return self.request(
            self.control,
            "POST",
            base + "/command",
            data=json.dumps(
                {"serial": SERIAL, "command": "set_temperature", "value": value}
            ).encode(),
            headers=headers,
        )

    def put(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self.request(
            self.device,
            "POST",
            DEVICE_URL + "/nest/transport/put",
            data=objectsBody([{"object_key": f"shared.{SERIAL}", "value": fields}]),
            headers=basicAuth(password=PASSWORD),
        )

    def record(self) -> str:
        """A whole session: boot, a pushed command, a put. The file's path."""
        held = self.boot()
        self.clock.advance(10)
        self.command(21.5)
        self.clock.advance(3)
        self.flush()
        assert held["ended"], "the held subscribe ends after the batch window"
        self.put({"hvac_heater_state": True})
        self.clock.advance(0.25)
        self.recorder.close()
        (path,) = self.recorder.paths()
        return path


def _lines(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


class RecorderTests(SynchronousTestCase):
    """The recorder writes one JSON-lines fixture per device and run."""

    def test_appSecretsRedacted(self) -> None:
        """
        Account passwords (JSON and form), the token a login answers and
        the token apps send (as C{Basic <token>}, in a JSONP query) appear
        nowhere in a recording (PROTOCOL.md §20.6).
        """
        session = _Session(self.directory)
        password = "correct-horse-battery"
        session.request(
            session.control,
            "POST",
            CONTROL_URL + "/api/users",
            data=json.dumps({"username": "owner", "password": password}).encode(),
            headers={"Content-Type": "application/json"},
        )
        login = session.request(
            session.device,
            "POST",
            DEVICE_URL + "/user/login",
            data=f"username=owner&password={password}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        token = json.loads(b"".join(login["chunks"]))["access_token"]
        session.request(
            session.device,
            "GET",
            DEVICE_URL + "/v2/mobile/user.owner",
            headers={"Authorization": f"Basic {token}"},
        )
        session.request(
            session.device,
            "GET",
            DEVICE_URL
            + "/v1/subscribe?jsonp=cb&payload=%7B%7D&Authorization=Basic+"
            + token,
        )
        session.recorder.close()
        text = "".join(open(path).read() for path in session.recorder.paths())
        self.assertNotIn(password, text)
        self.assertNotIn(token, text)
        # Synthetic, so that a replay creates, logs in and authorises alike.
        self.assertIn("password=password-1", text)
        self.assertIn('"password": "password-1"', text)
        self.assertIn('"access_token": "apptoken-1"', text)
        self.assertIn('"Authorization": "Basic apptoken-1"', text)
        self.assertIn("Authorization=Basic+apptoken-1", text)

    def setUp(self) -> None:
        self.directory = self.mktemp()

    def test_formatLine(self) -> None:
        """
        The first line names the format version, the synthetic serial and
        the recording's start in ms.
        """
        path = _Session(self.directory).record()
        header = _lines(path)[0]
        self.assertEqual(header["format"], FORMAT_VERSION)
        self.assertEqual(header["startMs"], int(START_SECONDS * 1000))
        self.assertTrue(header["redacted"])
        self.assertNotEqual(header["serial"], SERIAL)
        self.assertIn(header["serial"], os.path.basename(path))

    def test_redacted(self) -> None:
        """
        By default the real serial, MAC and Basic password appear nowhere
        in the file; the synthetic serial replaces the real one in paths,
        bucket keys, sessions and values alike.
        """
        path = _Session(self.directory).record()
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertNotIn(SERIAL, text)
        self.assertNotIn(MAC, text.upper())
        self.assertNotIn(PASSWORD, text)
        synthetic = _lines(path)[0]["serial"]
        subscribe = _lines(path)[2]
        body = subscribe["request"]["body"]["json"]
        self.assertEqual(body["objects"][0]["object_key"], f"shared.{synthetic}")
        self.assertTrue(body["session"].endswith(synthetic))
        authorization = subscribe["request"]["headers"]["Authorization"]
        decoded = b64decode(authorization.split(" ", 1)[1]).decode()
        self.assertEqual(decoded, f"nest.{synthetic}:redacted")

    def test_otherSerialsRedacted(self) -> None:
        """
        A serial the recorder learns only from a body (another device's
        bucket key) is replaced too, in keys and values alike.
        """
        session = _Session(self.directory)
        session.request(
            session.device,
            "POST",
            DEVICE_URL + "/nest/transport",
            data=objectsBody(
                [
                    clientObject(f"shared.{SERIAL}"),
                    clientObject(f"shared.{OTHER_SERIAL}", value={"x": OTHER_SERIAL}),
                ]
            ),
            headers=basicAuth(password=PASSWORD),
        )
        session.recorder.close()
        (path,) = session.recorder.paths()
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertNotIn(OTHER_SERIAL, text)
        self.assertIn("shared.09AA01AC0000000002", text)

    def test_raw(self) -> None:
        """With raw, serials and passwords are kept as they were."""
        path = _Session(self.directory, raw=True).record()
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertIn(f"shared.{SERIAL}", text)
        self.assertIn(MAC, text)
        self.assertFalse(_lines(path)[0]["redacted"])

    def test_chunksAndTimes(self) -> None:
        """
        A held subscribe is recorded with its start, the time its headers
        went out, the pushed chunk at the command's time and its end after
        the batch window; the command is recorded as a control exchange in
        the same file.
        """
        path = _Session(self.directory).record()
        exchanges = {line["seq"]: line for line in _lines(path)[1:]}
        held, command = exchanges[3], exchanges[4]
        self.assertEqual(held["kind"], DEVICE)
        self.assertEqual(held["start"], 0.5)
        self.assertEqual(held["response"]["headersAt"], 0.5)
        self.assertTrue(held["response"]["chunked"])
        (chunk,) = held["response"]["chunks"]
        self.assertEqual(chunk["at"], 10.5)
        pushed = chunk["body"]["json"]["objects"][0]
        self.assertEqual(
            list(pushed),
            ["object_revision", "object_timestamp", "object_key", "value"],
        )
        self.assertEqual(held["response"]["end"], 13.5)
        self.assertEqual(command["kind"], CONTROL)
        self.assertEqual(command["start"], 10.5)
        self.assertEqual(command["request"]["body"]["json"]["value"], 21.5)
        self.assertIn("X-Nl-Service-Timestamp", held["response"]["headers"])

    def test_entryCodeRedacted(self) -> None:
        """
        An entry code in a passphrase answer is replaced by a synthetic one,
        and the claim naming it on the control port shows the same one.
        """
        session = _Session(self.directory)
        answer = session.request(
            session.device,
            "GET",
            DEVICE_URL + "/nest/passphrase",
            headers={"X-nl-device-id": SERIAL},
        )
        code = json.loads(answer["chunks"][0])["value"]
        session.clock.advance(1)
        session.request(
            session.control,
            "POST",
            CONTROL_URL + "/api/register",
            data=json.dumps({"code": code, "userId": "homeowner"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        session.recorder.close()
        (path,) = session.recorder.paths()
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertNotIn(code, text)
        passphrase, claim = _lines(path)[1:]
        synthetic = passphrase["response"]["chunks"][0]["body"]["json"]["value"]
        self.assertEqual(claim["request"]["body"]["json"]["code"], synthetic)
        self.assertRegex(synthetic, "^[0-9]{3}[A-Z]{4}$")

    def test_dashedCodeRedactedAndReplays(self) -> None:
        """
        A claim typed with the hyphen the device shows (C{707-frnu}) is
        redacted like the code (the synthetic one with the hyphen), and the
        recording replays green, raw or redacted.
        """
        for raw in (False, True):
            session = _Session(self.mktemp(), raw=raw)
            answer = session.request(
                session.device,
                "GET",
                DEVICE_URL + "/nest/passphrase",
                headers={"X-nl-device-id": SERIAL},
            )
            code = json.loads(answer["chunks"][0])["value"]
            typed = f"{code[:3]}-{code[3:]}".lower()
            session.clock.advance(1)
            claim = session.request(
                session.control,
                "POST",
                CONTROL_URL + "/api/register",
                data=json.dumps({"code": typed, "userId": "homeowner"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            self.assertEqual(claim["response"].code, 200)
            session.clock.advance(1)
            session.recorder.close()
            (path,) = session.recorder.paths()
            recordedClaim = _lines(path)[2]["request"]["body"]["json"]["code"]
            if raw:
                self.assertEqual(recordedClaim, typed)
            else:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read().upper()
                self.assertNotIn(code, text)
                self.assertNotIn(typed.upper(), text)
                self.assertEqual(recordedClaim, "001-CODE")
            fixture = loadFixture(path)
            target = MemoryTarget(fixture.startSeconds)
            results: list[Any] = []
            Replayer(target, fixture).run().addCallback(results.append)
            (result,) = results
            self.assertEqual(result.describe(), [], f"raw={raw}")
            self.assertEqual(result.matched, 2)

    def test_openAtClose(self) -> None:
        """
        An exchange still open when the recorder closes is written with no
        end, and a replay expects it still open.
        """
        session = _Session(self.directory)
        held = session.boot()
        session.clock.advance(5)
        session.recorder.close()
        self.assertFalse(held["ended"])
        (path,) = session.recorder.paths()
        self.assertIsNone(_lines(path)[-1]["response"]["end"])
        result = replayInMemory(loadFixture(path))
        self.assertEqual(result.describe(), [])

    def test_lost(self) -> None:
        """
        A client that leaves a held subscribe is recorded with the time it
        left and no end; the replay leaves at the same time and matches.
        """
        session = _Session(self.directory)
        held = session.boot()
        session.clock.advance(7)
        held["response"].original._transport.loseConnection()
        session.flush()
        session.clock.advance(1)
        session.recorder.close()
        (path,) = session.recorder.paths()
        (line,) = [line for line in _lines(path) if line.get("seq") == 3]
        self.assertEqual(
            (line["response"]["lost"], line["response"]["end"]), (7.5, None)
        )
        self.assertEqual(replayInMemory(loadFixture(path)).describe(), [])

    def test_serviceOption(self) -> None:
        """
        C{--record DIR} wraps both listening ports' resources in recorders
        writing to DIR.
        """
        options = Options()
        directory = self.mktemp()
        options.parseOptions(
            ["--data", self.mktemp(), "--record", directory, "--weather", "none"]
        )
        service: Any = makeService(options, MemoryReactorClock())
        resources = [
            child.factory.resource
            for child in service
            if isinstance(child, StreamServerEndpointService)
        ]
        self.assertEqual(len(resources), 2)
        for resource in resources:
            self.assertIsInstance(resource, RecordingResource)
        self.assertTrue(os.path.isdir(directory))


class _EchoingDeviceAPI(DeviceAPI):
    """A broken server: its put receipts echo the stored value."""

    def put(self, request: IRequest, dialect: Dialect) -> Deferred[bytes]:
        serial = deviceSerial(request)

        def echo(body: bytes) -> bytes:
            document = json.loads(body)
            for item in document["objects"]:
                bucket = self.state.bucket(serial or "", item["object_key"])
                item["value"] = {} if bucket is None else bucket.value
            return json.dumps(document).encode()

        return super().put(request, dialect).addCallback(echo)


class _ReorderingResource:
    """A broken server: every object it writes has C{object_key} first."""

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        self._wrapped = wrapped

    def render(self, request: IRequest) -> Any:
        original = request.write

        def write(data: bytes) -> None:
            if data.startswith(b'{"objects"'):
                document = json.loads(data)
                document["objects"] = [
                    {"object_key": o["object_key"], **o} for o in document["objects"]
                ]
                data = json.dumps(document).encode()
            original(data)

        request.write = write  # type: ignore[method-assign]
        return self._wrapped.render(request)


def _reorderingServer(clock: Any) -> tuple[Any, Any]:
    device, control = memoryServer(clock)
    return _ReorderingResource(device), control


class ReplayTests(SynchronousTestCase):
    """Replays match a faithful server and name what a broken one breaks."""

    def setUp(self) -> None:
        self.path = _Session(self.mktemp()).record()

    def test_recordedSessionReplays(self) -> None:
        """
        A recorded session replays green against a fresh server, and
        leaves no timer behind.
        """
        fixture = loadFixture(self.path)
        target = MemoryTarget(fixture.startSeconds)
        results: list[Any] = []
        Replayer(target, fixture).run().addCallback(results.append)
        (result,) = results
        self.assertEqual(result.describe(), [])
        self.assertEqual((result.replayed, result.matched), (5, 5))
        self.assertTrue(result.ok)
        self.assertEqual(target.clock.getDelayedCalls(), [])

    def test_symbolicTimes(self) -> None:
        """
        Replayed a day later, every timestamp differs from the recording
        and the replay still matches, the recorded times bound to the new.
        """
        fixture = loadFixture(self.path)
        target = MemoryTarget(fixture.startSeconds + 86400)
        replayer = Replayer(target, fixture)
        replayer.run()
        self.assertEqual(replayer._mismatches, [])
        recorded = int(START_SECONDS * 1000) + 250
        self.assertEqual(replayer.bindings.milliseconds[recorded], recorded + 86400000)

    def test_echoingServerFails(self) -> None:
        """
        A server whose put receipts carry the value fails the replay; the
        message names the exchange and the object's fields.
        """
        fixture = loadFixture(self.path)
        result = replayInMemory(
            fixture, partial(memoryServer, deviceClass=_EchoingDeviceAPI)
        )
        self.assertFalse(result.ok)
        self.assertEqual(result.failed, 1)
        (line,) = result.describe()
        self.assertIn("exchange 5: chunk 1 $.objects[0] (fields)", line)
        self.assertIn("object_key", line)
        self.assertIn("value", line)
        self.assertTrue(line.startswith(self.path))

    def test_reorderingServerFails(self) -> None:
        """
        A server that puts C{object_key} before the revision fails every
        exchange answering objects, each message naming the field order.
        """
        result = replayInMemory(loadFixture(self.path), _reorderingServer)
        self.assertFalse(result.ok)
        lines = result.describe()
        self.assertTrue(lines)
        self.assertIn("exchange 2: chunk 1 $.objects[0] (fields): recorded", lines[0])
        self.assertIn('["object_revision", "object_timestamp", "object_key"', lines[0])
        self.assertIn('replayed ["object_key", "object_revision"', lines[0])

    def test_tamperedRecordingFails(self) -> None:
        """
        A recording whose pushed chunk says another setpoint fails at that
        exchange, chunk and field, with both values.
        """
        lines = _lines(self.path)
        bySeq = {line.get("seq"): line for line in lines}
        push = bySeq[3]["response"]["chunks"][0]["body"]["json"]["objects"][0]
        push["value"]["target_temperature"] = 25.0
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
        result = replayInMemory(loadFixture(self.path))
        (line,) = result.describe()
        self.assertIn(
            "exchange 3: chunk 1 $.objects[0].value.target_temperature: "
            "recorded 25.0, replayed 21.5",
            line,
        )

    def test_lateEndFails(self) -> None:
        """A held answer that ends later than recorded is a mismatch."""
        lines = _lines(self.path)
        (held,) = [line for line in lines if line.get("seq") == 3]
        held["response"]["end"] = 12.5
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
        result = replayInMemory(loadFixture(self.path))
        self.assertEqual(
            [m.where for m in result.mismatches], ["end (s)"], result.describe()
        )


#: The recorded app scenario, with its JSONP subscribe (scenario 71).
_APP_FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "fixtures", "app.jsonl"
)
#: The JSONP answer's callback in that recording.
_CALLBACK = b"cb_14("


class _RewritingResource:
    """A broken server: its JSONP answers are rewritten by C{rewrite}."""

    isLeaf = True

    def __init__(self, wrapped: IResource, rewrite: Callable[[bytes], bytes]) -> None:
        self._wrapped = wrapped
        self._rewrite = rewrite

    def render(self, request: IRequest) -> Any:
        original = request.write

        def write(data: bytes) -> None:
            original(self._rewrite(data) if data.startswith(_CALLBACK) else data)

        request.write = write  # type: ignore[method-assign]
        return self._wrapped.render(request)


class JSONPReplayTests(SynchronousTestCase):
    """
    A recorded JSONP answer (PROTOCOL.md §20.6) is compared as a callback
    name and an envelope whose C{X-nl-skv-*} values are bound like a
    key-list answer's headers.
    """

    def setUp(self) -> None:
        self.fixture = loadFixture(_APP_FIXTURE)
        (self.exchange,) = [
            e for e in self.fixture.exchanges if "jsonp=cb_14" in e.path
        ]

    def replay(self, old: bytes, new: bytes) -> list[str]:
        """What a replay a week later says of a server writing C{new} for C{old}."""

        def rewrite(data: bytes) -> bytes:
            self.assertIn(old, data)
            return data.replace(old, new)

        def server(clock: Any) -> tuple[Any, Any]:
            device, control = memoryServer(clock)
            return _RewritingResource(device, rewrite), control

        result = replayInMemory(
            self.fixture, server, self.fixture.startSeconds + 7 * 86400
        )
        self.assertEqual(result.failed, 1, result.describe())
        return [
            f"exchange {m.exchange}: {m.where}: {m.recorded!r} {m.replayed!r}"
            for m in result.mismatches
        ]

    def test_recordedWithItsToken(self) -> None:
        """
        The app's token in the query is recorded as the synthetic one its
        login got, and the request as sent: no C{Authorization} header.
        """
        self.assertIn("&Authorization=Basic+apptoken-1", self.exchange.path)
        self.assertNotIn("Authorization", self.exchange.requestHeaders)
        self.assertEqual(
            self.exchange.responseHeaders["Content-Type"], "application/javascript"
        )

    def test_bindsHeaders(self) -> None:
        """
        Replayed a week later, the answer matches: its revision and
        timestamp are bound as the held v7 answer's were, and the token
        in the query is the one the replay's login got.
        """
        target = MemoryTarget(self.fixture.startSeconds + 7 * 86400)
        replayer = Replayer(target, self.fixture)
        results: list[Any] = []
        replayer.run().addCallback(results.append)
        (result,) = results
        self.assertEqual(result.describe(), [])
        self.assertTrue(result.ok)
        text = self.exchange.chunks[0].body
        assert text is not None
        envelope = json.loads(text["text"][len("cb_14(") : -1])
        headers = envelope["headers"]
        recordedMs = headers["X-nl-skv-timestamp"]
        self.assertEqual(
            replayer.bindings.milliseconds[recordedMs], recordedMs + 7 * 86400000
        )
        self.assertIn(
            headers["X-nl-skv-version"],
            replayer.bindings.revisions[headers["X-nl-skv-key"]],
        )
        self.assertIn("apptoken-1", replayer.bindings.tokens)

    def test_wrongCallbackFails(self) -> None:
        """Another callback name is a mismatch naming both."""
        self.assertEqual(
            self.replay(b"cb_14(", b"cb_15("),
            ["exchange 17: body callback: 'cb_14' 'cb_15'"],
        )

    def test_changedPayloadFails(self) -> None:
        """A changed value in the payload is a mismatch at its place."""
        self.assertEqual(
            self.replay(b'"target_temperature":22.5', b'"target_temperature":23.0'),
            ["exchange 17: body $.payload.target_temperature: 22.5 23.0"],
        )

    def test_revisionBreakingBindingFails(self) -> None:
        """
        A revision other than the one the held v7 answer bound for the
        bucket is a mismatch, as in a key-list answer's headers.
        """
        self.assertEqual(
            self.replay(b'"X-nl-skv-version":2', b'"X-nl-skv-version":3'),
            ["exchange 17: body $.headers.X-nl-skv-version (earlier bound to 2): 2 3"],
        )

    def test_timestampBreakingBindingFails(self) -> None:
        """A bucket timestamp bound to another one is a mismatch."""
        (line,) = self.replay(b'"X-nl-skv-timestamp":', b'"X-nl-skv-timestamp":1')
        self.assertIn("body $.headers.X-nl-skv-timestamp (earlier bound to", line)

    def test_stringRevisionFails(self) -> None:
        """A revision sent as a string where a number was recorded fails."""
        self.assertEqual(
            self.replay(b'"X-nl-skv-version":2', b'"X-nl-skv-version":"2"'),
            ["exchange 17: body $.headers.X-nl-skv-version: 2 '2'"],
        )

    def test_notAScriptFails(self) -> None:
        """A JSON answer where a script was recorded fails."""
        (line,) = self.replay(b"cb_14(", b"(")
        self.assertIn("exchange 17: body (not a JSONP answer)", line)


def replayTokenFixture(fixture: Any, token: str | None) -> Any:
    """Replay C{fixture} against a server whose control token is C{s3cret}."""
    target = MemoryTarget(
        fixture.startSeconds, partial(memoryServer, controlToken="s3cret")
    )
    results: list[Any] = []
    Replayer(target, fixture, controlToken=token).run().addCallback(results.append)
    return results[0]


class ControlTokenTests(SynchronousTestCase):
    """A control port with a Bearer token: recorded without it, replayed with it."""

    def setUp(self) -> None:
        self.path = _Session(self.mktemp(), controlToken="s3cret").record()
        self.fixture = loadFixture(self.path)

    def replay(self, token: str | None) -> Any:
        return replayTokenFixture(self.fixture, token)

    def test_tokenRedacted(self) -> None:
        """The token is not in the file; the scheme is."""
        with open(self.path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertNotIn("s3cret", text)
        self.assertIn('"Authorization": "Bearer redacted"', text)

    def test_replayWithToken(self) -> None:
        """Given the token, the replay matches."""
        self.assertEqual(self.replay("s3cret").describe(), [])

    def test_replayWithoutToken(self) -> None:
        """Without it, the control exchange is refused: a status mismatch."""
        result = self.replay(None)
        self.assertIn(
            ("status", 200, 401),
            [(m.where, m.recorded, m.replayed) for m in result.mismatches],
        )


class PathTokenTests(SynchronousTestCase):
    """
    A control client using the C{/k/<token>/} prefix: recorded without the
    token, replayed with it put back.
    """

    def setUp(self) -> None:
        self.path = _Session(
            self.mktemp(), controlToken="s3cret", tokenInPath=True
        ).record()
        self.fixture = loadFixture(self.path)

    def replay(self, token: str | None) -> Any:
        return replayTokenFixture(self.fixture, token)

    def test_tokenRedacted(self) -> None:
        """The token is not in the file; the path says where it was."""
        with open(self.path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertNotIn("s3cret", text)
        self.assertIn('"path": "/k/redacted/command"', text)

    def test_raw(self) -> None:
        """A raw recording keeps the path as it was."""
        session = _Session(
            self.mktemp(), raw=True, controlToken="s3cret", tokenInPath=True
        )
        with open(session.record(), encoding="utf-8") as handle:
            self.assertIn('"path": "/k/s3cret/command"', handle.read())

    def test_replayWithToken(self) -> None:
        """Given the token, the replay puts it back in the path and matches."""
        self.assertEqual(self.replay("s3cret").describe(), [])

    def test_replayWithoutToken(self) -> None:
        """Without it, the command is sent without the prefix and refused."""
        result = self.replay(None)
        self.assertIn(
            ("status", 200, 401),
            [(m.where, m.recorded, m.replayed) for m in result.mismatches],
        )


class BindingTests(SynchronousTestCase):
    """Server-made values are matched by binding, in order."""

    def compare(self, bindings: Bindings, recorded: Any, replayed: Any) -> list[Any]:
        return compareDocuments(recorded, replayed, bindings)

    def test_sameRevisionAgain(self) -> None:
        """
        Where the recording shows the same revision twice, the replay must
        too.
        """
        bindings = Bindings()
        one = {"object_revision": 3, "object_key": "shared.A"}
        self.assertEqual(self.compare(bindings, one, {**one, "object_revision": 7}), [])
        self.assertEqual(self.compare(bindings, one, {**one, "object_revision": 7}), [])
        (problem,) = self.compare(bindings, one, {**one, "object_revision": 8})
        self.assertEqual(problem[1:], (3, 8))
        self.assertIn("earlier bound to 7", problem[0])

    def test_higherRevision(self) -> None:
        """
        Where the recording shows a higher revision, the replay must show a
        higher one too; revisions of other buckets are independent.
        """
        bindings = Bindings()
        key = {"object_key": "shared.A"}
        self.compare(
            bindings, {**key, "object_revision": 3}, {**key, "object_revision": 7}
        )
        (problem,) = self.compare(
            bindings, {**key, "object_revision": 4}, {**key, "object_revision": 6}
        )
        self.assertIn("order differs", problem[0])
        other = {"object_key": "device.A", "object_revision": 4}
        self.assertEqual(
            self.compare(bindings, other, {**other, "object_revision": 1}), []
        )

    def test_zeroTimestamp(self) -> None:
        """A timestamp 0 (no data) must replay as 0, and only 0 as 0."""
        bindings = Bindings()
        (problem,) = self.compare(
            bindings, {"object_timestamp": 0}, {"object_timestamp": 5}
        )
        self.assertIn("zero on one side only", problem[0])

    def test_requestUsesBindings(self) -> None:
        """
        A later request carries the replayed value wherever the recording
        had a bound one; unbound device times move with the replay clock.
        """
        bindings = Bindings(shiftMs=1000)
        self.compare(
            bindings,
            {"object_revision": 3, "object_timestamp": 50, "object_key": "shared.A"},
            {"object_revision": 9, "object_timestamp": 70, "object_key": "shared.A"},
        )
        request = bindings.request(
            {
                "objects": [
                    {
                        "object_key": "shared.A",
                        "object_revision": 3,
                        "object_timestamp": 50,
                    },
                    {
                        "object_key": "device.A",
                        "object_revision": 3,
                        "object_timestamp": 60,
                    },
                ]
            }
        )
        self.assertEqual(
            request["objects"],
            [
                {
                    "object_key": "shared.A",
                    "object_revision": 9,
                    "object_timestamp": 70,
                },
                {
                    "object_key": "device.A",
                    "object_revision": 3,
                    "object_timestamp": 1060,
                },
            ],
        )

    def test_entryCode(self) -> None:
        """A passphrase code binds, and later requests carry the replayed one."""
        bindings = Bindings()
        self.assertEqual(
            compareDocuments(
                {"value": "001CODE"}, {"value": "483KQWZ"}, bindings, codeField=True
            ),
            [],
        )
        self.assertEqual(bindings.request({"code": "001code"}), {"code": "483KQWZ"})
        self.assertEqual(bindings.request({"code": "001-code"}), {"code": "483-KQWZ"})


class BadFileTests(SynchronousTestCase):
    """A bad fixture file gives one line naming the file and line."""

    def write(self, text: str) -> str:
        path: str = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def assertFixtureError(self, text: str, line: int, reason: str) -> None:
        path = self.write(text)
        error = self.assertRaises(FixtureError, loadFixture, path)
        message = str(error)
        self.assertEqual(message.count("\n"), 0)
        self.assertTrue(message.startswith(f"{path}:{line}: "), message)
        self.assertIn(reason, message)

    def test_notJSON(self) -> None:
        """A line that is not JSON is named."""
        header = json.dumps({"format": FORMAT_VERSION, "startMs": 1})
        self.assertFixtureError(header + "\n{not json\n", 2, "not JSON")

    def test_wrongVersion(self) -> None:
        """Another format version is refused at line 1."""
        self.assertFixtureError(
            json.dumps({"format": 99, "startMs": 1}) + "\n", 1, "format version 99"
        )

    def test_noFormat(self) -> None:
        """A first line without a format field is refused."""
        self.assertFixtureError('{"startMs": 1}\n', 1, "format field")

    def test_empty(self) -> None:
        """An empty file is refused."""
        self.assertFixtureError("", 1, "empty file")

    def test_truncated(self) -> None:
        """A file cut inside its last line names that line as truncated."""
        path = _Session(self.mktemp()).record()
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        self.assertFixtureError(text[:-40], 6, "truncated")

    def test_malformedExchange(self) -> None:
        """An exchange missing a field is named with its line."""
        header = json.dumps({"format": FORMAT_VERSION, "startMs": 1})
        self.assertFixtureError(
            header + "\n" + json.dumps({"seq": 1, "kind": "device"}) + "\n",
            2,
            "missing field 'start'",
        )


class CommandLineTests(SynchronousTestCase):
    """C{python -m nestproto.replay}."""

    def test_green(self) -> None:
        """
        A recorded session exits 0 with a progress line of replayed,
        matched and failed exchanges.
        """
        path = _Session(self.mktemp()).record()
        out = io.StringIO()
        self.assertEqual(replay.main([path], out), 0)
        self.assertEqual(
            out.getvalue(), "1 fixtures: replayed 5, matched 5, failed 0\n"
        )

    def test_mismatch(self) -> None:
        """A mismatch is printed and the exit status is 1."""
        path = _Session(self.mktemp()).record()
        lines = _lines(path)
        lines[2]["response"]["status"] = 204
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
        out = io.StringIO()
        self.assertEqual(replay.main([path], out), 1)
        self.assertEqual(
            out.getvalue().splitlines(),
            [
                f"{path}: exchange 2: status: recorded 204, replayed 200",
                "1 fixtures: replayed 5, matched 4, failed 1",
            ],
        )

    def test_badFile(self) -> None:
        """An unreadable fixture is one error line and exit status 2."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write('{"format": 0, "startMs": 1}\n')
        out = io.StringIO()
        self.assertEqual(replay.main([path], out), 2)
        self.assertEqual(
            out.getvalue(), f"error: {path}:1: format version 0 is not 1\n"
        )

    def test_optionsAfterNames(self) -> None:
        """
        Options may follow the fixture names, as the synopsis shows; the
        control URL defaults to the device host on port 8082.
        """
        options = replay.Options()
        options.parseOptions(
            replay.optionsFirst(["a.jsonl", "--against", "http://h:8000", "b.jsonl"])
        )
        self.assertEqual(options["fixtures"], ["a.jsonl", "b.jsonl"])
        self.assertEqual(options["against"], "http://h:8000")
        self.assertEqual(options["control"], "http://h:8082")
        self.assertEqual(options["tolerance"], 0.5)

    def test_noArguments(self) -> None:
        """Without a fixture the usage is shown and the status is 2."""
        out = io.StringIO()
        self.assertEqual(replay.main([], out), 2)
        self.assertIn("name at least one fixture file", out.getvalue())
