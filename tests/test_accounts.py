# -*- test-case-name: tests.test_accounts -*-
"""
App accounts and login (PROTOCOL.md §20.6, scenario 67): created on the
control port and from a shell, logged in on the device port.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlencode

from twisted.trial.unittest import SynchronousTestCase

from nestproto.accounts import (
    ACCOUNT_RECORD,
    TOKEN_RECORD,
    TOKEN_SECONDS,
    hashPassword,
    tokenDigest,
    verifyPassword,
)
from nestproto.datadir import DataLock
from nestproto.users import run

from .helpers import DEVICE_URL, SERIAL, START_SECONDS, basicAuth, completed
from .test_pairing import ServerTestCase

PASSWORD = "correct horse"


class HashTests(SynchronousTestCase):
    """Password hashes."""

    def test_scryptRoundTrip(self) -> None:
        """A hash verifies its password and no other; it holds no clear text."""
        hashed = hashPassword(PASSWORD, b"s" * 16, 2**10)
        self.assertTrue(hashed.startswith("scrypt$1024$8$1$"))
        self.assertNotIn(PASSWORD, hashed)
        self.assertTrue(verifyPassword(PASSWORD, hashed))
        self.assertFalse(verifyPassword(PASSWORD + "!", hashed))
        self.assertFalse(verifyPassword(PASSWORD, "garbage"))
        self.assertFalse(verifyPassword(PASSWORD, "md5$1$2$3$4$5"))


class AccountTestCase(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.accounts = self.server.device.accounts
        self.accounts.scryptN = 2**10
        self.assertIs(self.server.control.accounts, self.accounts)

    def createUser(self, name: str = "homeowner", password: str = PASSWORD) -> Any:
        return self.control(
            "POST", "/api/users", {"username": name, "password": password}
        )

    def login(
        self, name: str = "homeowner", password: str = PASSWORD
    ) -> tuple[int, Any, dict[str, str]]:
        d = self.server.deviceClient.post(
            DEVICE_URL + "/user/login",
            data=urlencode({"username": name, "password": password}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response, body = completed(self, self.server.deviceClient, d)
        cookies = {
            value.split(";")[0].split("=")[0]: value.split(";")[0].split("=", 1)[1]
            for value in response.headers.getRawHeaders("set-cookie", [])
        }
        return response.code, json.loads(body), cookies


class ControlUserTests(AccountTestCase):
    """C{POST /api/users} and C{DELETE /api/users} on the control port."""

    def test_create(self) -> None:
        """An account is created with its name as user id, hashed."""
        self.assertEqual(
            self.createUser(), (200, {"success": True, "userId": "homeowner"})
        )
        record = self.server.store.record(ACCOUNT_RECORD, "homeowner")
        assert record is not None
        self.assertNotIn(PASSWORD, json.dumps(record))
        self.assertTrue(verifyPassword(PASSWORD, record["hash"]))

    def test_existingNameIs409(self) -> None:
        """A taken name is a 409, and the first password stays."""
        self.createUser()
        status, document = self.createUser(password="another password")
        self.assertEqual(status, 409)
        self.assertIs(document["success"], False)
        self.assertEqual(self.login()[0], 200)

    def test_badInputIs400(self) -> None:
        """Short passwords and malformed names are a 400; nothing is stored."""
        for name, password in [
            ("homeowner", "short"),
            ("homeowner", 12345678),
            ("has space", PASSWORD),
            ("", PASSWORD),
            (None, PASSWORD),
        ]:
            status, document = self.control(
                "POST", "/api/users", {"username": name, "password": password}
            )
            self.assertEqual(status, 400, (name, password))
        self.assertEqual(self.server.store.records(ACCOUNT_RECORD), {})

    def test_remove(self) -> None:
        """Removing an account revokes its tokens; an unknown name is a 404."""
        self.createUser()
        status, document, _ = self.login()
        token = document["access_token"]
        self.assertEqual(self.accounts.userFor(token), "homeowner")
        status, document = self.control(
            "DELETE", "/api/users", {"username": "homeowner"}
        )
        self.assertEqual(status, 200)
        self.assertIsNone(self.accounts.userFor(token))
        self.assertEqual(self.server.store.records(TOKEN_RECORD), {})
        status, document = self.control(
            "DELETE", "/api/users", {"username": "homeowner"}
        )
        self.assertEqual(status, 404)


class LoginTests(AccountTestCase):
    """C{POST /user/login} on the device port (scenario 67)."""

    def test_scenario67Login(self) -> None:
        """
        Scenario 67: the right password gets a token, the user as
        C{user.<uid>}, C{urls.transport_url} the device port's origin with
        its port, every field the apps index, and the two cookies.
        """
        self.createUser()
        status, document, cookies = self.login()
        self.assertEqual(status, 200)
        token = document["access_token"]
        self.assertEqual(document["user"], "user.homeowner")
        self.assertEqual(document["userid"], "homeowner")
        self.assertEqual(document["user_id"], "homeowner")
        self.assertEqual(document["urls"]["transport_url"], DEVICE_URL)
        self.assertTrue(document["urls"]["weather_url"].endswith("?query="))
        for name in ["email", "expires_in", "limits", "weave"]:
            self.assertIn(name, document)
        self.assertIs(document["is_staff"], False)
        self.assertIs(document["is_superuser"], False)
        self.assertRegex(
            document["expires_in"],
            r"^[A-Z][a-z]{2}, \d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d GMT$",
        )
        self.assertEqual(cookies, {"sessionid": token, "cztoken": token})
        # Kept hashed only.
        self.assertEqual(
            list(self.server.store.records(TOKEN_RECORD)), [tokenDigest(token)]
        )
        self.assertEqual(self.accounts.userFor(token), "homeowner")

    def test_wrongPasswordIs401(self) -> None:
        """A wrong password or an unknown user is a 401 with JSON."""
        self.createUser()
        for name, password in [("homeowner", "wrong one"), ("nobody", PASSWORD)]:
            status, document, cookies = self.login(name, password)
            self.assertEqual(status, 401)
            self.assertIsInstance(document["error"], str)
            self.assertEqual(cookies, {})
        self.assertEqual(self.server.store.records(TOKEN_RECORD), {})

    def test_failuresThrottledWith429(self) -> None:
        """Repeated failures get a 429, never a 401, even with the right one."""
        self.createUser()
        codes = [self.login(password="wrong one")[0] for _ in range(6)]
        self.assertEqual(codes, [401] * 5 + [429])
        self.assertEqual(self.login()[0], 429)
        self.server.clock.advance(60)
        self.assertEqual(self.login()[0], 200)

    def test_missingFieldsIs400(self) -> None:
        """A login without a name or password is a 400."""
        d = self.server.deviceClient.post(
            DEVICE_URL + "/user/login", data=b"username=homeowner"
        )
        response, body = completed(self, self.server.deviceClient, d)
        self.assertEqual(response.code, 400)

    def test_tokenExpires(self) -> None:
        """A token lasts its term (at least 30 days), then names nobody."""
        self.createUser()
        token = self.login()[1]["access_token"]
        self.server.clock.advance(30 * 24 * 3600)
        self.assertEqual(self.accounts.userFor(token), "homeowner")
        self.server.clock.advance(TOKEN_SECONDS)
        self.assertIsNone(self.accounts.userFor(token))
        self.assertIsNone(self.accounts.userFor("not a token"))


class ShellTests(SynchronousTestCase):
    """C{python -m nestproto.users}."""

    def test_addAndRemove(self) -> None:
        """C{add NAME} asks the password twice and stores its hash."""
        data = self.mktemp()
        asked: list[str] = []

        def ask(prompt: str) -> str:
            asked.append(prompt)
            return PASSWORD

        status, message = run(["--data", data, "add", "alice"], ask, START_SECONDS)
        self.assertEqual((status, message), (0, "Account alice created."))
        self.assertEqual(len(asked), 2)
        status, message = run(["--data", data, "add", "alice"], ask, START_SECONDS)
        self.assertEqual(status, 1)
        self.assertIn("exists", message)
        status, message = run(["--data", data, "remove", "alice"], ask, START_SECONDS)
        self.assertEqual(status, 0)

    def test_passwordsDiffer(self) -> None:
        """Two different answers change nothing."""
        answers = iter([PASSWORD, PASSWORD + "x"])
        status, message = run(
            ["--data", self.mktemp(), "add", "bob"], lambda p: next(answers)
        )
        self.assertEqual(status, 1)

    def test_refusedWhileServerRuns(self) -> None:
        """A data directory a server holds is left alone."""
        data = self.mktemp()
        os.makedirs(data)
        lock = DataLock.acquire(data)
        self.addCleanup(lock.release)
        status, message = run(["--data", data, "add", "carol"], lambda p: PASSWORD)
        self.assertEqual(status, 1)
        self.assertIn("POST /api/users", message)


class MobileReadTests(AccountTestCase):
    """C{GET /v2/mobile/user.<uid>} (scenarios 68, 70)."""

    def setUp(self) -> None:
        super().setUp()
        for name in ["homeowner", "neighbour"]:
            self.createUser(name)
        # The owner's thermostat reports, shows its code and is claimed.
        self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/v3/put",
            data=json.dumps(
                {"shared": {SERIAL: {"current_temperature": 20.5}}}
            ).encode(),
            headers=basicAuth(),
        )
        self.server.deviceClient.flush()
        code = self.passphrase()["value"]
        self.assertEqual(self.claim(code, "homeowner")[0], 200)
        self.ownerToken = self.login()[1]["access_token"]
        self.neighbourToken = self.login("neighbour")[1]["access_token"]

    def read(self, path: str, token: str | None) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": f"Basic {token}"}
        return self.deviceGet(path, headers)

    def test_scenario68OwnUserNested(self) -> None:
        """
        Scenario 68: the user, exactly its structures and devices, nested
        by bare id with C{$version}/C{$timestamp}; every map apps index.
        """
        status, document = self.read("/v2/mobile/user.homeowner", self.ownerToken)
        self.assertEqual(status, 200)
        structureKey = self.server.state.membership.structureKey(SERIAL)
        sid = structureKey.split(".", 1)[1]
        self.assertEqual(document["user"]["homeowner"]["structures"], [structureKey])
        self.assertEqual(document["structure"][sid]["devices"], [f"device.{SERIAL}"])
        self.assertEqual(document["shared"][SERIAL]["current_temperature"], 20.5)
        self.assertIn("$version", document["shared"][SERIAL])
        self.assertIn("$timestamp", document["user"]["homeowner"])
        self.assertEqual(document["link"][SERIAL]["structure"], structureKey)
        for name in ["device", "schedule", "track", "where", "topaz"]:
            self.assertIn(name, document)
        self.assertEqual(
            self.read("/v3/mobile/user.homeowner", self.ownerToken)[0], 200
        )

    def test_emptyAccount(self) -> None:
        """An account without devices reads its user and empty maps."""
        status, document = self.read("/v2/mobile/user.neighbour", self.neighbourToken)
        self.assertEqual(status, 200)
        self.assertEqual(document["user"]["neighbour"]["structures"], [])
        self.assertEqual(document["shared"], {})

    def test_scenario70OtherUserIs403(self) -> None:
        """
        Scenario 70 (reads): another user's token, or a token that names
        nobody, gets a 403; no token a 401.
        """
        for token in [self.neighbourToken, "forged", ""]:
            status, document = self.read("/v2/mobile/user.homeowner", token)
            self.assertEqual(status, 403, token)
            self.assertNotIn("shared", document)
        self.assertEqual(self.read("/v2/mobile/user.homeowner", None)[0], 401)
