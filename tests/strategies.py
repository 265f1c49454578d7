"""
Hypothesis strategies for nestproto's values and wire shapes.

Every strategy is bounded and none is recursive: bucket values nest at most
two levels, as real buckets do (PROTOCOL.md §10), and bodies name a handful
of buckets.
"""

from __future__ import annotations

import json
from base64 import b64encode
from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy, composite

from nestproto.buckets import (
    GLOBAL_TYPES,
    INT32_MAX,
    INT32_MIN,
    KNOWN_TYPES,
    SERIAL_KEYED_TYPES,
    TIMESTAMP_MAX,
    Bucket,
)
from nestproto.fields import NUMERIC_FIELDS

#: Every bucket type of PROTOCOL.md §10.1, in a stable order.
BUCKET_TYPES = sorted(KNOWN_TYPES)
#: Types whose id is neither a serial nor a user or structure id.
OTHER_TYPES = sorted(KNOWN_TYPES - SERIAL_KEYED_TYPES - GLOBAL_TYPES)
#: 2026-01-01T00:00:00Z in ms: timestamps around it look like real ones.
START_MS = 1767225600000
#: Field names a thermostat really uses (PROTOCOL.md §10.3, §10.4), so that
#: generated buckets overlap and merges collide.
FIELD_NAMES = (
    "target_temperature",
    "target_temperature_low",
    "target_temperature_high",
    "target_temperature_type",
    "target_change_pending",
    "current_temperature",
    "current_humidity",
    "hvac_heater_state",
    "can_heat",
    "can_cool",
    "has_fan",
    "fan_timer_timeout",
    "away_temperature_low",
    "eco",
    "touched_by",
    "name",
    "devices",
    "manual_eco_all",
    "schedule_mode",
    "days",
)
#: Characters an object key's id may hold (the key pattern of buckets.py).
_ID_ALPHABET = "ABCDEFabcdef0123456789_-:.@"
_HEX = "0123456789ABCDEF"


# Identities


@composite
def serials(draw: DrawFn) -> str:
    """A canonical serial: 16 uppercase alphanumerics, as the firmware's."""
    return "02AA01AC" + draw(st.text(_HEX, min_size=8, max_size=8))


@composite
def serialSpellings(draw: DrawFn, serial: str) -> str:
    """
    C{serial} as a device or tool may spell it: lowercase, with separators
    (PROTOCOL.md §2.2: normalised to uppercase alphanumerics).
    """
    spelling = draw(st.sampled_from(["upper", "lower", "hyphens"]))
    if spelling == "lower":
        return serial.lower()
    if spelling == "hyphens":
        return "-".join(serial[i : i + 4] for i in range(0, len(serial), 4))
    return serial


@composite
def userIds(draw: DrawFn) -> str:
    """A user id, sometimes with the C{user_} prefix (PROTOCOL.md §10.5)."""
    name = draw(
        st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
    )
    return draw(st.sampled_from([name, "user_" + name]))


# Buckets


def revisions() -> SearchStrategy[int]:
    """An int32 revision, biased to small values and the wrap-around edge."""
    return st.one_of(
        st.integers(0, 50),
        st.integers(INT32_MIN, INT32_MAX),
        st.sampled_from([INT32_MAX - 1, INT32_MAX, INT32_MIN, -1]),
    )


def timestamps() -> SearchStrategy[int]:
    """A timestamp in ms: 0 (no data), around now, or anywhere valid."""
    return st.one_of(
        st.just(0),
        st.integers(START_MS - 10_000, START_MS + 10_000),
        st.integers(0, TIMESTAMP_MAX),
    )


