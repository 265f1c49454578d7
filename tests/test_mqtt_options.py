# -*- test-case-name: tests.test_mqtt_options -*-
"""
The MQTT options of C{twistd nestproto}: off unless asked, checked at
start-up, the password from a file, and the bridge in the service tree.
"""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from nestproto.mqtt import BrokerConnection
from nestproto.service import MQTT_PASSWORD_FILE, Options, _startupLines, makeService


class MQTTOptionsTests(SynchronousTestCase):
    def parse(self, *argv: str, data: str | None = None) -> Options:
        options = Options()
        options.parseOptions(["--data", data or self.mktemp(), *argv])
        return options

    def dataWithPassword(self, password: str) -> str:
        data: str = self.mktemp()
        os.makedirs(data)
        with open(os.path.join(data, MQTT_PASSWORD_FILE), "w") as f:
            f.write(password + "\n")
        return data

    def test_offByDefault(self) -> None:
        """Without --mqtt there is no bridge, and the start-up says so."""
        options = self.parse()
        self.assertIsNone(options.mqttBroker)
        self.assertIn(("MQTT: {mqtt}", {"mqtt": "off"}), _startupLines(options, "x", 0))
        service = makeService(options, MemoryReactorClock())
        assert isinstance(service, MultiService)
        self.assertFalse([s for s in service if isinstance(s, BrokerConnection)])

    def test_passwordFromFile(self) -> None:
        """
        A URL with a user and no password takes the password from the
        mqtt-password file; one with a password keeps its own.
        """
        data = self.dataWithPassword("from-file")
        options = self.parse("--mqtt", "mqtt://nest@broker", data=data)
        assert options.mqttBroker is not None
        self.assertEqual(options.mqttBroker.password, "from-file")
        options = self.parse("--mqtt", "mqtt://nest:inline@broker", data=data)
        assert options.mqttBroker is not None
        self.assertEqual(options.mqttBroker.password, "inline")

    def test_passwordFileWithoutUser(self) -> None:
        """A password file is refused when the URL names no user."""
        data = self.dataWithPassword("from-file")
        self.assertRaises(
            usage.UsageError, self.parse, "--mqtt", "mqtt://broker", data=data
        )

    def test_badURL(self) -> None:
        """A URL that is not a broker's stops the start with a reason."""
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--mqtt", "http://broker")
        self.assertIn("--mqtt", str(raised.exception))

    def test_badPrefixes(self) -> None:
        """A prefix with wildcards or empty levels is refused."""
        for option in ("--mqtt-prefix", "--mqtt-discovery-prefix"):
            for prefix in ("a/+", "a/#", "/a", "a/", "a//b", ""):
                self.assertRaises(usage.UsageError, self.parse, option, prefix)
        self.assertEqual(
            self.parse("--mqtt-prefix", "home/nest")["mqtt-prefix"], "home/nest"
        )

    def test_bridgeInTheTree(self) -> None:
        """
        With --mqtt the service tree has the broker connection, and the
        start-up line names the broker and prefixes, never the password.
        """
        options = self.parse(
            "--mqtt", "mqtt://nest:pw@broker:1884", "--mqtt-prefix", "nolongerevil"
        )
        service = makeService(options, MemoryReactorClock())
        assert isinstance(service, MultiService)
        [connection] = [s for s in service if isinstance(s, BrokerConnection)]
        self.assertEqual(connection.broker.port, 1884)
        lines = dict(_startupLines(options, "x", 0))
        self.assertEqual(
            lines["MQTT: {mqtt}"]["mqtt"],
            "mqtt://nest@broker:1884, topics under nolongerevil/, discovery "
            "under homeassistant/",
        )
