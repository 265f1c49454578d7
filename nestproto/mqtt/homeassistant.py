# -*- test-case-name: tests.test_mqtt_bridge -*-
"""
The topics the bridge publishes and what goes in them: raw bucket fields,
Home Assistant's state topics and its discovery payloads. No I/O.

The layout is that of the NoLongerEvil self-hosted server, so that with
C{--mqtt-prefix nolongerevil} its users keep their topics and, since the
C{unique_id}s are made from the prefix the same way, their Home Assistant
entities (the entity registry keys on C{unique_id}). Where that layout had
defects, this one differs on purpose:

 - the setpoint command topics are in the climate config in every mode
   (the peer drops them in C{off}, and Home Assistant then refuses the
   entity); which setpoints apply is said on the state topics instead,
   with C{None} for those that do not (Home Assistant's MQTT climate
   resets a setpoint on that payload);
 - the config changes only with what it describes (name, capabilities,
   safety bounds), so it is not republished on every change;
 - temperatures are Celsius and labelled so; battery is a percentage.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

from attrs import frozen

#: Which Home Assistant mode each C{target_temperature_type} shows as.
HA_MODES = {
    "off": "off",
    "heat": "heat",
    "cool": "cool",
    "range": "heat_cool",
    "emergency": "heat",
}
#: The C{hvac_*_state} fields (shared) that mean heating, and cooling.
_HEATING = (
    "hvac_heater_state",
    "hvac_heat_x2_state",
    "hvac_heat_x3_state",
    "hvac_aux_heater_state",
    "hvac_alt_heat_state",
    "hvac_alt_heat_x2_state",
    "hvac_emer_heat_state",
)
_COOLING = ("hvac_ac_state", "hvac_cool_x2_state", "hvac_cool_x3_state")
#: Battery voltage read as empty and as full. The firmware turns Wi-Fi off
#: below 3.6 V (PROTOCOL.md §12); 4.0 V is a full lithium-ion cell. Not
#: calibrated against a thermostat: a rough gauge.
BATTERY_EMPTY_VOLTS = 3.6
BATTERY_FULL_VOLTS = 4.0
#: A C{time_to_target} above this is an epoch time, below it a duration
#: (PROTOCOL.md §10.2: sources differ).
_EPOCH_THRESHOLD = 1_000_000_000

PRESETS = ("home", "away", "eco")
FAN_MODES = ("auto", "on")
#: The object ids of the sensors and binary sensors, in discovery order.
SENSORS = (
    "temperature",
    "humidity",
    "outdoor_temperature",
    "battery",
    "time_to_target",
)
BINARY_SENSORS = ("occupancy", "fan", "heating", "cooling", "filter_replacement")
#: Discovery objects the NoLongerEvil server publishes and this bridge does
#: not: cleared when discovery is sent, so that after a migration Home
#: Assistant drops them instead of showing their last values forever (the
#: discovery topics are the same whatever the prefix).
PEER_ONLY = (
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
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def topicSafe(level: str) -> bool:
    """Whether C{level} can be one level of a topic we publish."""
    return bool(level) and not any(c in level for c in "/+#\0")


@frozen
class Topics:
    """Every topic name of one bridge: C{prefix} (P) and C{discoveryPrefix} (D)."""

    prefix: str = "nestproto"
    discoveryPrefix: str = "homeassistant"

    @property
    def uniquePrefix(self) -> str:
        """What C{unique_id}s and device identifiers start with."""
        return _UNSAFE.sub("_", self.prefix)

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def commands(self) -> str:
        """Every command topic: raw (P/S/B/F/set) and HA's (P/S/ha/N/set)."""
        return f"{self.prefix}/+/+/+/set"

    @property
    def homeAssistantStatus(self) -> str:
        return f"{self.discoveryPrefix}/status"

    @property
    def climates(self) -> str:
        """The filter of every thermostat's climate config."""
        return f"{self.discoveryPrefix}/climate/+/thermostat/config"

    def climateSerial(self, topic: str) -> str | None:
        """The serial a climate config topic is for, or C{None}."""
        start = f"{self.discoveryPrefix}/climate/nest_"
        end = "/thermostat/config"
        if not topic.startswith(start) or not topic.endswith(end):
            return None
        serial = topic[len(start) : -len(end)]
        return serial if topicSafe(serial) else None

    def availability(self, serial: str) -> str:
        return f"{self.prefix}/{serial}/availability"

    def bucket(self, serial: str, bucketType: str) -> str:
        return f"{self.prefix}/{serial}/{bucketType}"

    def field(self, serial: str, bucketType: str, name: str) -> str:
        return f"{self.prefix}/{serial}/{bucketType}/{name}"

    def ha(self, serial: str, name: str) -> str:
        return f"{self.prefix}/{serial}/ha/{name}"

    def discovery(self, component: str, serial: str, objectId: str) -> str:
        return f"{self.discoveryPrefix}/{component}/nest_{serial}/{objectId}/config"

    def discoveryTopics(self, serial: str) -> list[str]:
        """Every discovery topic of C{serial}: what removing it clears."""
        return [
            self.discovery("climate", serial, "thermostat"),
            *(self.discovery("sensor", serial, name) for name in SENSORS),
            *(self.discovery("binary_sensor", serial, name) for name in BINARY_SENSORS),
        ]

    def peerOnlyTopics(self, serial: str) -> list[str]:
        return [
            self.discovery(component, serial, name) for component, name in PEER_ONLY
        ]

    def parseCommand(self, topic: str) -> tuple[str, str, str] | None:
        """
        C{(serial, bucket or "ha", field)} of a command topic, or C{None}
        when C{topic} is not one.
        """
        start = f"{self.prefix}/"
        if not topic.startswith(start) or not topic.endswith("/set"):
            return None
        levels = topic[len(start) : -len("/set")].split("/")
        if len(levels) != 3 or not all(levels):
            return None
        serial, bucketType, name = levels
        return serial, bucketType, name


