# -*- test-case-name: tests.test_access -*-
"""
Tests for who may use the control API, and from where (issue 12 items 5
and 6; L{nestproto.control.access} and the control port's gate): the token
as a header, under the C{/k/<token>/} path prefix or from a trusted
network, for every route of the API; browser origins and CORS; JSON-only
changes. All through the control port's resource.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any

import treq
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from nestproto.control.access import (
    isJSONType,
    isTrusted,
    judgeOrigin,
    normaliseOrigin,
    parseNetwork,
)
from nestproto.control.api import ControlAPI, ControlSettings
from nestproto.device.dialect import V7

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    SERIAL,
    clientObject,
    completed,
    makeServer,
    receiveDroppable,
)
from .test_control_api import ControlTestCase

TOKEN = "s3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
#: The control API as the tests' requests reach it (helpers.CONTROL_URL).
OWN_ORIGIN = "http://192.168.1.10:8082"
DASHBOARD = "http://dashboard.home.arpa"
FOREIGN = "https://evil.example"
_ARGUMENT = re.compile(r"<(?:[^:>]+:)?[^>]+>")


def controlRoutes() -> list[tuple[str, str, str]]:
    """
    (endpoint, method, path) of every route the control API has, read from
    its router's URL map, so a route added later is tested too. Path
    arguments name the test's device.
    """
    routes = []
    for rule in ControlAPI.app.url_map.iter_rules():
        path = _ARGUMENT.sub(SERIAL, rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((str(rule.endpoint), method, path))
    return sorted(routes)


class AccessTestCase(ControlTestCase):
    """A server with one thermostat whose control API has a token."""

    controlSettings = ControlSettings(token=TOKEN)

    def send(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        """
        One request to the control port: its status, JSON body (C{None} for
        an event stream, which is left at once) and response headers.
        """
        client = self.server.controlClient
        sent = dict(headers or {})
        if data is None and method in ("POST", "PUT", "PATCH", "DELETE"):
            data = b"{}"
        d = client.request(method, CONTROL_URL + path, headers=sent, data=data)
        client.flush()
        response = self.successResultOf(d)
        if response.headers.getRawHeaders("content-type") == ["text/event-stream"]:
            answer, body = receiveDroppable(response)
            body.disconnect()
            client.flush()
            self.failureResultOf(answer.done)
            return response.code, None, response.headers
        raw = self.successResultOf(treq.content(response))
        if response.headers.getRawHeaders("content-type") != ["application/json"]:
            # The dashboard's page and assets.
            return response.code, raw, response.headers
        return response.code, json.loads(raw) if raw else None, response.headers

    def control(
        self,
        method: str,
        path: str,
        document: Any = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        # The thermostat-side helpers of ControlTestCase, with the token.
        return super().control(
            method, path, document, {**BEARER, **(headers or {})}, data
        )


class TokenTests(AccessTestCase):
    """With a token, every route but C{/health} needs it."""

    def test_routesEnumerated(self) -> None:
        """
        The route list comes from the router and includes the event
        stream; C{/health} and the dashboard's page, assets and login are
        the routes declared public.
        """
        routes = controlRoutes()
        self.assertIn(("eventStream", "GET", "/api/events"), routes)
        self.assertIn(("command", "POST", "/command"), routes)
        self.assertEqual(
            {e for e, _m, _p in routes if ControlAPI.app.isPublic(e)},
            {"health", "page", "asset", "session", "login", "logout"},
        )

    def test_everyRouteRefusedWithoutToken(self) -> None:
        """
        Every route refuses a request without the token, or with a wrong or
        non-Bearer one, with a JSON 401 that names the scheme, and changes
        nothing.
        """
        before = self.snapshot()
        for credentials in [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic czNjcmV0"},
            {"Authorization": "Bearer"},
        ]:
            for endpoint, method, path in controlRoutes():
                if ControlAPI.app.isPublic(endpoint):
                    continue
                status, document, headers = self.send(
                    method, path, {**credentials, **JSON}
                )
                self.assertEqual(status, 401, (credentials, method, path))
                self.assertEqual(
                    document,
                    {
                        "success": False,
                        "error": "Missing or wrong Authorization: Bearer token",
                        "message": "Missing or wrong Authorization: Bearer token",
                        "code": "unauthorized",
                    },
                )
                self.assertEqual(
                    headers.getRawHeaders("www-authenticate"),
                    ['Bearer realm="nestproto"'],
                )
        self.assertEqual(self.snapshot(), before)

    def test_everyRouteWithToken(self) -> None:
        """Every route lets the Bearer token in."""
        for _endpoint, method, path in controlRoutes():
            status, _document, _headers = self.send(method, path, {**BEARER, **JSON})
            self.assertNotEqual(status, 401, (method, path))

    def test_openWithoutToken(self) -> None:
        """Without a token configured, any Authorization header is ignored."""
        client = makeServer().controlClient
        d = client.get(CONTROL_URL + "/api/devices", headers={"Authorization": "x"})
        response, _body = completed(self, client, d)
        self.assertEqual(response.code, 200)

    def test_health(self) -> None:
        """
        C{/health} answers without the token and says nothing but that the
        server is up.
        """
        self.assertEqual(self.send("GET", "/health")[:2], (200, {"status": "ok"}))
        self.assertEqual(self.send("GET", f"/k/{TOKEN}/health")[:2][0], 200)
        self.assertEqual(self.send("GET", "/k/wrong/health")[0], 401)


class PathTokenTests(AccessTestCase):
    """
    The whole API under C{/k/<token>/}, for clients that cannot send a
    header (the Home Assistant integration, the Matterbridge plugin).
    """

    def test_everyRoute(self) -> None:
        """
        Every route answers under the prefix as it does with the Bearer
        header: the same status, never a 401.
        """
        for _endpoint, method, path in controlRoutes():
            viaHeader = self.send(method, path, {**BEARER, **JSON})[0]
            viaPath = self.send(method, f"/k/{TOKEN}{path}", JSON)[0]
            self.assertEqual(viaPath, viaHeader, (method, path))
            self.assertNotEqual(viaPath, 401)

    def test_readAndCommand(self) -> None:
        """A status read and a command work under the prefix."""
        status, document, _ = self.send("GET", f"/k/{TOKEN}/status?serial={SERIAL}")
        self.assertEqual((status, document["serial"]), (200, SERIAL))
        body = {"serial": SERIAL, "command": "set_temperature", "value": 22.5}
        status, document, _ = self.send(
            "POST", f"/k/{TOKEN}/command", JSON, json.dumps(body).encode()
        )
        self.assertEqual((status, document["success"]), (200, True))
        self.assertEqual(self.value(f"shared.{SERIAL}")["target_temperature"], 22.5)

    def test_eventsUnderPrefix(self) -> None:
        """
        The event stream is served under the prefix: it streams the events
        of changes, and leaving it leaves nothing behind.
        """
        client = self.server.controlClient
        d = client.get(CONTROL_URL + f"/k/{TOKEN}/api/events")
        client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        answer, body = receiveDroppable(response)
        self.ok("set_temperature", 21)
        client.flush()
        self.assertIn(
            b'data: {"serial": "%s"}' % SERIAL.encode(), b"".join(answer.chunks)
        )
        body.disconnect()
        client.flush()
        self.failureResultOf(answer.done)
        self.assertEqual(self.server.control.events.count(), 0)

    def test_wrongToken(self) -> None:
        """A wrong token in the path is a 401 and changes nothing."""
        before = self.snapshot()
        body = {"serial": SERIAL, "command": "set_away", "value": True}
        for prefix in ["/k/wrong", "/k/S3CRET", "/k/s3cre", "/k/s3crets", "/k/"]:
            status, document, _ = self.send(
                "POST", f"{prefix}/command", JSON, json.dumps(body).encode()
            )
            self.assertEqual((status, document["code"]), (401, "unauthorized"))
        self.assertEqual(self.snapshot(), before)

    def test_tokenWithSlash(self) -> None:
        """
        A token with a C{/} (base64) works with the slash percent-encoded.
        """
        server = makeServer(controlSettings=ControlSettings(token="a/b+c="))
        client = server.controlClient
        d = client.get(CONTROL_URL + "/k/a%2Fb+c=/api/devices")
        response, body = completed(self, client, d)
        self.assertEqual(response.code, 200)

    def test_noTokenNoPrefix(self) -> None:
        """
        Without a token the API is open, and the prefix names nothing.
        """
        client = makeServer().controlClient
        d = client.get(CONTROL_URL + "/k/anything/api/devices")
        response, body = completed(self, client, d)
        self.assertEqual((response.code, json.loads(body)["code"]), (404, "not_found"))

    def test_tokenNeverLogged(self) -> None:
        """
        No log event of requests under the prefix, answered or refused,
        carries the token, even at debug.
        """
        with capturedLogs() as events:
            self.send("GET", f"/k/{TOKEN}/status?serial={SERIAL}")
            self.send("GET", f"/k/{TOKEN}/nowhere")
            self.send("POST", f"/k/{TOKEN}/command", JSON, b"[")
            self.send("GET", f"/k/{TOKEN}/status")
        self.assertTrue(events)
        self.assertNotIn(TOKEN, repr(events))


class TrustedNetworkTests(AccessTestCase):
    """C{--trusted-network}: those client addresses need no token."""

    controlSettings = ControlSettings(
        token=TOKEN, trustedNetworks=(parseNetwork("127.0.0.0/8"),)
    )

    def test_trusted(self) -> None:
        """
        A client in a trusted network (the test client is 127.0.0.1) uses
        every route without a token.
        """
        for _endpoint, method, path in controlRoutes():
            status, _document, _headers = self.send(method, path, JSON)
            self.assertNotEqual(status, 401, (method, path))

    def test_untrusted(self) -> None:
        """A client outside every trusted network still needs the token."""
        server = makeServer(
            controlSettings=ControlSettings(
                token=TOKEN,
                trustedNetworks=(parseNetwork("10.0.0.0/8"), parseNetwork("::1")),
            )
        )
        d = server.controlClient.get(CONTROL_URL + "/api/devices")
        response, _body = completed(self, server.controlClient, d)
        self.assertEqual(response.code, 401)


class OriginTests(AccessTestCase):
    """
    Browser pages: only the API's own origin, and those given with
    C{--allow-origin}, may call it; CORS is closed otherwise.
    """

    controlSettings = ControlSettings(token=TOKEN)

    def test_foreignOriginChangesNothing(self) -> None:
        """
        A command from a page of a foreign origin, even with the token and
        JSON, is a 403: nothing is stored, the thermostat holding a
        subscribe is sent nothing, and no CORS header lets the page read
        the answer.
        """
        held = self.held()
        before = self.snapshot()
        body = {"serial": SERIAL, "command": "set_temperature", "value": 25}
        for origin in [FOREIGN, "null", "http://192.168.1.10:8083", "file://"]:
            status, document, headers = self.send(
                "POST",
                "/command",
                {"Origin": origin, **BEARER, **JSON},
                json.dumps(body).encode(),
            )
            self.assertEqual(
                document,
                {
                    "success": False,
                    "error": "Requests from this origin are not allowed "
                    "(--allow-origin)",
                    "message": "Requests from this origin are not allowed "
                    "(--allow-origin)",
                    "code": "origin_not_allowed",
                },
            )
            self.assertEqual(status, 403)
            self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))
        self.server.deviceClient.flush()
        self.assertEqual(held.chunks, [])
        self.assertEqual(self.snapshot(), before)
        self.endHolds()

    def test_foreignOriginEveryRoute(self) -> None:
        """Every route refuses a foreign page, reads included."""
        before = self.snapshot()
        for _endpoint, method, path in controlRoutes():
            status = self.send(method, path, {"Origin": FOREIGN, **BEARER, **JSON})[0]
            self.assertEqual(status, 403, (method, path))
        self.assertEqual(self.snapshot(), before)

    def test_ownOrigin(self) -> None:
        """
        A page of the API's own origin (as its Host says) is served, and
        needs no CORS header.
        """
        for origin in [OWN_ORIGIN, OWN_ORIGIN.upper(), OWN_ORIGIN + "/"]:
            status, document, headers = self.send(
                "GET", f"/status?serial={SERIAL}", {"Origin": origin, **BEARER}
            )
            self.assertEqual(status, 200, origin)
            self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))

    def test_noOriginNoCORS(self) -> None:
        """
        Clients that are not browsers (curl, Home Assistant, Homebridge)
        send no Origin and are served; no answer, success or error, carries
        CORS headers by default.
        """
        for path, expected in [("/health", 200), ("/status", 400), ("/nowhere", 404)]:
            status, _document, headers = self.send("GET", path, BEARER)
            self.assertEqual(status, expected)
            for name in ["access-control-allow-origin", "access-control-allow-methods"]:
                self.assertIsNone(headers.getRawHeaders(name), path)

    def test_preflightNotAllowed(self) -> None:
        """
        A preflight from a foreign origin is a 403 with no CORS headers; one
        with no allowed origins configured gets no CORS headers either.
        """
        status, _document, headers = self.send(
            "OPTIONS", "/command", {"Origin": FOREIGN}
        )
        self.assertEqual(status, 403)
        self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))


class AllowedOriginTests(AccessTestCase):
    """C{--allow-origin} opens CORS to the pages of that origin."""

    controlSettings = ControlSettings(
        token=TOKEN, allowOrigins=frozenset({"http://dashboard.home.arpa:80"})
    )

    def test_preflight(self) -> None:
        """
        An allowed origin's preflight is a 204 without a token, naming the
        origin as the browser sent it, the methods and the headers (the
        token's and JSON's).
        """
        status, _document, headers = self.send(
            "OPTIONS",
            "/command",
            {"Origin": DASHBOARD, "Access-Control-Request-Method": "POST"},
        )
        self.assertEqual(status, 204)
        self.assertEqual(
            headers.getRawHeaders("access-control-allow-origin"), [DASHBOARD]
        )
        allowed = headers.getRawHeaders("access-control-allow-headers")[0]
        for name in ["Authorization", "Content-Type", "Last-Event-ID"]:
            self.assertIn(name, allowed)
        self.assertIn("POST", headers.getRawHeaders("access-control-allow-methods")[0])
        self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])

    def test_everyAnswer(self) -> None:
        """
        Every answer to an allowed page carries its origin, errors too, so
        the page can read why it was refused.
        """
        for path, headers, expected in [
            (f"/status?serial={SERIAL}", BEARER, 200),
            ("/status", BEARER, 400),
            ("/status", {}, 401),
            ("/nowhere", BEARER, 404),
        ]:
            status, _document, answer = self.send(
                "GET", path, {"Origin": DASHBOARD, **headers}
            )
            self.assertEqual(status, expected)
            self.assertEqual(
                answer.getRawHeaders("access-control-allow-origin"), [DASHBOARD]
            )

    def test_commandFromAllowedPage(self) -> None:
        """An allowed page's command, with the token and JSON, is applied."""
        body = {"serial": SERIAL, "command": "set_temperature", "value": 19}
        status, document, _ = self.send(
            "POST",
            "/command",
            {"Origin": "http://DASHBOARD.home.arpa:80", **BEARER, **JSON},
            json.dumps(body).encode(),
        )
        self.assertEqual(status, 200)
        self.assertEqual(self.value(f"shared.{SERIAL}")["target_temperature"], 19)

    def test_otherOriginsStillRefused(self) -> None:
        """Allowing one origin refuses the others, and the https one."""
        for origin in [FOREIGN, "https://dashboard.home.arpa"]:
            status = self.send("GET", "/health", {"Origin": origin})[0]
            self.assertEqual(status, 403, origin)


