# -*- test-case-name: tests.test_control_api -*-
"""
User commands (PROTOCOL.md §14-§16): each one checked, then turned into
bucket edits that L{DeviceState.change} writes and pushes.

Planning reads the store but changes nothing, so a refused command leaves
everything as it was. Commands always move revision and timestamp, even
when the values are equal (PROTOCOL.md §11.5), so they are always pushed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from attrs import frozen
from twisted.internet.defer import Deferred

from .. import buckets as rules
from ..buckets import Bucket
from ..errors import CommandError, UnknownDevice
from ..membership import GLOBAL_SCOPE
from ..state import DeviceState
from ..store import BucketUpdate, Decide

#: Setpoints are clamped into this range by default: 45 °F to 95 °F
#: (PROTOCOL.md §16.3).
DEFAULT_MIN_CELSIUS = 7.222
DEFAULT_MAX_CELSIUS = 35.0
#: Schedule setpoints outside this range are refused (PROTOCOL.md §15, §16.1).
SCHEDULE_MIN_CELSIUS = 4.5
SCHEDULE_MAX_CELSIUS = 32.0
SCHEDULE_MAX_ENTRIES_PER_DAY = 96
SCHEDULE_MODES = ("HEAT", "COOL", "RANGE")
#: A fan started with C{"on"} runs this long unless the device has its own
#: duration (PROTOCOL.md §16.1).
DEFAULT_FAN_SECONDS = 3600
MAX_FAN_SECONDS = 24 * 3600
#: touched_by value of a remote change (PROTOCOL.md §10.3, §15).
TOUCHED_REMOTELY = 3

_MODES = {
    "off": "off",
    "heat": "heat",
    "cool": "cool",
    "heat-cool": "range",
    "range": "range",
    "auto": "range",
    "emergency": "emergency",
}


@frozen
class Edit:
    """
    Fields to write into one bucket: merged over the stored value, or
    replacing it whole when C{replace}.
    """

    scope: str
    key: str
    fields: dict[str, Any]
    replace: bool = False


@frozen
class Plan:
    """
    What a command does: its edits, and the key and values the control API
    reports back (C{{"object_key", "values"}}).
    """

    key: str
    values: dict[str, Any]
    edits: tuple[Edit, ...]


def _isNumber(value: object) -> TypeGuard[int | float]:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _number(value: object, what: str) -> float:
    if not _isNumber(value):
        raise CommandError(f"{what} must be a number")
    assert isinstance(value, int | float)
    return float(value)


@frozen
class _Device:
    """What planning needs to know of one device."""

    serial: str
    shared: dict[str, Any]
    device: dict[str, Any]
    schedule: dict[str, Any] | None

    def flag(self, name: str, default: bool) -> bool:
        """A capability: shared's copy first, then the device's."""
        for value in (self.shared.get(name), self.device.get(name)):
            if isinstance(value, bool):
                return value
        return default

    @property
    def stored(self) -> bool:
        return bool(self.shared or self.device)


def safetyBounds(device: Mapping[str, Any]) -> tuple[float, float]:
    """
    The range setpoints are clamped to: the defaults, narrowed by the
    device's own safety temperatures when it has them enabled.

    The firmware names its limits C{lower_safety_temp}/C{upper_safety_temp}
    (PROTOCOL.md §16.3: the anchor reads C{safety_temp_min}/C{_max}, which
    no device sends, so it always uses the defaults).
    """
    low, high = DEFAULT_MIN_CELSIUS, DEFAULT_MAX_CELSIUS
    lower = device.get("lower_safety_temp")
    if device.get("lower_safety_temp_enabled") is True and _isNumber(lower):
        low = max(low, float(lower))
    upper = device.get("upper_safety_temp")
    if device.get("upper_safety_temp_enabled") is True and _isNumber(upper):
        high = min(high, float(upper))
    if low >= high:
        return DEFAULT_MIN_CELSIUS, DEFAULT_MAX_CELSIUS
    return low, high


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _touched(shared: Mapping[str, Any], nowS: int) -> dict[str, Any]:
    previous = shared.get("touched_by")
    touched = dict(previous) if isinstance(previous, dict) else {}
    touched.update({"touched_by": TOUCHED_REMOTELY, "touched_at": nowS})
    touched.setdefault("touched_user_id", "")
    return touched


def _lowHigh(value: object, what: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise CommandError(f"{what} must be a number or {{'high', 'low'}}")
    unknown = set(value) - {"high", "low"}
    if unknown or not value:
        raise CommandError(f"{what} takes only 'high' and 'low'")
    return {name: _number(value[name], f"{what} {name}") for name in value}


def setTemperature(device: _Device, value: object, nowS: int) -> Plan:
    bounds = safetyBounds(device.device)
    key = f"shared.{device.serial}"
    fields: dict[str, Any]
    if _isNumber(value):
        assert isinstance(value, int | float)
        fields = {"target_temperature": _clamp(float(value), bounds)}
    else:
        both = _lowHigh(value, "set_temperature value")
        if set(both) != {"high", "low"}:
            raise CommandError("set_temperature range needs both 'high' and 'low'")
        low, high = _clamp(both["low"], bounds), _clamp(both["high"], bounds)
        if low > high:
            raise CommandError("set_temperature low must not be above high")
        fields = {"target_temperature_low": low, "target_temperature_high": high}
    # A setpoint push wakes the display; the device acknowledges with false
    # (PROTOCOL.md §11.6). touched_by 3 marks a remote change (§15).
    fields["target_change_pending"] = True
    fields["touched_by"] = _touched(device.shared, nowS)
    return Plan(key, fields, (Edit(device.serial, key, fields),))


def setMode(device: _Device, value: object, nowS: int) -> Plan:
    if not isinstance(value, str):
        raise CommandError("set_mode value must be a string")
    requested = value.strip().lower()
    if requested == "eco":
        raise CommandError("eco is not a mode; use set_away")
    mode = _MODES.get(requested)
    if mode is None:
        raise CommandError(f"Unknown mode {value!r}; use one of {', '.join(_MODES)}")
    if device.stored:
        needs = {
            "heat": ["can_heat"],
            "cool": ["can_cool"],
            "range": ["can_heat", "can_cool"],
            "emergency": ["has_emer_heat"],
        }.get(mode, [])
        for capability in needs:
            if not device.flag(capability, default=capability != "has_emer_heat"):
                raise CommandError(f"Device cannot {requested} ({capability} is false)")
    key = f"shared.{device.serial}"
    fields = {"target_temperature_type": mode}
    return Plan(key, fields, (Edit(device.serial, key, fields),))


def setAway(
    device: _Device, value: object, nowS: int, structureKey: str, members: list[str]
) -> Plan:
    """
    Eco for the whole structure (PROTOCOL.md §14): C{manual_eco_all} with a
    timestamp in seconds. Leaving eco also writes C{away: false} and puts
    each device's C{eco} back to its schedule, as NCPR 2.7 says; the anchor
    writes only the two structure fields (§18 item 17).
    """
    if not isinstance(value, bool):
        raise CommandError("set_away value must be true or false")
    # The structure's away follows, so the apps' view (PROTOCOL.md §20.4:
    # Home/Away is C{structure.away}) agrees with the eco switch.
    fields: dict[str, Any] = {
        "manual_eco_all": value,
        "manual_eco_timestamp": nowS,
        "away": value,
    }
    edits = []
    if not value:
        eco = {
            "eco": {
                "mode": "schedule",
                "touched_by": TOUCHED_REMOTELY,
                "mode_update_timestamp": nowS,
            }
        }
        edits = [Edit(serial, f"device.{serial}", eco) for serial in members]
    return Plan(
        structureKey,
        fields,
        (Edit(GLOBAL_SCOPE, structureKey, fields), *edits),
    )


def setFan(device: _Device, value: object, nowS: int) -> Plan:
    """
    The fan timer (PROTOCOL.md §16.1): both C{fan_timer_duration} and
    C{fan_timer_timeout} are set to start it, as NCPR says the device needs.
    """
    if not device.flag("has_fan", default=False):
        raise CommandError("Device has no fan")
    key = f"device.{device.serial}"
    if value == "auto" or (_isNumber(value) and value == 0):
        fields: dict[str, Any] = {"fan_timer_timeout": 0}
    elif value == "on":
        duration = device.device.get("fan_timer_duration")
        seconds = (
            int(duration)
            if _isNumber(duration) and 0 < duration <= MAX_FAN_SECONDS
            else DEFAULT_FAN_SECONDS
        )
        fields = {"fan_timer_duration": seconds, "fan_timer_timeout": nowS + seconds}
    elif _isNumber(value):
        assert isinstance(value, int | float)
        if value != int(value) or not 0 < value <= MAX_FAN_SECONDS:
            raise CommandError(
                f"set_fan seconds must be a whole number from 1 to {MAX_FAN_SECONDS}"
            )
        seconds = int(value)
        fields = {"fan_timer_duration": seconds, "fan_timer_timeout": nowS + seconds}
    else:
        raise CommandError("set_fan value must be 'on', 'auto' or a number of seconds")
    return Plan(key, fields, (Edit(device.serial, key, fields),))


def setEcoTemperatures(device: _Device, value: object, nowS: int) -> Plan:
    both = _lowHigh(value, "set_eco_temperatures value")
    bounds = safetyBounds(device.device)
    clamped = {name: _clamp(temperature, bounds) for name, temperature in both.items()}
    if "low" in clamped and "high" in clamped and clamped["low"] > clamped["high"]:
        raise CommandError("set_eco_temperatures low must not be above high")
    fields = {f"away_temperature_{name}": clamped[name] for name in sorted(clamped)}
    key = f"device.{device.serial}"
    return Plan(key, fields, (Edit(device.serial, key, fields),))


_ENTRY_FIELDS = frozenset(
    {
        "type",
        "time",
        "entry_type",
        "temp",
        "temp-min",
        "temp-max",
        "touched_by",
        "touched_at",
        "touched_tzo",
        "touched_user_id",
    }
)


def _scheduleTemperature(entry: Mapping[str, Any], name: str, where: str) -> float:
    temperature = entry.get(name)
    if not _isNumber(temperature):
        raise CommandError(f"{where}: {name} must be a number")
    assert isinstance(temperature, int | float)
    if not SCHEDULE_MIN_CELSIUS <= temperature <= SCHEDULE_MAX_CELSIUS:
        raise CommandError(
            f"{where}: {name} must be {SCHEDULE_MIN_CELSIUS}-{SCHEDULE_MAX_CELSIUS} °C"
        )
    return float(temperature)


def _scheduleEntry(entry: object, mode: str, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise CommandError(f"{where} must be an object")
    kind = entry.get("type")
    kind = kind.upper() if isinstance(kind, str) else kind
    if kind not in SCHEDULE_MODES:
        raise CommandError(f"{where}: type must be one of {', '.join(SCHEDULE_MODES)}")
    if kind != mode:
        # The device drops entries whose type is not the schedule's mode
        # (PROTOCOL.md §10.6).
        raise CommandError(f"{where}: type {kind} differs from schedule mode {mode}")
    time = entry.get("time")
    if isinstance(time, bool) or not isinstance(time, int) or not 0 <= time <= 86399:
        raise CommandError(f"{where}: time must be whole seconds 0-86399")
    entryType = entry.get("entry_type", "setpoint")
    if entryType not in ("setpoint", "continuation"):
        raise CommandError(f"{where}: entry_type must be setpoint or continuation")
    # Unknown fields are dropped: clients post back what they read.
    cleaned = {name: v for name, v in entry.items() if name in _ENTRY_FIELDS}
    cleaned["entry_type"] = entryType
    cleaned["type"] = kind
    if kind == "RANGE":
        low = _scheduleTemperature(entry, "temp-min", where)
        high = _scheduleTemperature(entry, "temp-max", where)
        if low > high:
            raise CommandError(f"{where}: temp-min must not be above temp-max")
    else:
        _scheduleTemperature(entry, "temp", where)
    return cleaned


def _indexed(container: object, count: int | None, where: str) -> list[object]:
    """
    The items of a list, or of an object keyed by integer strings, in key
    order. C{count} bounds the keys (days: 0-6).
    """
    if isinstance(container, list):
        items = list(enumerate(container))
    elif isinstance(container, dict):
        items = []
        for name, item in container.items():
            if not (isinstance(name, str) and name.isdigit() and len(name) <= 3):
                raise CommandError(f"{where}: key {name!r} is not a whole number")
            items.append((int(name), item))
        items.sort(key=lambda pair: pair[0])
    else:
        raise CommandError(f"{where} must be a list or an object")
    if count is not None and any(index >= count for index, item in items):
        raise CommandError(f"{where}: keys must be 0-{count - 1}")
    return [item for index, item in items] if count is None else _spread(items, count)


def _spread(items: list[tuple[int, object]], count: int) -> list[object]:
    days: list[object] = [{} for _ in range(count)]
    for index, item in items:
        days[index] = item
    return days


def parseSchedule(value: object, previousName: str | None) -> dict[str, Any]:
    """
    A schedule from a client, checked (PROTOCOL.md §16.1) and put in the
    form the device uses (§10.6): days and entries keyed by integer
    strings, entries in time order, every day present; or no day at all
    when no day has an entry (a cleared schedule).

    @raise CommandError: on anything the device would not take.
    """
    if not isinstance(value, dict):
        raise CommandError("set_schedule value must be an object")
    if value.get("ver", 2) != 2 or isinstance(value.get("ver"), bool):
        raise CommandError("set_schedule ver must be 2")
    mode = value.get("schedule_mode", value.get("mode"))
    if not isinstance(mode, str) or mode.upper() not in SCHEDULE_MODES:
        raise CommandError(
            f"set_schedule schedule_mode must be one of {', '.join(SCHEDULE_MODES)}"
        )
    mode = mode.upper()
    name = value.get("name", previousName or "Default")
    if not isinstance(name, str) or len(name) > 64:
        raise CommandError("set_schedule name must be a string of at most 64")
    days: dict[str, Any] = {}
    for day, entries in enumerate(_indexed(value.get("days", {}), 7, "days")):
        where = f"day {day}"
        checked = [
            _scheduleEntry(entry, mode, f"{where} entry {number}")
            for number, entry in enumerate(_indexed(entries, None, where))
        ]
        if len(checked) > SCHEDULE_MAX_ENTRIES_PER_DAY:
            raise CommandError(
                f"{where}: at most {SCHEDULE_MAX_ENTRIES_PER_DAY} entries a day"
            )
        checked.sort(key=lambda entry: entry["time"])
        times = [entry["time"] for entry in checked]
        if len(set(times)) != len(times):
            raise CommandError(f"{where}: two entries at the same time")
        days[str(day)] = {str(n): entry for n, entry in enumerate(checked)}
    if not any(days.values()):
        # A cleared schedule stays cleared: clients (the Homebridge plugin)
        # take any day listed, even an empty one, for a schedule in use.
        days = {}
    return {"ver": 2, "name": name, "schedule_mode": mode, "days": days}


def setSchedule(device: _Device, value: object, nowS: int) -> Plan:
    """
    Replace the schedule whole (the device replaces it wholesale), and make
    shared's C{schedule_mode} match, or the device ignores the schedule
    (PROTOCOL.md §10.6).
    """
    previous = device.schedule or {}
    previousName = previous.get("name")
    schedule = parseSchedule(
        value, previousName if isinstance(previousName, str) else None
    )
    key = f"schedule.{device.serial}"
    edits = [Edit(device.serial, key, schedule, replace=True)]
    if device.shared.get("schedule_mode") != schedule["schedule_mode"]:
        edits.append(
            Edit(
                device.serial,
                f"shared.{device.serial}",
                {"schedule_mode": schedule["schedule_mode"]},
            )
        )
    return Plan(key, schedule, tuple(edits))


def setScheduleMode(device: _Device, value: object, nowS: int) -> Plan:
    if not isinstance(value, str) or value.strip().upper() not in SCHEDULE_MODES:
        raise CommandError(
            f"set_schedule_mode value must be one of {', '.join(SCHEDULE_MODES)}"
        )
    key = f"shared.{device.serial}"
    fields = {"schedule_mode": value.strip().upper()}
    return Plan(key, fields, (Edit(device.serial, key, fields),))


def _boolean(value: object) -> bool:
    return isinstance(value, bool)


def _temperature(value: object) -> bool:
    return _isNumber(value) and -50.0 <= value <= 1000.0


def _wholeNumber(low: int, high: int) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and low <= value <= high
        )

    return check


def _shortText(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64


def _oneOf(*choices: str) -> Callable[[object], bool]:
    return lambda value: value in choices


#: What C{set_device_setting} may write, and how each value must look. Only
#: cloud-writable device fields (PROTOCOL.md §10.4); device-reported ones
#: (C{time_to_target}, C{hot_water_active}, C{current_temperature}...) are
#: refused, as the device would overwrite them anyway.
DEVICE_SETTINGS: dict[str, Callable[[object], bool]] = {
    "lower_safety_temp": _temperature,
    "lower_safety_temp_enabled": _boolean,
    "upper_safety_temp": _temperature,
    "upper_safety_temp_enabled": _boolean,
    "learning_mode": _boolean,
    "preconditioning_enabled": _boolean,
    "target_humidity": _wholeNumber(10, 60),
    "target_humidity_enabled": _boolean,
    "temperature_scale": _oneOf("C", "F"),
    "sunlight_correction_enabled": _boolean,
    "auto_away_enable": _boolean,
    "away_temperature_high_enabled": _boolean,
    "away_temperature_low_enabled": _boolean,
    "fan_mode": _oneOf("auto", "on", "duty-cycle"),
    "fan_duty_cycle": _wholeNumber(0, 3600),
    "fan_duty_start_time": _wholeNumber(0, 86400),
    "fan_duty_end_time": _wholeNumber(0, 86400),
    "fan_cooling_enabled": _boolean,
    "fan_timer_duration": _wholeNumber(1, MAX_FAN_SECONDS),
    "heat_pump_aux_threshold": _temperature,
    "heat_pump_aux_threshold_enabled": _boolean,
    "heat_pump_comp_threshold": lambda v: _isNumber(v) and -1000.0 <= v <= 1000.0,
    "heat_pump_comp_threshold_enabled": _boolean,
    "equipment_type": _shortText,
    "heat_source": _shortText,
    "hot_water_boost_time_to_end": _wholeNumber(0, 2**40),
    "filter_reminder_enabled": _boolean,
    "filter_reminder_level": _wholeNumber(0, 1000),
    "filter_changed_date": _wholeNumber(0, 2**40),
    "postal_code": _shortText,
    "country_code": _shortText,
    # The firmware's lock fields (PROTOCOL.md §16.1 ⚠: the anchor's
    # whitelist names them temp_lock_*, which no device reads).
    "temperature_lock": _boolean,
    "temperature_lock_pin_hash": _shortText,
    "temperature_lock_low_temp": _temperature,
    "temperature_lock_high_temp": _temperature,
}
#: The anchor's lock names, accepted for its clients and written under the
#: firmware's names.
DEVICE_SETTING_ALIASES = {
    "temp_lock_on": "temperature_lock",
    "temp_lock_pin_hash": "temperature_lock_pin_hash",
    "temp_lock_low_temp": "temperature_lock_low_temp",
    "temp_lock_high_temp": "temperature_lock_high_temp",
}


def setDeviceSetting(device: _Device, value: object, nowS: int) -> Plan:
    if not isinstance(value, dict) or not value:
        raise CommandError("set_device_setting value must be an object of settings")
    fields: dict[str, Any] = {}
    for name, setting in value.items():
        field = DEVICE_SETTING_ALIASES.get(name) or str(name)
        check = DEVICE_SETTINGS.get(field)
        if check is None:
            raise CommandError(f"{name} is not a writable setting")
        if not check(setting):
            raise CommandError(f"{name}: value {setting!r} is not valid")
        fields[field] = setting
    key = f"device.{device.serial}"
    return Plan(key, fields, (Edit(device.serial, key, fields),))


_SIMPLE: dict[str, Callable[[_Device, object, int], Plan]] = {
    "set_temperature": setTemperature,
    "set_mode": setMode,
    "set_fan": setFan,
    "set_eco_temperatures": setEcoTemperatures,
    "set_schedule": setSchedule,
    "set_schedule_mode": setScheduleMode,
    "set_device_setting": setDeviceSetting,
}
COMMANDS = frozenset({*_SIMPLE, "set_away"})


def _value(bucket: Bucket | None) -> dict[str, Any]:
    return {} if bucket is None else bucket.value


def plan(state: DeviceState, serial: str, command: object, value: object) -> Plan:
    """
    Check C{command} for C{serial} and plan its edits; nothing is changed.

    @raise CommandError: for an unknown command or a value it cannot take.
    @raise UnknownDevice: when C{serial} has never connected.
    """
    if not isinstance(command, str) or command not in COMMANDS:
        raise CommandError(
            f"Unknown command {command!r}; use one of {', '.join(sorted(COMMANDS))}"
        )
    if not state.membership.isKnown(serial):
        raise UnknownDevice(serial)
    store = state.store
    device = _Device(
        serial,
        _value(store.get(serial, f"shared.{serial}")),
        _value(store.get(serial, f"device.{serial}")),
        _value(store.get(serial, f"schedule.{serial}")) or None,
    )
    nowS = int(state.clock.seconds())
    if command == "set_away":
        structureKey = state.membership.structureKey(serial)
        members = [
            member
            for member in state.membership.devicesSeeing(GLOBAL_SCOPE, structureKey)
            if store.get(member, f"device.{member}") is not None
        ]
        return setAway(device, value, nowS, structureKey, members)
    return _SIMPLE[command](device, value, nowS)


def execute(state: DeviceState, planned: Plan) -> Deferred[list[Bucket]]:
    """
    Write C{planned}'s edits in one transaction, all or nothing (C{set_away}
    touches structure, device and shared buckets), and so push them.

    @return: fires with every written bucket.
    """

    def decide(edit: Edit) -> Decide:
        def edited(stored: Bucket | None, nowMs: int) -> Bucket:
            before = stored or rules.empty(edit.key)
            if edit.replace:
                return rules.replace(before, edit.fields, nowMs)
            return rules.forceMerge(before, edit.fields, nowMs)

        return edited

    return state.change(
        [BucketUpdate(edit.scope, edit.key, decide(edit)) for edit in planned.edits]
    ).addCallback(lambda results: [bucket for bucket in results if bucket is not None])
