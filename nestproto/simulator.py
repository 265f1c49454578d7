# -*- test-case-name: tests.test_simulator,tests.test_e2e_simulator -*-
"""
A simulated Nest thermostat: a treq client that behaves like the firmware.

It boots (C{/nest/entry}), fetches an entry key and shows it, then runs
the subscribe loop: a chunked objects-array subscribe naming the buckets
it holds with their revisions and timestamps, applying every bucket whose
server timestamp is newer than its own, subscribing again after every
answer or close, and backing off on errors. Its own changes (temperature
drift, heating on and off, acknowledging a pushed setpoint) go out as
PUTs, conditional on the shared bucket's revision (PROTOCOL.md §7, §11.3).

A thermostat on firmware 4.x (C{--firmware 4.3.3}) speaks the key-list
dialect instead (PROTOCOL.md §20): it puts its own values first, fetches its
state whole (the BigGet, its path carrying the firmware's C{._sync}
mutation of §20.2), then subscribes by a list of keys and takes one bucket
per answer; its puts are nested C{type → id → fields}.

C{python -m nestproto.simulator --server http://127.0.0.1:8000 --count N}
runs N of them against a server; C{--firmware 5.9.3-5,4.3.3} mixes them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from base64 import b64encode
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

import treq
from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from ._version import __version__
from .recording.format import splitDocuments

#: Firmware version and model the simulator reports (PROTOCOL.md §2.1, §4).
SOFTWARE_VERSION = "5.9.3-5"
MODEL = "Diamond-2.6"
#: The model a 4.x thermostat reports (PROTOCOL.md §20: Display-2.14).
KEY_LIST_MODEL = "Display-2.14"
#: Backoff after an error: first delay and cap, in seconds (§17).
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
#: Retry delay of a PUT refused by if_object_revision.
CAS_RETRY_SECONDS = 1.0


class ServerRefused(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"{url} answered {status}")
        self.status = status


@frozen
class LocalBucket:
    """A bucket as the thermostat holds it."""

    revision: int
    timestamp: int
    value: dict[str, Any]


def speaksKeyList(firmware: str) -> bool:
    """Whether C{firmware} is 4.x or older, which speaks §20's dialect."""
    major = firmware.split(".", 1)[0]
    return major.isdigit() and int(major) < 5


def initialState(
    serial: str, mac: str, firmware: str = SOFTWARE_VERSION
) -> dict[str, LocalBucket]:
    """What a thermostat holds before it first talks to a server."""
    return {
        f"device.{serial}": LocalBucket(
            0,
            0,
            {
                "serial_number": serial,
                "mac_address": mac.lower(),
                "current_version": firmware,
                "model_version": KEY_LIST_MODEL if speaksKeyList(firmware) else MODEL,
                "current_temperature": 20.0,
                "current_humidity": 40,
                "battery_level": 3.9,
                "has_fan": True,
                "temperature_scale": "C",
            },
        ),
        f"shared.{serial}": LocalBucket(
            0,
            0,
            {
                "target_temperature": 20.0,
                "target_temperature_type": "heat",
                "target_change_pending": False,
                "can_heat": True,
                "can_cool": False,
                "hvac_heater_state": False,
                "current_temperature": 20.0,
            },
        ),
        f"schedule.{serial}": LocalBucket(0, 0, {}),
        f"device_alert_dialog.{serial}": LocalBucket(0, 0, {}),
    }