@composite
def bucketKeys(draw: DrawFn, serial: str | None = None) -> str:
    """
    A key of any type of PROTOCOL.md §10.1: serial-keyed types name
    C{serial} (a fresh serial when not given), structures and users a user
    id, the other types a short id.
    """
    bucketType = draw(st.sampled_from(BUCKET_TYPES))
    if bucketType in SERIAL_KEYED_TYPES:
        bucketId = serial if serial is not None else draw(serials())
    elif bucketType in GLOBAL_TYPES:
        bucketId = draw(userIds())
    else:
        bucketId = draw(st.text(_ID_ALPHABET, min_size=1, max_size=12))
    return f"{bucketType}.{bucketId}"


def _scalars() -> SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**53), 2**53),
        st.floats(-1000, 1000, allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    )


def _fieldNames() -> SearchStrategy[str]:
    return st.one_of(st.sampled_from(FIELD_NAMES), st.text(min_size=1, max_size=10))


def fieldValues() -> SearchStrategy[Any]:
    """One field's value: a scalar, a short list, or a flat object."""
    return st.one_of(
        _scalars(),
        st.lists(_scalars(), max_size=3),
        st.dictionaries(st.text(max_size=8), _scalars(), max_size=3),
    )


def bucketValues(
    minSize: int = 0, maxSize: int = 6, exclude: frozenset[str] = frozenset()
) -> SearchStrategy[dict[str, Any]]:
    """A bucket value: a JSON object of a few fields, nested at most twice."""
    return st.dictionaries(
        _fieldNames().filter(lambda name: name not in exclude),
        fieldValues(),
        min_size=minSize,
        max_size=maxSize,
    )


def _numbersKept(value: dict[str, Any]) -> dict[str, Any]:
    """C{value} with a number wherever clients read one (nestproto.fields)."""
    return {
        name: 20.5
        if name in NUMERIC_FIELDS
        and field is not None
        and (isinstance(field, bool) or not isinstance(field, int | float))
        else field
        for name, field in value.items()
    }


def deviceValues(
    minSize: int = 0, maxSize: int = 6, exclude: frozenset[str] = frozenset()
) -> SearchStrategy[dict[str, Any]]:
    """
    A bucket value a device may send: as L{bucketValues}, with a number or
    C{null} in every field clients read as a number.
    """
    return bucketValues(minSize, maxSize, exclude).map(_numbersKept)


@composite
def buckets(draw: DrawFn, key: str | None = None) -> Bucket:
    """A stored bucket with any revision, timestamp and value."""
    return Bucket(
        draw(bucketKeys()) if key is None else key,
        draw(revisions()),
        draw(timestamps()),
        draw(bucketValues()),
    )


# Device request bodies

#: The two body forms of PROTOCOL.md §6.1 and §7.1.
FORMS = ("objects", "named")
#: A subscribe's named form may name entries by type too (§6.1).
SUBSCRIBE_FORMS = ("objects", "named", "typed")


def subscribeDocument(
    entries: Sequence[Mapping[str, Any]],
    form: str = "objects",
    chunked: bool = True,
    session: str = "s",
) -> dict[str, Any]:
    """
    A subscribe body naming C{entries} (each with C{object_key} and
    optionally revision, timestamp and value): as an C{objects} list, or
    named, each entry under its own key or (C{typed}) its type
    (PROTOCOL.md §6.1).
    """
    document: dict[str, Any] = {"chunked": chunked, "session": session}
    if form == "objects":
        document["objects"] = [dict(entry) for entry in entries]
        return document
    types = [entry["object_key"].split(".")[0] for entry in entries]
    for entry, bucketType in zip(entries, types, strict=True):
        # "typed" names each entry by its type, as the firmware does
        # ("device": {...}), where a type comes once.
        typed = form == "typed" and types.count(bucketType) == 1
        document[bucketType if typed else entry["object_key"]] = dict(entry)
    return document


