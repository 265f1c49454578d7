# -*- test-case-name: tests.test_history_api -*-
"""
The history and usage documents of the control port (C{/api/history},
C{/api/usage}): their query parameters, their JSON, and their CSV.

The CSV is written from the JSON document itself, so a spreadsheet sees
exactly the numbers the JSON has.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from attrs import frozen
from twisted.internet.defer import Deferred

from ..buckets import TIMESTAMP_MAX
from ..errors import BadParameter
from ..history import (
    DAY_MS,
    HVAC_FIELDS,
    NUMBERS,
    SIGNALS,
    USAGE,
    WORDS,
    History,
)
from ..membership import GLOBAL_SCOPE
from ..state import DeviceState

#: The steps C{/api/history} offers.
STEPS = ("raw", "hourly")
FORMATS = ("json", "csv")
DEFAULT_USAGE_DAYS = 7
_MS_PER_MINUTE = 60_000


@frozen
class HistoryQuery:
    """A checked C{/api/history} query; times in ms, C{toMs} excluded."""

    serial: str
    fromMs: int
    toMs: int
    step: str
    format: str


def _text(args: Mapping[bytes, Sequence[bytes]], name: str) -> str | None:
    values = args.get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadParameter(f"{name} is not UTF-8") from None


def _integer(
    args: Mapping[bytes, Sequence[bytes]],
    name: str,
    default: int,
    low: int,
    high: int,
    what: str,
) -> int:
    text = _text(args, name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadParameter(f"{name} must be {what}, not {text[:40]!r}") from None
    if not low <= value <= high:
        raise BadParameter(f"{name} must be between {low} and {high}")
    return value


def _choice(
    args: Mapping[bytes, Sequence[bytes]], name: str, choices: Sequence[str]
) -> str:
    text = _text(args, name)
    if text is None or text == "":
        return choices[0]
    if text not in choices:
        raise BadParameter(f"{name} must be one of {', '.join(choices)}")
    return text


def parseHistoryQuery(
    serial: str, args: Mapping[bytes, Sequence[bytes]], nowMs: int
) -> HistoryQuery:
    """
    C{from} and C{to} in ms since the epoch (default: the last 24 hours),
    C{step} C{raw} (default) or C{hourly}, C{format} C{json} (default) or
    C{csv}.

    @raise BadParameter: with a sentence saying which parameter and why.
    """
    ms = "a time in ms since the epoch"
    toMs = _integer(args, "to", nowMs, 1, TIMESTAMP_MAX, ms)
    fromMs = _integer(args, "from", max(toMs - DAY_MS, 0), 0, TIMESTAMP_MAX, ms)
    if fromMs >= toMs:
        raise BadParameter("from must be before to")
    return HistoryQuery(
        serial,
        fromMs,
        toMs,
        _choice(args, "step", STEPS),
        _choice(args, "format", FORMATS),
    )


def parseUsageDays(args: Mapping[bytes, Sequence[bytes]], maxDays: int) -> int:
    """C{days}: how many local days, today included (default 7)."""
    return _integer(
        args, "days", min(DEFAULT_USAGE_DAYS, maxDays), 1, maxDays, "a number of days"
    )


def _minutes(ms: int) -> float:
    return ms / _MS_PER_MINUTE


async def _historyDocument(history: History, query: HistoryQuery) -> dict[str, Any]:
    document: dict[str, Any] = {
        "serial": query.serial,
        "from": query.fromMs,
        "to": query.toMs,
        "step": query.step,
    }
    if query.step == "hourly":
        hours = await history.hours(query.serial, query.fromMs, query.toMs)
        document["hours"] = [
            {
                "time": hour.hourMs,
                "samples": hour.samples,
                **{
                    name: None
                    if name not in hour.stats
                    else dict(
                        zip(("min", "mean", "max"), hour.stats[name], strict=True)
                    )
                    for name in NUMBERS
                },
                "minutes_on": {
                    name: _minutes(hour.onMs[name])
                    for name in SIGNALS
                    if name in hour.onMs
                },
            }
            for hour in hours
        ]
        return document
    samples = await history.samples(query.serial, query.fromMs, query.toMs)
    transitions = await history.transitions(query.serial, query.fromMs, query.toMs)
    document["samples"] = [
        {
            "time": sample.timeMs,
            **{name: sample.values.get(name) for name in NUMBERS + WORDS},
        }
        for sample in samples
    ]
    document["hvac_at_from"] = {
        name: transitions.initial.get(name, False) for name in HVAC_FIELDS
    }
    document["transitions"] = [
        {"time": change.timeMs, "field": change.field, "on": change.on}
        for change in transitions.changes
    ]
    return document


def historyDocument(history: History, query: HistoryQuery) -> Deferred[dict[str, Any]]:
    """
    The JSON document of C{query}: C{samples}, C{hvac_at_from} and
    C{transitions} (raw), or C{hours} (hourly, complete hours only).
    """
    return Deferred.fromCoroutine(_historyDocument(history, query))


def _cell(value: object) -> object:
    return "" if value is None else value


def historyCSV(document: Mapping[str, Any]) -> bytes:
    """
    The rows of a L{historyDocument} as CSV with a header line: one row per
    sample (raw; HVAC transitions are in the JSON only) or per hour.
    """
    out = io.StringIO()
    writer = csv.writer(out)
    if document["step"] == "hourly":
        stats = [
            f"{name}_{stat}" for name in NUMBERS for stat in ("min", "mean", "max")
        ]
        minutes = [f"{name}_minutes" for name in SIGNALS]
        writer.writerow(["time_ms", "samples", *stats, *minutes])
        for hour in document["hours"]:
            numbers = [
                _cell(None if hour[name] is None else hour[name][stat])
                for name in NUMBERS
                for stat in ("min", "mean", "max")
            ]
            on = [hour["minutes_on"].get(name, 0) for name in SIGNALS]
            writer.writerow([hour["time"], hour["samples"], *numbers, *on])
    else:
        writer.writerow(["time_ms", *NUMBERS, *WORDS])
        for sample in document["samples"]:
            writer.writerow(
                [sample["time"], *(_cell(sample[name]) for name in NUMBERS + WORDS)]
            )
    return out.getvalue().encode("utf-8")


# Usage


@frozen
class Zone:
    """
    Where local days are counted: C{zone} C{None} is the server's own time
    zone; C{name} is what the answer shows.
    """

    zone: tzinfo | None
    name: str | None
    source: str


def deviceZone(state: DeviceState, serial: str, nowS: float) -> Zone:
    """
    The time zone of C{serial}'s structure (its C{time_zone}, an IANA name)
    when known and valid, else the server's.
    """
    structure = state.store.get(GLOBAL_SCOPE, state.membership.structureKey(serial))
    name = None if structure is None else structure.value.get("time_zone")
    if isinstance(name, str) and 0 < len(name) <= 64:
        try:
            return Zone(ZoneInfo(name), name, "structure")
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return Zone(None, datetime.fromtimestamp(nowS).astimezone().tzname(), "server")


def localDays(zone: tzinfo | None, nowS: float, days: int) -> list[tuple[date, int]]:
    """
    The last C{days} local days, today included, oldest first: each date
    and the ms its midnight falls on in C{zone} (C{None}: the server's).
    """
    today = datetime.fromtimestamp(nowS, zone).date()
    starts = []
    for back in range(days - 1, -1, -1):
        day = today - timedelta(days=back)
        midnight = datetime(day.year, day.month, day.day, tzinfo=zone)
        starts.append((day, int(midnight.timestamp() * 1000)))
    return starts


async def _usageDocument(
    history: History, serial: str, zone: Zone, nowMs: int, days: int
) -> dict[str, Any]:
    starts = localDays(zone.zone, nowMs / 1000, days)
    boundaries = [startMs for _, startMs in starts] + [nowMs]
    totals = await history.usage(serial, boundaries)
    return {
        "serial": serial,
        "time_zone": zone.name,
        "time_zone_source": zone.source,
        "days": [
            {
                "date": day.isoformat(),
                "from": boundaries[i],
                "to": boundaries[i + 1],
                **{name: _minutes(totals[i][name]) for name in USAGE},
            }
            for i, (day, _) in enumerate(starts)
        ],
    }


def usageDocument(
    history: History, serial: str, zone: Zone, nowMs: int, days: int
) -> Deferred[dict[str, Any]]:
    """
    Minutes of heating, cooling, fan and aux heat in each of the last
    C{days} local days of C{zone}, today (until now) last.
    """
    return Deferred.fromCoroutine(_usageDocument(history, serial, zone, nowMs, days))
