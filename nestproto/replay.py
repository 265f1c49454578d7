# -*- test-case-name: tests.test_fixtures -*-
"""
C{python -m nestproto.replay FIXTURE... [--against URL]}: replay recorded
exchanges and check every answer (the logic is in L{nestproto.recording}).

Without C{--against}, each fixture runs against a fresh in-memory server
on a clock the replay advances, so hours of holds replay at once. With it,
requests go over TCP to a running server, in real time.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from .recording.format import Fixture, FixtureError, loadFixture
from .recording.replayer import Replayer, ReplayResult, replayInMemory
from .recording.targets import TCPTarget


class Options(usage.Options):
    """Command-line options of C{python -m nestproto.replay}."""

    optFlags: list[list[Any]] = [
        [
            "force",
            None,
            "With --against: replay even though the server already has devices.",
        ],
    ]

    synopsis = (
        "Usage: python -m nestproto.replay FIXTURE... "
        "[--against URL [--force]] [--control URL] [--tolerance SECONDS]"
    )
    # Plain text: usage.Options shows the module docstring (epytext) when
    # there is no longdesc.
    longdesc = (
        "Replay recorded exchanges and check every answer. Without --against, "
        "each fixture runs against a fresh in-memory server whose clock the "
        "replay advances, so hours of holds replay at once. With it, requests "
        "go over TCP to a running server, in real time; that server must have "
        "no devices yet (the replay leaves its devices behind), unless --force."
    )
    optParameters: list[list[Any]] = [
        [
            "against",
            None,
            None,
            "Device port of a running server, e.g. http://127.0.0.1:8000 "
            "(default: a fresh in-memory server per fixture).",
        ],
        [
            "control",
            None,
            None,
            "Control port of that server, for control exchanges "
            "(default: the --against host on port 8082).",
        ],
        [
            "control-token",
            None,
            None,
            "Bearer token of that control port, for recorded control exchanges "
            "(recordings keep no token).",
        ],
        [
            "tolerance",
            None,
            None,
            "Seconds a chunk or end may be early or late "
            "(default 0.01 in memory, 0.5 over TCP).",
            float,
        ],
    ]

    def parseArgs(self, *fixtures: str) -> None:
        if not fixtures:
            raise usage.UsageError("name at least one fixture file")
        self["fixtures"] = list(fixtures)

    def postOptions(self) -> None:
        against = self["against"]
        if against is not None and self["control"] is None:
            from hyperlink import URL

            url = URL.from_text(against)
            self["control"] = url.replace(port=8082, path=()).to_text()
        if self["tolerance"] is None:
            self["tolerance"] = 0.01 if against is None else 0.5


def optionsFirst(argv: Sequence[str]) -> list[str]:
    """
    C{argv} with its options moved before the fixture names: the synopsis
    puts them after, and getopt stops at the first name.
    """
    takesValue = {f"--{name}" for name, *rest in Options.optParameters}
    options: list[str] = []
    names: list[str] = []
    arguments = list(argv)
    while arguments:
        argument = arguments.pop(0)
        if argument == "--":
            names.extend(arguments)
            break
        if argument.startswith("-") and argument != "-":
            options.append(argument)
            if argument in takesValue and arguments:
                options.append(arguments.pop(0))
        else:
            names.append(argument)
    return options + ["--", *names] if names else options


def loadAll(paths: Sequence[str], out: TextIO) -> list[Fixture] | None:
    """Every fixture, or C{None} after printing the first unreadable one."""
    fixtures = []
    for path in paths:
        try:
            fixtures.append(loadFixture(path))
        except FixtureError as e:
            out.write(f"error: {e}\n")
            return None
    return fixtures


def report(results: Sequence[ReplayResult], out: TextIO) -> int:
    """Print each mismatch and a progress line; the exit status."""
    for result in results:
        for line in result.describe():
            out.write(line + "\n")
    replayed = sum(result.replayed for result in results)
    matched = sum(result.matched for result in results)
    failed = sum(result.failed for result in results)
    out.write(
        f"{len(results)} fixtures: replayed {replayed}, matched {matched}, "
        f"failed {failed}\n"
    )
    return 0 if all(result.ok for result in results) else 1


async def refusal(reactor: Any, options: Options) -> str | None:
    """
    Why the server C{options} name must not be replayed against, or
    C{None}: a replay expects a fresh server, and leaves the devices it
    plays (claimed ones included) behind in it, so a server that already
    has devices is refused, and so is one whose devices cannot be counted.
    """
    control = options["control"]
    headers: dict[bytes | str, bytes | str] = {}
    if options["control-token"] is not None:
        headers["Authorization"] = f"Bearer {options['control-token']}"
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    url = control.rstrip("/") + "/api/devices"
    try:
        response = await client.get(url, headers=headers)
        body = await treq.content(response)
    except Exception as e:
        return (
            f"cannot count the devices of the server at {url} ({e}); name its "
            "control port with --control, or give --force"
        )
    finally:
        await pool.closeCachedConnections()
    try:
        total = int(json.loads(body)["total"]) if response.code == 200 else None
    except (ValueError, KeyError, TypeError):
        total = None
    if total is None:
        hint = " (give --control-token)" if response.code == 401 else ""
        return (
            f"cannot count the devices of the server at {url}: it answered "
            f"{response.code}{hint}; or give --force"
        )
    if total:
        return (
            f"the server at {control} already has {total} device(s); a replay "
            "expects a fresh server and leaves its own devices behind in it. "
            "Replay against a fresh server, or give --force"
        )
    return None


def replayOverTCP(
    reactor: Any, fixtures: Sequence[Fixture], options: Options
) -> Deferred[list[ReplayResult]]:
    """Replay C{fixtures} one after the other against a running server."""

    async def run() -> list[ReplayResult]:
        results = []
        for fixture in fixtures:
            target = TCPTarget(reactor, options["against"], options["control"])
            replayer = Replayer(
                target,
                fixture,
                options["tolerance"],
                controlToken=options["control-token"],
            )
            results.append(await replayer.run())
        return results

    return Deferred.fromCoroutine(run())


def runAgainst(
    reactor: Any, fixtures: Sequence[Fixture], options: Options, out: TextIO
) -> Deferred[int]:
    """
    Replay C{fixtures} against the running server C{options} name, unless
    it already has devices and C{--force} is not given; the exit status.
    """

    async def run() -> int:
        if not options["force"]:
            refused = await refusal(reactor, options)
            if refused is not None:
                out.write(f"error: {refused}\n")
                return 2
        return report(await replayOverTCP(reactor, fixtures, options), out)

    return Deferred.fromCoroutine(run())


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    """Run the command line; the exit status."""
    options = Options()
    try:
        options.parseOptions(optionsFirst(argv))
    except usage.UsageError as e:
        out.write(f"{options}\nerror: {e}\n")
        return 2
    fixtures = loadAll(options["fixtures"], out)
    if fixtures is None:
        return 2
    if options["against"] is None:
        results = [
            replayInMemory(fixture, tolerance=options["tolerance"])
            for fixture in fixtures
        ]
        return report(results, out)

    from twisted.internet.task import react

    status: list[int] = []

    def runAll(reactorArg: Any) -> Deferred[None]:
        return runAgainst(reactorArg, fixtures, options, out).addCallback(status.append)

    try:
        react(runAll, [])
    except SystemExit:
        pass
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
