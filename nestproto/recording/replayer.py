# -*- test-case-name: tests.test_fixtures,tests.test_replay_all -*-
"""
The replayer: plays a fixture's exchanges against a L{ReplayTarget} at
their recorded times and checks every answer (status, headers, each chunk
and its time, the end) against the recording.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import quote

import treq
from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from ..device.jsonp import parseScript
from .bindings import Bindings
from .compare import (
    Mismatch,
    compareDocuments,
    compareHeaders,
    compareScripts,
)
from .format import CONTROL, Exchange, Fixture, decodeBody, splitDocuments
from .redaction import QUERY_AUTHORIZATION, REDACTED_PASSWORD
from .targets import MemoryTarget, ReplayTarget, ServerFactory, memoryServer


@frozen
class ReplayResult:
    """The outcome of replaying one fixture."""

    path: str
    replayed: int
    matched: int
    mismatches: tuple[Mismatch, ...]

    @property
    def failed(self) -> int:
        return self.replayed - self.matched

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.failed == 0

    def describe(self) -> list[str]:
        """One line per mismatch."""
        return [mismatch.describe(self.path) for mismatch in self.mismatches]


@define(eq=False)
class _Live:
    """One exchange being replayed."""

    exchange: Exchange
    request: Deferred[Any] | None = None
    response: Any = None
    headersAt: float | None = None
    buffer: bytes = b""
    raw: bytes = b""
    documents: list[tuple[float, Any]] = field(factory=list)
    end: float | None = None
    failure: str | None = None
    headersChecked: bool = False
    checked: int = 0
    bodyChecked: bool = False

    @property
    def finished(self) -> bool:
        return self.end is not None or self.failure is not None


def _finished(live: _Live) -> bool:
    return live.finished


def _happenedBy(live: _Live, moment: float) -> list[Callable[[], bool]]:
    """What of C{live}'s recorded answer had happened by C{moment}."""
    exchange = live.exchange
    if exchange.end is not None and exchange.end <= moment:
        return [partial(_finished, live)]
    conditions: list[Callable[[], bool]] = []
    if exchange.headersAt is not None and exchange.headersAt <= moment:
        conditions.append(lambda: live.response is not None or live.finished)
    arrived = len([chunk for chunk in exchange.chunks if chunk.at <= moment])
    if arrived:
        conditions.append(lambda: len(live.documents) >= arrived or live.finished)
    return conditions


