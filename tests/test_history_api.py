# -*- test-case-name: tests.test_history_api -*-
"""
Tests for the history API of the control port (L{nestproto.control.history}):
C{/api/history} as JSON and CSV, C{/api/usage} by local day, and their
errors, through the control port's resource.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from nestproto.buckets import Bucket
from nestproto.control.api import ControlSettings
from nestproto.history import DAY_MS, HOUR_MS, NUMBERS, SIGNALS, WORDS, History
from nestproto.membership import GLOBAL_SCOPE
from nestproto.store import BucketWrite

from .helpers import (
    CONTROL_URL,
    DEVICE_URL,
    SERIAL,
    START_SECONDS,
    basicAuth,
    completed,
)
from .test_pairing import ServerTestCase

START_MS = int(START_SECONDS * 1000)
MINUTE_MS = 60_000


class HistoryAPITestCase(ServerTestCase):
    """A server whose thermostat reports through the device port."""

    @property
    def history(self) -> History:
        history = self.server.control.history
        assert history is not None
        return history

    def at(self, timeMs: int) -> None:
        self.server.clock.advance(timeMs / 1000 - self.server.clock.seconds())

    def put(self, **shared: Any) -> None:
        d = self.server.deviceClient.post(
            DEVICE_URL + "/nest/transport/put",
            data=json.dumps(
                {
                    "session": "s",
                    "objects": [{"object_key": f"shared.{SERIAL}", "value": shared}],
                }
            ).encode(),
            headers=basicAuth(SERIAL),
        )
        response, body = completed(self, self.server.deviceClient, d)
        self.assertEqual(response.code, 200, body)

    def get(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        d = self.server.controlClient.get(CONTROL_URL + path, headers=headers)
        response, body = completed(self, self.server.controlClient, d)
        contentType = response.headers.getRawHeaders("content-type", [""])[0]
        return response.code, contentType, body

    def getJSON(self, path: str) -> dict[str, Any]:
        status, contentType, body = self.get(path)
        self.assertEqual(status, 200, body)
        self.assertEqual(contentType, "application/json")
        document = json.loads(body)
        assert isinstance(document, dict)
        return document

    def refused(self, path: str, status: int = 400) -> dict[str, Any]:
        code, contentType, body = self.get(path)
        self.assertEqual(code, status, body)
        self.assertEqual(contentType, "application/json")
        document = json.loads(body)
        assert isinstance(document, dict)
        return document

    def heatingDay(self) -> None:
        """
        Reports over three hours: temperature every 10 minutes, heater on at
        00:20 for 30 minutes and again at 01:50 for 20 minutes (UTC).
        """
        for minute in range(0, 180, 10):
            self.at(START_MS + minute * MINUTE_MS + 1_500)
            self.put(
                current_temperature=19.0 + minute / 100,
                target_temperature=20.5,
                target_temperature_type="heat",
                hvac_heater_state=minute in (20, 30, 40, 110, 120),
            )
        self.at(START_MS + 3 * HOUR_MS + 5 * MINUTE_MS)


class HistoryTests(HistoryAPITestCase):
    """C{GET /api/history}."""

    def test_raw(self) -> None:
        """
        Raw history: every sample with its numbers and words, the HVAC state
        at C{from}, and each transition at its millisecond.
        """
        self.heatingDay()
        document = self.getJSON(
            f"/api/history?serial={SERIAL}&from={START_MS + HOUR_MS}"
            f"&to={START_MS + 2 * HOUR_MS}"
        )
        self.assertEqual(
            (document["serial"], document["step"], document["from"], document["to"]),
            (SERIAL, "raw", START_MS + HOUR_MS, START_MS + 2 * HOUR_MS),
        )
        self.assertEqual(
            [(s["time"] - START_MS, s["temperature"]) for s in document["samples"]],
            [(m * MINUTE_MS + 1_500, 19.0 + m / 100) for m in range(60, 120, 10)],
        )
        self.assertEqual(
            document["samples"][0],
            {
                "time": START_MS + HOUR_MS + 1_500,
                "temperature": 19.6,
                "humidity": None,
                "target": 20.5,
                "target_low": None,
                "target_high": None,
                "mode": "heat",
                "eco": None,
            },
        )
        self.assertFalse(document["hvac_at_from"]["hvac_heater_state"])
        self.assertEqual(
            document["transitions"],
            [
                {
                    "time": START_MS + 110 * MINUTE_MS + 1_500,
                    "field": "hvac_heater_state",
                    "on": True,
                }
            ],
        )

    def test_defaultsToTheLastDay(self) -> None:
        """Without C{from} and C{to}: the 24 hours before now."""
        self.heatingDay()
        self.at(START_MS + DAY_MS + HOUR_MS)
        document = self.getJSON(f"/api/history?serial={SERIAL}")
        self.assertEqual(document["to"], START_MS + DAY_MS + HOUR_MS)
        self.assertEqual(document["from"], START_MS + HOUR_MS)
        self.assertEqual(len(document["samples"]), 12)
        self.assertTrue(document["hvac_at_from"]["hvac_heater_state"] is False)

    def test_hourly(self) -> None:
        """
        Hourly history: complete hours once rolled up, each with its sample
        count, min/mean/max, and minutes on per HVAC field and category.
        """
        self.heatingDay()
        self.successResultOf(self.history.maintain())
        document = self.getJSON(
            f"/api/history?serial={SERIAL}&step=hourly&from={START_MS}"
            f"&to={START_MS + DAY_MS}"
        )
        hours = document["hours"]
        self.assertEqual(
            [hour["time"] - START_MS for hour in hours], [0, HOUR_MS, 2 * HOUR_MS]
        )
        self.assertEqual([hour["samples"] for hour in hours], [6, 6, 6])
        temperature = hours[0]["temperature"]
        self.assertEqual((temperature["min"], temperature["max"]), (19.0, 19.5))
        self.assertAlmostEqual(temperature["mean"], 19.25)
        self.assertEqual(hours[0]["target"], {"min": 20.5, "mean": 20.5, "max": 20.5})
        self.assertIsNone(hours[0]["humidity"])
        # On at 00:20:01.5 for 30 minutes; at 01:50:01.5 for 20 minutes,
        # across the hour.
        self.assertEqual(
            [hour["minutes_on"] for hour in hours],
            [
                {"hvac_heater_state": 30.0, "heating": 30.0},
                {"hvac_heater_state": 9.975, "heating": 9.975},
                {"hvac_heater_state": 10.025, "heating": 10.025},
            ],
        )

    def test_csvParsesBack(self) -> None:
        """
        C{format=csv} has a header and a row per sample or hour, and its
        numbers and words are the JSON's, exactly.
        """
        self.heatingDay()
        self.successResultOf(self.history.maintain())
        for step in ("raw", "hourly"):
            query = (
                f"/api/history?serial={SERIAL}&from={START_MS}"
                f"&to={START_MS + DAY_MS}&step={step}"
            )
            document = self.getJSON(query)
            status, contentType, body = self.get(query + "&format=csv")
            self.assertEqual(status, 200)
            self.assertEqual(contentType, "text/csv; charset=utf-8")
            rows = list(csv.DictReader(io.StringIO(body.decode("utf-8"))))
            if step == "raw":
                self.assertEqual(len(rows), len(document["samples"]))
                for row, sample in zip(rows, document["samples"], strict=True):
                    self.assertEqual(int(row["time_ms"]), sample["time"])
                    for name in NUMBERS:
                        self.assertEqual(_number(row[name]), sample[name], name)
                    for name in WORDS:
                        self.assertEqual(row[name] or None, sample[name], name)
            else:
                self.assertEqual(len(rows), len(document["hours"]))
                for row, hour in zip(rows, document["hours"], strict=True):
                    self.assertEqual(int(row["time_ms"]), hour["time"])
                    self.assertEqual(int(row["samples"]), hour["samples"])
                    for name in NUMBERS:
                        for stat in ("min", "mean", "max"):
                            self.assertEqual(
                                _number(row[f"{name}_{stat}"]),
                                None if hour[name] is None else hour[name][stat],
                            )
                    for name in SIGNALS:
                        self.assertEqual(
                            float(row[f"{name}_minutes"]),
                            hour["minutes_on"].get(name, 0),
                        )

    def test_badParameters(self) -> None:
        """
        A parameter that is not a number, out of range, or not one of the
        choices is refused with a JSON 400 naming it; no serial is a 400,
        an unknown one a 404.
        """
        self.heatingDay()
        base = f"/api/history?serial={SERIAL}"
        for query, words in [
            ("&from=yesterday", "from must be a time in ms"),
            ("&to=1.5", "to must be a time in ms"),
            ("&from=-1", "from must be between"),
            (f"&from={START_MS}&to={START_MS}", "from must be before to"),
            ("&to=99999999999999999999", "to must be between"),
            ("&step=daily", "step must be one of raw, hourly"),
            ("&format=xml", "format must be one of json, csv"),
            ("&from=%ff", "from is not UTF-8"),
        ]:
            document = self.refused(base + query)
            self.assertEqual(document["code"], "bad_parameter", query)
            self.assertIn(words, document["message"], query)
        self.assertEqual(self.refused("/api/history")["code"], "serial_required")
        self.assertEqual(
            self.refused("/api/history?serial=02AA01AC0000000009", 404)["code"],
            "unknown_device",
        )


class UsageTests(HistoryAPITestCase):
    """C{GET /api/usage}: minutes on per local day."""

    def zone(self, name: str) -> None:
        """Give the device's structure a time zone."""
        structureKey = self.server.state.membership.structureKey(SERIAL)
        self.server.store.write(
            [BucketWrite(GLOBAL_SCOPE, Bucket(structureKey, 1, 1, {"time_zone": name}))]
        )

    def heatBetween(self, *spans: tuple[int, int]) -> None:
        for startMs, endMs in spans:
            self.at(startMs)
            self.put(hvac_heater_state=True)
            self.at(endMs)
            self.put(hvac_heater_state=False)

    def test_structureTimeZone(self) -> None:
        """
        Days start at midnight in the structure's time zone: heating from
        23:00 to 01:00 in New York (UTC-5) is an hour on each side.
        """
        self.zone("America/New_York")
        self.heatBetween((START_MS + 4 * HOUR_MS, START_MS + 6 * HOUR_MS))
        self.at(START_MS + 10 * HOUR_MS)
        document = self.getJSON(f"/api/usage?serial={SERIAL}&days=2")
        self.assertEqual(
            (document["time_zone"], document["time_zone_source"]),
            ("America/New_York", "structure"),
        )
        self.assertEqual(
            [(d["date"], d["heating"], d["cooling"]) for d in document["days"]],
            [("2025-12-31", 60.0, 0.0), ("2026-01-01", 60.0, 0.0)],
        )
        self.assertEqual(document["days"][0]["from"], START_MS - 19 * HOUR_MS)
        self.assertEqual(document["days"][1]["from"], START_MS + 5 * HOUR_MS)
        self.assertEqual(document["days"][1]["to"], START_MS + 10 * HOUR_MS)

    def test_daylightSavingDay(self) -> None:
        """
        The day the clocks go forward has 23 hours: heating all of it is
        1,380 minutes, from hourly rows once raw ones are gone.
        """
        self.zone("America/New_York")
        # 2026-03-08: midnight EST is 05:00 UTC, the next midnight (EDT)
        # is 04:00 UTC on the 9th.
        dayStartMs = START_MS + 66 * DAY_MS + 5 * HOUR_MS
        self.heatBetween((dayStartMs - HOUR_MS, dayStartMs + 24 * HOUR_MS))
        self.at(dayStartMs + 30 * HOUR_MS)
        document = self.getJSON(f"/api/usage?serial={SERIAL}&days=3")
        self.assertEqual(
            [(d["date"], d["heating"]) for d in document["days"]],
            [("2026-03-07", 60.0), ("2026-03-08", 1380.0), ("2026-03-09", 60.0)],
        )
        self.at(dayStartMs + 20 * DAY_MS)
        self.successResultOf(self.history.maintain())
        document = self.getJSON(f"/api/usage?serial={SERIAL}&days=30")
        self.assertEqual(
            [(d["date"], d["heating"]) for d in document["days"] if d["heating"]],
            [("2026-03-07", 60.0), ("2026-03-08", 1380.0), ("2026-03-09", 60.0)],
        )

    def test_serverTimeZone(self) -> None:
        """
        Without a valid structure time zone, days are the server's: here
        India's, which starts them at 18:30 UTC.
        """
        self.zone("Mars/Olympus_Mons")
        previous = os.environ.get("TZ")
        os.environ["TZ"] = "Asia/Kolkata"
        time.tzset()

        def restore() -> None:
            if previous is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = previous
            time.tzset()

        self.addCleanup(restore)
        self.heatBetween((START_MS + 18 * HOUR_MS, START_MS + 19 * HOUR_MS))
        self.at(START_MS + 20 * HOUR_MS)
        document = self.getJSON(f"/api/usage?serial={SERIAL}&days=2")
        self.assertEqual(document["time_zone_source"], "server")
        self.assertEqual(document["time_zone"], "IST")
        self.assertEqual(
            [(d["date"], d["heating"]) for d in document["days"]],
            [("2026-01-01", 30.0), ("2026-01-02", 30.0)],
        )

    def test_badDays(self) -> None:
        """C{days} must be a whole number from 1 to the hourly retention."""
        self.heatBetween((START_MS, START_MS + HOUR_MS))
        for days in ("0", "731", "week", "1.5"):
            document = self.refused(f"/api/usage?serial={SERIAL}&days={days}")
            self.assertEqual(document["code"], "bad_parameter")
            self.assertIn("days must be", document["message"])
        document = self.getJSON(f"/api/usage?serial={SERIAL}")
        self.assertEqual(len(document["days"]), 7)


class ProtectedTests(HistoryAPITestCase):
    """History, usage and metrics need the control token like the rest."""

    controlSettings = ControlSettings(token="s3cret")

    def test_tokenRequired(self) -> None:
        """Without the token each answers 401; with it, 200."""
        self.put(hvac_heater_state=True)
        for path in (
            f"/api/history?serial={SERIAL}",
            f"/api/usage?serial={SERIAL}",
            "/metrics",
        ):
            status, _, _ = self.get(path)
            self.assertEqual(status, 401, path)
            status, _, body = self.get(path, {"Authorization": "Bearer s3cret"})
            self.assertEqual(status, 200, (path, body))


def _number(cell: str) -> float | None:
    return None if cell == "" else float(cell)
