# -*- test-case-name: tests.test_fixtures -*-
"""
Comparison of a replayed answer with the recorded one: the differences
between two JSON documents by field path, between the headers of two
key-list answers, between two JSONP answers (a callback around such
headers and a bucket, PROTOCOL.md §20.6), and the L{Mismatch} that names
the file, exchange and place of each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from ..device.jsonp import parseScript
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


#: The header naming a key-list answer's bucket (PROTOCOL.md §20.3).
SKV_KEY = "x-nl-skv-key"
#: Key-list answer headers whose values the server made up (§20.3): the
#: bucket's revision (per bucket) and its timestamp (in ms).
SKV_BOUND = frozenset({"x-nl-skv-version", "x-nl-skv-timestamp"})
#: The server's clock when it answered, in ms (§6.3).
SERVICE_TIMESTAMP = "x-nl-service-timestamp"
#: How far C{X-nl-service-timestamp} may be from the replay clock, in ms.
SERVICE_TIMESTAMP_SLACK_MS = 1000

_DECIMAL = re.compile(r"^-?[0-9]+$")


def _headerInteger(value: Any) -> int | None:
    """A header's decimal value: an HTTP header's text, a JSONP number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _DECIMAL.match(value):
        return int(value)
    return None


def compareHeaders(
    recorded: Mapping[str, Any],
    replayed: Mapping[str, Any],
    bindings: Bindings,
    nowMs: float,
    prefix: str = "header ",
    slackMs: float = 0,
) -> list[tuple[str, Any, Any]]:
    """
    The differences between the headers of a recorded and a replayed
    answer: the same names with the same values (a JSONP answer's are JSON
    values, so of the same type too), except the bucket's
    C{X-nl-skv-version} and C{X-nl-skv-timestamp}, bound like a body's
    revisions (per C{X-nl-skv-key}) and times, and C{X-nl-service-timestamp},
    which must be within 1 s of C{nowMs}.

    @param recorded: header names (in any case) to values; the caller
        chooses which headers count.
    @param prefix: what each difference's place starts with.
    @param slackMs: how much later than 1 s the service time may be.
    """
    lowered = {name.lower(): value for name, value in recorded.items()}
    key = lowered.get(SKV_KEY)
    problems: list[tuple[str, Any, Any]] = []
    for name in sorted(set(recorded) | set(replayed)):
        where = prefix + name
        if name not in replayed:
            problems.append((where, recorded[name], None))
        elif name not in recorded:
            problems.append((where, None, replayed[name]))
        elif name.lower() == SERVICE_TIMESTAMP:
            problems.extend(
                _compareServiceTimestamp(where, replayed[name], nowMs, slackMs)
            )
        elif name.lower() in SKV_BOUND:
            ours = _headerInteger(recorded[name])
            theirs = _headerInteger(replayed[name])
            if (
                ours is None
                or theirs is None
                or type(recorded[name]) is not type(replayed[name])
            ):
                problems.append((where, recorded[name], replayed[name]))
                continue
            if name.lower() == "x-nl-skv-timestamp":
                table = bindings.milliseconds
            else:
                table = bindings.revisions.setdefault(
                    key if isinstance(key, str) else "", {}
                )
            reason = bindings.bindOrdered(table, ours, theirs)
            if reason is not None:
                problems.append((f"{where} ({reason})", ours, theirs))
        elif type(recorded[name]) is not type(replayed[name]) or (
            recorded[name] != replayed[name]
        ):
            problems.append((where, recorded[name], replayed[name]))
    return problems


def _compareServiceTimestamp(
    where: str, value: Any, nowMs: float, slackMs: float
) -> list[tuple[str, Any, Any]]:
    replayed = _headerInteger(value)
    if replayed is None:
        return [(where, "ms", value)]
    if abs(replayed - nowMs) > SERVICE_TIMESTAMP_SLACK_MS + slackMs:
        return [(f"{where} (not near the replay clock)", int(nowMs), replayed)]
    return []


def compareScripts(
    recorded: str,
    replayed: str,
    bindings: Bindings,
    nowMs: float,
    slackMs: float = 0,
) -> list[tuple[str, Any, Any]]:
    """
    The differences between a recorded and a replayed JSONP answer
    (PROTOCOL.md §20.6): the same callback name, and envelopes
    C{{"status", "headers", "payload"}} alike as JSON documents, the
    headers compared as L{compareHeaders} compares a key-list answer's and
    the payload as a body about the bucket they name.

    @param recorded: a JSONP answer (L{parseScript} reads it).
    """
    ours = parseScript(recorded)
    if ours is None:
        raise ValueError("the recorded answer is not a JSONP answer")
    theirs = parseScript(replayed)
    if theirs is None:
        return [("(not a JSONP answer)", recorded, replayed)]
    problems: list[tuple[str, Any, Any]] = []
    if ours[0] != theirs[0]:
        problems.append(("callback", ours[0], theirs[0]))
    envelope, replayedEnvelope = ours[1], theirs[1]
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    if not isinstance(headers, dict):
        return problems + compareDocuments(envelope, replayedEnvelope, bindings)
    if not isinstance(replayedEnvelope, dict):
        return problems + [("$", envelope, replayedEnvelope)]
    if list(envelope) != list(replayedEnvelope):
        return problems + [("$ (fields)", list(envelope), list(replayedEnvelope))]
    key = {name.lower(): value for name, value in headers.items()}.get(SKV_KEY)
    for name in envelope:
        where = f"$.{name}"
        if name != "headers":
            problems.extend(
                compareDocuments(
                    envelope[name],
                    replayedEnvelope[name],
                    bindings,
                    where,
                    name,
                    key if isinstance(key, str) else None,
                )
            )
            continue
        replayedHeaders = replayedEnvelope[name]
        if not isinstance(replayedHeaders, dict):
            problems.append((where, headers, replayedHeaders))
        elif list(headers) != list(replayedHeaders):
            problems.append((f"{where} (fields)", list(headers), list(replayedHeaders)))
        else:
            problems.extend(
                compareHeaders(
                    headers, replayedHeaders, bindings, nowMs, f"{where}.", slackMs
                )
            )
    return problems
