# -*- test-case-name: tests.test_control_api -*-
"""
The flat status of one thermostat, as the anchor's control API shows it
(PROTOCOL.md §16.5) and its clients read it (§16.6).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..fields import isNumber, numberOrNone
from ..hub import SubscriberHub
from ..membership import GLOBAL_SCOPE
from ..state import DeviceState

#: A device silent for longer than this is shown unavailable: it subscribes
#: at least every suspend_time_max (300 s), so two missed rounds.
DEFAULT_UNAVAILABLE_AFTER_SECONDS = 600.0

#: C{hvac} entries and the shared (or device) field each reads.
_HVAC_SHARED = {
    "heater": "hvac_heater_state",
    "heat_x2": "hvac_heat_x2_state",
    "heat_x3": "hvac_heat_x3_state",
    "ac": "hvac_ac_state",
    "cool_x2": "hvac_cool_x2_state",
    "cool_x3": "hvac_cool_x3_state",
    "fan": "hvac_fan_state",
    "aux_heat": "hvac_aux_heater_state",
    "emer_heat": "hvac_emer_heat_state",
    "alt_heat": "hvac_alt_heat_state",
}
_HVAC_DEVICE = {
    "humidifier": "humidifier_state",
    "dehumidifier": "dehumidifier_state",
    "auto_dehum": "auto_dehum_state",
    "fan_cooling": "fan_cooling_state",
}
#: Capabilities and what a missing flag means (as L{commands.setMode}
#: decides: heat and cool assumed, the rest not).
_CAPABILITIES = {
    "can_heat": True,
    "can_cool": True,
    "has_fan": False,
    "has_emer_heat": False,
    "has_humidifier": False,
    "has_dehumidifier": False,
}
#: The device's C{eco.mode} as clients read C{eco_mode}: they take
#: C{on|manual|auto|true|1} as eco on (PROTOCOL.md §16.6), so the device's
#: own words (C{manual-eco}, C{auto-eco}) would read as off.
_ECO_MODES = {"manual-eco": "manual", "auto-eco": "auto", "schedule": "off"}


def _first(name: str, *values: dict[str, Any]) -> Any:
    for value in values:
        if value.get(name) is not None:
            return value[name]
    return None


def _firstNumber(name: str, *values: dict[str, Any]) -> int | float | None:
    """
    The first number stored under C{name}, or C{None}: a non-number stored
    before devices were held to numbers (nestproto.fields) is never shown
    where clients expect a number.
    """
    for value in values:
        if isNumber(value.get(name)):
            return value[name]  # type: ignore[no-any-return]
    return None


def isAvailable(
    state: DeviceState, hub: SubscriberHub, serial: str, unavailableAfter: float
) -> bool:
    """
    Whether C{serial} is talking to us: it holds a subscribe now, or was
    heard from within C{unavailableAfter} seconds.
    """
    if hub.count(serial):
        return True
    seen = state.presence.lastSeen(serial)
    return seen is not None and state.clock.seconds() - seen <= unavailableAfter


def deviceStatus(
    state: DeviceState,
    hub: SubscriberHub,
    serial: str,
    unavailableAfter: float = DEFAULT_UNAVAILABLE_AFTER_SECONDS,
) -> dict[str, Any]:
    """The flat status of C{serial}, which must be a known device."""
    store = state.store

    def value(key: str, scope: str = serial) -> dict[str, Any]:
        bucket = store.get(scope, key)
        return {} if bucket is None else bucket.value

    shared = value(f"shared.{serial}")
    device = value(f"device.{serial}")
    structureKey = state.membership.structureKey(serial)
    structure = value(structureKey, GLOBAL_SCOPE)
    nowS = state.clock.seconds()
    available = isAvailable(state, hub, serial, unavailableAfter)
    seen = state.presence.lastSeen(serial)

    capabilities = {}
    for name, default in _CAPABILITIES.items():
        flag = _first(name, shared, device)
        capabilities[name] = flag if isinstance(flag, bool) else default

    eco = device.get("eco")
    deviceEco = eco.get("mode") if isinstance(eco, dict) else None
    # Away is the structure's eco switch, which is what set_away writes
    # (PROTOCOL.md §16.6: the anchor reads shared.away, so every client's
    # away switch snaps back after a successful command).
    away = structure.get("manual_eco_all") is True or structure.get("away") is True
    ecoMode = _ECO_MODES.get(deviceEco, "off") if isinstance(deviceEco, str) else "off"
    if ecoMode == "off" and structure.get("manual_eco_all") is True:
        ecoMode = "manual"

    fanTimeout = numberOrNone(device.get("fan_timer_timeout")) or 0
    displayName = shared.get("name")
    owner = state.membership.ownerOf(serial)
    status: dict[str, Any] = {
        "serial": serial,
        "id": serial,
        "name": displayName if isinstance(displayName, str) and displayName else None,
        "is_available": available,
        "is_online": available,
        "last_seen": None
        if seen is None
        else datetime.fromtimestamp(seen, UTC).isoformat(),
        "last_seen_ms": None if seen is None else int(seen * 1000),
        "current_temperature": _firstNumber("current_temperature", shared, device),
        "target_temperature": _firstNumber("target_temperature", shared, device),
        "target_temperature_high": _firstNumber(
            "target_temperature_high", shared, device
        ),
        "target_temperature_low": _firstNumber(
            "target_temperature_low", shared, device
        ),
        "humidity": numberOrNone(device.get("current_humidity")),
        "target_humidity": numberOrNone(device.get("target_humidity")),
        "target_humidity_enabled": device.get("target_humidity_enabled") is True,
        "mode": _first("target_temperature_type", shared, device),
        "hvac": {
            **{word: shared.get(field) is True for word, field in _HVAC_SHARED.items()},
            **{word: device.get(field) is True for word, field in _HVAC_DEVICE.items()},
        },
        "fan_timer_active": fanTimeout > nowS,
        "fan_timer_timeout": fanTimeout,
        "fan_timer_duration": numberOrNone(device.get("fan_timer_duration")),
        "eco_temperatures": {
            "high": numberOrNone(device.get("away_temperature_high")),
            "low": numberOrNone(device.get("away_temperature_low")),
        },
        "eco_mode": ecoMode,
        "away": away,
        "has_leaf": device.get("leaf") is True,
        "software_version": device.get("current_version")
        or state.presence.entryFields(serial).get("software_version"),
        "temperature_scale": device.get("temperature_scale", "C"),
        "schedule_mode": shared.get("schedule_mode"),
        "temperature_lock_enabled": device.get("temperature_lock") is True,
        "capabilities": capabilities,
        **capabilities,
        "time_to_target": numberOrNone(device.get("time_to_target")),
        "safety_state": device.get("safety_state"),
        "learning_mode": device.get("learning_mode"),
        "preconditioning_enabled": device.get("preconditioning_enabled"),
        "backplate_temperature": numberOrNone(device.get("backplate_temperature")),
        "structure_id": structureKey.split(".", 1)[1],
        "paired": owner is not None,
        "owner": owner,
    }
    return status
