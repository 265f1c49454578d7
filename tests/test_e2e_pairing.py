# -*- test-case-name: tests.test_e2e_pairing -*-
"""
Pairing end to end: the real service (C{makeService}) on loopback TCP ports
with a real SQLite file. A thermostat boots, shows its code and holds a
subscribe; a user claims the code on the control port; the thermostat
receives its user and structure on the connection it holds. Also the
service options of pairing and the control API.
"""

from __future__ import annotations

import json
import os

import treq
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from nestproto.service import CONTROL_TOKEN_FILE, Options

from .e2e import DEVICE_HEADERS, BodyReader, LiveServiceTestCase, sleep
from .helpers import SERIAL, objectsBody

TOKEN = "e2e-token-0123456789"


class PairingEndToEndTests(LiveServiceTestCase):
    """
    Claiming a thermostat over real TCP.
    """

    def setUp(self) -> None:
        super().setUp()
        os.makedirs(self.data)
        with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
            f.write(TOKEN + "\n")

    def test_claimReachesHeldSubscribe(self) -> Deferred[None]:
        """
        Boot, passphrase, a held subscribe; the claim on the control port
        answers success and the held connection receives C{user.U} (named
        U) and C{structure.U} listing the device, in one chunk, then ends
        after the batch window. After a restart the device is still claimed.
        """
        return self.asDeferred(self.claimScenario())

    async def claimScenario(self) -> None:
        device, control = await self.start()
        headers = DEVICE_HEADERS
        auth = {"Authorization": f"Bearer {TOKEN}"}

        status, entry = await self.json(
            "POST",
            device + "/nest/entry",
            data=b"mac=18B430000001&software_version=5.9.3-5",
            headers={"X-nl-device-id": SERIAL},
        )
        self.assertEqual(status, 200)
        status, key = await self.json("GET", entry["passphrase_url"], headers=headers)
        self.assertEqual(status, 200)
        self.assertIsInstance(key["expires"], int)

        # The device's state, then a subscribe in sync with it: held.
        status, receipts = await self.json(
            "POST",
            device + "/nest/transport/put",
            data=json.dumps(
                {"objects": [{"object_key": f"device.{SERIAL}", "value": {"x": 1}}]}
            ).encode(),
            headers=headers,
        )
        self.assertEqual(status, 200)
        status, first = await self.json(
            "POST",
            entry["transport_url"],
            data=objectsBody(
                [
                    {"object_key": f"device.{SERIAL}", "object_timestamp": 0},
                    {
                        "object_key": f"device_alert_dialog.{SERIAL}",
                        "object_timestamp": 0,
                    },
                ]
            ),
            headers=headers,
        )
        inSync = [
            {
                "object_key": one["object_key"],
                "object_revision": one["object_revision"],
                "object_timestamp": one["object_timestamp"],
            }
            for one in first["objects"]
        ]
        self.assertEqual(len(inSync), 2)
        response = await self.request(
            "POST", entry["transport_url"], data=objectsBody(inSync), headers=headers
        )
        self.assertEqual(response.code, 200)
        reader = BodyReader()
        response.deliverBody(reader)
        await sleep(0.1)
        self.assertEqual(reader.received, [])

        # Without the token the control port refuses the claim.
        refused = await self.request(
            "POST",
            control + "/api/register",
            json={"code": key["value"], "userId": "homeowner"},
        )
        self.assertEqual(refused.code, 401)
        await treq.content(refused)

        code = f"{key['value'][:3]}-{key['value'][3:]}".lower()
        status, claimed = await self.json(
            "POST",
            control + "/api/register",
            json={"code": code, "userId": "homeowner"},
            headers=auth,
        )
        self.assertEqual((status, claimed["success"]), (200, True))
        self.assertEqual(claimed["serial"], SERIAL)

        pushed = await reader.document()
        byKey = {one["object_key"]: one for one in pushed["objects"]}
        self.assertEqual(set(byKey), {"user.homeowner", "structure.homeowner"})
        self.assertEqual(byKey["user.homeowner"]["value"], {"name": "homeowner"})
        self.assertEqual(
            byKey["structure.homeowner"]["value"],
            {"name": "Home", "devices": [f"device.{SERIAL}"]},
        )
        await reader.finished

        # The claim is durable.
        await self.services[0].stopService()
        device, control = await self.start()
        status, document = await self.json(
            "GET", device + "/nest/passphrase/status", headers=headers
        )
        self.assertEqual(
            (document["status"], document["claimedBy"]), ("claimed", "homeowner")
        )
        status, listed = await self.json("GET", control + "/api/devices", headers=auth)
        self.assertEqual([d["serial"] for d in listed["devices"]], [SERIAL])
        self.assertIs(listed["devices"][0]["paired"], True)


class PairingOptionsTests(SynchronousTestCase):
    """
    The service options of pairing and the control API.
    """

    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(["--data", self.data, *arguments])
        return options

    def setUp(self) -> None:
        self.data = self.mktemp()

    def test_defaults(self) -> None:
        """
        Keys live an hour, the control API is open, devices go unavailable
        after 600 s.
        """
        options = self.parse()
        self.assertEqual(options["entry-key-ttl"], 3600)
        self.assertIsNone(options["control-token"])
        self.assertEqual(options["unavailable-after"], 600.0)

    def test_entryKeyTtlBounds(self) -> None:
        """
        A TTL that would leave a code on screen for under 10 minutes, or
        one over a week, is refused with a sentence saying why.
        """
        self.assertEqual(self.parse("--entry-key-ttl", "2400")["entry-key-ttl"], 2400)
        for ttl in ["2399", "1800", "604801"]:
            error = self.assertRaises(
                usage.UsageError, self.parse, "--entry-key-ttl", ttl
            )
            self.assertIn("30 minutes", str(error))

    def test_tokenFile(self) -> None:
        """
        A C{control-token} file in --data sets the token; the option wins
        over it.
        """
        os.makedirs(self.data)
        with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
            f.write("from-file\n")
        self.assertEqual(self.parse()["control-token"], "from-file")
        self.assertEqual(
            self.parse("--control-token", "given")["control-token"], "given"
        )

    def test_badToken(self) -> None:
        """
        An empty token, or one with spaces, is refused.
        """
        for token in ["", "two words"]:
            self.assertRaises(usage.UsageError, self.parse, "--control-token", token)
        os.makedirs(self.data, exist_ok=True)
        with open(os.path.join(self.data, CONTROL_TOKEN_FILE), "w") as f:
            f.write("\n")
        self.assertRaises(usage.UsageError, self.parse)
