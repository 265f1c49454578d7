"""
Shared test scaffolding: a whole nestproto (store, hub, state, both APIs)
in memory, driven by a Clock and reached through L{StubClient}.
"""

from __future__ import annotations

import json
from base64 import b64encode
from collections.abc import Iterable, Mapping
from typing import Any

import treq
from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from nestproto.admission import AdmissionSettings
from nestproto.apps import AppSettings, buildApps
from nestproto.buckets import Bucket
from nestproto.control.api import ControlAPI, ControlSettings
from nestproto.device.api import DeviceAPI, TransportSettings
from nestproto.hub import SubscriberHub
from nestproto.pairing import Pairing
from nestproto.state import DeviceState
from nestproto.store import BucketWrite, SQLiteStore, ThreadRunner, runInline
from nestproto.uploads import LogStore
from nestproto.weather import IWeatherSource

from .stub import StubClient

SERIAL = "02AA01AC0000000001"
OTHER_SERIAL = "02AA01AC0000000002"
DEVICE_URL = "http://192.168.1.10:8000"
CONTROL_URL = "http://192.168.1.10:8082"
#: 2026-01-01T00:00:00Z: tests start their clocks here, so timestamps in ms
#: look like real ones.
START_SECONDS = 1767225600.0


@define
class Server:
    """One nestproto, in memory."""

    clock: Clock
    store: SQLiteStore
    hub: SubscriberHub
    state: DeviceState
    pairing: Pairing
    device: DeviceAPI
    control: ControlAPI
    deviceClient: StubClient
    controlClient: StubClient

    def nowMs(self) -> int:
        return int(self.clock.seconds() * 1000)

    def seed(self, serial: str, *buckets: Bucket) -> None:
        """Store C{buckets} in C{serial}'s scope, as if received earlier."""
        self.store.write(
            [BucketWrite(serial, bucket) for bucket in buckets], origin=serial
        )


def makeServer(
    path: str = ":memory:",
    clock: Clock | None = None,
    settings: TransportSettings | None = None,
    holdSeconds: float = 290.0,
    weatherSource: IWeatherSource | None = None,
    logs: LogStore | None = None,
    controlSettings: ControlSettings | None = None,
    storeRunner: ThreadRunner = runInline,
    admission: AdmissionSettings | None = None,
) -> Server:
    """
    Build a whole server on C{path} (a real SQLite file when given), with
    store writes committed inline so results are synchronous.

    @param storeRunner: what runs the store's commits; inline unless a test
        watches them.
    """
    if clock is None:
        clock = Clock()
        clock.advance(START_SECONDS)
    store = SQLiteStore.open(path, storeRunner, clock)
    apps = buildApps(
        store,
        clock,
        runInThread=runInline,
        settings=AppSettings(
            holdSeconds=holdSeconds,
            transport=settings or TransportSettings(),
            control=controlSettings or ControlSettings(),
            admission=admission or AdmissionSettings(),
        ),
        weatherSource=weatherSource,
        logs=logs,
    )
    return Server(
        clock,
        store,
        apps.hub,
        apps.state,
        apps.pairing,
        apps.device,
        apps.control,
        StubClient(apps.device.app.resource()),
        StubClient(apps.control.app.resource()),
    )


def basicAuth(serial: str = SERIAL, password: str = "token") -> dict[str, str]:
    """Headers a thermostat sends once it has credentials."""
    encoded = b64encode(f"nest.{serial}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def objectsBody(
    objects: Iterable[Mapping[str, Any]], chunked: bool = True, session: str = "s"
) -> bytes:
    """A subscribe or put body in the objects-array form."""
    return json.dumps(
        {"chunked": chunked, "session": session, "objects": list(objects)}
    ).encode()


def clientObject(
    key: str, revision: int = 0, timestamp: int = 0, value: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One subscribe entry."""
    entry: dict[str, Any] = {
        "object_key": key,
        "object_revision": revision,
        "object_timestamp": timestamp,
    }
    if value is not None:
        entry["value"] = value
    return entry


def parseChunks(chunks: list[bytes]) -> list[dict[str, Any]]:
    """Each received chunk decoded as one JSON document."""
    return [json.loads(chunk) for chunk in chunks if chunk]


def sseEvents(chunks: list[bytes]) -> list[tuple[str, str, Any]]:
    """
    The events of a Server-Sent Events stream as a browser's EventSource
    dispatches them: (last event id, event type, JSON data) each. An id
    field sets the id even on a block without data, which dispatches
    nothing.
    """
    events: list[tuple[str, str, Any]] = []
    lastId = ""
    for block in b"".join(chunks).decode().split("\n\n"):
        kind, data = "message", []
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name == "id":
                lastId = value
            elif name == "event":
                kind = value
            elif name == "data":
                data.append(value)
        if data:
            events.append((lastId, kind, json.loads("\n".join(data))))
    return events


@define
class Answer:
    """A response whose body is being collected chunk by chunk."""

    response: IResponse
    chunks: list[bytes]
    done: Deferred[None]

    def documents(self) -> list[dict[str, Any]]:
        """Each chunk received, decoded as one JSON document."""
        return parseChunks(self.chunks)

    def keys(self) -> list[str]:
        """The object keys of every document received, in order."""
        return [
            entry["object_key"]
            for document in self.documents()
            for entry in document["objects"]
        ]

    def header(self, name: str) -> str | None:
        values = self.response.headers.getRawHeaders(name)
        return None if values is None else values[0]


class DroppableBody(Protocol):
    """
    Collects a response body like C{treq.collect}, and can drop the
    connection as a client that gives up does.
    """

    def __init__(self, chunks: list[bytes], done: Deferred[None]) -> None:
        self.chunks = chunks
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def disconnect(self) -> None:
        # A response body's transport is a producer (IResponse.deliverBody).
        IPushProducer(self.transport).stopProducing()


def receive(response: IResponse) -> Answer:
    """Start collecting the body of C{response}, whose headers arrived."""
    chunks: list[bytes] = []
    return Answer(response, chunks, treq.collect(response, chunks.append))


def receiveDroppable(response: IResponse) -> tuple[Answer, DroppableBody]:
    """Like L{receive}, with a body protocol that can drop the connection."""
    chunks: list[bytes] = []
    done: Deferred[None] = Deferred()
    body = DroppableBody(chunks, done)
    response.deliverBody(body)
    return Answer(response, chunks, done), body


def completed(
    case: SynchronousTestCase, client: StubClient, requested: Deferred[IResponse]
) -> tuple[IResponse, bytes]:
    """
    Flush C{client}; then the response to C{requested}, which has ended,
    and its whole body.
    """
    client.flush()
    response = case.successResultOf(requested)
    return response, case.successResultOf(treq.content(response))
