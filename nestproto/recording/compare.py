# -*- test-case-name: tests.test_fixtures -*-
"""
Comparison of a replayed answer with the recorded one: the differences
between two JSON documents by field path, and the L{Mismatch} that names
the file, exchange and place of each.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen

from .bindings import (
    MS_FIELDS,
    REVISION_FIELDS,
    SECONDS_FIELDS,
    Bindings,
    codeKey,
    documentKey,
    nestedKey,
)
from .format import isNumber

#: Fields whose value depends on the server build, not on the protocol.
ANY_STRING_FIELDS = frozenset(
    {
        "server_version",
        # A login's expiry, a date in words (PROTOCOL.md §20.6).
        "expires_in",
    }
)


@frozen
class Mismatch:
    """One difference between a recording and a replay."""

    exchange: int
    where: str
    recorded: Any
    replayed: Any

    def describe(self, path: str) -> str:
        return (
            f"{path}: exchange {self.exchange}: {self.where}: "
            f"recorded {_show(self.recorded)}, replayed {_show(self.replayed)}"
        )


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def compareDocuments(
    recorded: Any,
    replayed: Any,
    bindings: Bindings,
    where: str = "$",
    name: str = "",
    objectKey: str | None = None,
    codeField: bool = False,
) -> list[tuple[str, Any, Any]]:
    """
    The differences between a recorded and a replayed JSON document: types,
    object field names and their order, list lengths and scalars, with
    server-made values matched through C{bindings}.

    @param codeField: C{recorded} is an entry code (a passphrase answer's
        C{value}): bind it rather than compare it.
    @return: C{(where, recorded, replayed)} for each difference.
    """
    if isinstance(recorded, dict):
        if not isinstance(replayed, dict):
            return [(where, recorded, replayed)]
        if list(recorded) != list(replayed):
            return [(where + " (fields)", list(recorded), list(replayed))]
        key = documentKey(recorded, objectKey)
        problems = []
        for field_ in recorded:
            problems.extend(
                compareDocuments(
                    recorded[field_],
                    replayed[field_],
                    bindings,
                    f"{where}.{field_}",
                    field_,
                    nestedKey(name, field_, recorded[field_], key),
                    codeField and field_ == "value",
                )
            )
        return problems
    if isinstance(recorded, list):
        if not isinstance(replayed, list):
            return [(where, recorded, replayed)]
        if len(recorded) != len(replayed):
            return [(where + " (length)", len(recorded), len(replayed))]
        problems = []
        for index, (a, b) in enumerate(zip(recorded, replayed, strict=True)):
            problems.extend(
                compareDocuments(a, b, bindings, f"{where}[{index}]", name, objectKey)
            )
        return problems
    if codeField and isinstance(recorded, str):
        if not isinstance(replayed, str):
            return [(where, recorded, replayed)]
        bound = bindings.codes.setdefault(codeKey(recorded), replayed)
        if bound != replayed:
            return [(where + f" (entry code bound to {bound!r})", recorded, replayed)]
        return []
    if name == "access_token" and isinstance(recorded, str) and recorded:
        # An app token the server made up: bound, then sent in its place.
        if not isinstance(replayed, str):
            return [(where, recorded, replayed)]
        bound = bindings.tokens.setdefault(recorded, replayed)
        if bound != replayed:
            return [(where + f" (token bound to {bound!r})", recorded, replayed)]
        return []
    if name in ANY_STRING_FIELDS and isinstance(recorded, str):
        return [] if isinstance(replayed, str) else [(where, recorded, replayed)]
    table: dict[int, int] | None = None
    if name in MS_FIELDS:
        table = bindings.milliseconds
    elif name in SECONDS_FIELDS:
        table = bindings.seconds
    elif name in REVISION_FIELDS and objectKey is not None:
        table = bindings.revisions.setdefault(objectKey, {})
    if (
        table is not None
        and isinstance(recorded, int)
        and not isinstance(recorded, bool)
    ):
        if not isinstance(replayed, int) or isinstance(replayed, bool):
            return [(where, recorded, replayed)]
        reason = bindings.bindOrdered(table, recorded, replayed)
        return [] if reason is None else [(f"{where} ({reason})", recorded, replayed)]
    if isNumber(recorded) and isNumber(replayed):
        return [] if recorded == replayed else [(where, recorded, replayed)]
    if type(recorded) is not type(replayed) or recorded != replayed:
        return [(where, recorded, replayed)]
    return []
