# -*- test-case-name: tests.test_device_api -*-
"""
Tests for the discovery side of L{nestproto.device.api}: entry and ping
(PROTOCOL.md §4, §9; §19 scenarios 1, 2, 57), and who is calling (§2.2,
scenarios 3-6).
"""

from __future__ import annotations

import gzip
import json
from base64 import b64encode
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse

from nestproto.device.api import TransportSettings
from nestproto.uploads import MAX_UPLOAD_BODY_BYTES, LogStore

from .helpers import DEVICE_URL, SERIAL, basicAuth, completed, makeServer
from .stub import StubClient

ENTRY_FORM = (
    b"reset=FALSE&mac=18B430000001&model=Diamond-2.6&request_id=1"
    b"&software_version=5.9.3-5&wireless_reg_domain=US&backplate_model=Backplate-2.1"
)
ENTRY_FIELDS = {
    "czfe_url",
    "transport_url",
    "direct_transport_url",
    "passphrase_url",
    "ping_url",
    "pro_info_url",
    "weather_url",
    "upload_url",
    "software_update_url",
    "server_version",
    "tier_name",
}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _jsonAnswer(
    case: SynchronousTestCase, client: StubClient, requested: Deferred[IResponse]
) -> tuple[int, Any]:
    """The status and decoded body of a response that is JSON."""
    response, body = completed(case, client, requested)
    case.assertEqual(
        response.headers.getRawHeaders("content-type"), ["application/json"]
    )
    return response.code, json.loads(body)


class EntryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = makeServer()

    def answer(self, d: Any) -> tuple[int, Any]:
        return _jsonAnswer(self, self.server.deviceClient, d)

    def test_scenario1PostAndGet(self) -> None:
        """
        Scenario 1: a form POST and a bodiless GET of /nest/entry both answer
        the flat map of eleven fields, each URL with an explicit port.
        """
        client = self.server.deviceClient
        for d in [
            client.post(DEVICE_URL + "/nest/entry", data=ENTRY_FORM, headers=FORM),
            client.get(DEVICE_URL + "/nest/entry"),
        ]:
            code, entry = self.answer(d)
            self.assertEqual(code, 200)
            self.assertEqual(set(entry), ENTRY_FIELDS)
            for name, value in entry.items():
                if name.endswith("_url") and value:
                    self.assertEqual(urlsplit(value).port, 8000, name)
            self.assertEqual(entry["transport_url"], DEVICE_URL + "/nest/transport")
            self.assertEqual(entry["tier_name"], "local")

    def test_scenario2WeatherAndUpdate(self) -> None:
        """
        Scenario 2: weather_url ends in /nest/weather/v1?query= and
        software_update_url is empty (no OTA).
        """
        code, entry = self.answer(
            self.server.deviceClient.get(DEVICE_URL + "/nest/entry")
        )
        self.assertTrue(entry["weather_url"].endswith("/nest/weather/v1?query="))
        self.assertEqual(entry["software_update_url"], "")

    def test_legacyAlias(self) -> None:
        """/entry answers like /nest/entry."""
        code, entry = self.answer(
            self.server.deviceClient.post(
                DEVICE_URL + "/entry", data=ENTRY_FORM, headers=FORM
            )
        )
        self.assertEqual(code, 200)
        self.assertEqual(set(entry), ENTRY_FIELDS)

    def test_hostWithoutPortGetsDefaultPort(self) -> None:
        """
        A Host header without a port means the scheme's default port, and the
        URLs say so explicitly.
        """
        code, entry = self.answer(
            self.server.deviceClient.get(
                DEVICE_URL + "/nest/entry", headers={"Host": "nest.example.org"}
            )
        )
        self.assertEqual(
            entry["transport_url"], "http://nest.example.org:80/nest/transport"
        )

    def test_configuredOrigin(self) -> None:
        """--origin replaces whatever Host the request carried."""
        server = makeServer(
            settings=TransportSettings(origin="https://thermo.lan:8443")
        )
        server.deviceClient.flush()
        d = server.deviceClient.get(DEVICE_URL + "/nest/entry")
        entry = json.loads(completed(self, server.deviceClient, d)[1])
        self.assertEqual(
            entry["passphrase_url"], "https://thermo.lan:8443/nest/passphrase"
        )

    def test_entryRemembersDevice(self) -> None:
        """The entry fields of an identified device are kept for the control side."""
        self.answer(
            self.server.deviceClient.post(
                DEVICE_URL + "/nest/entry",
                data=ENTRY_FORM,
                headers={**FORM, "X-nl-device-id": SERIAL},
            )
        )
        self.assertEqual(
            self.server.state.presence.entryFields(SERIAL)["software_version"],
            "5.9.3-5",
        )

    def test_malformedForm(self) -> None:
        """A malformed form body is a 400 JSON error and nothing is kept."""
        for body in [b"mac=zz&&==", b"mac=XYZ", b"\xff\xfe=1", b"x=" + b"a" * 300]:
            code, error = self.answer(
                self.server.deviceClient.post(
                    DEVICE_URL + "/nest/entry",
                    data=body,
                    headers={**FORM, "X-nl-device-id": SERIAL},
                )
            )
            self.assertEqual(code, 400, body)
            self.assertIn("error", error)
        self.assertEqual(self.server.state.presence.entryFields(SERIAL), {})

    def test_unknownPathAndMethod(self) -> None:
        """An unknown path is a 404 and a wrong method a 405, both JSON."""
        code, error = self.answer(
            self.server.deviceClient.get(DEVICE_URL + "/nest/nothing")
        )
        self.assertEqual(code, 404)
        self.assertIn("error", error)
        code, error = self.answer(
            self.server.deviceClient.delete(DEVICE_URL + "/nest/entry")
        )
        self.assertEqual(code, 405)


