# -*- test-case-name: tests.test_buckets -*-
"""
The bucket model and its versioning rules (PROTOCOL.md §10, §11).

Pure: no I/O and no clock. Whoever calls these passes the time in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from attrs import evolve, field, frozen

# The 28 bucket types the firmware knows (PROTOCOL.md §10.1).
KNOWN_TYPES = frozenset(
    {
        "device",
        "shared",
        "schedule",
        "structure",
        "user",
        "link",
        "device_alert_dialog",
        "where",
        "message",
        "custom_schedule",
        "topaz",
        "kryptonite",
        "hvac_partner",
        "occupancy",
        "servicegroup",
        "demand_response",
        "demand_response_event",
        "utility",
        "diamond_sensor_config",
        "diamond_sensor_event",
        "rate_plan",
        "tou",
        "demand_charge",
        "demand_charge_event",
        "rcs_settings",
        "cloud_algo",
        "diagnostics",
        "tuneups",
    }
)

# Types whose id is the serial of the device that owns them: a device may
# name only its own (isolation, DESIGN.md "Principles").
SERIAL_KEYED_TYPES = frozenset(
    {"device", "shared", "schedule", "device_alert_dialog", "occupancy"}
)

# Types that live outside any one device: visible to every device linked to
# them (its owner's user bucket, its structure).
GLOBAL_TYPES = frozenset({"structure", "user"})

_KEY_PATTERN = re.compile(r"^([a-z][a-z0-9_]{0,39})\.([A-Za-z0-9_\-:.@]{1,80})$")

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# Timestamps are ms since the epoch; anything past year 10000 is garbage.
TIMESTAMP_MAX = 253402300799999


def splitKey(key: str) -> tuple[str, str]:
    """
    Split an object key at its first dot.

    @return: C{(type, id)}.
    @raise ValueError: if C{key} is not C{type.id} with a known type.
    """
    match = _KEY_PATTERN.match(key)
    if match is None or match.group(1) not in KNOWN_TYPES:
        raise ValueError(f"not a bucket key: {key!r}")
    return match.group(1), match.group(2)


def isBucketKey(key: object) -> bool:
    """
    @return: whether C{key} is a well-formed key of a known bucket type.
    """
    if not isinstance(key, str):
        return False
    try:
        splitKey(key)
    except ValueError:
        return False
    return True


def _frozenValue(value: Mapping[str, Any]) -> dict[str, Any]:
    return dict(value)


@frozen
class Bucket:
    """
    One object of the device protocol.

    @ivar key: C{type.id}, e.g. C{shared.02AA01AC0000000001}.
    @ivar revision: int32, moved by the server on each real change.
    @ivar timestamp: ms since the epoch of the last change; 0 means no data.
    @ivar value: the bucket's fields. Treat as immutable: change a bucket
        with the functions of this module, never in place.
    """

    key: str
    revision: int = 0
    timestamp: int = 0
    value: dict[str, Any] = field(factory=dict, converter=_frozenValue)

    @property
    def type(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def id(self) -> str:
        return self.key.split(".", 1)[1]


def empty(key: str) -> Bucket:
    """
    The placeholder for a bucket the server has no copy of (PROTOCOL.md §6.2
    step 3): revision 0, timestamp 0, empty value.
    """
    return Bucket(key)


def serverIsNewer(clientTimestamp: int, serverTimestamp: int) -> bool:
    """
    Whether the server's copy must be sent to a device that holds
    C{clientTimestamp} (PROTOCOL.md §11.2).

    The timestamp alone decides: a device with no data (0) always gets the
    server's copy, even the empty placeholder; equal timestamps are in sync
    whatever the revisions say (§18 item 1: the revision tiebreak of older
    sources would resend buckets the device already has).
    """
    if clientTimestamp == 0:
        return True
    return serverTimestamp > clientTimestamp


def nextRevision(revision: int) -> int:
    """
    The revision after C{revision}, wrapping within int32 as the firmware's
    field does (PROTOCOL.md §10: revisions are int32 and may be negative).
    """
    return INT32_MIN if revision >= INT32_MAX else revision + 1


def nextTimestamp(bucket: Bucket, nowMs: int) -> int:
    """
    The timestamp of a change made at C{nowMs}.

    Never at or below the bucket's current timestamp: a device compares
    timestamps only, so a change stamped earlier than what it already holds
    (server clock stepped back, or a device-supplied timestamp adopted from a
    clock that runs ahead) would never reach it.
    """
    return max(nowMs, bucket.timestamp + 1)


def changed(bucket: Bucket, value: Mapping[str, Any], nowMs: int) -> Bucket:
    """
    C{bucket} with C{value} as its new value, revision and timestamp moved.
    """
    return Bucket(
        bucket.key,
        nextRevision(bucket.revision),
        nextTimestamp(bucket, nowMs),
        value,
    )


def merge(bucket: Bucket, fields: Mapping[str, Any], nowMs: int) -> Bucket:
    """
    Shallow-merge C{fields} into C{bucket} (PROTOCOL.md §11.5).

    Nested objects are replaced whole. Revision and timestamp move only when
    the value really changes; otherwise C{bucket} itself is returned, so an
    identical re-put leaves nothing to resend.
    """
    merged = {**bucket.value, **fields}
    if merged == bucket.value:
        return bucket
    return changed(bucket, merged, nowMs)


def forceMerge(bucket: Bucket, fields: Mapping[str, Any], nowMs: int) -> Bucket:
    """
    Shallow-merge C{fields} and move revision and timestamp even when nothing
    changed: a user's command is always pushed (PROTOCOL.md §11.5).
    """
    return changed(bucket, {**bucket.value, **fields}, nowMs)


def replace(bucket: Bucket, value: Mapping[str, Any], nowMs: int) -> Bucket:
    """
    C{bucket} with its whole value replaced, revision and timestamp moved
    (schedules from the control side, PROTOCOL.md §11.5).
    """
    return changed(bucket, value, nowMs)


def conditionalMerge(
    bucket: Bucket, fields: Mapping[str, Any], ifRevision: int | None, nowMs: int
) -> tuple[Bucket, bool]:
    """
    A device's put of C{fields}, conditional on C{ifRevision} when given.

    @return: the resulting bucket and whether the write was refused because
        C{ifRevision} differs from the stored revision (PROTOCOL.md §7.2 step
        1, §11.6); a refused write returns C{bucket} unchanged.
    """
    if ifRevision is not None and ifRevision != bucket.revision:
        return bucket, True
    return merge(bucket, fields, nowMs), False


def adopt(
    bucket: Bucket, fields: Mapping[str, Any], revision: int, timestamp: int
) -> Bucket:
    """
    Take a device's newer copy announced in a subscribe (PROTOCOL.md §6.2
    step 5): its fields merged over ours, its timestamp adopted.

    The revision is the device's unless ours is higher: revisions of a bucket
    never go back, and a device whose revision is below ours learns ours from
    the receipt of its next conditional put.
    """
    return evolve(
        bucket,
        revision=max(revision, bucket.revision),
        timestamp=timestamp,
        value={**bucket.value, **fields},
    )


def clearPendingChange(bucket: Bucket) -> Bucket:
    """
    The device's acknowledgement of a setpoint push: C{target_change_pending}
    stored as C{false} without moving revision or timestamp (PROTOCOL.md
    §11.6), so the acknowledged bucket is not resent.
    """
    return evolve(bucket, value={**bucket.value, "target_change_pending": False})