@define
class SimulatedThermostat:
    """
    One simulated thermostat.

    @ivar http: a treq-like client (C{treq}, an C{HTTPClient}, a
        C{StubTreq}): anything with C{request(method, url, ...)}.
    @ivar clock: the time source for timers, backoff and drift.
    @ivar server: the origin of C{/nest/entry}, e.g. C{http://h:8000}.
    @ivar changeSeconds: how often the room temperature drifts and the
        thermostat PUTs its sensors and heating state.
    @ivar display: called with (serial, code) when the thermostat shows an
        entry code, as C{123-ABCD}.
    """

    log = Logger()

    http: Any
    clock: IReactorTime
    server: str
    serial: str
    mac: str = "18B430000001"
    password: str = "simulated-device-token"
    changeSeconds: float = 60.0
    passphraseSeconds: float = 600.0
    random: random.Random = field(factory=lambda: random.Random(0))
    display: Callable[[str, str], None] = lambda serial, code: None
    #: 4.x speaks the key-list dialect (PROTOCOL.md §20).
    firmware: str = SOFTWARE_VERSION
    #: How often an unclaimed 4.x thermostat fetches its state whole: a
    #: key-list subscribe answers only the keys listed, so that is how it
    #: learns of its new user and structure (PROTOCOL.md §20.5).
    refetchSeconds: float = 60.0
    buckets: dict[str, LocalBucket] = field(init=False)
    #: Key-list: whether its own values went out and the BigGet came back.
    booted: bool = field(default=False, init=False)
    transportURL: str | None = field(default=None, init=False)
    passphraseURL: str | None = field(default=None, init=False)
    code: str | None = field(default=None, init=False)
    owner: str | None = field(default=None, init=False)
    subscribes: int = field(default=0, init=False)
    puts: int = field(default=0, init=False)
    errors: int = field(default=0, init=False)
    _dirty: dict[str, dict[str, Any]] = field(factory=dict, init=False)
    _casRevision: dict[str, int] = field(factory=dict, init=False)
    _running: bool = field(default=False, init=False)
    _loop: Deferred[None] | None = field(default=None, init=False)
    _putting: Deferred[None] | None = field(default=None, init=False)
    _timers: dict[str, IDelayedCall] = field(factory=dict, init=False)
    _responses: list[Any] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self.buckets = initialState(self.serial, self.mac, self.firmware)
        if self.keyList:
            # A key-list subscribe carries no values: what the thermostat
            # holds before it ever synced goes out as a put (§20.4).
            for key, local in self.buckets.items():
                if local.value:
                    self._dirty[key] = dict(local.value)

    @property
    def keyList(self) -> bool:
        """Whether this thermostat speaks the key-list dialect."""
        return speaksKeyList(self.firmware)

    # Lifecycle

    def start(self) -> None:
        """Boot and run the subscribe loop until L{stop}."""
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._unexpected)
        self._schedule("change", self.changeSeconds, self._changeTick)
        if self.keyList:
            self._schedule("refetch", self.refetchSeconds, self._refetchTick)

    def stop(self) -> None:
        """Stop: cancel timers and requests in flight, leaving nothing behind."""
        self._running = False
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for response in list(self._responses):
            _disconnect(response)
        for d in (self._loop, self._putting):
            if d is not None:
                d.cancel()
        self._loop = self._putting = None

    def _unexpected(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("simulated {serial} failed", failure, serial=self.serial)

    def _schedule(self, name: str, seconds: float, f: Callable[[], None]) -> None:
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[name] = self.clock.callLater(seconds, f)

    async def _run(self) -> None:
        delay = BACKOFF_FIRST_SECONDS
        while self._running:
            try:
                if self.transportURL is None:
                    await self.entry()
                if self.owner is None and self.code is None:
                    await self.passphrase()
                if self.keyList and not self.booted:
                    await self.boot()
                await self.subscribeOnce()
                delay = BACKOFF_FIRST_SECONDS
            except CancelledError:
                return
            except Exception as e:
                self.errors += 1
                self.log.info(
                    "simulated {serial}: {error}; retrying in {delay} s",
                    serial=self.serial,
                    error=str(e),
                    delay=delay,
                )
                if isinstance(e, ServerRefused) and e.status in (401, 403, 404):
                    # Re-authenticate / reset comms (PROTOCOL.md §17).
                    self.transportURL = None
                await deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    # Requests

    def _credentials(self) -> dict[str, str]:
        token = b64encode(f"nest.{self.serial}:{self.password}".encode()).decode()
        model = KEY_LIST_MODEL if self.keyList else MODEL
        headers = {
            "Authorization": f"Basic {token}",
            "Content-Type": "application/json",
            "User-Agent": f"Nest/{self.firmware} ({model}; wireless_reg_domain=US)",
            "X-nl-protocol-version": "1",
            "X-nl-device-swversion": self.firmware,
        }
        if self.keyList:
            headers["X-nl-session-id"] = self.mac.lower() + self.serial
        return headers

    async def _keyListRequest(
        self, method: str, url: str, body: bytes | None = None
    ) -> tuple[Any, bytes]:
        """A key-list request: the response (for its headers) and its body."""
        response = await self.http.request(
            method, url, headers=self._credentials(), data=body, unbuffered=True
        )
        chunks: list[bytes] = []
        self._responses.append(response)
        try:
            await treq.collect(response, chunks.append)
        finally:
            self._responses.remove(response)
        if response.code != 200:
            raise ServerRefused(response.code, url)
        return response, b"".join(chunks)

    async def boot(self) -> None:
        """
        A 4.x thermostat's start (PROTOCOL.md §20.4, §20.5): its own values
        out, then its whole state in, by the BigGet, whose path 4.3.3
        mangles (§20.2).
        """
        assert self.transportURL is not None
        if self._dirty:
            await self._put()
        await self.bigGet()
        self.booted = True

    async def bigGet(self) -> None:
        """Fetch and take the whole state (PROTOCOL.md §20.5)."""
        assert self.transportURL is not None
        _response, body = await self._keyListRequest(
            "GET",
            f"{self.transportURL}/v3/device/device.{self.serial} ._sync",
        )
        self.apply({"objects": _nestedItems(json.loads(body))})

    async def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None = None,
        onDocument: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        """
        Send a request; the JSON documents of its answer, each handed to
        C{onDocument} as soon as it is complete (a held subscribe's chunks).
        """
        response = await self.http.request(
            method, url, headers=headers, data=body, unbuffered=True
        )
        documents: list[Any] = []
        pending = [b""]

        def collect(data: bytes) -> None:
            found, pending[0] = splitDocuments(pending[0] + data)
            for document in found:
                documents.append(document)
                if onDocument is not None:
                    onDocument(document)

        self._responses.append(response)
        try:
            await treq.collect(response, collect)
        finally:
            self._responses.remove(response)
        if response.code != 200:
            raise ServerRefused(response.code, url)
        return documents

    async def entry(self) -> None:
        """Discover the server's URLs (PROTOCOL.md §4)."""
        form = (
            f"reset=FALSE&mac={self.mac}&model={MODEL}&request_id=1"
            f"&software_version={SOFTWARE_VERSION}&wireless_reg_domain=US"
        )
        (urls,) = await self._request(
            "POST",
            self.server.rstrip("/") + "/nest/entry",
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-nl-device-id": self.serial,
            },
            form.encode(),
        )
        self.transportURL = urls["transport_url"].rstrip("/")
        self.passphraseURL = urls.get("passphrase_url")

    async def passphrase(self) -> None:
        """Fetch the entry key and show it (PROTOCOL.md §5)."""
        if not self.passphraseURL:
            return
        (answer,) = await self._request(
            "GET", self.passphraseURL, {"X-nl-device-id": self.serial}
        )
        self.code = str(answer["value"])
        self.display(self.serial, f"{self.code[:3]}-{self.code[3:]}")
        # Poll again later while unclaimed: the server hands out the same
        # key while it is valid and a new one after.
        self._schedule("passphrase", self.passphraseSeconds, self._forgetCode)

    def _refetchTick(self) -> None:
        if self.owner is not None:
            return
        if self.booted and self.transportURL is not None:
            d = Deferred.fromCoroutine(self.bigGet())
            d.addErrback(self._refetchFailed)
        self._schedule("refetch", self.refetchSeconds, self._refetchTick)

    def _refetchFailed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.errors += 1

    def _forgetCode(self) -> None:
        if self.owner is None:
            self.code = None

    def subscribeKeys(self) -> list[str]:
        """The buckets the thermostat subscribes to: those it holds."""
        return list(self.buckets)

    def subscribeBody(self) -> dict[str, Any]:
        """
        The objects-array subscribe: each bucket held with its revision and
        timestamp; buckets never synced (timestamp 0) carry the local value
        as an inline update (PROTOCOL.md §11.4).
        """
        objects = []
        for key in self.subscribeKeys():
            local = self.buckets[key]
            entry: dict[str, Any] = {
                "object_key": key,
                "object_revision": local.revision,
                "object_timestamp": local.timestamp,
            }
            if local.timestamp == 0 and local.value:
                entry["value"] = local.value
            objects.append(entry)
        return {
            "chunked": True,
            "session": self.mac.lower() + self.serial,
            "objects": objects,
        }

    def keyListBody(self) -> dict[str, Any]:
        """The key-list subscribe: each bucket held, with what it holds."""
        return {
            "keys": [
                {"key": key, "version": local.revision, "timestamp": local.timestamp}
                for key, local in self.buckets.items()
            ]
        }

    async def subscribeOnce(self) -> None:
        """One subscribe, held until the server ends it."""
        assert self.transportURL is not None
        self.subscribes += 1
        if self.keyList:
            response, body = await self._keyListRequest(
                "POST",
                self.transportURL + "/v3/subscribe",
                json.dumps(self.keyListBody()).encode(),
            )
            key = _header(response, "x-nl-skv-key")
            if key is not None:
                # One bucket per answer, named by the headers (§20.3); an
                # answer with no body is the end of a hold: subscribe again.
                self.apply(
                    {
                        "objects": [
                            {
                                "object_key": key,
                                "object_revision": int(
                                    _header(response, "x-nl-skv-version") or 0
                                ),
                                "object_timestamp": int(
                                    _header(response, "x-nl-skv-timestamp") or 0
                                ),
                                "value": json.loads(body) if body else {},
                            }
                        ]
                    }
                )
            return
        await self._request(
            "POST",
            self.transportURL + "/v7/subscribe",
            self._credentials(),
            json.dumps(self.subscribeBody()).encode(),
            self.apply,
        )

    # Applying what the server sends

    def apply(self, document: Any) -> None:
        """
        Take each bucket whose server timestamp is newer than the one held
        (PROTOCOL.md §11.3); local edits not yet put stay on top.
        """
        for item in document.get("objects", []):
            key = item["object_key"]
            local = self.buckets.get(key)
            timestamp = item["object_timestamp"]
            if timestamp == 0 and not item.get("value"):
                # The server has no such bucket: stop asking for it, or
                # every subscribe would be answered at once (§11.2).
                if local is not None and local.timestamp == 0:
                    del self.buckets[key]
                continue
            if local is not None and local.timestamp != 0:
                if timestamp <= local.timestamp:
                    continue
            value = item.get("value", local.value if local else {})
            value = {**value, **self._dirty.get(key, {})}
            self.buckets[key] = LocalBucket(item["object_revision"], timestamp, value)
            self._casRevision.pop(key, None)
            self._noticed(key, value)

    def _noticed(self, key: str, value: dict[str, Any]) -> None:
        bucketType = key.split(".", 1)[0]
        if bucketType == "user" and value.get("name"):
            # The user bucket's name completes pairing (PROTOCOL.md §13).
            self.owner = str(value["name"])
        if bucketType == "shared" and value.get("target_change_pending") is True:
            # Acknowledge the setpoint push (PROTOCOL.md §11.6).
            self.change(key, {"target_change_pending": False})

    # Own changes

    def change(self, key: str, fields: dict[str, Any]) -> None:
        """Change C{fields} of C{key} locally and PUT them."""
        self._edit(key, fields)
        self.kickPut()

    def _edit(self, key: str, fields: dict[str, Any]) -> None:
        local = self.buckets[key]
        self.buckets[key] = LocalBucket(
            local.revision, local.timestamp, {**local.value, **fields}
        )
        self._dirty.setdefault(key, {}).update(fields)

    def drift(self) -> None:
        """
        The room warms while heating and cools otherwise; the thermostat
        heats below its setpoint (heat mode, 0.2 °C hysteresis).
        """
        device = self.buckets[f"device.{self.serial}"].value
        shared = self.buckets[f"shared.{self.serial}"].value
        heating = bool(shared.get("hvac_heater_state"))
        current = float(device.get("current_temperature", 20.0))
        current += (0.1 if heating else -0.05) + self.random.uniform(-0.02, 0.02)
        current = round(current, 2)
        target = float(shared.get("target_temperature", 20.0))
        if current < target - 0.2:
            heating = True
        elif current > target + 0.2:
            heating = False
        self._edit(
            f"device.{self.serial}",
            {
                "current_temperature": current,
                "current_humidity": int(device.get("current_humidity", 40)),
            },
        )
        self._edit(
            f"shared.{self.serial}",
            {"current_temperature": current, "hvac_heater_state": heating},
        )
        self.kickPut()

    def _changeTick(self) -> None:
        if self.transportURL is not None:
            self.drift()
        self._schedule("change", self.changeSeconds, self._changeTick)

    def kickPut(self) -> None:
        """Start a PUT of the pending changes unless one is in flight."""
        if not self._running or self._putting is not None or not self._dirty:
            return
        if self.transportURL is None:
            return
        self._putting = Deferred.fromCoroutine(self._put())

        def done(result: object) -> None:
            self._putting = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.errors += 1
                self._schedule("put", CAS_RETRY_SECONDS, self.kickPut)

        self._putting.addBoth(done)

    async def _put(self) -> None:
        assert self.transportURL is not None
        for key in [key for key, fields in self._dirty.items() if not fields]:
            # Nothing to put: a put with no field is no change, and would
            # get no receipt (PROTOCOL.md §20.4).
            del self._dirty[key]
        sent = {key: dict(fields) for key, fields in self._dirty.items()}
        objects = []
        conditions: dict[str, int] = {}
        for key, fields in sent.items():
            entry: dict[str, Any] = {"object_key": key}
            if key.startswith("shared."):
                # shared is the one bucket written conditionally (§10.1).
                revision = self._casRevision.get(key, self.buckets[key].revision)
                conditions[key] = revision
                entry["if_object_revision"] = revision
            entry["value"] = fields
            objects.append(entry)
        self.puts += 1
        if self.keyList:
            nested: dict[str, dict[str, Any]] = {}
            for entry in objects:
                bucketType, bucketId = entry["object_key"].split(".", 1)
                fields = dict(entry["value"])
                if "if_object_revision" in entry:
                    fields["if_object_revision"] = entry["if_object_revision"]
                nested.setdefault(bucketType, {})[bucketId] = fields
            _response, answer = await self._keyListRequest(
                "POST", self.transportURL + "/v3/put", json.dumps(nested).encode()
            )
            receipts = {"objects": _nestedItems(json.loads(answer))}
        else:
            body = {"session": self.mac.lower() + self.serial, "objects": objects}
            (receipts,) = await self._request(
                "POST",
                self.transportURL + "/v7/put",
                self._credentials(),
                json.dumps(body).encode(),
            )
        retry = False
        for receipt in receipts.get("objects", []):
            key = receipt["object_key"]
            if key not in sent:
                continue
            revision = receipt["object_revision"]
            condition = conditions.get(key)
            if condition is not None and revision not in (condition, condition + 1):
                # Refused: keep the edits, retry on the server's revision.
                # (A receipt cannot tell a refusal at revision+1 from our
                # own change: both show revision+1; the next subscribe
                # brings the server's value then, timestamp being newer.)
                self._casRevision[key] = revision
                retry = True
                continue
            local = self.buckets[key]
            self.buckets[key] = LocalBucket(
                revision, receipt["object_timestamp"], local.value
            )
            self._casRevision.pop(key, None)
            dirty = self._dirty.get(key, {})
            for name, value in sent[key].items():
                if name in dirty and dirty[name] == value:
                    del dirty[name]
            if not dirty:
                self._dirty.pop(key, None)
        if retry:
            self._schedule("put", CAS_RETRY_SECONDS, self.kickPut)
        elif self._dirty:
            self._schedule("put", 0, self.kickPut)