class PingTests(SynchronousTestCase):
    def test_scenario57Ping(self) -> None:
        """Scenario 57: /nest/ping answers status ok and the time in ms."""
        server = makeServer()
        d = server.deviceClient.get(DEVICE_URL + "/nest/ping")
        _response, body = completed(self, server.deviceClient, d)
        self.assertEqual(
            json.loads(body), {"status": "ok", "timestamp": server.nowMs()}
        )


class CallerTests(SynchronousTestCase):
    """Who is calling: the serial in Basic auth and the X-nl headers."""

    def listingFor(
        self, headers: dict[str, str], path: str = "/nest/transport/device/x"
    ) -> int:
        server = makeServer()
        d = server.deviceClient.get(DEVICE_URL + path, headers=headers)
        response, _body = completed(self, server.deviceClient, d)
        self.serial = next(iter(server.state.presence.heardFrom()), None)
        return int(response.code)

    def test_scenario3BasicVariants(self) -> None:
        """
        Scenario 3: Basic usernames SERIAL, nest.SERIAL and d.SERIAL.rand all
        name SERIAL.
        """
        for username in [SERIAL, f"nest.{SERIAL}", f"d.{SERIAL}.AB12"]:
            encoded = b64encode(f"{username}:pw".encode()).decode()
            self.assertEqual(
                self.listingFor({"Authorization": f"Basic {encoded}"}), 200
            )
            self.assertEqual(self.serial, SERIAL)

    def test_scenario4ClientId(self) -> None:
        """Scenario 4: without Authorization, X-nl-client-id names the device."""
        self.assertEqual(self.listingFor({"X-nl-client-id": f"d.{SERIAL}.AB12"}), 200)
        self.assertEqual(self.serial, SERIAL)

    def test_deviceIdHeader(self) -> None:
        """X-nl-device-id names the device when nothing else does."""
        self.listingFor({"X-nl-device-id": SERIAL})
        self.assertEqual(self.serial, SERIAL)

    def test_basicBeatsHeaders(self) -> None:
        """The Basic username wins over X-nl-client-id (PROTOCOL.md §2.2 order)."""
        self.listingFor(
            {**basicAuth(SERIAL), "X-nl-client-id": "d.02AA01AC0000000099.x"}
        )
        self.assertEqual(self.serial, SERIAL)

    def test_scenario5Normalised(self) -> None:
        """
        Scenario 5: a lowercase, hyphenated serial is normalised; one shorter
        than 10 characters counts as missing.
        """
        self.listingFor({"X-nl-device-id": "02aa-01ac-0000-0000-01"})
        self.assertEqual(self.serial, SERIAL)
        self.assertEqual(
            self.listingFor(
                {"X-nl-device-id": "abc-123"}, path="/nest/transport/device/"
            ),
            400,
        )

    def test_scenario6NoSerial(self) -> None:
        """
        Scenario 6: subscribe and put with no identifiable serial answer 400
        "Device serial required"; entry still answers 200.
        """
        server = makeServer()
        for path in ["/nest/transport", "/nest/transport/put"]:
            d = server.deviceClient.post(DEVICE_URL + path, data=b'{"objects":[]}')
            response, body = completed(self, server.deviceClient, d)
            self.assertEqual(response.code, 400)
            self.assertEqual(json.loads(body)["error"], "Device serial required")
        d = server.deviceClient.get(DEVICE_URL + "/nest/entry")
        server.deviceClient.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(server.store.scopes(), [])


