# -*- test-case-name: tests.test_appputs -*-
"""
An app's put as user commands (PROTOCOL.md §20.4, §20.6).

An app writes buckets (C{{"shared": {"S": {"target_temperature": 21}}}});
each field is turned into the L{commands} plan that C{/command} would make
of it, so the same rules apply (mode values, capability checks, safety
clamps, C{target_change_pending}), and C{structure.away} is C{set_away}.
What the token may touch is decided here too: its user, that user's
structures, their devices and those devices' buckets (§20.6).

Planning reads the store and changes nothing: a refused put leaves
everything as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..buckets import GLOBAL_TYPES, SERIAL_KEYED_TYPES, splitKey
from ..errors import CommandError, NotYours
from ..membership import GLOBAL_SCOPE, IMembership
from ..model import PutEntry
from ..state import DeviceState
from . import commands
from .commands import Edit, Plan

#: Fields an app may send with what it writes and which are ours to set:
#: C{target_change_pending} is set by every setpoint change (§11.6),
#: C{touched_by} by every remote one (§15).
_IGNORED = frozenset({"target_change_pending", "touched_by"})
#: The structure fields of an app's Home/Away (PROTOCOL.md §20.4, [PN]).
_AWAY_FIELDS = frozenset({"away", "away_timestamp", "away_setter"})


def userSerials(state: DeviceState, userId: str) -> list[str]:
    """The devices C{userId} owns, sorted."""
    membership = state.membership
    return [s for s in membership.knownSerials() if membership.ownerOf(s) == userId]


def appScope(state: DeviceState, userId: str, key: str) -> tuple[str, str | None]:
    """
    Where C{key} lives for an app of C{userId}, and the device it belongs to
    (C{None} for the user and structure buckets).

    @raise NotYours: when C{key} is outside the user's account.
    """
    serials = userSerials(state, userId)
    try:
        bucketType, bucketId = splitKey(key)
    except ValueError:
        raise NotYours(f"{key} is not in this account") from None
    if bucketType in GLOBAL_TYPES:
        structures = {state.membership.structureKey(s): s for s in serials}
        if key == f"user.{userId}":
            return GLOBAL_SCOPE, None
        if key in structures:
            return GLOBAL_SCOPE, structures[key]
    elif bucketType in SERIAL_KEYED_TYPES:
        if bucketId in serials:
            return bucketId, bucketId
    else:
        holders = [s for s in serials if state.store.get(s, key) is not None]
        if len(holders) == 1:
            return holders[0], holders[0]
    raise NotYours(f"{key} is not in this account")


def _shared(device: commands._Device, fields: dict[str, Any], nowS: int) -> list[Plan]:
    plans = []
    if "target_temperature_type" in fields:
        plans.append(commands.setMode(device, fields["target_temperature_type"], nowS))
    if "target_temperature" in fields:
        plans.append(
            commands.setTemperature(device, fields["target_temperature"], nowS)
        )
    if "target_temperature_low" in fields or "target_temperature_high" in fields:
        both = {
            name: fields.get(
                f"target_temperature_{name}",
                device.shared.get(f"target_temperature_{name}"),
            )
            for name in ("low", "high")
        }
        plans.append(commands.setTemperature(device, both, nowS))
    if "schedule_mode" in fields:
        plans.append(commands.setScheduleMode(device, fields["schedule_mode"], nowS))
    known = {
        "target_temperature_type",
        "target_temperature",
        "target_temperature_low",
        "target_temperature_high",
        "schedule_mode",
    }
    _refuseOthers(f"shared.{device.serial}", fields, known)
    return plans


def _device(device: commands._Device, fields: dict[str, Any], nowS: int) -> list[Plan]:
    plans = []
    eco = {
        name: fields[f"away_temperature_{name}"]
        for name in ("low", "high")
        if f"away_temperature_{name}" in fields
    }
    if eco:
        plans.append(commands.setEcoTemperatures(device, eco, nowS))
    if "fan_timer_timeout" in fields:
        # An absolute time in seconds, as the device keeps it; 0 stops the fan.
        timeout = fields["fan_timer_timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int):
            raise CommandError("fan_timer_timeout must be whole seconds")
        if timeout != 0 and timeout <= nowS:
            raise CommandError("fan_timer_timeout must be 0 or in the future")
        plans.append(
            commands.setFan(device, "auto" if timeout == 0 else timeout - nowS, nowS)
        )
    settings = {
        name: value
        for name, value in fields.items()
        if name not in {"away_temperature_low", "away_temperature_high"}
        and name != "fan_timer_timeout"
    }
    if settings:
        plans.append(commands.setDeviceSetting(device, settings, nowS))
    return plans


def _refuseOthers(key: str, fields: dict[str, Any], known: set[str]) -> None:
    others = sorted(set(fields) - known)
    if others:
        raise CommandError(f"{', '.join(others)} of {key} not writable by an app")


def _structure(
    state: DeviceState,
    key: str,
    device: commands._Device,
    fields: dict[str, Any],
    nowS: int,
) -> list[Plan]:
    _refuseOthers(key, fields, set(_AWAY_FIELDS))
    if "away" not in fields:
        raise CommandError(f"a put of {key} must set away")
    for name in ("away_timestamp", "away_setter"):
        value = fields.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CommandError(f"{name} of {key} must be a whole number")
    members = [
        member
        for member in state.membership.devicesSeeing(GLOBAL_SCOPE, key)
        if state.store.get(member, f"device.{member}") is not None
    ]
    planned = commands.setAway(device, fields["away"], nowS, key, members)
    # Both views of away in step (PROTOCOL.md §20.4): the app's own fields
    # beside the eco switch set_away writes.
    extra = {name: fields[name] for name in sorted(_AWAY_FIELDS) if name in fields}
    extra.setdefault("away_setter", 0)
    extra.setdefault("away_timestamp", nowS)
    return [planned, Plan(key, extra, (Edit(GLOBAL_SCOPE, key, extra),))]


def _deviceOf(state: DeviceState, serial: str) -> commands._Device:
    store = state.store

    def value(key: str) -> dict[str, Any]:
        bucket = store.get(serial, key)
        return {} if bucket is None else dict(bucket.value)

    return commands._Device(
        serial,
        value(f"shared.{serial}"),
        value(f"device.{serial}"),
        value(f"schedule.{serial}") or None,
    )


def planAppPut(state: DeviceState, userId: str, entries: Sequence[PutEntry]) -> Plan:
    """
    Check an app's put for C{userId} and plan it as user commands, all in
    one transaction; nothing is changed.

    @raise NotYours: when any bucket is outside the user's account.
    @raise CommandError: when a field is not one an app may write, or its
        value is one the command would refuse.
    """
    located = [(entry, appScope(state, userId, entry.key)) for entry in entries]
    nowS = int(state.clock.seconds())
    plans: list[Plan] = []
    for entry, (_scope, serial) in located:
        fields = {n: v for n, v in entry.fields.items() if n not in _IGNORED}
        if not fields:
            continue
        bucketType = entry.key.split(".", 1)[0]
        if bucketType == "structure":
            device = _deviceOf(state, serial or "")
            plans.extend(_structure(state, entry.key, device, fields, nowS))
        elif serial is not None and bucketType == "shared":
            plans.extend(_shared(_deviceOf(state, serial), fields, nowS))
        elif serial is not None and bucketType == "device":
            plans.extend(_device(_deviceOf(state, serial), fields, nowS))
        elif serial is not None and bucketType == "schedule":
            plans.append(commands.setSchedule(_deviceOf(state, serial), fields, nowS))
        else:
            raise CommandError(f"{entry.key} is not writable by an app")
    return _joined(plans)


def _joined(plans: Sequence[Plan]) -> Plan:
    """
    One plan of many: edits of one bucket merged in order, so each bucket
    is written once and moves once.
    """
    edits: dict[tuple[str, str], Edit] = {}
    for planned in plans:
        for edit in planned.edits:
            earlier = edits.get((edit.scope, edit.key))
            if earlier is not None and not edit.replace:
                edit = Edit(
                    edit.scope,
                    edit.key,
                    {**earlier.fields, **edit.fields},
                    earlier.replace,
                )
            edits[(edit.scope, edit.key)] = edit
    first = plans[0] if plans else Plan("", {}, ())
    return Plan(first.key, first.values, tuple(edits.values()))


#: How an app's held subscribes are named in the hub, beside device serials.
APP_SUBSCRIBER = "app:"


def appSubscriber(userId: str) -> str:
    """The hub's name for the held subscribes of C{userId}'s apps."""
    return APP_SUBSCRIBER + userId


def appsSeeing(membership: IMembership, scope: str, key: str) -> set[str]:
    """
    The users whose apps see a change of C{key} in C{scope}: a user sees its
    own user bucket, the structures of its devices and its devices' buckets
    (§20.6). Found from the bucket's owners, not by asking each user.
    """
    if scope != GLOBAL_SCOPE:
        owner = membership.ownerOf(scope)
        return set() if owner is None else {owner}
    users = {
        owner
        for serial in membership.devicesSeeing(GLOBAL_SCOPE, key)
        if (owner := membership.ownerOf(serial)) is not None
    }
    bucketType, _, bucketId = key.partition(".")
    if bucketType == "user" and bucketId:
        users.add(bucketId)
    return users
