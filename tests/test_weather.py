# -*- test-case-name: tests.test_weather -*-
"""
Tests for L{nestproto.weather}, with Open-Meteo played in memory.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from nestproto.errors import BadQuery, MissingQuery, WeatherUnavailable
from nestproto.weather import (
    IWeatherSource,
    NoWeather,
    OpenMeteoSource,
    WeatherService,
    compassPoint,
    condition,
    gmtOffset,
    parseWeatherQuery,
)

QUERY = "94043,US"
# 2026-01-01T00:00:00Z, which is 16:00 on Dec 31 in California.
NOW = 1767225600
LOCAL_MIDNIGHT = 1767168000
HOUR = 3600
DAY = 86400
TIMEOUT_SECONDS = 5
TTL_SECONDS = 600

PLACE = {
    "id": 5375480,
    "name": "Mountain View",
    "latitude": 37.4,
    "longitude": -122.08,
    "country_code": "US",
    "admin1": "California",
    "timezone": "America/Los_Angeles",
    "postcodes": ["94043"],
    "country": "United States",
}

DAILY_CODES = [63, 0, 2, 3, 45, 95, 71]
DAILY_HIGHS = [14.4, 15.0, 16.1, 12.2, 9.9, 11.0, 3.3]
DAILY_LOWS = [-2.2, 1.0, 2.5, 4.4, 0.0, -1.1, -5.0]


def hourlyCelsius(index: int) -> float:
    return 5.0 + index % 24 / 2


def hourlyHumidity(index: int) -> int:
    return 50 + index % 40


def forecastBody() -> dict[str, Any]:
    """
    An Open-Meteo forecast for Mountain View asked with C{timeformat=unixtime}.
    """
    hours = range(7 * 24)
    return {
        "latitude": 37.4,
        "longitude": -122.08,
        "utc_offset_seconds": -8 * HOUR,
        "timezone": "America/Los_Angeles",
        "timezone_abbreviation": "PST",
        "current": {
            "time": NOW,
            "interval": 900,
            "temperature_2m": 10.6,
            "relative_humidity_2m": 90,
            "weather_code": 63,
            "wind_speed_10m": 19.2,
            "wind_direction_10m": 247.5,
            "is_day": 1,
        },
        "hourly": {
            "time": [LOCAL_MIDNIGHT + h * HOUR for h in hours],
            "temperature_2m": [hourlyCelsius(h) for h in hours],
            "relative_humidity_2m": [hourlyHumidity(h) for h in hours],
        },
        "daily": {
            "time": [LOCAL_MIDNIGHT + d * DAY for d in range(7)],
            "weather_code": DAILY_CODES,
            "temperature_2m_max": DAILY_HIGHS,
            "temperature_2m_min": DAILY_LOWS,
            "sunrise": [LOCAL_MIDNIGHT + d * DAY + 8 * HOUR for d in range(7)],
            "sunset": [LOCAL_MIDNIGHT + d * DAY + 18 * HOUR for d in range(7)],
        },
    }


class FakeOpenMeteo(Resource):
    """
    Both Open-Meteo APIs, in memory.

    @ivar mode: C{"ok"} answers, C{"error"} answers HTTP 500, C{"hang"} never
        answers until L{release}, C{"nowhere"} geocodes to no place.
    @ivar requests: the path and arguments of every request, in order.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]]]] = []
        self.pending: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.requests.append((request.path, request.args))
        if self.mode == "hang":
            self.pending.append(request)
            return NOT_DONE_YET
        if self.mode == "error":
            request.setResponseCode(500)
            return b'{"error": true, "reason": "Internal error"}'
        return self._body(request.path)

    def _body(self, path: bytes) -> bytes:
        if path == b"/v1/search":
            results = [] if self.mode == "nowhere" else [PLACE]
            return json.dumps({"results": results}).encode()
        assert path == b"/v1/forecast", path
        return json.dumps(forecastBody()).encode()

    def release(self) -> None:
        """
        Answer every held request, and answer from now on.
        """
        self.mode = "ok"
        held, self.pending = self.pending, []
        for request in held:
            request.write(self._body(request.path))
            request.finish()

    def paths(self) -> list[bytes]:
        return [path for path, _ in self.requests]