def putDocument(
    entries: Sequence[Mapping[str, Any]], form: str = "objects", session: str = "s"
) -> dict[str, Any]:
    """
    A put body: C{entries} carry C{object_key}, C{fields} and optionally
    C{if_object_revision} and C{base_object_revision}. The C{objects} form
    nests the fields under C{value}; the named form puts them inline under
    the bucket key (PROTOCOL.md §7.1).
    """
    document: dict[str, Any] = {"session": session}
    rendered = []
    for entry in entries:
        one: dict[str, Any] = {"object_key": entry["object_key"]}
        for name in ("if_object_revision", "base_object_revision"):
            if entry.get(name) is not None:
                one[name] = entry[name]
        if form == "objects":
            one["value"] = dict(entry["fields"])
        else:
            one.update(entry["fields"])
        rendered.append(one)
    if form == "objects":
        document["objects"] = rendered
    else:
        for one in rendered:
            document[one["object_key"]] = one
    return document


#: Keys of a put entry that are not bucket fields (PROTOCOL.md §7.1).
PUT_META_KEYS = frozenset({"object_key", "base_object_revision", "if_object_revision"})


@composite
def subscribeEntries(draw: DrawFn, serial: str) -> dict[str, Any]:
    """One subscribe entry for a key of any type, with or without a value."""
    key = draw(st.one_of(bucketKeys(serial), bucketKeys()))
    entry: dict[str, Any] = {"object_key": key}
    if draw(st.booleans()):
        entry["object_revision"] = draw(revisions())
        entry["object_timestamp"] = draw(timestamps())
    if draw(st.booleans()):
        entry["value"] = draw(bucketValues())
    return entry


@composite
def subscribeBodies(draw: DrawFn, serial: str) -> dict[str, Any]:
    """A valid subscribe body in either form."""
    entries = draw(st.lists(subscribeEntries(serial), max_size=5))
    form = draw(st.sampled_from(SUBSCRIBE_FORMS))
    if form != "objects":
        # The named form can name a bucket once only.
        entries = list({entry["object_key"]: entry for entry in entries}.values())
    return subscribeDocument(
        entries,
        form,
        chunked=draw(st.booleans()),
        session=draw(st.text(max_size=30)),
    )


@composite
def putEntries(draw: DrawFn, serial: str) -> dict[str, Any]:
    """One put entry for a key of any type, conditional or not."""
    return {
        "object_key": draw(st.one_of(bucketKeys(serial), bucketKeys())),
        "fields": draw(bucketValues(exclude=PUT_META_KEYS)),
        "if_object_revision": draw(st.none() | revisions()),
        "base_object_revision": draw(st.none() | revisions()),
    }


@composite
def putBodies(draw: DrawFn, serial: str) -> dict[str, Any]:
    """A valid put body in either form."""
    entries = draw(st.lists(putEntries(serial), max_size=5))
    form = draw(st.sampled_from(FORMS))
    if form == "named":
        entries = list({entry["object_key"]: entry for entry in entries}.values())
    return putDocument(entries, form, session=draw(st.text(max_size=30)))


# Control commands

#: The commands of PROTOCOL.md §16.1.
COMMANDS = (
    "set_temperature",
    "set_mode",
    "set_away",
    "set_fan",
    "set_eco_temperatures",
    "set_schedule",
    "set_schedule_mode",
    "set_device_setting",
)


@composite
def schedules(draw: DrawFn) -> dict[str, Any]:
    """A schedule value of PROTOCOL.md §10.6: valid or nearly so."""
    mode = draw(st.sampled_from(["HEAT", "COOL", "RANGE", "AUTO"]))
    days: dict[str, Any] = {}
    for day in draw(st.lists(st.sampled_from("0123456789"), max_size=3, unique=True)):
        entries = {}
        for index in range(draw(st.integers(0, 3))):
            entries[str(index)] = {
                "type": mode,
                "time": draw(st.integers(-1, 86400)),
                "entry_type": "setpoint",
                "temp": draw(st.floats(0, 45, allow_nan=False)),
            }
        days[day] = entries
    return {
        "ver": draw(st.sampled_from([2, 2, 1])),
        "name": "Default",
        "schedule_mode": mode,
        "days": days,
    }