class ContentTypeTests(AccessTestCase):
    """A request that changes something must say its body is JSON."""

    controlSettings = ControlSettings()

    def test_everyChangingRoute(self) -> None:
        """
        Every POST and DELETE route refuses a body that is not declared
        JSON (none, a form, text) with a JSON 415, changing nothing.
        """
        before = self.snapshot()
        body = json.dumps({"serial": SERIAL, "command": "set_away", "value": True})
        changing = [r for r in controlRoutes() if r[1] != "GET"]
        self.assertTrue(changing)
        for contentType in [
            None,
            "text/plain",
            "application/x-www-form-urlencoded",
            # (Not multipart: StubTreq's own site parses such a body and
            # answers 400 itself, which the server's site does not.)
            "text/html; charset=utf-8",
            "application/jsonx",
        ]:
            headers = {} if contentType is None else {"Content-Type": contentType}
            for _endpoint, method, path in changing:
                status, document, _ = self.send(method, path, headers, body.encode())
                self.assertIsNotNone(document, (status, method, path, contentType))
                self.assertEqual(
                    (status, document["code"]),
                    (415, "unsupported_media_type"),
                    (method, path, contentType),
                )
                self.assertIs(document["success"], False)
        self.assertEqual(self.snapshot(), before)

    def test_jsonWithParameters(self) -> None:
        """C{application/json; charset=utf-8} is JSON."""
        body = {"serial": SERIAL, "command": "set_temperature", "value": 20.5}
        status, _document, _ = self.send(
            "POST",
            "/command",
            {"Content-Type": "Application/JSON; charset=utf-8"},
            json.dumps(body).encode(),
        )
        self.assertEqual(status, 200)

    def test_deleteWithoutBody(self) -> None:
        """
        C{DELETE /api/device?serial=} needs no body and so no content type;
        the device is removed.
        """
        status, document, _ = self.send(
            "DELETE", f"/api/device?serial={SERIAL}", data=b""
        )
        self.assertEqual((status, document["serial"]), (200, SERIAL))
        self.assertEqual(self.server.store.buckets(SERIAL), [])

    def test_readsNeedNone(self) -> None:
        """A GET needs no content type."""
        self.assertEqual(self.send("GET", f"/status?serial={SERIAL}")[0], 200)