def _comparedHeaders(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a replay compares, by lowercase name."""
    lowered = {name.lower(): value for name, value in headers.items()}
    return {
        name: value
        for name, value in lowered.items()
        if name.startswith("x-nl-") or name == "content-type"
    }


@define
class Replayer:
    """
    Plays one fixture against a L{ReplayTarget} and compares each answer
    with the recording.

    @ivar tolerance: seconds by which a chunk or an end may be early or late.
    @ivar controlToken: sent as C{Authorization: Bearer} on control
        exchanges recorded with a (redacted) token, and put back into the
        C{/k/<token>/} path prefix of those recorded under it (without a
        token the prefix is taken off).
    """

    target: ReplayTarget
    fixture: Fixture
    tolerance: float = 0.01
    bindings: Bindings = field(factory=Bindings)
    controlToken: str | None = None
    _start: float = field(default=0.0, init=False)
    _lives: list[_Live] = field(factory=list, init=False)
    _mismatches: list[Mismatch] = field(factory=list, init=False)

    def run(self) -> Deferred[ReplayResult]:
        """Replay the whole fixture; fires with the result."""
        return Deferred.fromCoroutine(self._run())

    def _now(self) -> float:
        return self.target.clock.seconds() - self._start

    async def _run(self) -> ReplayResult:
        self._start = self.target.clock.seconds()
        self.bindings.shiftMs = int(round(self._start * 1000)) - int(
            self.fixture.header["startMs"]
        )
        exchanges = self.fixture.exchanges
        times = set()
        for exchange in exchanges:
            times.add(exchange.start)
            times.update(chunk.at for chunk in exchange.chunks)
            for moment in (exchange.end, exchange.lost, exchange.headersAt):
                if moment is not None:
                    times.add(moment)
        livesByNumber: dict[int, _Live] = {}
        try:
            for moment in sorted(times):
                await self.target.settle(self._start + moment)
                self._check()
                for exchange in exchanges:
                    if exchange.start == moment:
                        await self._before(exchange)
                        live = self._issue(exchange)
                        livesByNumber[exchange.number] = live
                        self.target.flush()
                        self._check()
                    if exchange.lost == moment and exchange.number in livesByNumber:
                        self._lose(livesByNumber[exchange.number])
                        self.target.flush()
            ending = [
                partial(_finished, live)
                for live in self._lives
                if live.exchange.end is not None or live.exchange.lost is not None
            ]
            await self.target.awaitAll(ending, self.tolerance + 5)
            self.target.flush()
            self._check()
            for live in self._lives:
                self._checkEnd(live)
        finally:
            for live in self._lives:
                if not live.finished:
                    self._lose(live)
            self.target.flush()
            self.target.close()
        failed = {mismatch.exchange for mismatch in self._mismatches}
        return ReplayResult(
            self.fixture.path,
            len(self._lives),
            len([live for live in self._lives if live.exchange.number not in failed]),
            tuple(self._mismatches),
        )

    async def _before(self, exchange: Exchange) -> None:
        # What had happened when this request started in the recording must
        # have happened in the replay too: answers ended (a device
        # resubscribes after an answer), headers sent (a subscribe is held
        # before the command that pushes to it), chunks received.
        conditions = [
            condition
            for live in self._lives
            for condition in _happenedBy(live, exchange.start)
        ]
        await self.target.awaitAll(conditions, self.tolerance + 5)
        self._check()

    def _mismatch(
        self, exchange: Exchange, where: str, recorded: Any, replayed: Any
    ) -> None:
        self._mismatches.append(Mismatch(exchange.number, where, recorded, replayed))

    def _issue(self, exchange: Exchange) -> _Live:
        live = _Live(exchange)
        self._lives.append(live)
        body = exchange.requestBody
        if body is not None and "json" in body:
            data = json.dumps(
                self.bindings.request(body["json"]), separators=(",", ":")
            ).encode("utf-8")
        else:
            data = decodeBody(body)
        headers = {
            name.lower(): value
            for name, value in exchange.requestHeaders.items()
            if name.lower() != "content-length"
        }
        if headers.get("authorization") == f"Bearer {REDACTED_PASSWORD}":
            if self.controlToken is None:
                del headers["authorization"]
            else:
                headers["authorization"] = f"Bearer {self.controlToken}"
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic" and token in self.bindings.tokens:
            headers["authorization"] = f"Basic {self.bindings.tokens[token]}"
        path = QUERY_AUTHORIZATION.sub(
            lambda match: (
                match.group(1)
                + quote(
                    self.bindings.tokens.get(match.group(2), match.group(2)), safe=""
                )
            ),
            exchange.path,
        )
        secretPath = f"/k/{REDACTED_PASSWORD}/"
        if exchange.kind == CONTROL and path.startswith(secretPath):
            rest = path[len(secretPath) - 1 :]
            if self.controlToken is None:
                path = rest
            else:
                path = f"/k/{quote(self.controlToken, safe='')}{rest}"
        try:
            d = self.target.request(exchange.kind, exchange.method, path, headers, data)
        except Exception as e:
            live.failure = str(e)
            self._mismatch(exchange, "request", "sent", str(e))
            return live
        live.request = d

        def arrived(response: Any) -> Deferred[None]:
            live.response = response
            live.headersAt = self._now()

            def collect(data: bytes) -> None:
                live.raw += data
                documents, live.buffer = splitDocuments(live.buffer + data)
                at = self._now()
                live.documents.extend((at, document) for document in documents)

            return treq.collect(response, collect)

        def ended(ignored: None) -> None:
            live.end = self._now()

        def failed(failure: Failure) -> None:
            live.failure = failure.getErrorMessage() or repr(failure.value)

        d.addCallback(arrived).addCallbacks(ended, failed)
        return live

    def _lose(self, live: _Live) -> None:
        if live.finished:
            return
        if live.response is None:
            if live.request is not None:
                live.request.cancel()
            return
        original = getattr(live.response, "original", live.response)
        transport = getattr(original, "_transport", None)
        if transport is not None:
            transport.loseConnection()
        else:
            live.failure = "lost"

    def _check(self) -> None:
        for live in self._lives:
            self._checkLive(live)

    def _checkLive(self, live: _Live) -> None:
        exchange = live.exchange
        if live.response is not None and not live.headersChecked:
            live.headersChecked = True
            self._checkHeaders(live)
        if not self._jsonBodies(exchange):
            # A body that is not JSON documents is compared whole, once it
            # has all come (a JSONP answer binds values later requests use).
            if live.end is not None and not live.bodyChecked:
                self._checkBody(live)
            return
        while live.checked < len(live.documents):
            index = live.checked
            live.checked += 1
            at, document = live.documents[index]
            label = f"chunk {index + 1}"
            if index >= len(exchange.chunks):
                self._mismatch(exchange, f"{label} (unexpected)", None, document)
                continue
            chunk = exchange.chunks[index]
            assert chunk.body is not None
            for where, recorded, replayed in compareDocuments(
                chunk.body["json"],
                document,
                self.bindings,
                codeField=exchange.path.split("?")[0]
                .rstrip("/")
                .endswith("passphrase"),
            ):
                self._mismatch(exchange, f"{label} {where}", recorded, replayed)
            if abs(at - chunk.at) > self.tolerance:
                self._mismatch(exchange, f"{label} time (s)", chunk.at, round(at, 6))

    @staticmethod
    def _jsonBodies(exchange: Exchange) -> bool:
        return all(c.body is not None and "json" in c.body for c in exchange.chunks)

    def _checkHeaders(self, live: _Live) -> None:
        exchange = live.exchange
        response = live.response
        if exchange.status is not None and response.code != exchange.status:
            self._mismatch(exchange, "status", exchange.status, response.code)
        assert live.headersAt is not None
        recorded = _comparedHeaders(exchange.responseHeaders)
        replayed = _comparedHeaders(
            {
                name.decode("latin-1"): values[-1].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
            }
        )
        # The bucket's revision and timestamp the server made up
        # (PROTOCOL.md §20.3) are bound like the body's, per key.
        for where, ours, theirs in compareHeaders(
            recorded,
            replayed,
            self.bindings,
            self._nowMs(live.headersAt),
            slackMs=self.tolerance * 1000,
        ):
            self._mismatch(exchange, where, ours, theirs)
        chunked = response.length is UNKNOWN_LENGTH
        if exchange.status is not None and exchange.chunked != chunked:
            self._mismatch(exchange, "chunked", exchange.chunked, chunked)
        if exchange.headersAt is not None and live.headersAt is not None:
            if abs(live.headersAt - exchange.headersAt) > self.tolerance:
                self._mismatch(
                    exchange,
                    "headers time (s)",
                    exchange.headersAt,
                    round(live.headersAt, 6),
                )

    def _checkBody(self, live: _Live) -> None:
        """
        A body that is not JSON documents: a JSONP answer (PROTOCOL.md
        §20.6) compared symbolically, anything else byte for byte.
        """
        live.bodyChecked = True
        exchange = live.exchange
        recorded = b"".join(decodeBody(chunk.body) for chunk in exchange.chunks)
        text = recorded.decode("utf-8", "replace")
        replayed = live.raw.decode("utf-8", "replace")
        if parseScript(text) is not None and all(
            chunk.body and "text" in chunk.body for chunk in exchange.chunks
        ):
            # Written with its headers: its service time is theirs.
            moment = self._now() if live.headersAt is None else live.headersAt
            for where, ours, theirs in compareScripts(
                text,
                replayed,
                self.bindings,
                self._nowMs(moment),
                self.tolerance * 1000,
            ):
                self._mismatch(exchange, f"body {where}", ours, theirs)
        elif recorded != live.raw:
            self._mismatch(exchange, "body", text, replayed)

    def _nowMs(self, moment: float) -> float:
        """The replay clock at C{moment} (an offset, s), in ms."""
        return (self._start + moment) * 1000

    def _checkEnd(self, live: _Live) -> None:
        exchange = live.exchange
        if exchange.lost is not None:
            return
        if live.failure is not None and exchange.end is not None:
            self._mismatch(exchange, "response", "complete", live.failure)
            return
        if self._jsonBodies(exchange):
            if live.buffer.strip():
                self._mismatch(
                    exchange,
                    "body (trailing bytes)",
                    None,
                    live.buffer.decode("utf-8", "replace"),
                )
            for index in range(len(live.documents), len(exchange.chunks)):
                chunk = exchange.chunks[index]
                assert chunk.body is not None
                self._mismatch(
                    exchange, f"chunk {index + 1} (missing)", chunk.body["json"], None
                )
        elif not live.bodyChecked:
            self._checkBody(live)
        if exchange.end is None:
            if live.end is not None:
                self._mismatch(
                    exchange, "end (recorded still open)", None, round(live.end, 6)
                )
        elif live.end is None:
            self._mismatch(exchange, "end (s)", exchange.end, None)
        elif abs(live.end - exchange.end) > self.tolerance:
            self._mismatch(exchange, "end (s)", exchange.end, round(live.end, 6))


def replayInMemory(
    fixture: Fixture,
    serverFactory: ServerFactory = memoryServer,
    startSeconds: float | None = None,
    tolerance: float = 0.01,
) -> ReplayResult:
    """
    Replay C{fixture} against a fresh in-memory server, synchronously.

    @param startSeconds: the replay clock's start; by default the
        recording's, so device-supplied times mean what they meant.
    """
    start = fixture.startSeconds if startSeconds is None else startSeconds
    target = MemoryTarget(start, serverFactory)
    d = Replayer(target, fixture, tolerance).run()
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError(f"{fixture.path}: the in-memory replay did not finish")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    result: ReplayResult = results[0]
    return result