@composite
def commandValues(draw: DrawFn, command: str, garbage: bool = True) -> Any:
    """A value for C{command} of the right shape, or (C{garbage}) any scalar."""
    temperature = st.floats(-10, 60, allow_nan=False, allow_infinity=False)
    byCommand: dict[str, SearchStrategy[Any]] = {
        "set_temperature": temperature
        | st.fixed_dictionaries({"high": temperature, "low": temperature}),
        "set_mode": st.sampled_from(
            ["off", "heat", "cool", "heat-cool", "range", "auto", "emergency", "eco"]
        ),
        "set_away": st.booleans(),
        "set_fan": st.sampled_from(["on", "auto", "sideways"]) | st.integers(-60, 7200),
        "set_eco_temperatures": st.fixed_dictionaries(
            {"high": temperature, "low": temperature}
        ),
        "set_schedule": schedules(),
        "set_schedule_mode": st.sampled_from(["HEAT", "COOL", "RANGE", "heat", "X"]),
        "set_device_setting": st.dictionaries(
            st.sampled_from(
                ["temperature_scale", "learning_mode", "current_temperature", "x"]
            ),
            _scalars(),
            max_size=2,
        ),
    }
    if garbage:
        return draw(st.one_of(byCommand[command], _scalars()))
    return draw(byCommand[command])


@composite
def controlCommands(draw: DrawFn, serial: str, garbage: bool = True) -> dict[str, Any]:
    """
    A C{POST /command} body (PROTOCOL.md §16.1): each command with values
    of its shape, some out of range, and (C{garbage}) values of any type.
    """
    command = draw(st.sampled_from(COMMANDS))
    value = draw(commandValues(command, garbage))
    return {"serial": serial, "command": command, "value": value}


@composite
def commandChanges(draw: DrawFn) -> tuple[str, dict[str, Any], bool]:
    """
    What a control command does to a device's buckets (PROTOCOL.md §16.1):
    C{(bucket type, fields, replaces)}. Setpoints go to C{shared} with
    C{target_change_pending}, settings to C{device}, away to the structure,
    schedules replace C{schedule} whole.
    """
    kind = draw(st.sampled_from(["setpoint", "setting", "away", "schedule", "same"]))
    if kind == "setpoint":
        fields = {
            "target_temperature": draw(st.floats(7.222, 35, allow_nan=False)),
            "target_change_pending": True,
        }
        return "shared", fields, False
    if kind == "setting":
        return "device", {"fan_timer_timeout": draw(st.integers(0, 2**31))}, False
    if kind == "away":
        return (
            "structure",
            {"manual_eco_all": draw(st.booleans()), "manual_eco_timestamp": 1767225600},
            False,
        )
    if kind == "schedule":
        return "schedule", draw(schedules()), True
    # A command that sets what is already there still moves rev/ts (§11.5).
    return "shared", {}, False


# Garbage and near misses


def garbageBodies() -> SearchStrategy[bytes]:
    """Bodies no endpoint accepts: binary, broken JSON, JSON that is not an object."""
    return st.one_of(
        st.binary(max_size=64),
        st.text(max_size=64).map(lambda text: text.encode("utf-8")),
        st.sampled_from(
            [
                b"",
                b"{",
                b"[]",
                b"null",
                b"42",
                b'"objects"',
                b'{"objects": NaN}',
                b'{"objects": [Infinity]}',
                b"\xff\xfe{}",
                b"[" * 5000 + b"]" * 5000,
                b'{"a":' * 3000 + b"1" + b"}" * 3000,
                b'{"objects": [' + b'{"object_key":"device.X"},' * 300 + b"{}]}",
            ]
        ),
        st.lists(_scalars(), max_size=3).map(lambda doc: json.dumps(doc).encode()),
    )


