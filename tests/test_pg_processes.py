# -*- test-case-name: tests.test_pg_processes -*-
"""
Two real C{twistd -n nestproto} processes on one PostgreSQL database, as
behind a load balancer: a device held on one receives a command sent to
the other, a code minted on one is claimed on the other, conflicting puts
through both are decided once, a killed process loses nothing it
acknowledged, and a killed listening connection misses nothing.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .helpers import SERIAL, basicAuth, clientObject, objectsBody
from .pg import asURL, testDatabase
from .twistd import loopbackServer

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"
ENTRY_FORM = b"mac=18B430000001&model=Diamond-2.6&software_version=5.9.3-5"


def deviceHeaders(serial: str = SERIAL) -> dict[str, str]:
    return {
        **basicAuth(serial),
        "X-nl-protocol-version": "1",
        "Content-Type": "application/json",
    }


def call(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """A request's status and JSON body."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body)
    request = urllib.request.Request(
        url,
        data=data.encode() if isinstance(data, str) else data,
        method=method,
        headers=headers or {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def eventually(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


class Server:
    """One twistd nestproto on the shared database, and its two origins."""

    def __init__(self, case: SynchronousTestCase, store: str) -> None:
        self.process, device, control = loopbackServer(
            case, case.mktemp(), "--store", store
        )
        self.device = f"http://127.0.0.1:{device}"
        self.control = f"http://127.0.0.1:{control}"

    def put(
        self, objects: list[dict[str, Any]], serial: str = SERIAL
    ) -> tuple[int, Any]:
        return call(
            "POST",
            f"{self.device}/nest/transport/v7/put",
            {"session": "s", "objects": objects},
            deviceHeaders(serial),
        )

    def subscribe(self, objects: list[dict[str, Any]]) -> tuple[int, Any]:
        """
        A keylist subscribe: held until a change, answered with it (one
        document per chunk when changes come close together: all merged).
        """
        request = urllib.request.Request(
            f"{self.device}/nest/transport",
            data=objectsBody(objects),
            method="POST",
            headers=deviceHeaders(),
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        decoder = json.JSONDecoder()
        merged: dict[str, Any] = {"objects": []}
        at = 0
        while at < len(text):
            document, at = decoder.raw_decode(text, at)
            merged["objects"].extend(document.get("objects", []))
            while at < len(text) and text[at].isspace():
                at += 1
        return response.status, merged

    def knows(self, serial: str = SERIAL) -> bool:
        """Whether the control port lists C{serial}."""
        return serial in json.dumps(call("GET", f"{self.control}/api/devices")[1])

    def command(self, command: str, value: Any) -> tuple[int, Any]:
        return call(
            "POST",
            f"{self.control}/command",
            {"serial": SERIAL, "command": command, "value": value},
        )


class TwoProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dsn = testDatabase(self)
        self.store = asURL(self.dsn)
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.addCleanup(self.pool.shutdown, wait=False, cancel_futures=True)

    def servers(self) -> tuple[Server, Server]:
        return Server(self, self.store), Server(self, self.store)

    def booted(self, server: Server) -> dict[str, dict[str, Any]]:
        """The device's thermostat state, put through C{server}: receipts."""
        status, receipts = server.put(
            [
                {
                    "object_key": SHARED,
                    "value": {
                        "target_temperature": 20.0,
                        "target_temperature_type": "heat",
                        "can_heat": True,
                        "can_cool": False,
                    },
                },
                {"object_key": DEVICE, "value": {"current_humidity": 41}},
            ]
        )
        self.assertEqual(status, 200, receipts)
        return {o["object_key"]: o for o in receipts["objects"]}

    def held(self, server: Server, held: dict[str, dict[str, Any]]) -> Future[Any]:
        """A subscribe in sync with C{held}, on C{server}, in a thread."""
        objects = [
            clientObject(o["object_key"], o["object_revision"], o["object_timestamp"])
            for o in held.values()
        ]
        future = self.pool.submit(server.subscribe, objects)
        time.sleep(0.5)
        self.assertFalse(future.done(), "the subscribe was not held")
        return future

    def test_commandReachesDeviceHeldOnTheOtherProcess(self) -> None:
        """
        A device held on B receives a command sent to A's control port,
        with the revision A's commit assigned.
        """
        a, b = self.servers()
        held = self.booted(b)
        # The device reaches A on the feed (milliseconds).
        eventually(a.knows)
        waiting = self.held(b, held)
        status, answer = a.command("set_temperature", 21.5)
        self.assertEqual((status, answer["success"]), (200, True))
        status, pushed = waiting.result(timeout=10)
        self.assertEqual(status, 200)
        [bucket] = pushed["objects"]
        self.assertEqual(bucket["object_key"], SHARED)
        self.assertEqual(bucket["object_revision"], held[SHARED]["object_revision"] + 1)
        self.assertEqual(bucket["value"]["target_temperature"], 21.5)

    def test_codeMintedOnOneIsClaimedOnTheOther(self) -> None:
        """
        An entry key handed out by A is claimed through B; A then reports
        the device claimed, and a device held on A gets its user bucket.
        """
        a, b = self.servers()
        code, entry = call(
            "POST",
            f"{a.device}/nest/entry",
            ENTRY_FORM,
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-nl-device-id": SERIAL,
            },
        )
        self.assertEqual(code, 200, entry)
        code, key = call("GET", entry["passphrase_url"], headers=deviceHeaders())
        self.assertEqual(code, 200, key)

        def status(server: Server) -> Any:
            return call(
                "GET",
                f"{server.device}/nest/passphrase/status",
                headers=deviceHeaders(),
            )[1]

        # The code reaches B on the feed (milliseconds; a person takes longer).
        eventually(lambda: status(b)["status"] == "pending")
        code, claimed = call(
            "POST", f"{b.control}/api/register", {"code": key["value"], "userId": "u1"}
        )
        self.assertEqual((code, claimed.get("serial")), (200, SERIAL), claimed)

        eventually(lambda: status(a)["status"] == "claimed")
        self.assertEqual(status(a)["claimedBy"], "u1")

    def test_wrongCodesCountOnBothProcesses(self) -> None:
        """
        Five wrong codes sent alternately to A and B lock the address out
        of both: the sixth is refused (429) by either.
        """
        a, b = self.servers()

        def register(server: Server) -> int:
            code, body = call(
                "POST",
                f"{server.control}/api/register",
                {"code": "000AAAA", "userId": "u1"},
            )
            return code

        for server in [a, b, a, b]:
            self.assertNotEqual(register(server), 429)
        # The fifth, once A has seen B's failures (its feed: milliseconds).
        time.sleep(0.5)
        self.assertNotEqual(register(a), 429)
        # Per process, B would have counted two. (Waiting with eventually()
        # would send B more wrong codes, which B would count itself.)
        time.sleep(1.0)
        self.assertEqual(register(b), 429)
        self.assertEqual(register(a), 429)

    def test_conflictingPutsThroughBothAreDecidedOnce(self) -> None:
        """
        Puts conditional on one revision, through A and B at once: exactly
        one is applied (the revision goes up by one), and both processes
        then show the same bucket.
        """
        a, b = self.servers()
        held = self.booted(a)
        revision = held[SHARED]["object_revision"]
        start = threading.Barrier(2)

        def conditional(server: Server, value: float) -> tuple[int, Any]:
            start.wait()
            return server.put(
                [
                    {
                        "object_key": SHARED,
                        "if_object_revision": revision,
                        "value": {"target_temperature": value},
                    }
                ]
            )

        for attempt in range(5):
            fromA = self.pool.submit(conditional, a, 22.0 + attempt)
            fromB = self.pool.submit(conditional, b, 25.0 + attempt)
            answers = [fromA.result(10), fromB.result(10)]
            for status, body in answers:
                self.assertEqual(status, 200, body)
            listings = [self.listing(server) for server in (a, b)]
            self.assertEqual(listings[0][SHARED]["object_revision"], revision + 1)
            self.assertIn(
                listings[0][SHARED]["value"]["target_temperature"],
                {22.0 + attempt, 25.0 + attempt},
            )
            eventually(lambda: self.listing(b) == self.listing(a))
            revision += 1

    def test_historyRecordedOnceAcrossProcesses(self) -> None:
        """
        A thermostat reporting through A: B's history API shows each HVAC
        transition once and, once A has stopped (writing its current
        minute), the minute's one sample; B, which hears of every report,
        records none of them itself.
        """
        a, b = self.servers()
        # Reports within one clock minute make one sample: start early in one.
        if time.time() % 60 > 40:
            time.sleep(61 - time.time() % 60)
        for n, heating in enumerate([True, False, True]):
            status, body = a.put(
                [
                    {
                        "object_key": SHARED,
                        "value": {
                            "current_temperature": 20.0 + n,
                            "hvac_heater_state": heating,
                        },
                    }
                ]
            )
            self.assertEqual(status, 200, body)
        eventually(b.knows)

        def history() -> dict[str, Any]:
            status, document = call("GET", f"{b.control}/api/history?serial={SERIAL}")
            self.assertEqual(status, 200, document)
            return dict(document)

        # A writes its transitions every 10 s (history.FLUSH_SECONDS).
        eventually(lambda: len(history()["transitions"]) >= 3, timeout=30)
        document = history()
        self.assertEqual(
            [(t["field"], t["on"]) for t in document["transitions"]],
            [("hvac_heater_state", on) for on in (True, False, True)],
        )
        # Only A's sample of the minute, once A has written it.
        self.assertIn([s["temperature"] for s in document["samples"]], ([], [22.0]))
        self.assertIn(a.process.stop(), (0, -15))
        document = history()
        self.assertEqual([s["temperature"] for s in document["samples"]], [22.0])
        self.assertEqual(len(document["transitions"]), 3)

    def listing(self, server: Server) -> dict[str, dict[str, Any]]:
        """What a subscribe from scratch gets from C{server}, by key."""
        status, answer = server.subscribe([clientObject(SHARED), clientObject(DEVICE)])
        self.assertEqual(status, 200, answer)
        return {o["object_key"]: o for o in answer["objects"]}

    def test_killedProcessLosesNoAcknowledgedPut(self) -> None:
        """
        A process killed with SIGKILL while four devices put through it
        loses no acknowledged put: the other process shows each device's
        last acknowledged value or a later one.
        """
        a, b = self.servers()
        serials = [f"02AA01AC00000001{n:02d}" for n in range(4)]
        acknowledged = dict.fromkeys(serials, 0)
        stop = threading.Event()

        def putLoop(serial: str) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    status, answer = a.put(
                        [{"object_key": f"shared.{serial}", "value": {"n": n}}],
                        serial,
                    )
                except OSError:
                    return
                if status == 200:
                    acknowledged[serial] = n

        loops = [self.pool.submit(putLoop, serial) for serial in serials]
        eventually(lambda: min(acknowledged.values()) >= 20)
        a.process.process.kill()
        a.process.wait()
        stop.set()
        for loop in loops:
            loop.result(10)

        import psycopg

        with psycopg.connect(self.dsn) as connection:
            stored: dict[str, str] = dict(
                connection.execute(
                    "SELECT scope, value FROM buckets WHERE key LIKE 'shared.%'"
                ).fetchall()
            )
        for serial in serials:
            self.assertGreaterEqual(
                json.loads(stored[serial])["n"], acknowledged[serial]
            )

        def shownOnB(serial: str) -> int:
            status, answer = call(
                "POST",
                f"{b.device}/nest/transport",
                objectsBody([clientObject(f"shared.{serial}")]),
                deviceHeaders(serial),
            )
            self.assertEqual(status, 200, answer)
            [bucket] = answer["objects"]
            return int(bucket["value"]["n"])

        def caughtUp(serial: str) -> bool:
            return shownOnB(serial) >= acknowledged[serial]

        # B learns of A's last commits on the feed, if it had not yet.
        for serial in serials:
            eventually(partial(caughtUp, serial))

    def test_killedListeningConnectionMissesNothing(self) -> None:
        """
        B's listening connection is killed with pg_terminate_backend while
        commands flow through A: B reconnects, catches up, and its held
        device ends with the last command; B then shows what A shows.
        """
        import psycopg

        a, b = self.servers()
        held = self.booted(b)
        eventually(a.knows)
        latest = {SHARED: dict(held[SHARED], value={})}
        killed = 0
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            for n in range(30):
                target = 15.0 + n * 0.5
                status, answer = a.command("set_temperature", target)
                self.assertEqual(status, 200, answer)
                if n % 10 == 5:
                    row = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) "
                        "FROM pg_stat_activity WHERE application_name = "
                        "'nestproto-feed' AND datname = current_database()"
                    ).fetchone()
                    assert row is not None
                    killed += row[0]
        self.assertGreaterEqual(killed, 2)

        # The device on B resubscribes with what it last got, as a
        # thermostat does, until it has the last command; revisions only rise.
        final = 15.0 + 29 * 0.5
        revisions = [held[SHARED]["object_revision"]]
        deadline = time.monotonic() + 15
        while latest[SHARED]["value"].get("target_temperature") != final:
            self.assertLess(time.monotonic(), deadline, "B never caught up")
            status, answer = b.subscribe(
                [
                    clientObject(
                        o["object_key"], o["object_revision"], o["object_timestamp"]
                    )
                    for o in latest.values()
                ]
            )
            self.assertEqual(status, 200, answer)
            for o in answer["objects"]:
                latest[o["object_key"]] = o
            revisions.append(latest[SHARED]["object_revision"])
        self.assertEqual(revisions, sorted(revisions))
        self.assertEqual(revisions[-1], held[SHARED]["object_revision"] + 30)
        self.assertEqual(self.listing(a), self.listing(b))
        b.process.waitFor("change feed connection lost")