@frozen
class Thermostat:
    """What the mapping reads of one device, as committed."""

    serial: str
    device: Mapping[str, Any]
    shared: Mapping[str, Any]
    structure: Mapping[str, Any]
    #: The setpoint range commands clamp to (L{commands.safetyBounds}).
    bounds: tuple[float, float]

    def first(self, name: str) -> Any:
        """C{name} from shared, else from device (as the control API reads)."""
        value = self.shared.get(name)
        return self.device.get(name) if value is None else value

    def capability(self, name: str, default: bool) -> bool:
        for value in (self.shared.get(name), self.device.get(name)):
            if isinstance(value, bool):
                return value
        return default

    @property
    def mode(self) -> str:
        mode = self.first("target_temperature_type")
        return HA_MODES.get(mode.lower(), "off") if isinstance(mode, str) else "off"

    @property
    def away(self) -> bool:
        """The structure's eco switch, as the control API's C{away} reads it."""
        return (
            self.structure.get("manual_eco_all") is True
            or self.structure.get("away") is True
        )

    @property
    def eco(self) -> bool:
        eco = self.device.get("eco")
        mode = eco.get("mode") if isinstance(eco, dict) else None
        return self.away or mode in ("manual-eco", "auto-eco")

    def name(self) -> str:
        name = self.shared.get("name")
        return name if isinstance(name, str) and name.strip() else f"Nest {self.serial}"


