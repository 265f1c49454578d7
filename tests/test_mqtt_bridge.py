# -*- test-case-name: tests.test_mqtt_bridge -*-
"""
The MQTT bridge in memory: a whole server on a Clock, the bridge on its
feed, and a broker stand-in that keeps what is retained.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import capturedLogs

from nestproto._version import __version__
from nestproto.admission import Admission, AdmissionSettings
from nestproto.buckets import Bucket
from nestproto.model import PutEntry
from nestproto.mqtt.bridge import MAX_COMMAND_AGE_SECONDS, MQTTBridge
from nestproto.mqtt.homeassistant import Topics
from nestproto.mqtt.packets import Publish

from .helpers import SERIAL, makeServer
from .test_pairing import ServerTestCase

SHARED = f"shared.{SERIAL}"
DEVICE = f"device.{SERIAL}"
SHARED_VALUE: dict[str, Any] = {
    "target_temperature": 20.0,
    "target_temperature_low": 18.0,
    "target_temperature_high": 24.0,
    "target_temperature_type": "heat",
    "can_heat": True,
    "can_cool": True,
    "current_temperature": 19.5,
    "name": "Hallway",
}
DEVICE_VALUE: dict[str, Any] = {
    "current_humidity": 40,
    "has_fan": True,
    "battery_level": 3.8,
    "lower_safety_temp": 9.0,
    "lower_safety_temp_enabled": True,
    "upper_safety_temp": 30.0,
    "upper_safety_temp_enabled": True,
    "local_ip": "192.168.1.50",
    "learning_mode": True,
    "model_version": "Display-2.8",
}
P = f"p/{SERIAL}"
#: What the NoLongerEvil server publishes and nestproto does not.
PEER_ONLY = [
    f"ha/{component}/nest_{SERIAL}/{name}/config"
    for component, name in [
        ("sensor", "rssi"),
        ("sensor", "filter_runtime"),
        ("sensor", "compressor_lockout"),
        ("sensor", "local_ip"),
        ("sensor", "fan_timer_remaining"),
        ("binary_sensor", "leaf"),
        ("binary_sensor", "sunlight_correction"),
        ("binary_sensor", "learning_mode"),
        ("binary_sensor", "heat_pump_ready"),
        ("number", "fan_duration"),
    ]
]
CLIMATE = f"ha/climate/nest_{SERIAL}/thermostat/config"
DISCOVERY = [
    CLIMATE,
    *(
        f"ha/sensor/nest_{SERIAL}/{name}/config"
        for name in (
            "temperature",
            "humidity",
            "outdoor_temperature",
            "battery",
            "time_to_target",
        )
    ),
    *(
        f"ha/binary_sensor/nest_{SERIAL}/{name}/config"
        for name in ("occupancy", "fan", "heating", "cooling", "filter_replacement")
    ),
]


class FakeBroker:
    """A connection that records what is published and what stays retained."""

    def __init__(self) -> None:
        self.paused = False
        self.published: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self.subscriptions: list[tuple[str, int]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.published.append((topic, payload, retain))
        if retain and payload:
            self.retained[topic] = payload
        elif retain:
            self.retained.pop(topic, None)

    def subscribe(self, filters: Sequence[tuple[str, int]]) -> Deferred[list[int]]:
        self.subscriptions.extend(filters)
        return succeed([qos for topic, qos in filters])

    def take(self) -> list[str]:
        """The topics published since the last call."""
        topics = [topic for topic, payload, retain in self.published]
        self.published = []
        return topics

    def text(self, topic: str) -> str:
        return self.retained[topic].decode("utf-8")

    def config(self, topic: str) -> dict[str, Any]:
        config = json.loads(self.retained[topic])
        assert isinstance(config, dict)
        return config


class ManualRunner:
    """A store runner that commits only when told to."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]]
        self.waiting = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append((d, f, args))
        return d

    def release(self) -> None:
        while self.waiting:
            d, f, args = self.waiting.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