#: Ways to spoil one subscribe or put entry, each a near miss of a valid one.
_ENTRY_SPOILERS: dict[str, Any] = {
    "object_key": st.sampled_from(
        ["", "device", "nosuchtype.X", ".X", "device.", "device.a b", 7, None]
    ),
    "object_revision": st.sampled_from(["1", 1.5, True, 2**31, -(2**31) - 1, [1]]),
    "object_timestamp": st.sampled_from(["0", -1, 1.0, False, TIMESTAMP_MAX + 1]),
    "if_object_revision": st.sampled_from(["3", 2**40, 0.5, {}]),
    "base_object_revision": st.sampled_from(["x", 2**33]),
    "value": st.sampled_from(
        [[], "v", 1, True, {"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}]
    ),
}


@composite
def nearlyValidBodies(draw: DrawFn, serial: str) -> bytes:
    """
    A valid subscribe or put body with one thing wrong: a bad key, a
    revision of the wrong type or range, a value that is not an object,
    C{objects} or C{chunked} or C{session} of the wrong type.
    """
    document = draw(st.one_of(subscribeBodies(serial), putBodies(serial)))
    spoil = draw(st.sampled_from(["entry", "objects", "chunked", "session"]))
    entries = document.get("objects")
    if spoil == "entry" and entries:
        entry = draw(st.sampled_from(entries))
        name = draw(st.sampled_from(sorted(_ENTRY_SPOILERS)))
        entry[name] = draw(_ENTRY_SPOILERS[name])
    elif spoil == "objects":
        document["objects"] = draw(
            st.sampled_from([{}, "x", 1, [1], [None], [[]], None])
        )
    elif spoil == "chunked":
        document["chunked"] = draw(st.sampled_from(["true", 1, None, []]))
    else:
        document["session"] = draw(st.sampled_from([1, None, [], {}]))
    return json.dumps(document).encode("utf-8")


def _basic(username: str, password: str = "token") -> str:
    encoded = b64encode(f"{username}:{password}".encode()).decode()
    return f"Basic {encoded}"


@composite
def deviceHeaders(draw: DrawFn, serial: str) -> dict[str, str]:
    """
    Headers identifying C{serial} in each way of PROTOCOL.md §2.2, or
    identifying nobody, or garbled.
    """
    spelled = draw(serialSpellings(serial))
    way = draw(
        st.sampled_from(
            [
                "basic",
                "nest",
                "d",
                "client-id",
                "device-id",
                "tool",
                "none",
                "short",
                "garbled",
            ]
        )
    )
    headers: dict[str, str] = {}
    if way == "basic":
        headers["Authorization"] = _basic(spelled)
    elif way == "nest":
        headers["Authorization"] = _basic("nest." + spelled)
    elif way == "d":
        headers["Authorization"] = _basic(f"d.{spelled}.AB12")
    elif way == "client-id":
        headers["X-nl-client-id"] = f"d.{spelled}.BC7C9039"
    elif way == "device-id":
        headers["X-nl-device-id"] = spelled
    elif way == "tool":
        headers["X-NL-Device-Serial"] = spelled
    elif way == "short":
        headers["Authorization"] = _basic("nest.12345")
    elif way == "garbled":
        headers["Authorization"] = draw(
            st.sampled_from(["Basic !!!", "Basic " + "/w==", "Bearer x", "Basic", ""])
        )
    if draw(st.booleans()):
        headers["X-nl-weave-device-id"] = draw(st.text(max_size=200))
    if draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/x-www-form-urlencoded",
                    "text/plain; charset=utf-8",
                    "application/json; charset=utf-8",
                    "multipart/form-data",
                ]
            )
        )
    return {name: _latin1(value) for name, value in headers.items()}


def _latin1(text: str) -> str:
    # A header value is latin-1 without control characters (RFC 9110
    # field-value); anything else is refused by Twisted's HTTP parser
    # before nestproto sees the request.
    printable = text.encode("latin-1", "replace").decode("latin-1")
    return "".join(c for c in printable if c >= " " and c != "\x7f")