def isNumber(value: object) -> TypeGuard[int | float]:
    """A JSON number: not a boolean, not NaN or infinite."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _number(value: float) -> str:
    # What json.dumps writes for a finite number, without its machinery.
    return repr(value)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def fieldPayload(value: Any) -> bytes:
    """
    A raw field's payload: a string as it is, anything else as JSON
    (C{true}, C{21.5}, C{{...}}).
    """
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | float) and math.isfinite(value):
        return repr(value).encode("ascii")
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def bucketPayload(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def action(t: Thermostat) -> str:
    """What the equipment does now: heating, cooling, fan, idle or off."""
    if any(t.shared.get(name) is True for name in _HEATING):
        return "heating"
    if any(t.shared.get(name) is True for name in _COOLING):
        return "cooling"
    if t.shared.get("hvac_fan_state") is True:
        return "fan"
    return "off" if t.mode == "off" else "idle"


def fanMode(t: Thermostat, nowS: float) -> str:
    timeout = t.device.get("fan_timer_timeout")
    if isNumber(timeout) and timeout > nowS:
        return "on"
    return "on" if t.device.get("fan_mode") == "on" else "auto"


def preset(t: Thermostat) -> str:
    """
    C{away} while the structure is in eco (what the control API calls
    away), C{eco} while only the device is, else C{home}.
    """
    if t.away:
        return "away"
    return "eco" if t.eco else "home"


def batteryPercent(volts: float) -> int:
    share = (volts - BATTERY_EMPTY_VOLTS) / (BATTERY_FULL_VOLTS - BATTERY_EMPTY_VOLTS)
    return round(min(max(share, 0.0), 1.0) * 100)


def minutesToTarget(value: float, nowS: float) -> int:
    seconds = value - nowS if value > _EPOCH_THRESHOLD else value
    return max(0, int(seconds // 60))


def timeDependent(t: Thermostat, nowS: float) -> bool:
    """Whether L{states} will change with time alone (a timer runs)."""
    ttt = t.device.get("time_to_target")
    timeout = t.device.get("fan_timer_timeout")
    return (isNumber(ttt) and ttt > 0) or (isNumber(timeout) and timeout > nowS)


def states(t: Thermostat, nowS: float) -> dict[str, str]:
    """
    The payload of each C{P/S/ha/NAME} state topic, by NAME. A value the
    device has not reported is left out.
    """
    out: dict[str, str] = {}
    current = t.first("current_temperature")
    if isNumber(current):
        out["current_temperature"] = _number(current)
    humidity = t.device.get("current_humidity")
    if isNumber(humidity):
        out["current_humidity"] = _number(humidity)
    mode = t.mode
    setpoints = {
        name: t.first(name)
        for name in (
            "target_temperature",
            "target_temperature_low",
            "target_temperature_high",
        )
    }
    applies = (
        {"target_temperature_low", "target_temperature_high"}
        if mode == "heat_cool"
        else {"target_temperature"}
    )
    for name, value in setpoints.items():
        out[name] = _number(value) if name in applies and isNumber(value) else "None"
    out["mode"] = mode
    doing = action(t)
    out["action"] = doing
    out["heating"] = _flag(doing == "heating")
    out["cooling"] = _flag(doing == "cooling")
    out["fan_mode"] = fanMode(t, nowS)
    out["preset"] = preset(t)
    for name, bucket in (
        ("outdoor_temperature", t.device),
        ("outside_temperature", t.shared),
        ("outside_temperature", t.device),
    ):
        if isNumber(bucket.get(name)):
            out["outdoor_temperature"] = _number(bucket[name])
            break
    out["occupancy"] = "away" if t.away else "home"
    out["fan_running"] = _flag(t.shared.get("hvac_fan_state") is True)
    out["eco"] = _flag(t.eco)
    battery = t.device.get("battery_level")
    if isNumber(battery):
        out["battery"] = str(batteryPercent(battery))
    ttt = t.device.get("time_to_target")
    if isNumber(ttt):
        out["time_to_target"] = str(minutesToTarget(ttt, nowS))
    for name in ("filter_replacement_needed", "learning_mode"):
        if isinstance(t.device.get(name), bool):
            out[name] = _flag(t.device[name])
    localIp = t.device.get("local_ip")
    if isinstance(localIp, str) and localIp:
        out["local_ip"] = localIp
    return out


def _model(t: Thermostat) -> str:
    version = t.device.get("model_version")
    if isinstance(version, str) and version:
        return f"Nest Learning Thermostat ({version})"
    return "Nest Learning Thermostat"


def discoveryInputs(t: Thermostat) -> tuple[object, ...]:
    """
    Everything of C{t} that L{discovery} reads: the configs change only
    when this does, and comparing it is far cheaper than building them.
    """
    return (
        t.name(),
        _model(t),
        t.capability("can_heat", True),
        t.capability("can_cool", True),
        t.capability("has_fan", False),
        t.bounds,
    )


def discovery(
    t: Thermostat, topics: Topics, version: str
) -> list[tuple[str, dict[str, Any]]]:
    """Every discovery config of C{t}: (topic, payload), climate first."""
    serial = t.serial
    unique = f"{topics.uniquePrefix}_{serial}"

    def ha(name: str) -> str:
        return topics.ha(serial, name)

    common: dict[str, Any] = {
        "device": {
            "identifiers": [unique],
            "name": t.name(),
            "model": _model(t),
            "manufacturer": "Nest Labs",
            "sw_version": version,
        },
        # Both must say online: the bridge (its will says offline when it
        # vanishes) and the thermostat (from its presence).
        "availability": [
            {"topic": topics.status},
            {"topic": topics.availability(serial)},
        ],
        "availability_mode": "all",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    canHeat = t.capability("can_heat", True)
    canCool = t.capability("can_cool", True)
    modes = ["off"]
    if canHeat:
        modes.append("heat")
    if canCool:
        modes.append("cool")
    if canHeat and canCool:
        modes.append("heat_cool")
    low, high = t.bounds
    climate: dict[str, Any] = {
        **common,
        "unique_id": unique,
        # The device's own name: the climate is the device's main entity.
        "name": None,
        "temperature_unit": "C",
        "precision": 0.5,
        "temp_step": 0.5,
        "min_temp": low,
        "max_temp": high,
        "current_temperature_topic": ha("current_temperature"),
        "current_humidity_topic": ha("current_humidity"),
        "mode_state_topic": ha("mode"),
        "mode_command_topic": ha("mode") + "/set",
        "modes": modes,
        "action_topic": ha("action"),
        "preset_mode_state_topic": ha("preset"),
        "preset_mode_command_topic": ha("preset") + "/set",
        "preset_modes": list(PRESETS),
        "optimistic": False,
        "qos": 1,
    }
    for key, name in (
        ("temperature", "target_temperature"),
        ("temperature_low", "target_temperature_low"),
        ("temperature_high", "target_temperature_high"),
    ):
        climate[f"{key}_state_topic"] = ha(name)
        climate[f"{key}_command_topic"] = ha(name) + "/set"
    if t.capability("has_fan", False):
        climate["fan_mode_state_topic"] = ha("fan_mode")
        climate["fan_mode_command_topic"] = ha("fan_mode") + "/set"
        climate["fan_modes"] = list(FAN_MODES)

    def entity(objectId: str, name: str, state: str, **extra: Any) -> dict[str, Any]:
        return {
            **common,
            "unique_id": f"{unique}_{objectId}",
            "name": name,
            "state_topic": ha(state),
            **extra,
        }

    temperature = {
        "device_class": "temperature",
        "unit_of_measurement": "°C",
        "state_class": "measurement",
    }
    flags = {"payload_on": "true", "payload_off": "false"}
    sensors = {
        "temperature": entity(
            "temperature", "Temperature", "current_temperature", **temperature
        ),
        "humidity": entity(
            "humidity",
            "Humidity",
            "current_humidity",
            device_class="humidity",
            unit_of_measurement="%",
            state_class="measurement",
        ),
        "outdoor_temperature": entity(
            "outdoor_temperature",
            "Outdoor temperature",
            "outdoor_temperature",
            **temperature,
        ),
        "battery": entity(
            "battery",
            "Battery",
            "battery",
            device_class="battery",
            unit_of_measurement="%",
            state_class="measurement",
            entity_category="diagnostic",
        ),
        "time_to_target": entity(
            "time_to_target",
            "Time to target",
            "time_to_target",
            device_class="duration",
            unit_of_measurement="min",
            state_class="measurement",
        ),
    }
    binarySensors = {
        "occupancy": entity(
            "occupancy",
            "Occupancy",
            "occupancy",
            device_class="occupancy",
            payload_on="home",
            payload_off="away",
        ),
        "fan": entity("fan", "Fan", "fan_running", device_class="running", **flags),
        "heating": entity(
            "heating", "Heating", "heating", device_class="heat", **flags
        ),
        "cooling": entity(
            "cooling", "Cooling", "cooling", device_class="cold", **flags
        ),
        "filter_replacement": entity(
            "filter_replacement",
            "Filter replacement",
            "filter_replacement_needed",
            device_class="problem",
            entity_category="diagnostic",
            **flags,
        ),
    }
    configs = [(topics.discovery("climate", serial, "thermostat"), climate)]
    configs.extend(
        (topics.discovery("sensor", serial, name), sensors[name]) for name in SENSORS
    )
    configs.extend(
        (topics.discovery("binary_sensor", serial, name), binarySensors[name])
        for name in BINARY_SENSORS
    )
    return configs
