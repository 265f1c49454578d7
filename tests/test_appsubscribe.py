# -*- test-case-name: tests.test_appsubscribe -*-
"""
An app's subscribe (PROTOCOL.md §20.3, §20.6, scenario 71): key-list on
C{/v2/subscribe} and C{/v5/subscribe}, the JSONP variant on C{GET
/v1/subscribe}, only ever over the token's account.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from .helpers import DEVICE_URL, OTHER_SERIAL, SERIAL, Answer, receive
from .test_appputs import DEVICE, SHARED, AppPutTestCase


class AppSubscribeTestCase(AppPutTestCase):
    def appSubscribe(
        self,
        keys: list[Any],
        token: str | None = None,
        path: str = "/v2/subscribe",
        headers: dict[str, str] | None = None,
    ) -> Deferred[IResponse]:
        token = self.ownerToken if token is None else token
        d = self.server.deviceClient.post(
            DEVICE_URL + path,
            data=json.dumps({"keys": keys}).encode(),
            headers={
                "Authorization": f"Basic {token}",
                "X-nl-session-id": "app-session",
                **(headers or {}),
            },
        )
        self.server.deviceClient.flush()
        return d

    def answered(self, d: Deferred[IResponse]) -> tuple[IResponse, bytes]:
        response = self.successResultOf(d)
        answer = receive(response)
        self.server.deviceClient.flush()
        self.successResultOf(answer.done)
        return response, b"".join(answer.chunks)

    def heldAnswer(self, d: Deferred[IResponse]) -> Answer:
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders("x-nl-skv-key"))
        answer = receive(response)
        self.assertNoResult(answer.done)
        return answer


class KeyListTests(AppSubscribeTestCase):
    """C{/v2/subscribe} and C{/v5/subscribe} with keys."""

    def test_oneBucketPerAnswerThenHeldThenEndedByDevice(self) -> None:
        """
        Bare keys: one bucket per answer, compact and bare, named by the
        C{X-nl-skv-*} headers; in sync, held with headers at once; the
        thermostat's own report ends the hold with no body, and the next
        poll carries it.
        """
        keys = [SHARED, DEVICE]
        response, body = self.answered(self.appSubscribe(keys))
        shared = self.server.store.get(SERIAL, SHARED)
        assert shared is not None
        self.assertEqual(response.headers.getRawHeaders("x-nl-skv-key"), [SHARED])
        self.assertEqual(
            response.headers.getRawHeaders("x-nl-skv-version"), [str(shared.revision)]
        )
        self.assertNotIn(b": ", body)
        self.assertEqual(json.loads(body), shared.value)
        response, body = self.answered(self.appSubscribe(keys))
        self.assertEqual(response.headers.getRawHeaders("x-nl-skv-key"), [DEVICE])
        held = self.heldAnswer(self.appSubscribe(keys))
        self.devicePut(SERIAL, {"shared": {SERIAL: {"current_temperature": 23.0}}})
        self.server.deviceClient.flush()
        self.successResultOf(held.done)
        self.assertEqual(held.chunks, [])
        response, body = self.answered(self.appSubscribe(keys))
        self.assertEqual(response.headers.getRawHeaders("x-nl-skv-key"), [SHARED])
        self.assertEqual(json.loads(body)["current_temperature"], 23.0)

    def test_subscribeTimeoutEndsHold(self) -> None:
        """C{X-nl-subscribe-timeout} ends the app's hold empty; nothing stays."""
        self.answered(self.appSubscribe([SHARED]))
        held = self.heldAnswer(
            self.appSubscribe([SHARED], headers={"X-nl-subscribe-timeout": "8"})
        )
        self.server.clock.advance(8)
        self.server.deviceClient.flush()
        self.successResultOf(held.done)
        self.assertEqual(self.server.hub.total(), 0)

    def test_otherAccountsChangesDoNotEndHold(self) -> None:
        """A change outside the account leaves the app's hold as it is."""
        keys = [f"shared.{OTHER_SERIAL}"]
        self.answered(self.appSubscribe(keys, token=self.neighbourToken))
        held = self.heldAnswer(self.appSubscribe(keys, token=self.neighbourToken))
        self.appPut(f"/v2/put/{SHARED}", {"target_temperature": 22})
        self.devicePut(SERIAL, {"shared": {SERIAL: {"current_temperature": 23.0}}})
        self.server.deviceClient.flush()
        self.assertNoResult(held.done)
        self.endHolds()

    def test_foreignKeyIs403(self) -> None:
        """Listing another account's key is a 403; nothing is held."""
        for token in [self.neighbourToken, "forged"]:
            response = self.successResultOf(self.appSubscribe([SHARED], token=token))
            self.assertEqual(response.code, 403)
        self.assertEqual(self.server.hub.total(), 0)

    def test_badInputIs400(self) -> None:
        """Malformed keys and timeouts are 400s."""
        cases: list[tuple[list[Any], dict[str, str]]] = [
            ([{"key": 5}], {}),
            (["nonsense"], {}),
            ([SHARED], {"X-nl-subscribe-timeout": "soon"}),
        ]
        for keys, headers in cases:
            response = self.successResultOf(self.appSubscribe(keys, headers=headers))
            self.assertEqual(response.code, 400)
        self.assertEqual(self.server.hub.total(), 0)

    def test_v5Keys(self) -> None:
        """C{/v5/subscribe} with keys is the key-list subscribe; no token a 401."""
        response, body = self.answered(
            self.appSubscribe([SHARED], path="/v5/subscribe")
        )
        self.assertEqual(response.headers.getRawHeaders("x-nl-skv-key"), [SHARED])
        d = self.server.deviceClient.post(DEVICE_URL + "/v5/subscribe", data=b"{}")
        self.assertEqual(self.answer(d, self.server.deviceClient)[0], 401)

    def test_v5Objects(self) -> None:
        """
        C{/v5/subscribe} with objects answers v7's shape; in sync, it is
        held and gets the app-visible push of a listed bucket.
        """
        d = self.server.deviceClient.post(
            DEVICE_URL + "/v5/subscribe",
            data=json.dumps({"chunked": True, "objects": [{"object_key": SHARED}]}),
            headers={"Authorization": f"Basic {self.ownerToken}"},
        )
        response, body = self.answered(d)
        [obj] = json.loads(body)["objects"]
        self.assertEqual(obj["object_key"], SHARED)
        d = self.server.deviceClient.post(
            DEVICE_URL + "/v5/subscribe",
            data=json.dumps(
                {
                    "chunked": True,
                    "objects": [
                        {
                            "object_key": SHARED,
                            "object_revision": obj["object_revision"],
                            "object_timestamp": obj["object_timestamp"],
                        }
                    ],
                }
            ),
            headers={"Authorization": f"Basic {self.ownerToken}"},
        )
        self.server.deviceClient.flush()
        held = self.heldAnswer(d)
        self.devicePut(SERIAL, {"device": {SERIAL: {"temperature_scale": "F"}}})
        self.server.deviceClient.flush()
        self.assertEqual(held.chunks, [])
        self.devicePut(SERIAL, {"shared": {SERIAL: {"current_temperature": 24.0}}})
        self.server.deviceClient.flush()
        self.assertIn(b"24.0", b"".join(held.chunks))
        self.endHolds()


