# -*- test-case-name: tests.test_weather -*-
"""
Weather for C{GET /nest/weather/v1?query=<postal>,<CC>} (PROTOCOL.md §9).

A L{WeatherService} answers from a bounded cache and asks an
L{IWeatherSource} on a miss; L{OpenMeteoSource} is the default source (keyless
Open-Meteo geocoding and forecast APIs), L{NoWeather} the one for
C{--weather none}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from nestproto.errors import BadQuery, MissingQuery, WeatherUnavailable

GEOCODING_URL = "https://geocoding-api.open-meteo.com/v1/search"
FORECAST_URL = "https://api.open-meteo.com/v1/forecast"

#: How many queries (and geocoded places) are remembered; one home needs one.
MAX_CACHED_QUERIES = 1000
#: PROTOCOL.md §9: the firmware shows about six days and 48 hours.
DAILY_DAYS = 6
HOURLY_HOURS = 48

log = Logger()

_K = TypeVar("_K")
_V = TypeVar("_V")


class IWeatherSource(Interface):
    """
    Where weather comes from.
    """

    def fetch(query: str) -> Deferred[dict[str, Any]]:
        """
        Look up the weather for one device query.

        @param query: C{<postal>,<CC>} as the device sends it, e.g. C{94043,US}.
        @return: a L{Deferred} firing with the per-query dict of PROTOCOL.md §9
            (C{current}, C{location}, C{forecast}), or failing.
        """


class UpstreamError(Exception):
    """
    The weather source answered with something other than weather.
    """


@frozen
class _Cached:
    answer: dict[str, Any]
    fetchedAt: float


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """
    Store C{value} under C{key}, dropping the oldest entries past
    L{MAX_CACHED_QUERIES} so no stream of queries grows memory without bound.
    """
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > MAX_CACHED_QUERIES:
        del cache[next(iter(cache))]


def queryArgument(args: dict[bytes, list[bytes]], *names: bytes) -> str | None:
    """
    The first non-empty value among the query arguments C{names}.

    @param args: C{request.args}.
    @raise BadQuery: the value is not UTF-8.
    """
    for name in names:
        for value in args.get(name, []):
            if value:
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadQuery() from None
    return None


def parseWeatherQuery(args: dict[bytes, list[bytes]]) -> str:
    """
    The weather query of a request: C{query}, else C{location}, else C{zip=Z}
    read as C{Z,US} (the C# backend's aliases, PROTOCOL.md §9).

    @param args: C{request.args}.
    @raise MissingQuery: none of them is given.
    @raise BadQuery: the value is not UTF-8.
    """
    query = queryArgument(args, b"query", b"location")
    if query is not None:
        return query
    postal = queryArgument(args, b"zip")
    if postal is not None:
        return postal + ",US"
    raise MissingQuery()


@implementer(IWeatherSource)
class NoWeather:
    """
    The source for C{--weather none}: there is never any weather.
    """

    def fetch(self, query: str) -> Deferred[dict[str, Any]]:
        return fail(WeatherUnavailable())


@define
class WeatherService:
    """
    Weather answers for devices, cached per query.

    A fresh answer (younger than C{ttlSeconds}) comes from the cache. Otherwise
    the source is asked once, however many devices wait for the same query; if
    it fails or takes longer than C{timeoutSeconds} the last answer is served
    even when stale, as the anchor does (PROTOCOL.md §9).
    """

    source: IWeatherSource
    clock: IReactorTime
    ttlSeconds: float = 600
    timeoutSeconds: float = 5
    _cache: dict[str, _Cached] = field(factory=dict, init=False)
    _waiters: dict[str, list[Deferred[dict[str, Any]]]] = field(
        factory=dict, init=False
    )

    def lookup(self, query: str) -> Deferred[dict[str, Any]]:
        """
        The device's weather answer: C{{query: perQueryDict}}. The dict is
        shared with the cache: render it, do not change it.

        @raise MissingQuery: C{query} is empty.
        @return: a L{Deferred} that fails with L{WeatherUnavailable} when there
            is neither a fetched nor a cached answer.
        """
        if not query:
            raise MissingQuery()
        cached = self._cache.get(query)
        if cached is not None and (
            self.clock.seconds() - cached.fetchedAt < self.ttlSeconds
        ):
            return succeed({query: cached.answer})
        fetching = query in self._waiters
        waiters = self._waiters.setdefault(query, [])
        # A device that leaves stops waiting; the fetch goes on to fill the cache.
        waiter: Deferred[dict[str, Any]] = Deferred(lambda d: waiters.remove(d))
        waiters.append(waiter)
        if not fetching:
            self._fetch(query)
        return waiter

    def _fetch(self, query: str) -> None:
        d = maybeDeferred(self.source.fetch, query)
        d.addTimeout(self.timeoutSeconds, self.clock)
        d.addCallbacks(
            self._fetched,
            self._failed,
            callbackArgs=(query,),
            errbackArgs=(query,),
        )
        d.addErrback(lambda f: log.failure("weather for {query}", f, query=query))

    def _fetched(self, answer: dict[str, Any], query: str) -> None:
        _remember(self._cache, query, _Cached(answer, self.clock.seconds()))
        for d in self._waiters.pop(query):
            d.callback({query: answer})

    def _failed(self, reason: Failure, query: str) -> None:
        log.info(
            "weather source failed for {query}: {error}",
            query=query,
            error=reason.getErrorMessage(),
        )
        cached = self._cache.get(query)
        for d in self._waiters.pop(query):
            if cached is None:
                d.errback(WeatherUnavailable())
            else:
                d.callback({query: cached.answer})


@implementer(IWeatherSource)
@define
class OpenMeteoSource:
    """
    Weather from Open-Meteo (U{https://open-meteo.com}), which needs no key.

    The postal code is geocoded once (places do not move), then the forecast
    for that place is fetched in °C and mph and shaped as PROTOCOL.md §9.

    @ivar httpClient: anything with treq's C{get(url, params=...)}: the
        C{treq} module, a L{treq.client.HTTPClient} or a
        L{treq.testing.StubTreq}. Timeouts are the L{WeatherService}'s.
    """

    httpClient: Any
    clock: IReactorTime
    _places: dict[str, dict[str, Any]] = field(factory=dict, init=False)

    def fetch(self, query: str) -> Deferred[dict[str, Any]]:
        postal, _, country = query.partition(",")
        postal, country = postal.strip(), country.strip().upper()
        d = self._place(postal, country)
        d.addCallback(
            lambda place: self._forecast(place).addCallback(
                lambda forecast: nestWeather(
                    postal, country, place, forecast, self.clock.seconds()
                )
            )
        )
        return d

    def _place(self, postal: str, country: str) -> Deferred[dict[str, Any]]:
        key = postal + "," + country
        if key in self._places:
            return succeed(self._places[key])
        params = {"name": postal, "count": "1", "language": "en", "format": "json"}
        if country:
            params["countryCode"] = country

        def found(body: dict[str, Any]) -> dict[str, Any]:
            results = body.get("results") or []
            if not results:
                raise UpstreamError(f"no place found for {key!r}")
            _remember(self._places, key, results[0])
            return results[0]  # type: ignore[no-any-return]

        return self._getJSON(GEOCODING_URL, params).addCallback(found)

    def _forecast(self, place: dict[str, Any]) -> Deferred[dict[str, Any]]:
        params = {
            "latitude": str(place["latitude"]),
            "longitude": str(place["longitude"]),
            "current": "temperature_2m,relative_humidity_2m,weather_code,"
            "wind_speed_10m,wind_direction_10m,is_day",
            "hourly": "temperature_2m,relative_humidity_2m",
            "daily": "weather_code,temperature_2m_max,temperature_2m_min,"
            "sunrise,sunset",
            "timezone": "auto",
            "timeformat": "unixtime",
            "wind_speed_unit": "mph",
            # One day more than shown, so 48 hours ahead fit late in the day.
            "forecast_days": str(DAILY_DAYS + 1),
        }
        return self._getJSON(FORECAST_URL, params)

    def _getJSON(self, url: str, params: dict[str, str]) -> Deferred[dict[str, Any]]:
        def read(response: Any) -> Deferred[dict[str, Any]]:
            if response.code != 200:
                raise UpstreamError(f"{url} answered HTTP {response.code}")
            return response.json()  # type: ignore[no-any-return]

        d: Deferred[dict[str, Any]] = self.httpClient.get(url, params=params)
        return d.addCallback(read)


# WMO weather interpretation codes (Open-Meteo "weather_code") as the Weather
# Underground condition words and icon names the Nest firmware shows.
_CONDITIONS: dict[int, tuple[str, str]] = {
    0: ("Clear", "sunny"),
    1: ("Mostly Clear", "mostlysunny"),
    2: ("Partly Cloudy", "partlycloudy"),
    3: ("Overcast", "cloudy"),
    45: ("Fog", "fog"),
    48: ("Fog", "fog"),
    51: ("Light Drizzle", "rain"),
    53: ("Drizzle", "rain"),
    55: ("Heavy Drizzle", "rain"),
    56: ("Freezing Drizzle", "sleet"),
    57: ("Freezing Drizzle", "sleet"),
    61: ("Light Rain", "rain"),
    63: ("Rain", "rain"),
    65: ("Heavy Rain", "rain"),
    66: ("Freezing Rain", "sleet"),
    67: ("Freezing Rain", "sleet"),
    71: ("Light Snow", "snow"),
    73: ("Snow", "snow"),
    75: ("Heavy Snow", "snow"),
    77: ("Snow Grains", "flurries"),
    80: ("Rain Showers", "chancerain"),
    81: ("Rain Showers", "rain"),
    82: ("Heavy Rain Showers", "rain"),
    85: ("Snow Showers", "chancesnow"),
    86: ("Heavy Snow Showers", "snow"),
    95: ("Thunderstorm", "tstorms"),
    96: ("Thunderstorm with Hail", "tstorms"),
    99: ("Thunderstorm with Hail", "tstorms"),
}
# A code WMO may add later still gets an icon every firmware knows.
_UNKNOWN_CONDITION = ("Cloudy", "cloudy")

_COMPASS = "N NNE NE ENE E ESE SE SSE S SSW SW WSW W WNW NW NNW".split()


def condition(weatherCode: int, isDay: bool = True) -> tuple[str, str]:
    """
    The Nest C{condition} and C{icon} words for a WMO weather code.

    @param isDay: a clear night shows the moon (C{clear}), not the sun.
    """
    words = _CONDITIONS.get(weatherCode, _UNKNOWN_CONDITION)
    if words[1] == "sunny" and not isDay:
        return (words[0], "clear")
    return words


def fahrenheit(celsius: float) -> int:
    """
    Whole degrees Fahrenheit, as the device shows them.
    """
    return round(celsius * 9 / 5 + 32)


def compassPoint(degrees: float) -> str:
    """
    The 16-point compass name (C{WSW}) of a direction in degrees.
    """
    return _COMPASS[round((degrees % 360) / 22.5) % 16]


def gmtOffset(offsetSeconds: int) -> str:
    """
    An offset from UTC as the device's C{gmt_offset}: signed hours, e.g.
    C{-08.00}; fractions of an hour are decimal (C{+05.50} for India).
    """
    return f"{offsetSeconds / 3600:+06.2f}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def nestWeather(
    postal: str,
    country: str,
    place: dict[str, Any],
    forecast: dict[str, Any],
    now: float,
) -> dict[str, Any]:
    """
    Shape an Open-Meteo place and forecast as the per-query dict of
    PROTOCOL.md §9.

    @param place: one Open-Meteo geocoding result.
    @param forecast: an Open-Meteo forecast asked with C{timeformat=unixtime},
        so every time is epoch seconds.
    @param now: epoch seconds; the hourly forecast starts after it.
    """
    current, hourly, daily = forecast["current"], forecast["hourly"], forecast["daily"]
    offset = gmtOffset(forecast["utc_offset_seconds"])
    city = place.get("name", postal)
    state = place.get("admin1", "")
    currentCondition, currentIcon = condition(
        current["weather_code"], bool(current.get("is_day", 1))
    )

    # strict: series of different lengths are a broken answer, not weather.
    hours = list(
        zip(
            hourly["time"],
            hourly["temperature_2m"],
            hourly["relative_humidity_2m"],
            strict=True,
        )
    )
    ahead = [hour for hour in hours if hour[0] > now][:HOURLY_HOURS]

    days = []
    for date, code, high, low in list(
        zip(
            daily["time"],
            daily["weather_code"],
            daily["temperature_2m_max"],
            daily["temperature_2m_min"],
            strict=True,
        )
    )[:DAILY_DAYS]:
        dayHumidity = [h for t, _, h in hours if date <= t < date + 86400]
        dayCondition, dayIcon = condition(code)
        days.append(
            {
                "date": date,
                "temp_low_c": round(low, 1),
                "temp_high_c": round(high, 1),
                "temp_low_f": fahrenheit(low),
                "temp_high_f": fahrenheit(high),
                "humidity": round(
                    _mean(dayHumidity)
                    if dayHumidity
                    else current["relative_humidity_2m"]
                ),
                "condition": dayCondition,
                "icon": dayIcon,
            }
        )

    return {
        "current": {
            "temp_f": fahrenheit(current["temperature_2m"]),
            "temp_c": round(current["temperature_2m"], 1),
            "condition": currentCondition,
            "icon": currentIcon,
            "humidity": round(current["relative_humidity_2m"]),
            "wind_dir": compassPoint(current["wind_direction_10m"]),
            "wind_mph": round(current["wind_speed_10m"]),
            "sunrise": daily["sunrise"][0],
            "sunset": daily["sunset"][0],
            "gmt_offset": offset,
        },
        "location": {
            "zip": postal,
            "city": city,
            "state": state,
            "country": place.get("country_code", country),
            "lat": str(round(place["latitude"], 4)),
            "lon": str(round(place["longitude"], 4)),
            "timezone": forecast.get("timezone_abbreviation", ""),
            "timezone_long": forecast.get("timezone", ""),
            "short_name": f"{city},{state}" if state else city,
            "full_name": ", ".join(
                part for part in (city, state, place.get("country", "")) if part
            ),
            "gmt_offset": offset,
        },
        "forecast": {
            "daily": days,
            "hourly": [
                {
                    "hour": number,
                    "time": time,
                    "temp_c": round(celsius, 1),
                    "temp_f": fahrenheit(celsius),
                    "humidity": round(humidity),
                }
                for number, (time, celsius, humidity) in enumerate(ahead, start=1)
            ],
        },
    }
