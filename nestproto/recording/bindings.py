# -*- test-case-name: tests.test_fixtures -*-
"""
Symbolic binding of the values a server makes up (timestamps, revisions,
entry codes): which fields hold them, how a recorded value binds to a
replayed one, and what a recorded request becomes in the replay.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field

from ..buckets import isBucketKey
from ..device.keylist import canonicalKey

#: Fields holding a time in ms made by the server's clock.
MS_FIELDS = frozenset(
    {
        "object_timestamp",
        "timestamp",
        "expires",
        "expiresAt",
        "claimedAt",
        # The key-list dialect's nested metadata (PROTOCOL.md §20.4, §20.5).
        "$timestamp",
    }
)
#: Fields holding a time in seconds made by the server's clock (§10.2).
SECONDS_FIELDS = frozenset(
    {
        "manual_eco_timestamp",
        "fan_timer_timeout",
        "touched_at",
        "mode_update_timestamp",
    }
)
#: Fields holding a bucket revision; matched per object key.
REVISION_FIELDS = frozenset(
    {
        "object_revision",
        "if_object_revision",
        "base_object_revision",
        # The key-list dialect's (§20.3, §20.4): C{$version} in nested
        # documents, C{version} beside C{key} in a subscribe's keys.
        "$version",
        "version",
    }
)


@define
class Bindings:
    """
    Values a server makes up, recorded on one side, replayed on the other:
    each recorded value binds to the first replayed value seen in its place,
    and must be the same everywhere after. Times and revisions keep their
    order: a value recorded higher than another must replay higher too.
    """

    shiftMs: int = 0
    milliseconds: dict[int, int] = field(factory=dict)
    seconds: dict[int, int] = field(factory=dict)
    revisions: dict[str, dict[int, int]] = field(factory=dict)
    codes: dict[str, str] = field(factory=dict)
    #: App tokens (PROTOCOL.md §20.6): a login's recorded C{access_token}
    #: to the one the replay got, sent in its place after.
    tokens: dict[str, str] = field(factory=dict)

    def bindOrdered(
        self, table: dict[int, int], recorded: int, replayed: int
    ) -> str | None:
        """Bind C{recorded} to C{replayed}; a reason when that is inconsistent."""
        if (recorded == 0) != (replayed == 0):
            return "zero on one side only"
        if recorded in table:
            if table[recorded] != replayed:
                return f"earlier bound to {table[recorded]}"
            return None
        for otherRecorded, otherReplayed in table.items():
            if _sign(recorded - otherRecorded) != _sign(replayed - otherReplayed):
                return (
                    f"order differs from recorded {otherRecorded} "
                    f"(replayed {otherReplayed})"
                )
        table[recorded] = replayed
        return None

    def requestValue(self, name: str, value: Any, objectKey: str | None) -> Any:
        """What a recorded request field becomes in the replay."""
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str):
                code = self.codes.get(codeKey(value))
                if code is not None:
                    return styledLike(code, value)
            return value
        if name in MS_FIELDS:
            if value == 0:
                return 0
            return self.milliseconds.get(value, value + self.shiftMs)
        if name in SECONDS_FIELDS:
            if value == 0:
                return 0
            return self.seconds.get(value, value + self.shiftMs // 1000)
        if name in REVISION_FIELDS and objectKey is not None:
            return self.revisions.get(objectKey, {}).get(value, value)
        return value

    def request(
        self, document: Any, objectKey: str | None = None, parent: str = ""
    ) -> Any:
        """A recorded request body with every bound value replaced."""
        if isinstance(document, dict):
            key = documentKey(document, objectKey)
            return {
                name: self.requestValue(
                    name,
                    self.request(value, nestedKey(parent, name, value, key), name),
                    key,
                )
                for name, value in document.items()
            }
        if isinstance(document, list):
            return [self.request(item, objectKey) for item in document]
        return self.requestValue("", document, objectKey)


def documentKey(document: dict[str, Any], objectKey: str | None) -> str | None:
    """
    The bucket a document is about: its C{object_key} (v7), its C{key}
    (a key-list subscribe's entry, §20.3), else its parent's.
    """
    for name in ("object_key", "key"):
        key = document.get(name)
        if isinstance(key, str) and isBucketKey(canonicalKey(key)):
            return canonicalKey(key)
    return objectKey


def nestedKey(parent: str, name: str, value: Any, objectKey: str | None) -> str | None:
    """
    The bucket of C{value}, found at C{parent → name}: in a nested
    key-list document (C{{"shared": {"S": {"$version": …}}}}, §20.4) the
    type and id, when no key is known yet.
    """
    if objectKey is None and isinstance(value, dict) and parent:
        key = f"{parent}.{name}"
        if isBucketKey(key):
            return key
    return objectKey


def codeKey(text: str) -> str:
    """
    An entry code as the server compares it: the device shows C{123-ABCD},
    users type it with or without the hyphen, in either case (PROTOCOL.md
    §5, §13).
    """
    return text.strip().replace("-", "").upper()


def styledLike(code: str, typed: str) -> str:
    """C{code} with the hyphen C{typed} had, so a replay types what was typed."""
    typed = typed.strip()
    if len(typed) == len(code) + 1 and typed[3:4] == "-":
        return f"{code[:3]}-{code[3:]}"
    return code


def _sign(number: int) -> int:
    return (number > 0) - (number < 0)