class JSONPTests(AppSubscribeTestCase):
    """Scenario 71."""

    def jsonp(
        self, callback: str, keys: list[Any], **extra: str
    ) -> Deferred[IResponse]:
        query = urlencode(
            {
                "jsonp": callback,
                "payload": json.dumps({"keys": keys}),
                "X-nl-subscribe-timeout": "8",
                "Authorization": f"Basic {self.ownerToken}",
                **extra,
            }
        )
        d = self.server.deviceClient.get(f"{DEVICE_URL}/v1/subscribe?{query}")
        self.server.deviceClient.flush()
        return d

    def script(self, callback: str, body: bytes) -> dict[str, Any]:
        text = body.decode()
        self.assertTrue(text.startswith(callback + "(") and text.endswith(")"), text)
        document = json.loads(text[len(callback) + 1 : -1])
        assert isinstance(document, dict)
        return document

    def test_scenario71Answer(self) -> None:
        """
        Scenario 71: C{cb({"status":200,"headers":{…},"payload":{…}})} as
        JavaScript, the headers those of a key-list answer in seed 001's
        order, their values JSON numbers as seed 001 shows them.
        """
        response, body = self.answered(self.jsonp("cb", [SHARED]))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/javascript"]
        )
        document = self.script("cb", body)
        shared = self.server.store.get(SERIAL, SHARED)
        assert shared is not None
        self.assertEqual(document["status"], 200)
        self.assertEqual(document["headers"]["X-nl-skv-key"], SHARED)
        self.assertEqual(
            document["headers"],
            {
                "X-nl-skv-key": SHARED,
                "X-nl-skv-version": shared.revision,
                "X-nl-skv-timestamp": shared.timestamp,
                "X-nl-service-timestamp": self.server.nowMs(),
            },
        )
        self.assertEqual(document["payload"], shared.value)

    def test_scenario71BadCallbackIs400(self) -> None:
        """Scenario 71: a callback C{alert(1)//} is a 400, nothing held."""
        for callback in ["alert(1)//", "", "1cb", "a" * 65, "cb;x"]:
            response = self.successResultOf(self.jsonp(callback, [SHARED]))
            self.assertEqual(response.code, 400, callback)
        self.assertEqual(self.server.hub.total(), 0)

    def test_heldThenPushedBucket(self) -> None:
        """In sync, the script waits for the next change of a listed key."""
        self.answered(self.jsonp("cb", [SHARED], **{"X-nl-session-id": "tab"}))
        d = self.jsonp("cb", [SHARED], **{"X-nl-session-id": "tab"})
        self.assertNoResult(d)
        self.appPut(f"/v2/put/{SHARED}", {"target_temperature": 21.5})
        self.server.deviceClient.flush()
        response, body = self.answered(d)
        document = self.script("cb", body)
        self.assertEqual(document["payload"]["target_temperature"], 21.5)

    def test_heldTimesOutEmpty(self) -> None:
        """At the hold's end with nothing new, the script names no bucket."""
        self.answered(self.jsonp("cb", [SHARED], **{"X-nl-session-id": "tab"}))
        d = self.jsonp("cb", [SHARED], **{"X-nl-session-id": "tab"})
        self.server.clock.advance(8)
        self.server.deviceClient.flush()
        response, body = self.answered(d)
        document = self.script("cb", body)
        self.assertNotIn("X-nl-skv-key", document["headers"])
        self.assertEqual(document["payload"], {})

    def test_foreignKeyIs403(self) -> None:
        """The JSONP subscribe reads only the token's account."""
        response = self.successResultOf(self.jsonp("cb", [f"shared.{OTHER_SERIAL}"]))
        self.assertEqual(response.code, 403)