class BridgeTestCase(ServerTestCase):
    shared: dict[str, Any] = SHARED_VALUE
    device: dict[str, Any] = DEVICE_VALUE
    admission = AdmissionSettings()

    def setUp(self) -> None:
        super().setUp()
        self.startBridge()

    def startBridge(self) -> None:
        now = self.server.nowMs()
        self.server.seed(
            SERIAL,
            Bucket(SHARED, 1, now, dict(self.shared)),
            Bucket(DEVICE, 1, now, dict(self.device)),
        )
        self.bridge = MQTTBridge(
            self.server.state,
            self.server.hub,
            Topics("p", "ha"),
            admission=Admission(self.server.state, self.admission),
        )
        self.server.store.listen(self.bridge.commitArrived)
        self.broker = FakeBroker()
        self.bridge.connected(self.broker)
        self.settle()

    def tearDown(self) -> None:
        self.bridge.disconnected()
        super().tearDown()

    def settle(self) -> None:
        """Let every pending publication happen."""
        for _turn in range(100):
            self.server.clock.advance(self.bridge.flushDelaySeconds)
            if not self.bridge._dirty and not self.bridge._later:
                return

    def message(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.bridge.messageReceived(
            Publish(topic, payload, qos=1, retain=retain, packetId=1),
            self.server.clock.seconds(),
        )
        self.settle()

    def value(self, key: str) -> dict[str, Any]:
        bucket = self.server.store.get(SERIAL, key)
        assert bucket is not None
        return bucket.value


class DiscoveryTests(BridgeTestCase):
    def test_connectPublishes(self) -> None:
        """
        On connect the bridge says it is online, subscribes to every
        command topic and to Home Assistant's status, and publishes each
        device's discovery configs, all retained.
        """
        self.assertEqual(self.broker.text("p/status"), "online")
        self.assertEqual(
            self.broker.subscriptions,
            [
                ("p/+/+/+/set", 1),
                ("ha/status", 0),
                ("ha/climate/+/thermostat/config", 0),
            ],
        )
        for topic in DISCOVERY:
            self.assertIn(topic, self.broker.retained)
        self.assertTrue(all(retain for topic, payload, retain in self.broker.published))

    def test_peerEntitiesCleared(self) -> None:
        """
        With discovery, the configs of the NoLongerEvil server's entities
        that nestproto does not have are cleared (a migration leaves none
        behind showing stale values).
        """
        cleared = [
            topic for topic, payload, retain in self.broker.published if not payload
        ]
        self.assertEqual(cleared, PEER_ONLY)

    def test_everyConfig(self) -> None:
        """
        Every config has its own unique id from the prefix, the device
        block the thermostat's entities share (with nestproto's version),
        and availability on both the bridge and the device.
        """
        devices = []
        uniqueIds = set()
        for topic in DISCOVERY:
            config = self.broker.config(topic)
            uniqueIds.add(config["unique_id"])
            self.assertTrue(config["unique_id"].startswith(f"p_{SERIAL}"))
            devices.append(config["device"])
            self.assertEqual(
                config["availability"],
                [{"topic": "p/status"}, {"topic": f"{P}/availability"}],
            )
            self.assertEqual(config["availability_mode"], "all")
            for key, value in config.items():
                if key.endswith("_topic"):
                    self.assertTrue(value.startswith(f"{P}/ha/"), (key, value))
        self.assertEqual(len(uniqueIds), len(DISCOVERY))
        self.assertEqual(
            devices[0],
            {
                "identifiers": [f"p_{SERIAL}"],
                "name": "Hallway",
                "model": "Nest Learning Thermostat (Display-2.8)",
                "manufacturer": "Nest Labs",
                "sw_version": __version__,
            },
        )
        self.assertTrue(all(device == devices[0] for device in devices))

    def test_climate(self) -> None:
        """
        The climate is in Celsius at 0.5, bounded by the device's safety
        temperatures, with the modes and fan modes the device has, and
        every setpoint topic.
        """
        climate = self.broker.config(CLIMATE)
        self.assertEqual(
            {
                key: climate[key]
                for key in (
                    "temperature_unit",
                    "precision",
                    "temp_step",
                    "min_temp",
                    "max_temp",
                    "modes",
                    "fan_modes",
                    "preset_modes",
                    "name",
                )
            },
            {
                "temperature_unit": "C",
                "precision": 0.5,
                "temp_step": 0.5,
                "min_temp": 9.0,
                "max_temp": 30.0,
                "modes": ["off", "heat", "cool", "heat_cool"],
                "fan_modes": ["auto", "on"],
                "preset_modes": ["home", "away", "eco"],
                "name": None,
            },
        )
        for name in (
            "target_temperature",
            "target_temperature_low",
            "target_temperature_high",
            "mode",
            "fan_mode",
            "preset",
        ):
            self.assertIn(f"{P}/ha/{name}/set", climate.values())

    def test_units(self) -> None:
        """Each sensor's unit and class say what its state is."""
        units = {
            topic.split("/")[3]: (
                self.broker.config(topic).get("unit_of_measurement"),
                self.broker.config(topic).get("device_class"),
            )
            for topic in DISCOVERY[1:]
        }
        self.assertEqual(
            units,
            {
                "temperature": ("°C", "temperature"),
                "humidity": ("%", "humidity"),
                "outdoor_temperature": ("°C", "temperature"),
                "battery": ("%", "battery"),
                "time_to_target": ("min", "duration"),
                "occupancy": (None, "occupancy"),
                "fan": (None, "running"),
                "heating": (None, "heat"),
                "cooling": (None, "cold"),
                "filter_replacement": (None, "problem"),
            },
        )

    def test_notOnEveryChange(self) -> None:
        """
        A change of state publishes only the topics whose payload changed,
        never the discovery configs; a change of what the configs describe
        (here the name) publishes them again.
        """
        self.broker.take()
        self.server.clock.advance(1)
        self.successResultOf(
            self.server.state.put(
                SERIAL, [PutEntry(SHARED, {"current_temperature": 21.0})]
            )
        )
        self.settle()
        self.assertEqual(
            self.broker.take(),
            [
                f"{P}/shared",
                f"{P}/shared/current_temperature",
                f"{P}/ha/current_temperature",
                # A device's put is news from it.
                f"{P}/availability",
            ],
        )
        self.successResultOf(
            self.server.state.put(SERIAL, [PutEntry(SHARED, {"name": "Landing"})])
        )
        self.settle()
        published = self.broker.take()
        for topic in DISCOVERY:
            self.assertIn(topic, published)
        self.assertEqual(self.broker.config(CLIMATE)["device"]["name"], "Landing")

    def test_homeAssistantBirth(self) -> None:
        """
        Home Assistant announcing itself gets every config again; a retained
        announcement (an old one) does not.
        """
        self.broker.take()
        self.message("ha/status", b"online", retain=True)
        self.assertEqual(self.broker.take(), [])
        self.message("ha/status", b"offline")
        self.assertEqual(self.broker.take(), [])
        self.message("ha/status", b"online")
        self.assertEqual(self.broker.take(), PEER_ONLY + DISCOVERY)

    def test_removedDeviceCleared(self) -> None:
        """
        Removing a device publishes empty retained payloads on its discovery
        topics and every other topic of it.
        """
        self.successResultOf(self.server.state.removeDevice(SERIAL, [], []))
        self.settle()
        self.assertEqual(self.broker.retained, {"p/status": b"online"})
        cleared = {
            topic for topic, payload, retain in self.broker.published if not payload
        }
        self.assertTrue(set(DISCOVERY) <= cleared)

    def test_staleConfigsCleared(self) -> None:
        """
        A retained climate config of ours for a device no longer known (it
        was removed while there was no connection) is cleared with its
        device's other configs; one of another server's, a live one, or one
        of a known device is left alone.
        """
        gone = "02AA01AC0000000099"
        ours = json.dumps({"unique_id": f"p_{gone}"}).encode()
        topic = f"ha/climate/nest_{gone}/thermostat/config"
        self.broker.take()
        self.message(topic, json.dumps({"unique_id": f"other_{gone}"}).encode(), True)
        self.message(topic, ours)
        self.message(CLIMATE, json.dumps({"unique_id": f"p_{SERIAL}"}).encode(), True)
        self.assertEqual(self.broker.take(), [])
        self.message(topic, ours, retain=True)
        cleared = [t for t, payload, retain in self.broker.published if not payload]
        self.assertEqual(
            set(cleared),
            {
                *(t.replace(SERIAL, gone) for t in DISCOVERY + PEER_ONLY),
                f"p/{gone}/availability",
            },
        )

    def test_reconnectRepublishes(self) -> None:
        """After a new connection everything is published again."""
        before = dict(self.broker.retained)
        self.bridge.disconnected()
        self.assertEqual(self.server.clock.getDelayedCalls(), [])
        self.broker = FakeBroker()
        self.bridge.connected(self.broker)
        self.settle()
        self.assertEqual(self.broker.retained, before)


class CapabilityTests(BridgeTestCase):
    shared = {**SHARED_VALUE, "can_cool": False, "target_temperature_type": "off"}
    device = {"current_temperature": 19.0}

    def test_followsCapabilities(self) -> None:
        """
        A device that cannot cool has no cool modes; one without a fan no
        fan modes; without safety temperatures the bounds are the defaults.
        """
        climate = self.broker.config(CLIMATE)
        self.assertEqual(climate["modes"], ["off", "heat"])
        self.assertNotIn("fan_modes", climate)
        self.assertNotIn("fan_mode_command_topic", climate)
        self.assertEqual((climate["min_temp"], climate["max_temp"]), (7.222, 35.0))

    def test_offKeepsSetpoints(self) -> None:
        """
        In off the setpoint command topics stay (Home Assistant refuses a
        climate whose topics come and go), and the state topics say which
        setpoint applies.
        """
        climate = self.broker.config(CLIMATE)
        for key in ("temperature", "temperature_low", "temperature_high"):
            self.assertIn(f"{key}_command_topic", climate)
            self.assertIn(f"{key}_state_topic", climate)
        self.assertEqual(self.broker.text(f"{P}/ha/mode"), "off")
        self.assertEqual(self.broker.text(f"{P}/ha/target_temperature"), "20.0")
        self.assertEqual(self.broker.text(f"{P}/ha/target_temperature_low"), "None")
        self.assertEqual(self.broker.text(f"{P}/ha/action"), "off")


class StateTests(BridgeTestCase):
    def test_rawTopics(self) -> None:
        """
        Each bucket is published whole as JSON and field by field: strings
        as they are, everything else as JSON.
        """
        self.assertEqual(json.loads(self.broker.retained[f"{P}/shared"]), SHARED_VALUE)
        self.assertEqual(json.loads(self.broker.retained[f"{P}/device"]), DEVICE_VALUE)
        self.assertEqual(
            self.broker.text(f"{P}/shared/target_temperature_type"), "heat"
        )
        self.assertEqual(self.broker.text(f"{P}/shared/target_temperature"), "20.0")
        self.assertEqual(self.broker.text(f"{P}/device/has_fan"), "true")
        self.assertEqual(self.broker.text(f"{P}/device/current_humidity"), "40")

    def test_homeAssistantStates(self) -> None:
        """The HA state topics, as the device's buckets say."""
        states = {
            topic.rsplit("/", 1)[1]: payload.decode()
            for topic, payload in self.broker.retained.items()
            if topic.startswith(f"{P}/ha/")
        }
        self.assertEqual(
            states,
            {
                "current_temperature": "19.5",
                "current_humidity": "40",
                "target_temperature": "20.0",
                "target_temperature_low": "None",
                "target_temperature_high": "None",
                "mode": "heat",
                "action": "idle",
                "heating": "false",
                "cooling": "false",
                "fan_mode": "auto",
                "preset": "home",
                "occupancy": "home",
                "fan_running": "false",
                "eco": "false",
                "battery": "50",
                "learning_mode": "true",
                "local_ip": "192.168.1.50",
            },
        )

    def test_afterDevicePut(self) -> None:
        """
        A device's put shows on its raw and HA topics: heating, the range
        setpoints in heat-cool, a fan timer, time to target, an outdoor
        temperature and a filter reminder.
        """
        now = int(self.server.clock.seconds())
        self.successResultOf(
            self.server.state.put(
                SERIAL,
                [
                    PutEntry(
                        SHARED,
                        {
                            "hvac_heater_state": True,
                            "target_temperature_type": "range",
                            "current_temperature": 18.25,
                        },
                    ),
                    PutEntry(
                        DEVICE,
                        {
                            "fan_timer_timeout": now + 600,
                            "time_to_target": now + 1830,
                            "outdoor_temperature": -3.5,
                            "filter_replacement_needed": True,
                        },
                    ),
                ],
            )
        )
        self.settle()
        text = self.broker.text
        self.assertEqual(text(f"{P}/shared/hvac_heater_state"), "true")
        self.assertEqual(text(f"{P}/ha/current_temperature"), "18.25")
        self.assertEqual(
            [text(f"{P}/ha/{name}") for name in ("mode", "action", "heating")],
            ["heat_cool", "heating", "true"],
        )
        self.assertEqual(
            [text(f"{P}/ha/target_temperature{end}") for end in ("", "_low", "_high")],
            ["None", "18.0", "24.0"],
        )
        self.assertEqual(text(f"{P}/ha/fan_mode"), "on")
        self.assertEqual(text(f"{P}/ha/time_to_target"), "30")
        self.assertEqual(text(f"{P}/ha/outdoor_temperature"), "-3.5")
        self.assertEqual(text(f"{P}/ha/filter_replacement_needed"), "true")
        # Timers run down without a commit.
        self.server.clock.advance(self.bridge.refreshSeconds * 41)
        self.settle()
        self.assertEqual(text(f"{P}/ha/time_to_target"), "20")
        self.assertEqual(text(f"{P}/ha/fan_mode"), "auto")

    def test_availability(self) -> None:
        """
        A device heard from is online; silent for longer than the limit it
        is offline, within one refresh.
        """
        self.assertEqual(self.broker.text(f"{P}/availability"), "offline")
        self.server.state.presence.touch(SERIAL)
        self.server.clock.advance(self.bridge.refreshSeconds)
        self.settle()
        self.assertEqual(self.broker.text(f"{P}/availability"), "online")
        self.server.clock.advance(self.bridge.unavailableAfterSeconds)
        self.settle()
        self.assertEqual(self.broker.text(f"{P}/availability"), "offline")

    def test_backpressure(self) -> None:
        """
        While the connection's buffer is full nothing is written; once it
        drains, the latest state goes out.
        """
        self.broker.take()
        self.broker.paused = True
        for temperature in (21.0, 22.0, 23.0):
            self.successResultOf(
                self.server.state.put(
                    SERIAL, [PutEntry(SHARED, {"current_temperature": temperature})]
                )
            )
            self.settle()
        self.assertEqual(self.broker.take(), [])
        self.broker.paused = False
        self.bridge.writable()
        self.settle()
        self.assertEqual(self.broker.text(f"{P}/ha/current_temperature"), "23.0")
        self.assertEqual(
            set(self.broker.take()),
            {
                f"{P}/shared",
                f"{P}/shared/current_temperature",
                f"{P}/ha/current_temperature",
                f"{P}/availability",
            },
        )

    def test_disconnected(self) -> None:
        """Without a connection the feed costs nothing and leaves no timer."""
        self.bridge.disconnected()
        self.broker.take()
        self.successResultOf(
            self.server.state.put(
                SERIAL, [PutEntry(SHARED, {"current_temperature": 1})]
            )
        )
        self.assertEqual(self.server.clock.getDelayedCalls(), [])
        self.assertEqual(self.broker.take(), [])


class CommandTests(BridgeTestCase):
    def test_targetTemperatureReachesHeldSubscribe(self) -> None:
        """
        A setpoint on the HA topic goes through the command layer and is
        pushed to the device's held subscribe.
        """
        held = self.held()
        self.server.clock.advance(1)
        with capturedLogs() as events:
            self.message(f"{P}/ha/target_temperature/set", b"22.5")
        self.server.deviceClient.flush()
        [pushed] = held.documents()
        [bucket] = pushed["objects"]
        self.assertEqual(bucket["object_key"], SHARED)
        self.assertEqual(bucket["value"]["target_temperature"], 22.5)
        self.assertIs(bucket["value"]["target_change_pending"], True)
        self.assertEqual(self.broker.text(f"{P}/ha/target_temperature"), "22.5")
        self.assertEqual(
            [(e["log_format"], e.get("command")) for e in events],
            [("MQTT {command} for {serial}", "set_temperature")],
        )
        self.bridge.disconnected()
        self.endHolds()

    def test_clampedToSafety(self) -> None:
        """A setpoint beyond the device's safety range is clamped to it."""
        self.message(f"{P}/ha/target_temperature/set", b"40")
        self.assertEqual(self.value(SHARED)["target_temperature"], 30.0)

    def test_modeFanPreset(self) -> None:
        """Mode, fan mode and preset map to set_mode, set_fan and set_away."""
        self.message(f"{P}/ha/mode/set", b"heat_cool")
        self.assertEqual(self.value(SHARED)["target_temperature_type"], "range")
        self.message(f"{P}/ha/fan_mode/set", b"on")
        self.assertGreater(
            self.value(DEVICE)["fan_timer_timeout"], self.server.clock.seconds()
        )
        self.message(f"{P}/ha/preset/set", b"eco")
        self.assertEqual(self.broker.text(f"{P}/ha/preset"), "away")
        self.assertEqual(self.broker.text(f"{P}/ha/occupancy"), "away")
        self.message(f"{P}/ha/preset/set", b"home")
        self.assertEqual(self.broker.text(f"{P}/ha/preset"), "home")

    def test_rawCommands(self) -> None:
        """
        A raw C{/set} merges into its bucket through the command layer:
        JSON or bare payloads.
        """
        self.message(f"{P}/shared/target_temperature_type/set", b"cool")
        self.assertEqual(self.value(SHARED)["target_temperature_type"], "cool")
        self.message(f"{P}/shared/target_temperature/set", b"21")
        self.assertEqual(self.value(SHARED)["target_temperature"], 21.0)
        self.message(f"{P}/device/learning_mode/set", b"false")
        self.assertIs(self.value(DEVICE)["learning_mode"], False)
        self.message(f"{P}/device/away_temperature_low/set", b"12.5")
        self.assertEqual(self.value(DEVICE)["away_temperature_low"], 12.5)
        self.assertEqual(self.broker.text(f"{P}/device/learning_mode"), "false")

    def test_badCommandsChangeNothing(self) -> None:
        """
        A bad payload or topic is logged in one line and changes nothing.
        """
        before = (
            self.server.store.get(SERIAL, SHARED),
            self.server.store.get(SERIAL, DEVICE),
        )
        bad = [
            (f"{P}/ha/target_temperature/set", b"warm"),
            (f"{P}/ha/target_temperature/set", b"true"),
            (f"{P}/ha/target_temperature_low/set", b"{}"),
            (f"{P}/ha/mode/set", b"auto"),
            (f"{P}/ha/fan_mode/set", b"max"),
            (f"{P}/ha/preset/set", b"party"),
            (f"{P}/ha/swing/set", b"on"),
            (f"{P}/shared/current_temperature/set", b"25"),
            (f"{P}/shared/hvac_heater_state/set", b"true"),
            (f"{P}/schedule/days/set", b"{}"),
            (f"{P}/device/target_humidity/set", b"99"),
            (f"{P}/shared/target_temperature_type/set", b""),
            (f"{P}/shared/target_temperature_type/set", b"\xff\xfe"),
            ("p/UNKNOWN01/ha/target_temperature/set", b"21"),
        ]
        for topic, payload in bad:
            with capturedLogs() as events:
                self.message(topic, payload)
            self.assertEqual(
                [(e["log_level"].name, e["topic"]) for e in events],
                [("warn", topic)],
                payload,
            )
        self.assertEqual(
            (
                self.server.store.get(SERIAL, SHARED),
                self.server.store.get(SERIAL, DEVICE),
            ),
            before,
        )

    def test_retainedIgnored(self) -> None:
        """A retained command (of any age) changes nothing."""
        with capturedLogs() as events:
            self.message(f"{P}/ha/target_temperature/set", b"25", retain=True)
        self.assertEqual(self.value(SHARED)["target_temperature"], 20.0)
        [event] = events
        self.assertEqual(event["log_level"].name, "warn")


class QueuedCommandTests(BridgeTestCase):
    def setUp(self) -> None:
        self.runner = ManualRunner()
        self.server = makeServer(storeRunner=self.runner)
        self.startBridge()
        self.runner.release()
        self.settle()

    def test_rangeEndsInOrder(self) -> None:
        """
        The two ends of a range sent together both hold: the second is
        planned once the first is written, and moves neither back.
        """
        self.message(f"{P}/ha/target_temperature_low/set", b"20")
        self.message(f"{P}/ha/target_temperature_high/set", b"26")
        self.runner.release()
        self.runner.release()
        shared = self.value(SHARED)
        self.assertEqual(
            (shared["target_temperature_low"], shared["target_temperature_high"]),
            (20.0, 26.0),
        )

    def test_crossingEndMovesTheOther(self) -> None:
        """A low end above the high one takes the high one along."""
        self.message(f"{P}/ha/target_temperature_low/set", b"25")
        self.runner.release()
        shared = self.value(SHARED)
        self.assertEqual(
            (shared["target_temperature_low"], shared["target_temperature_high"]),
            (25.0, 25.0),
        )

    def test_staleDropped(self) -> None:
        """A command that waited more than 30 s is dropped, with one line."""
        self.message(f"{P}/ha/target_temperature/set", b"21")
        self.message(f"{P}/ha/target_temperature/set", b"23")
        self.server.clock.advance(MAX_COMMAND_AGE_SECONDS + 1)
        with capturedLogs() as events:
            self.runner.release()
        self.assertEqual(self.value(SHARED)["target_temperature"], 21.0)
        self.assertEqual(
            [(e["log_level"].name, e.get("why")) for e in events],
            [("warn", "dropped after waiting 31 s")],
        )
        self.settle()


class PairingRequiredTests(BridgeTestCase):
    """
    With pairing required, MQTT shows and commands exactly the devices the
    control side shows: claimed ones.
    """

    admission = AdmissionSettings(pairingRequired=True)

    def test_unclaimedHiddenUntilClaimed(self) -> None:
        """
        An unclaimed device is not published and its commands are refused,
        changing nothing; once claimed it is published like any other.
        """
        self.assertEqual(self.broker.retained, {"p/status": b"online"})
        before = self.server.store.get(SERIAL, SHARED)
        with capturedLogs() as events:
            self.message(f"{P}/ha/target_temperature/set", b"25")
        self.assertEqual([e["log_level"].name for e in events], ["warn"])
        self.assertEqual(self.server.store.get(SERIAL, SHARED), before)
        self.claim(self.passphrase()["value"])
        self.settle()
        for topic in DISCOVERY:
            self.assertIn(topic, self.broker.retained)
        self.message(f"{P}/ha/target_temperature/set", b"25")
        self.assertEqual(self.value(SHARED)["target_temperature"], 25.0)