class DevicePortTests(SynchronousTestCase):
    """The device port's errors keep their shape; it has no origin rules."""

    def test_errorShape(self) -> None:
        """
        A device error body is C{error} and C{code} only, whatever the
        Origin.
        """
        server = makeServer()
        d = server.deviceClient.post(
            DEVICE_URL + "/nest/transport",
            data=json.dumps({"objects": [clientObject(f"shared.{SERIAL}")]}).encode(),
            headers={"Origin": FOREIGN},
        )
        response, body = completed(self, server.deviceClient, d)
        self.assertEqual(response.code, 400)
        self.assertEqual(
            json.loads(body),
            {"error": "Device serial required", "code": "serial_required"},
        )

    def test_v7Dialect(self) -> None:
        """The v7 routes' dialect is v7's: batched holds, headers at once."""
        policy = V7.holdPolicy(V7.parseSubscribe(b'{"chunked": true}'))
        self.assertIs(policy.headersAtOnce, True)


class RuleTests(SynchronousTestCase):
    """The pure rules of L{nestproto.control.access}."""

    def test_normaliseOrigin(self) -> None:
        """
        Origins get their scheme's port and lower case; anything that is
        not an http(s) origin is C{None}.
        """
        for given, expected in [
            ("http://Host.Example", "http://host.example:80"),
            ("https://host.example", "https://host.example:443"),
            ("http://192.168.1.10:8082", "http://192.168.1.10:8082"),
            ("http://[fd00::1]:8082", "http://[fd00::1]:8082"),
            ("http://host/", "http://host:80"),
            ("null", None),
            ("file://", None),
            ("ftp://host", None),
            ("http://host/path", None),
            ("http://user:pw@host", None),
            ("http://host:99999", None),
            ("http://host?x=1", None),
            ("", None),
        ]:
            self.assertEqual(normaliseOrigin(given), expected, given)

    def test_judgeOrigin(self) -> None:
        """
        No Origin and the own origin are allowed without CORS; an allowed
        one with CORS naming it as sent; others are not.
        """
        allowed = frozenset({"http://dash:80"})
        own = "http://192.168.1.10:8082"
        self.assertEqual(
            (
                judgeOrigin(None, own, allowed).allowed,
                judgeOrigin(None, own, allowed).cors,
            ),
            (True, None),
        )
        self.assertEqual(judgeOrigin(b"http://dash", own, allowed).cors, "http://dash")
        self.assertTrue(judgeOrigin(own.encode(), own, allowed).allowed)
        self.assertIsNone(judgeOrigin(own.encode(), own, allowed).cors)
        self.assertFalse(judgeOrigin(b"http://other", own, allowed).allowed)
        self.assertFalse(judgeOrigin(b"\xff", own, allowed).allowed)

    def test_trusted(self) -> None:
        """
        Addresses in a network are trusted, IPv4 ones reaching an IPv6
        listener too; anything else, or no address, is not.
        """
        networks = [parseNetwork("192.168.1.0/24"), parseNetwork("fd00::/8")]
        self.assertTrue(isTrusted("192.168.1.77", networks))
        self.assertTrue(isTrusted("::ffff:192.168.1.77", networks))
        self.assertTrue(isTrusted("fd00::5", networks))
        self.assertFalse(isTrusted("192.168.2.1", networks))
        self.assertFalse(isTrusted("fe80::1%eth0", networks))
        self.assertFalse(isTrusted("not an address", networks))
        self.assertFalse(isTrusted("192.168.1.77", []))

    def test_parseNetwork(self) -> None:
        """A network, or one address, with host bits allowed."""
        self.assertEqual(
            parseNetwork("192.168.1.5/24"), ipaddress.ip_network("192.168.1.0/24")
        )
        self.assertEqual(parseNetwork("10.0.0.1").num_addresses, 1)
        self.assertRaises(ValueError, parseNetwork, "192.168.1.0/33")
        self.assertRaises(ValueError, parseNetwork, "home")

    def test_isJSONType(self) -> None:
        """Only application/json, whatever its case and parameters."""
        self.assertTrue(isJSONType(b"application/json"))
        self.assertTrue(isJSONType(b"application/JSON ; charset=UTF-8"))
        self.assertFalse(isJSONType(None))
        self.assertFalse(isJSONType(b"text/plain"))
        self.assertFalse(isJSONType(b"application/json-patch+json"))
