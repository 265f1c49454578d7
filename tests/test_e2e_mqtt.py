# -*- test-case-name: tests.test_e2e_mqtt -*-
"""
The MQTT bridge against a real Mosquitto: the machine's broker on
127.0.0.1:1883 (topics under a random prefix), and private brokers started
here on a free port for a restart and for passwords.

A missing broker fails the test under CI (C{CI} set) and skips it
elsewhere, saying why.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest

from nestproto.mqtt.client import MQTTClientProtocol, clientId
from nestproto.mqtt.packets import Publish

from .e2e import DEVICE_HEADERS, BodyReader, LiveServiceTestCase, sleep
from .helpers import SERIAL, objectsBody

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"
MACHINE_BROKER = ("127.0.0.1", 1883)
#: How long a test waits for a message it expects.
WAIT_SECONDS = 10.0


def unavailable(reason: str) -> None:
    """A missing broker: a failure under CI, a skip elsewhere."""
    if os.environ.get("CI"):
        raise AssertionError(f"MQTT test needs {reason}")
    raise SkipTest(reason)


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def writeCertificates(directory: str) -> tuple[str, str, str]:
    """
    A CA, and a certificate it signed for 127.0.0.1 with its key, as PEM
    files in C{directory}: their paths.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(directory)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    caKey = ec.generate_private_key(ec.SECP256R1())
    caCert = (
        x509.CertificateBuilder()
        .subject_name(name("nestproto test CA"))
        .issuer_name(name("nestproto test CA"))
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    paths = [os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem")]
    for path, data in zip(
        paths,
        [
            caCert.public_bytes(serialization.Encoding.PEM),
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        ],
        strict=True,
    ):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2]


class Observer:
    """What a test's own MQTT client has received, by topic."""

    def __init__(self) -> None:
        self.latest: dict[str, bytes] = {}
        self.messages: list[Publish] = []
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def messageReceived(self, message: Publish, receivedAt: float) -> None:
        self.latest[message.topic] = message.payload
        self.messages.append(message)
        still = []
        for predicate, d in self._waiting:
            if predicate():
                d.callback(None)
            else:
                still.append((predicate, d))
        self._waiting = still

    def writable(self) -> None:
        pass

    def text(self, topic: str) -> str | None:
        payload = self.latest.get(topic)
        return None if payload is None else payload.decode("utf-8")

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait until C{predicate} holds, at most L{WAIT_SECONDS}."""
        if predicate():
            return
        d: Deferred[None] = Deferred()
        self._waiting.append((predicate, d))
        d.addTimeout(WAIT_SECONDS, reactor)
        try:
            await d
        except Exception:
            raise AssertionError(f"waited {WAIT_SECONDS} s for {what}") from None

    async def payload(self, topic: str, expected: str) -> None:
        await self.until(
            lambda: self.text(topic) == expected,
            f"{topic} = {expected!r} (it is {self.text(topic)!r})",
        )


class MQTTEndToEndTests(LiveServiceTestCase):
    """A real service, a real broker, and a client of the test's own."""

    def setUp(self) -> None:
        super().setUp()
        tag = os.urandom(4).hex()
        self.prefix = f"nestproto-test-{tag}"
        self.discoveryPrefix = f"ha-test-{tag}"
        self.P = f"{self.prefix}/{SERIAL}"

    # Brokers and clients

    def machineBroker(self) -> int:
        host, port = MACHINE_BROKER
        if not listening(host, port):
            unavailable(f"the machine's Mosquitto on {host}:{port}")
        return port

    async def privateBroker(
        self,
        port: int | None = None,
        password: tuple[str, str] | None = None,
        tls: tuple[str, str, str] | None = None,
    ) -> tuple[int, subprocess.Popen[bytes]]:
        """A Mosquitto of the test's own, stopped at cleanup."""
        mosquitto = shutil.which("mosquitto") or shutil.which(
            "mosquitto", path="/usr/sbin:/usr/local/sbin"
        )
        if mosquitto is None:
            unavailable("the mosquitto program (Debian's mosquitto package)")
        assert mosquitto is not None
        port = port or freePort()
        directory = self.mktemp()
        os.makedirs(directory)
        lines = [f"listener {port} 127.0.0.1", "persistence false", "user root"]
        if password is None:
            lines.append("allow_anonymous true")
        else:
            passwords = os.path.join(directory, "passwords")
            subprocess.run(
                ["mosquitto_passwd", "-b", "-c", passwords, *password],
                check=True,
                capture_output=True,
            )
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        if tls is not None:
            lines += [f"cafile {tls[0]}", f"certfile {tls[1]}", f"keyfile {tls[2]}"]
        config = os.path.join(directory, "mosquitto.conf")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        process = subprocess.Popen(
            [mosquitto, "-c", config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(self.stopBroker, process)
        for _attempt in range(100):
            if listening("127.0.0.1", port):
                return port, process
            await sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {port}")

    def stopBroker(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(10)

    async def observe(
        self,
        port: int,
        *filters: str,
        username: str | None = None,
        password: str | None = None,
    ) -> tuple[MQTTClientProtocol, Observer]:
        observer = Observer()
        client = MQTTClientProtocol(reactor, clientId(), observer, username, password)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await client.ready
        self.addCleanup(client.disconnect)
        granted = await client.subscribe(
            [
                (f, 0)
                for f in filters or (f"{self.prefix}/#", f"{self.discoveryPrefix}/#")
            ]
        )
        self.assertNotIn(0x80, granted)
        return client, observer

    def forget(self, client: MQTTClientProtocol, observer: Observer) -> Deferred[None]:
        """
        Clear what the test left retained on the machine's broker, once the
        service has stopped (and said offline).
        """

        async def clear() -> None:
            await self.stopServices()
            await observer.until(
                lambda: observer.text(f"{self.prefix}/status") == "offline",
                "the bridge's offline status",
            )
            for topic, payload in observer.latest.items():
                if payload:
                    client.publish(topic, b"", retain=True)
            # The broker handles a client's packets in order: once this
            # SUBACK is back, every clearing PUBLISH has been handled.
            await client.subscribe([(f"{self.prefix}/sync", 0)])

        return self.asDeferred(clear())

    async def startWith(self, port: int, *options: str) -> tuple[str, str]:
        return await self.start(
            "--mqtt",
            f"mqtt://127.0.0.1:{port}",
            "--mqtt-prefix",
            self.prefix,
            "--mqtt-discovery-prefix",
            self.discoveryPrefix,
            *options,
        )

    # The device

    async def devicePut(
        self, origin: str, shared: dict[str, Any], device: dict[str, Any]
    ) -> dict[str, Any]:
        code, receipts = await self.json(
            "POST",
            f"{origin}/nest/transport/v7/put",
            data=json.dumps(
                {
                    "session": "s",
                    "objects": [
                        {"object_key": SHARED, "value": shared},
                        {"object_key": DEVICE, "value": device},
                    ],
                }
            ).encode(),
            headers=DEVICE_HEADERS,
        )
        self.assertEqual(code, 200)
        return {o["object_key"]: o for o in receipts["objects"]}

    async def status(self, controlOrigin: str) -> dict[str, Any]:
        code, status = await self.json("GET", f"{controlOrigin}/status?serial={SERIAL}")
        self.assertEqual(code, 200)
        assert isinstance(status, dict)
        return status

    # Tests

    def test_homeAssistant(self) -> Deferred[None]:
        """
        On the machine's broker: discovery for a device that puts its state,
        raw and HA states after the put, a setpoint on the HA command topic
        reaching the held subscribe, a raw /set command, and a bad payload
        that changes nothing.
        """
        return self.asDeferred(self.homeAssistant())

    async def homeAssistant(self) -> None:
        port = self.machineBroker()
        client, observer = await self.observe(port)
        self.addCleanup(self.forget, client, observer)
        P, D = self.P, self.discoveryPrefix
        # A command left retained (by anyone, any time ago) is not obeyed.
        client.publish(f"{P}/ha/target_temperature/set", b"30", retain=True)
        deviceOrigin, controlOrigin = await self.startWith(port)
        held = await self.devicePut(
            deviceOrigin,
            {
                "target_temperature": 20.0,
                "target_temperature_type": "heat",
                "current_temperature": 19.5,
                "can_heat": True,
                "can_cool": True,
            },
            {"current_humidity": 41, "has_fan": False, "battery_level": 3.9},
        )
        climateTopic = f"{D}/climate/nest_{SERIAL}/thermostat/config"
        await observer.until(lambda: climateTopic in observer.latest, climateTopic)
        climate = json.loads(observer.latest[climateTopic])
        self.assertEqual(climate["unique_id"], f"{self.prefix}_{SERIAL}")
        self.assertEqual(climate["modes"], ["off", "heat", "cool", "heat_cool"])
        self.assertEqual(climate["temperature_unit"], "C")
        self.assertNotIn("fan_modes", climate)
        for kind, names in [
            (
                "sensor",
                [
                    "temperature",
                    "humidity",
                    "outdoor_temperature",
                    "battery",
                    "time_to_target",
                ],
            ),
            (
                "binary_sensor",
                ["occupancy", "fan", "heating", "cooling", "filter_replacement"],
            ),
        ]:
            for name in names:
                topic = f"{D}/{kind}/nest_{SERIAL}/{name}/config"
                await observer.until(
                    lambda topic=topic: topic in observer.latest,  # type: ignore[misc]
                    topic,
                )
                config = json.loads(observer.latest[topic])
                self.assertEqual(config["device"], climate["device"])
                self.assertEqual(config["unique_id"], f"{self.prefix}_{SERIAL}_{name}")
        await observer.payload(f"{self.prefix}/status", "online")
        await observer.payload(f"{P}/availability", "online")
        await observer.payload(f"{P}/shared/target_temperature", "20.0")
        await observer.payload(f"{P}/ha/current_temperature", "19.5")
        await observer.payload(f"{P}/ha/current_humidity", "41")
        await observer.payload(f"{P}/ha/mode", "heat")
        await observer.payload(f"{P}/ha/battery", "75")
        self.assertEqual((await self.status(controlOrigin))["target_temperature"], 20.0)

        response = await self.request(
            "POST",
            f"{deviceOrigin}/nest/transport/v7/subscribe",
            data=objectsBody(held.values()),
            headers=DEVICE_HEADERS,
        )
        reader = BodyReader()
        response.deliverBody(reader)
        await sleep(0.1)
        self.assertEqual(reader.received, [])
        client.publish(f"{P}/ha/target_temperature/set", b"22.5")
        pushed = await reader.document()
        [bucket] = pushed["objects"]
        self.assertEqual(bucket["object_key"], SHARED)
        self.assertEqual(bucket["value"]["target_temperature"], 22.5)
        await observer.payload(f"{P}/ha/target_temperature", "22.5")

        client.publish(f"{P}/shared/target_temperature_type/set", b"cool")
        await observer.payload(f"{P}/ha/mode", "cool")
        await observer.payload(f"{P}/shared/target_temperature_type", "cool")

        with capturedLogs() as events:
            client.publish(f"{P}/ha/target_temperature/set", b"warm")
            client.publish(f"{P}/ha/mode/set", b"auto")

            def refused() -> list[dict[str, Any]]:
                return [e for e in events if e.get("why") and e.get("topic")]

            await observer.until(lambda: len(refused()) == 2, "two refusals")
        self.assertEqual(
            [e["topic"] for e in refused()],
            [f"{P}/ha/target_temperature/set", f"{P}/ha/mode/set"],
        )
        status = await self.status(controlOrigin)
        self.assertEqual((status["target_temperature"], status["mode"]), (22.5, "cool"))

    def test_brokerRestart(self) -> Deferred[None]:
        """
        When its broker restarts (losing everything retained), the bridge
        reconnects, subscribes again and republishes; meanwhile the device
        port answers as usual.
        """
        return self.asDeferred(self.brokerRestart())

    async def brokerRestart(self) -> None:
        port, broker = await self.privateBroker()
        deviceOrigin, controlOrigin = await self.startWith(port)
        await self.devicePut(
            deviceOrigin,
            {"target_temperature": 20.0, "target_temperature_type": "heat"},
            {"current_humidity": 40},
        )
        client, observer = await self.observe(port)
        await observer.payload(f"{self.P}/ha/target_temperature", "20.0")
        self.stopBroker(broker)
        await self.devicePut(
            deviceOrigin, {"target_temperature": 21.0}, {"current_humidity": 42}
        )
        port, broker = await self.privateBroker(port)
        client, observer = await self.observe(port)
        await observer.payload(f"{self.prefix}/status", "online")
        await observer.payload(f"{self.P}/ha/target_temperature", "21.0")
        await observer.payload(f"{self.P}/device/current_humidity", "42")
        climate = f"{self.discoveryPrefix}/climate/nest_{SERIAL}/thermostat/config"
        await observer.until(lambda: climate in observer.latest, climate)
        # Subscribed again: a command works on the new connection.
        client.publish(f"{self.P}/ha/target_temperature/set", b"23")
        await observer.payload(f"{self.P}/ha/target_temperature", "23.0")

    def test_tls(self) -> Deferred[None]:
        """
        With C{mqtts://} and C{?ca=FILE} the bridge speaks TLS to a broker
        whose certificate that CA signed (and checks its address).
        """
        return self.asDeferred(self.tls())

    async def tls(self) -> None:
        ca, cert, key = writeCertificates(self.mktemp())
        port, broker = await self.privateBroker(tls=(ca, cert, key))
        with capturedLogs() as events:
            deviceOrigin, controlOrigin = await self.start(
                "--mqtt",
                f"mqtts://127.0.0.1:{port}?ca={ca}",
                "--mqtt-prefix",
                self.prefix,
            )
            for _attempt in range(100):
                if any(
                    e.get("log_format", "").startswith("MQTT connected") for e in events
                ):
                    break
                await sleep(0.05)
        [connected] = [
            e for e in events if e.get("log_namespace", "").startswith("nestproto.mqtt")
        ]
        self.assertEqual(
            (connected["log_format"].split(" ")[1], connected["broker"]),
            ("connected", f"mqtts://127.0.0.1:{port}"),
        )

    def test_passwords(self) -> Deferred[None]:
        """
        A wrong password is one clear log line while the device port keeps
        serving; the password from the mqtt-password file is accepted.
        """
        return self.asDeferred(self.passwords())

    async def passwords(self) -> None:
        port, broker = await self.privateBroker(password=("nest", "s3cret"))
        with capturedLogs() as events:
            deviceOrigin, controlOrigin = await self.start(
                "--mqtt",
                f"mqtt://nest:wrong@127.0.0.1:{port}",
                "--mqtt-prefix",
                self.prefix,
            )
            for _round in range(3):
                await self.devicePut(
                    deviceOrigin, {"target_temperature": 20.0}, {"current_humidity": 40}
                )
                await sleep(0.5)
        mqttLines = [
            e for e in events if e.get("log_namespace", "").startswith("nestproto.mqtt")
        ]
        [line] = mqttLines
        self.assertEqual(line["log_level"].name, "warn")
        self.assertIn("user name or password", line["problem"])
        self.assertNotIn("wrong", str(line.get("broker")))
        await self.stop(self.services[-1])

        data = self.mktemp()
        os.makedirs(data)
        with open(os.path.join(data, "mqtt-password"), "w") as f:
            f.write("s3cret\n")
        client, observer = await self.observe(
            port, f"{self.prefix}/#", username="nest", password="s3cret"
        )
        await self.start(
            "--mqtt",
            f"mqtt://nest@127.0.0.1:{port}",
            "--mqtt-prefix",
            self.prefix,
            data=data,
        )
        await observer.payload(f"{self.prefix}/status", "online")
