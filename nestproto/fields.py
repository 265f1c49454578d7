# -*- test-case-name: tests.test_bad_input -*-
"""
Bucket fields whose type the server's clients depend on: the one list of
the numbers a device reports and the control API, the event stream and the
MQTT bridge read back as numbers (PROTOCOL.md §10.3, §10.4, §16.6).

Clients do arithmetic and comparisons on these fields, so text or a
boolean where one belongs breaks them. A device's write giving one a
non-number is refused (L{badNumericField}), and readers show C{None} for a
non-number stored before that rule (L{numberOrNone}).

Pure: no I/O.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, TypeGuard

#: The bucket types whose fields status and the bridges read (shared first,
#: then device, PROTOCOL.md §10.3, §10.4).
NUMERIC_BUCKET_TYPES = frozenset({"shared", "device"})

#: Fields of L{NUMERIC_BUCKET_TYPES} that must be numbers (or C{null}, no
#: reading, which is what a client sees for a field never sent).
NUMERIC_FIELDS = frozenset(
    {
        # Temperatures, °C (§10.2, §10.3).
        "current_temperature",
        "target_temperature",
        "target_temperature_low",
        "target_temperature_high",
        "away_temperature_low",
        "away_temperature_high",
        "backplate_temperature",
        "lower_safety_temp",
        "upper_safety_temp",
        # Humidity, percent (§10.4).
        "current_humidity",
        "target_humidity",
        # Battery voltage (§10.4).
        "battery_level",
        # Seconds (§10.4, §16.1).
        "fan_timer_timeout",
        "fan_timer_duration",
        "time_to_target",
    }
)


def isNumber(value: object) -> TypeGuard[int | float]:
    """
    Whether C{value} is a finite JSON number a float can hold; a boolean is
    not one, nor an integer too large for a float (JSON integers have no
    bound, and clients read these fields as floats).
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= _FLOAT_MAX
    return isinstance(value, float) and math.isfinite(value)


_FLOAT_MAX = int(sys.float_info.max)


def numberOrNone(value: object) -> int | float | None:
    """C{value} when it is a number, else C{None}."""
    return value if isNumber(value) else None


def badNumericField(key: str, value: Mapping[str, Any]) -> str | None:
    """
    The first field of bucket C{key}'s C{value} that must be a number and
    is not one, or C{None} when there is none.
    """
    if key.split(".", 1)[0] not in NUMERIC_BUCKET_TYPES:
        return None
    for name in sorted(NUMERIC_FIELDS.intersection(value)):
        field = value[name]
        if field is not None and not isNumber(field):
            return name
    return None