class RestOfEntryMapTests(SynchronousTestCase):
    """Weather, upload and pro_info routes (PROTOCOL.md §9)."""

    def call(
        self, server: Any, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any]:
        d = server.deviceClient.request(method, DEVICE_URL + path, **kwargs)
        return _jsonAnswer(self, server.deviceClient, d)

    def test_weatherNeedsQuery(self) -> None:
        """Weather without a query is a 400 JSON error."""
        code, body = self.call(makeServer(), "GET", "/nest/weather/v1")
        self.assertEqual((code, body["error"]), (400, "Missing query parameter"))

    def test_weatherOff(self) -> None:
        """With no weather source the device gets a 503 JSON error at once."""
        code, body = self.call(makeServer(), "GET", "/nest/weather/v1?query=94043,US")
        self.assertEqual(code, 503)
        self.assertEqual(body["error"], "Weather service unavailable")

    def test_uploadGzipKept(self) -> None:
        """
        Scenario 58: a gzip log upload answers 200 status ok and, with log
        keeping on, is stored decompressed under the device's serial.
        """
        directory = FilePath(self.mktemp())
        server = makeServer(logs=LogStore(directory, Clock()))
        code, body = self.call(
            server,
            "POST",
            "/nest/upload",
            data=gzip.compress(b"boot ok\n"),
            headers=basicAuth(),
        )
        self.assertEqual((code, body), (200, {"status": "ok"}))
        [log] = directory.child(SERIAL).children()
        self.assertEqual(log.getContent(), b"boot ok\n")

    def test_uploadTooLarge(self) -> None:
        """An upload past the cap is refused with 413."""
        code, body = self.call(
            makeServer(),
            "POST",
            "/nest/upload",
            data=b"x" * (MAX_UPLOAD_BODY_BYTES + 1),
        )
        self.assertEqual(code, 413)

    def test_proInfo(self) -> None:
        """pro_info answers a stable stub for the code in the path or query."""
        server = makeServer()
        code, body = self.call(server, "GET", "/nest/pro_info/12345")
        self.assertEqual((code, body["pro_id"]), (200, "12345"))
        code, body = self.call(server, "GET", "/pro-info?entry_code=777")
        self.assertEqual(body["pro_id"], "777")
        code, body = self.call(server, "GET", "/nest/pro_info")
        self.assertEqual(code, 400)