#: The device endpoints of PROTOCOL.md §3, with C{{serial}} for the caller.
DEVICE_PATHS = (
    "/nest/entry",
    "/entry",
    "/nest/ping",
    "/ping",
    "/nest/passphrase",
    "/passphrase",
    "/nest/passphrase/status",
    "/nest/transport",
    "/transport",
    "/nest/transport/v7/subscribe",
    "/nest/transport/v7",
    "/czfe/v7/subscribe",
    "/nest/transport/put",
    "/nest/transport/v7/put",
    "/transport/put",
    "/czfe/v7/put",
    "/nest/transport/device/{serial}",
    "/nest/transport/v7/device/device.{serial}",
    "/transport/device/{serial}",
    "/nest/weather/v1?query=94043,US",
    "/nest/weather/v1",
    "/weather/v1?zip=94043",
    "/nest/upload",
    "/upload",
    "/nest/pro_info/123ABCD",
    "/pro_info/123ABCD",
    "/nest/pro_info?entry_code=1",
    "/info",
)

#: The control endpoints of PROTOCOL.md §16.
CONTROL_PATHS = (
    "/health",
    "/command",
    "/status?serial={serial}",
    "/status",
    "/api/devices",
    "/api/schedule?serial={serial}",
    "/api/register",
    "/notify-device",
    "/api/stats",
    "/api/config",
    "/api/dismiss-pairing/{serial}",
    "/api/device",
    "/api/registered-devices/{serial}",
    "/api/ensure-user",
    "/api/history?serial={serial}",
    "/api/history?serial={serial}&step=hourly&from=0&format=csv",
    "/api/usage?serial={serial}&days=3",
    "/metrics",
)

_PATH_JUNK = st.sampled_from(
    [
        "",
        "/",
        "//",
        "/..",
        "/%00",
        "/%ff%fe",
        "/nest",
        "/nest/",
        "/nest/transport/",
        "/nest/transport//put",
        "/nest/transport/a/b/c/d/put",
        "/nest/transport/v7/device/",
        "/nest/transport/device/short",
        "/nest/transport/device/" + "9" * 200,
        "?serial=02AA01AC0000000001",
        "/x" * 100,
    ]
)


@composite
def paths(draw: DrawFn, templates: Sequence[str], serial: str) -> str:
    """A path from C{templates} naming C{serial}, another serial, or junk."""
    kind = draw(st.sampled_from(["valid", "valid", "other", "suffix", "junk"]))
    template = draw(st.sampled_from(templates))
    if kind == "valid":
        return template.format(serial=serial)
    if kind == "other":
        return template.format(serial=draw(serialSpellings(draw(serials()))))
    if kind == "suffix":
        return template.format(serial=serial) + draw(_PATH_JUNK)
    return draw(_PATH_JUNK)


#: What a simulated thermostat reports in its shared bucket: at most one
#: HVAC field of each usage category (nestproto.history.USAGE), so a
#: category's time on is its field's.
REPORTED_HVAC_FIELDS = (
    "hvac_heater_state",
    "hvac_ac_state",
    "hvac_fan_state",
    "hvac_aux_heater_state",
)


@composite
def thermostatReports(draw: DrawFn) -> list[tuple[int, dict[str, Any]]]:
    """
    A thermostat's reports over up to a few days: each the ms since the
    one before (often within the minute, sometimes hours) and the shared
    fields it puts (HVAC states, current temperature).
    """
    reports = []
    for _ in range(draw(st.integers(1, 30))):
        delayMs = draw(st.one_of(st.integers(0, 90_000), st.integers(0, 5 * 3_600_000)))
        fields: dict[str, Any] = {
            name: draw(st.booleans())
            for name in draw(st.sets(st.sampled_from(REPORTED_HVAC_FIELDS), max_size=3))
        }
        if draw(st.booleans()):
            fields["current_temperature"] = draw(
                st.integers(1500, 2800).map(lambda hundredths: hundredths / 100)
            )
        reports.append((delayMs, fields))
    return reports