def _header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if not values else str(values[0])


def _nestedItems(document: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The buckets of a nested key-list document (a BigGet, a put's
    acknowledgement) as v7 objects; metadata only when it has no fields.
    """
    items = []
    for bucketType, byId in document.items():
        for bucketId, fields in byId.items():
            value = {
                name: v
                for name, v in fields.items()
                if name not in ("$version", "$timestamp")
            }
            item: dict[str, Any] = {
                "object_key": f"{bucketType}.{bucketId}",
                "object_revision": fields["$version"],
                "object_timestamp": fields["$timestamp"],
            }
            if value:
                item["value"] = value
            items.append(item)
    return items


def _disconnect(response: Any) -> None:
    """
    Close the connection a response is read from: cancelling the read does
    not, and the server would hold the subscribe until its timeout.
    """
    original = getattr(response, "original", response)
    transport = getattr(original, "_transport", None)
    if transport is not None:
        transport.loseConnection()


# Command line


class Options(usage.Options):
    """Options of C{python -m nestproto.simulator}."""

    synopsis = "Usage: python -m nestproto.simulator [--server URL] [--count N]"
    # Plain text: usage.Options shows the module docstring (epytext) when
    # there is no longdesc.
    longdesc = (
        "Simulated Nest thermostats that behave like the firmware: each boots "
        "(entry), shows an entry code, subscribes and puts its own changes "
        "(PROTOCOL.md §4 to §7). A server takes at most "
        "--new-serials-per-hour new serials from one address (20 by "
        "default): run it with --new-serials-per-hour 0 for more."
    )

    optParameters: list[list[Any]] = [
        ["server", None, "http://127.0.0.1:8000", "Origin of the device port."],
        ["count", None, 1, "How many thermostats to simulate.", int],
        [
            "firmware",
            None,
            SOFTWARE_VERSION,
            "Firmware each reports, comma-separated to mix them in turn; "
            "4.x speaks the key-list dialect (PROTOCOL.md §20).",
        ],
        ["first-serial", None, 1, "Number of the first serial (02AA01AC...).", int],
        [
            "change-seconds",
            None,
            60.0,
            "Seconds between each thermostat's own changes.",
            float,
        ],
    ]

    def opt_version(self) -> NoReturn:
        """Display nestproto's version and exit."""
        print(f"nestproto {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["count"] < 1:
            raise usage.UsageError("--count must be at least 1")
        firmwares = [f.strip() for f in str(self["firmware"]).split(",")]
        if not all(re.fullmatch(r"[0-9]+(\.[0-9]+)*(-[0-9]+)?", f) for f in firmwares):
            raise usage.UsageError(
                "--firmware takes versions such as 5.9.3-5 or 4.3.3, comma-separated"
            )
        self["firmwares"] = firmwares


def simulatedSerial(number: int) -> str:
    """The serial of simulated thermostat C{number}."""
    return f"02AA01AC{number:010d}"


def simulatedMAC(number: int) -> str:
    """The MAC of simulated thermostat C{number} (locally administered)."""
    return f"02AB{number:08X}"


def makeThermostats(
    http: Any, clock: IReactorTime, options: Options, out: TextIO
) -> list[SimulatedThermostat]:
    """The thermostats the options ask for, each showing its code on C{out}."""

    def display(serial: str, code: str) -> None:
        out.write(f"{serial} shows entry code {code}\n")
        out.flush()

    return [
        SimulatedThermostat(
            http,
            clock,
            options["server"],
            simulatedSerial(options["first-serial"] + index),
            mac=simulatedMAC(options["first-serial"] + index),
            changeSeconds=options["change-seconds"],
            random=random.Random(index),
            display=display,
            firmware=options["firmwares"][index % len(options["firmwares"])],
        )
        for index in range(options["count"])
    ]


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    """Run simulated thermostats until interrupted."""
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        out.write(f"{options}\nerror: {e}\n")
        return 2
    from treq.client import HTTPClient
    from twisted.internet.task import react
    from twisted.web.client import Agent, HTTPConnectionPool

    def run(reactor: Any) -> Deferred[None]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=pool))
        thermostats = makeThermostats(http, reactor, options, out)
        for thermostat in thermostats:
            thermostat.start()

        def stopAll() -> None:
            for thermostat in thermostats:
                thermostat.stop()

        reactor.addSystemEventTrigger("before", "shutdown", stopAll)
        return Deferred()

    # react stops the process with the reactor's exit status.
    react(run, [])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