class WeatherServiceTests(SynchronousTestCase):
    """
    L{WeatherService} over L{OpenMeteoSource}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.upstream = FakeOpenMeteo()
        self.stub = StubTreq(self.upstream)
        self.source = OpenMeteoSource(self.stub, self.clock)
        self.service = WeatherService(self.source, self.clock)

    def lookup(self) -> Deferred[dict[str, Any]]:
        d = self.service.lookup(QUERY)
        self.stub.flush()
        return d

    def test_sourcesProvideTheInterface(self) -> None:
        """
        L{OpenMeteoSource} and L{NoWeather} are L{IWeatherSource}s.
        """
        self.assertTrue(verifyObject(IWeatherSource, self.source))
        self.assertTrue(verifyObject(IWeatherSource, NoWeather()))

    def test_freshFetch(self) -> None:
        """
        A first lookup geocodes the postal code within its country, then asks
        for the forecast there in unix time and the place's own time zone; the
        answer is keyed by the query.
        """
        answer = self.successResultOf(self.lookup())
        self.assertEqual(list(answer), [QUERY])
        self.assertEqual(self.upstream.paths(), [b"/v1/search", b"/v1/forecast"])
        geocoding, forecast = (args for _, args in self.upstream.requests)
        self.assertEqual(geocoding[b"name"], [b"94043"])
        self.assertEqual(geocoding[b"countryCode"], [b"US"])
        self.assertEqual(geocoding[b"count"], [b"1"])
        self.assertEqual(forecast[b"latitude"], [b"37.4"])
        self.assertEqual(forecast[b"longitude"], [b"-122.08"])
        self.assertEqual(forecast[b"timezone"], [b"auto"])
        self.assertEqual(forecast[b"timeformat"], [b"unixtime"])
        self.assertEqual(forecast[b"wind_speed_unit"], [b"mph"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answerShape(self) -> None:
        """
        The per-query answer has exactly the fields of PROTOCOL.md §9, both
        temperature scales, times in epoch seconds, six days and 48 hours.
        """
        weather = self.successResultOf(self.lookup())[QUERY]
        self.assertEqual(set(weather), {"current", "location", "forecast"})
        self.assertEqual(
            weather["current"],
            {
                "temp_f": 51,
                "temp_c": 10.6,
                "condition": "Rain",
                "icon": "rain",
                "humidity": 90,
                "wind_dir": "WSW",
                "wind_mph": 19,
                "sunrise": 1767196800,
                "sunset": 1767232800,
                "gmt_offset": "-08.00",
            },
        )
        self.assertEqual(
            weather["location"],
            {
                "zip": "94043",
                "city": "Mountain View",
                "state": "California",
                "country": "US",
                "lat": "37.4",
                "lon": "-122.08",
                "timezone": "PST",
                "timezone_long": "America/Los_Angeles",
                "short_name": "Mountain View,California",
                "full_name": "Mountain View, California, United States",
                "gmt_offset": "-08.00",
            },
        )
        self.assertEqual(set(weather["forecast"]), {"daily", "hourly"})

        daily = weather["forecast"]["daily"]
        self.assertEqual(len(daily), 6)
        self.assertEqual(
            daily[0],
            {
                "date": LOCAL_MIDNIGHT,
                "temp_low_c": -2.2,
                "temp_high_c": 14.4,
                "temp_low_f": 28,
                "temp_high_f": 58,
                "humidity": round(sum(hourlyHumidity(h) for h in range(24)) / 24),
                "condition": "Rain",
                "icon": "rain",
            },
        )
        self.assertEqual(
            [day["date"] for day in daily],
            [LOCAL_MIDNIGHT + d * DAY for d in range(6)],
        )
        self.assertEqual(
            [day["icon"] for day in daily],
            ["rain", "sunny", "partlycloudy", "cloudy", "fog", "tstorms"],
        )

        hourly = weather["forecast"]["hourly"]
        self.assertEqual(len(hourly), 48)
        # NOW is 16:00 local, hour 16 of the forecast: the next hour is 17.
        self.assertEqual(
            hourly[0],
            {
                "hour": 1,
                "time": NOW + HOUR,
                "temp_c": hourlyCelsius(17),
                "temp_f": round(hourlyCelsius(17) * 9 / 5 + 32),
                "humidity": hourlyHumidity(17),
            },
        )
        self.assertEqual(
            [hour["time"] for hour in hourly],
            [NOW + n * HOUR for n in range(1, 49)],
        )
        self.assertEqual([hour["hour"] for hour in hourly], list(range(1, 49)))
        for entry in [weather["current"], *daily, *hourly]:
            for name, value in entry.items():
                if name in {"sunrise", "sunset", "date", "time", "hour"}:
                    self.assertIsInstance(value, int, name)
                if name.endswith("_f") or name == "humidity":
                    self.assertIsInstance(value, int, name)

    def test_freshCacheHit(self) -> None:
        """
        Within the time to live a lookup is answered from the cache without
        asking upstream.
        """
        first = self.successResultOf(self.lookup())
        self.clock.advance(TTL_SECONDS - 1)
        self.assertEqual(self.successResultOf(self.lookup()), first)
        self.assertEqual(self.upstream.paths(), [b"/v1/search", b"/v1/forecast"])

    def test_staleCacheRefetches(self) -> None:
        """
        Once the time to live has passed the forecast is fetched again; the
        place is not geocoded again.
        """
        self.successResultOf(self.lookup())
        self.clock.advance(TTL_SECONDS)
        self.successResultOf(self.lookup())
        self.assertEqual(
            self.upstream.paths(),
            [b"/v1/search", b"/v1/forecast", b"/v1/forecast"],
        )

    def test_upstreamErrorServedFromCache(self) -> None:
        """
        When upstream fails, the last answer is served even though it is
        stale, and the failure is logged.
        """
        first = self.successResultOf(self.lookup())
        self.clock.advance(TTL_SECONDS + 1)
        self.upstream.mode = "error"
        with capturedLogs() as events:
            self.assertEqual(self.successResultOf(self.lookup()), first)
        self.assertEqual(len(self.upstream.requests), 3)
        self.assertEqual([event["query"] for event in events], [QUERY])

    def test_upstreamTimeoutServedFromCache(self) -> None:
        """
        An upstream that never answers is given up after five seconds and the
        last answer is served; no timer is left behind.
        """
        first = self.successResultOf(self.lookup())
        self.clock.advance(TTL_SECONDS + 1)
        self.upstream.mode = "hang"
        d = self.lookup()
        self.clock.advance(TIMEOUT_SECONDS - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), first)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_upstreamTimeoutWithoutCache(self) -> None:
        """
        An upstream that never answers, with nothing cached, is a 503 after
        five seconds.
        """
        self.upstream.mode = "hang"
        d = self.lookup()
        self.assertNoResult(d)
        self.clock.advance(TIMEOUT_SECONDS)
        self.stub.flush()
        self.failureResultOf(d, WeatherUnavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_upstreamErrorWithoutCache(self) -> None:
        """
        An upstream error with nothing cached is a 503 "Weather service
        unavailable".
        """
        self.upstream.mode = "error"
        failure = self.failureResultOf(self.lookup(), WeatherUnavailable)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(str(failure.value), "Weather service unavailable")

    def test_unknownPlace(self) -> None:
        """
        A postal code Open-Meteo cannot place is a 503 and is not remembered.
        """
        self.upstream.mode = "nowhere"
        self.failureResultOf(self.lookup(), WeatherUnavailable)
        self.upstream.mode = "ok"
        self.successResultOf(self.lookup())

    def test_concurrentLookupsShareOneFetch(self) -> None:
        """
        Lookups of the same query made while a fetch is under way wait for
        that fetch instead of starting another.
        """
        self.upstream.mode = "hang"
        first, second = self.lookup(), self.lookup()
        self.assertEqual(self.upstream.paths(), [b"/v1/search"])
        self.upstream.release()
        self.stub.flush()
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(self.upstream.paths(), [b"/v1/search", b"/v1/forecast"])

    def test_cancelledLookupLeavesOthers(self) -> None:
        """
        A device that leaves while waiting is dropped from the waiters; the
        others still get the answer, which is cached.
        """
        self.upstream.mode = "hang"
        leaving, staying = self.lookup(), self.lookup()
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.upstream.release()
        self.stub.flush()
        self.successResultOf(staying)
        self.successResultOf(self.lookup())
        self.assertEqual(len(self.upstream.requests), 2)

    def test_emptyQuery(self) -> None:
        """
        An empty query is a 400 "Missing query parameter", asked of nobody.
        """
        error = self.assertRaises(MissingQuery, self.service.lookup, "")
        self.assertEqual(error.status, 400)
        self.assertEqual(str(error), "Missing query parameter")
        self.assertEqual(self.upstream.requests, [])

    def test_noWeather(self) -> None:
        """
        With C{--weather none} every lookup is a 503.
        """
        service = WeatherService(NoWeather(), self.clock)
        failure = self.failureResultOf(service.lookup(QUERY), WeatherUnavailable)
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ParseWeatherQueryTests(SynchronousTestCase):
    """
    L{parseWeatherQuery}.
    """

    def test_query(self) -> None:
        """
        C{query} is taken as sent.
        """
        self.assertEqual(parseWeatherQuery({b"query": [b"94043,US"]}), "94043,US")

    def test_location(self) -> None:
        """
        C{location} stands in for C{query}.
        """
        self.assertEqual(parseWeatherQuery({b"location": [b"SW1A,GB"]}), "SW1A,GB")

    def test_zip(self) -> None:
        """
        C{zip=Z} is the US postal code Z.
        """
        self.assertEqual(parseWeatherQuery({b"zip": [b"94043"]}), "94043,US")

    def test_queryWins(self) -> None:
        """
        C{query} is preferred over C{zip}.
        """
        args = {b"zip": [b"10001"], b"query": [b"94043,US"]}
        self.assertEqual(parseWeatherQuery(args), "94043,US")

    def test_missing(self) -> None:
        """
        No query, or an empty one as a device without a postal code sends, is
        a 400 "Missing query parameter".
        """
        for args in [{}, {b"query": [b""]}]:
            error = self.assertRaises(MissingQuery, parseWeatherQuery, args)
            self.assertEqual(error.status, 400)
            self.assertEqual(str(error), "Missing query parameter")

    def test_badUTF8(self) -> None:
        """
        A query that is not UTF-8 is a 400.
        """
        error = self.assertRaises(BadQuery, parseWeatherQuery, {b"query": [b"\xff"]})
        self.assertEqual(error.status, 400)


class ShapingTests(SynchronousTestCase):
    """
    The small conversions into the device's words.
    """

    def test_clearNight(self) -> None:
        """
        A clear sky shows the sun by day and C{clear} by night.
        """
        self.assertEqual(condition(0, isDay=True), ("Clear", "sunny"))
        self.assertEqual(condition(0, isDay=False), ("Clear", "clear"))

    def test_unknownCode(self) -> None:
        """
        A weather code not in the WMO table still has a known icon.
        """
        self.assertEqual(condition(42), ("Cloudy", "cloudy"))

    def test_gmtOffset(self) -> None:
        """
        Offsets are signed decimal hours with two digits either side.
        """
        self.assertEqual(gmtOffset(-8 * HOUR), "-08.00")
        self.assertEqual(gmtOffset(0), "+00.00")
        self.assertEqual(gmtOffset(19800), "+05.50")

    def test_compassPoint(self) -> None:
        """
        Directions round to the nearest of 16 points, wrapping at north.
        """
        self.assertEqual(compassPoint(0), "N")
        self.assertEqual(compassPoint(350), "N")
        self.assertEqual(compassPoint(247.5), "WSW")
        self.assertEqual(compassPoint(90), "E")
