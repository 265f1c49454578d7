# -*- test-case-name: tests.test_app_library -*-
"""
An app library of the key-list era, python-nest 2.11 (the one the Home
Assistant and command-line tools of its day used), driven for real against
a real C{twistd nestproto}: unchanged except for its login URL and one
compatibility line for Python 3.10+ (PROTOCOL.md §20.6, issue 11).
"""

from __future__ import annotations

import collections
import collections.abc
import os
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .helpers import basicAuth
from .twistd import http, loopbackServer

SERIAL = "02AA01AC0000000A11"
PASSWORD = "correct horse battery"


def importNest() -> Any:
    """
    python-nest 2.11, or a skip (a failure under CI, which installs it with
    the test extra).
    """
    # The library's one Python 3.10+ incompatibility: collections.Callable
    # moved to collections.abc.
    if not hasattr(collections, "Callable"):
        collections.Callable = collections.abc.Callable  # type: ignore[attr-defined]
    try:
        import nest  # type: ignore[import-untyped]
    except ImportError:
        if os.environ.get("CI"):
            raise
        raise SkipTest(
            "python-nest 2.11 is not installed (pip install '.[test]')"
        ) from None
    return nest


class AppLibraryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.nest = importNest()
        self.server, device, control = loopbackServer(self, self.mktemp())
        self.device = f"http://127.0.0.1:{device}"
        self.control = f"http://127.0.0.1:{control}"

    def thermostatOnline(self) -> None:
        """A thermostat boots, reports, and is claimed for the account."""
        status, key = http(
            "GET", self.device + "/nest/passphrase", headers=basicAuth(SERIAL)
        )
        self.assertEqual(status, 200, key)
        status, answer = http(
            "POST",
            self.device + "/nest/transport/put",
            {
                "objects": [
                    {
                        "object_key": f"shared.{SERIAL}",
                        "value": {
                            "current_temperature": 19.5,
                            "target_temperature": 20.0,
                            "target_temperature_type": "heat",
                            "can_heat": True,
                            "can_cool": True,
                        },
                    },
                    {
                        "object_key": f"device.{SERIAL}",
                        "value": {"current_humidity": 41, "temperature_scale": "C"},
                    },
                ]
            },
            headers=basicAuth(SERIAL),
        )
        self.assertEqual(status, 200, answer)
        status, created = http(
            "POST",
            self.control + "/api/users",
            {"username": "alice", "password": PASSWORD},
        )
        self.assertEqual(status, 200, created)
        status, claimed = http(
            "POST",
            self.control + "/api/register",
            {"code": key["value"], "userId": "alice"},
        )
        self.assertEqual((status, claimed.get("success")), (200, True), claimed)

    def test_readAndChange(self) -> None:
        """
        The library logs in, lists the structure and its thermostat, reads
        temperature, humidity and mode, and changes the setpoint, the mode
        and away; each change is what the thermostat is then sent.
        """
        self.thermostatOnline()
        self.nest.nest.LOGIN_URL = self.device + "/user/login"
        napi = self.nest.Nest(username="alice", password=PASSWORD, cache_ttl=0)

        [structure] = napi.structures
        [thermostat] = structure.devices
        self.assertEqual(thermostat.serial, SERIAL)
        self.assertEqual(thermostat.temperature, 19.5)
        self.assertEqual(thermostat.humidity, 41)
        self.assertEqual(thermostat.mode, "heat")

        thermostat.target = 22.5
        thermostat.mode = "cool"
        structure.away = "away"

        [structure] = napi.structures
        [thermostat] = structure.devices
        self.assertEqual((thermostat.target, thermostat.mode), (22.5, "cool"))
        self.assertIs(structure.away, True)
        # What the thermostat itself is given, through the control API's
        # view of its buckets.
        status, shown = http("GET", self.control + f"/status?serial={SERIAL}")
        self.assertEqual(status, 200, shown)
        self.assertEqual(
            (shown["target_temperature"], shown["mode"], shown["away"]),
            (22.5, "cool", True),
        )

    def test_wrongPasswordRefused(self) -> None:
        """A wrong password is refused at login; nothing is read."""
        self.thermostatOnline()
        self.nest.nest.LOGIN_URL = self.device + "/user/login"
        napi = self.nest.Nest(username="alice", password="not the password")
        requests = __import__("requests")
        self.assertRaises(requests.HTTPError, lambda: napi.structures)
