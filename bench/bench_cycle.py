"""
The server's own cost of one command-with-push and of one put, in one
process: a whole nestproto (L{buildApps}, a real SQLite file, commits
inline) behind the device and control sites exactly as C{service.py} builds
them, reached through Twisted's HTTP parsing and writing over in-memory
transports. No sockets, no threads, no other process: what is measured is
nestproto's and Twisted's Python work for a cycle, which is what a faster
server would have to cut (bench/README.rst, issue 10).

Cycles:

 - C{command}: a thermostat holds a v7 subscribe; C{POST /command}
   C{set_temperature} on the control port; its commit pushes a chunk to the
   held answer; the batch window passes and the answer ends; the thermostat
   subscribes again with the revisions it was pushed, and is held.
 - C{put}: a thermostat puts a new C{target_temperature} with
   C{if_object_revision} on C{/nest/transport/v7/put} and reads its receipt.

Each cycle checks what it got (the chunk and its value, the end of the
answer, a 200 and the next revision), so a figure cannot be of a broken
path. C{--held} other thermostats hold subscribes all along.

It prints microseconds of this thread's CPU per cycle; with C{--callgrind}
it runs itself twice under C{valgrind --tool=callgrind} (C{--cycles} and
twice as many, so start-up cancels) and prints instructions per cycle, and
the C functions that take them (callgrind sees the interpreter, not Python
functions: C{--profile} shows those, by cProfile).

Timers: by default the reactor's own timed calls (Twisted's C{ReactorBase},
a heap) on a time that only the script moves, as a running server's would
cost. C{--task-clock} uses L{twisted.internet.task.Clock} instead, which
sorts its whole list on every C{callLater} and C{reset}: with 1,000 held
subscribes (a timer each) that sort is most of a cycle, and no server runs
on it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_transport import (  # noqa: E402
    PUT_PATH,
    SUBSCRIBE_PATH,
    Device,
    hostHeader,
    serials,
)
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.base import ReactorBase  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogEvent,
    LogLevel,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.web.server import Site  # noqa: E402

from nestproto.admission import AdmissionSettings  # noqa: E402
from nestproto.apps import AppSettings, buildApps  # noqa: E402
from nestproto.collector import COLLECTOR_THRESHOLDS, CollectorService  # noqa: E402
from nestproto.hub import BATCH_SECONDS  # noqa: E402
from nestproto.service import _levelFilter, _site  # noqa: E402
from nestproto.store import SQLiteStore, runInline  # noqa: E402

#: 2026-01-01T00:00:00Z, as the tests start.
START_SECONDS = 1767225600.0
DEVICE_PORT = 8000
CONTROL_PORT = 8082
#: Held subscribes outlive every run: the held set stays the same size.
HOLD_SECONDS = 10.0**9


class ReactorTimers(ReactorBase):
    """
    A reactor's timed calls (its heap, its lazy cancellation), on a time
    that only L{advance} moves; nothing else of a reactor is used.
    """

    def __init__(self, now: float) -> None:
        self.now = now
        super().__init__()

    def installWaker(self) -> None:
        pass

    def seconds(self) -> float:
        return self.now

    def advance(self, amount: float) -> None:
        self.now += amount
        self.runUntilCurrent()


class TaskClock(Clock):
    def __init__(self, now: float) -> None:
        super().__init__()
        self.advance(now)


#: One bound socket whose getsockname stands in for each connection's, so
#: a transport's getHost costs what tcp.Server's does (a system call and an
#: address object).
_SOCKET = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_SOCKET.bind(("127.0.0.1", 0))


class ServerTransport(StringTransport):
    """A StringTransport whose getHost asks a socket, as tcp.Server's does."""

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", *_SOCKET.getsockname())


class Connection:
    """One client connection to C{site}, in memory."""

    def __init__(self, site: Site, index: int, port: int) -> None:
        peer = IPv4Address(
            "TCP", f"192.168.{1 + index // 60000 % 200}.20", 1024 + index % 60000
        )
        self.transport = ServerTransport(peerAddress=peer)
        self.protocol = site.buildProtocol(peer)
        assert self.protocol is not None
        self.protocol.makeConnection(self.transport)
        self.port = port

    def request(self, method: bytes, path: bytes, headers: bytes, body: bytes) -> None:
        self.protocol.dataReceived(
            b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % (method, path, headers, len(body), body)
        )

    def take(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data


class Broken(Exception):
    """A cycle did not do what it claims."""


def check(condition: bool, what: str, data: object = None) -> None:
    if not condition:
        raise Broken(f"{what}: {data!r}"[:2000])


def splitHead(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers (lower-case names) and what follows the head."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    check(bool(sep), "no complete response head", data)
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def chunks(data: bytes) -> list[bytes]:
    """The chunks of a chunked body (the last, empty one included)."""
    found = []
    while data:
        size, sep, data = data.partition(b"\r\n")
        check(bool(sep), "truncated chunk", data)
        length = int(size, 16)
        found.append(data[:length])
        check(data[length : length + 2] == b"\r\n", "bad chunk end", data)
        data = data[length + 2 :]
    return found


def wholeBody(data: bytes) -> tuple[int, bytes]:
    """The status and body of one complete response."""
    status, headers, rest = splitHead(data)
    if headers.get(b"transfer-encoding") == b"chunked":
        parts = chunks(rest)
        check(parts[-1:] == [b""], "response not ended", data)
        return status, b"".join(parts)
    check(len(rest) == int(headers[b"content-length"]), "body length", data)
    return status, rest


class Thermostat(Device):
    """A simulated thermostat on one in-memory connection to the device site."""

    __slots__ = ("conn",)

    def boot(self, site: Site) -> None:
        self.conn = Connection(site, self.index, DEVICE_PORT)
        self.conn.request(b"POST", SUBSCRIBE_PATH, self.authHeaders, self.bootBody())
        status, body = wholeBody(self.conn.take())
        check(status == 200, "boot subscribe", body)
        self.learn(json.loads(body)["objects"])
        check(len(self.objects) >= 2, "boot answer", body)

    def hold(self) -> None:
        self.conn.request(
            b"POST", SUBSCRIBE_PATH, self.authHeaders, self.subscribeBody()
        )
        status, headers, rest = splitHead(self.conn.take())
        check(status == 200 and rest == b"", "held subscribe", (status, rest))
        check(headers.get(b"transfer-encoding") == b"chunked", "not chunked", headers)


def build(
    directory: str, taskClock: bool
) -> tuple[Any, Site, Site, Callable[[float], None]]:
    """The server: its store, the device and control sites, and its time."""
    timers: Any = (TaskClock if taskClock else ReactorTimers)(START_SECONDS)
    store = SQLiteStore.open(os.path.join(directory, "nest.db"), runInline, timers)
    apps = buildApps(
        store,
        timers,
        runInThread=runInline,
        settings=AppSettings(
            holdSeconds=HOLD_SECONDS,
            # As bench_transport: every thermostat comes from one address (0: no cap).
            admission=AdmissionSettings(newSerialsPerHour=0),
        ),
    )
    device = _site(apps.device.app.resource(), tolerant=True)
    control = _site(apps.control.app.resource())
    for site in (device, control):
        # Connection timeouts and the log date on our time, not the global
        # reactor's.
        site.reactor = timers
        site.doStart()
    return store, device, control, timers.advance


#: Log events emitted, by level name.
EVENTS: Counter[str] = Counter()


def logLikeTwistd() -> None:
    """
    Log events as twistd nestproto does at --log-level info, to nowhere;
    count them (by level) on the way.
    """
    sink = open(os.devnull, "w")  # noqa: SIM115 - open for the whole run
    filtered = FilteringLogObserver(
        textFileLogObserver(sink), [_levelFilter(LogLevel.info)]
    )

    def observe(event: LogEvent) -> None:
        EVENTS[event["log_level"].name] += 1
        filtered(event)

    globalLogBeginner.beginLoggingTo(
        [observe], discardBuffer=True, redirectStandardIO=False
    )
    try:
        from nestproto.debuglog import SwitchedLogger
    except ImportError:  # before per-request debug events could be switched off
        return
    # As twistd nestproto at --log-level info: its observer drops debug events.
    SwitchedLogger.debugOn = False


class CommandCycle:
    """Command, push, end of the batch window, subscribe again."""

    def __init__(
        self, device: Site, control: Site, advance: Callable[[float], None]
    ) -> None:
        (serial,) = serials("02BB01AC", 1)
        self.subject = Thermostat(serial, 0, DEVICE_PORT)
        self.subject.boot(device)
        self.subject.hold()
        self.control = Connection(control, 0, CONTROL_PORT)
        self.headers = hostHeader(CONTROL_PORT) + b"Content-Type: application/json\r\n"
        self.advance = advance
        self.n = 0
        self.key = "shared." + serial

    def __call__(self) -> None:
        self.n += 1
        value = 16.0 + (self.n % 80) / 10
        body = b'{"serial":"%s","command":"set_temperature","value":%r}' % (
            self.subject.serial.encode(),
            value,
        )
        self.control.request(b"POST", b"/command", self.headers, body)
        status, answer = wholeBody(self.control.take())
        check(status == 200 and b'"success":true' in answer, "command", answer)
        pushed = chunks(self.subject.conn.take())
        check(len(pushed) == 1, "one chunk pushed", pushed)
        objects = json.loads(pushed[0])["objects"]
        check(
            objects[0]["object_key"] == self.key
            and objects[0]["value"]["target_temperature"] == value,
            "pushed setpoint",
            objects,
        )
        self.subject.learn(objects)
        self.advance(BATCH_SECONDS + 0.001)
        check(self.subject.conn.take() == b"0\r\n\r\n", "answer ended", None)
        self.subject.hold()


class PutCycle:
    """A put with if_object_revision, and its receipt."""

    def __init__(self, device: Site, advance: Callable[[float], None]) -> None:
        (serial,) = serials("02CC01AC", 1)
        self.subject = Thermostat(serial, 1, DEVICE_PORT)
        self.subject.boot(device)
        self.key = "shared." + serial
        self.revision = self.subject.objects[self.key][0]
        self.advance = advance
        self.n = 0

    def __call__(self) -> None:
        self.n += 1
        body = (
            b'{"session":"%s","objects":[{"object_key":"%s","if_object_revision":%d,'
            b'"value":{"target_temperature":%r}}]}'
            % (
                self.subject.session().encode(),
                self.key.encode(),
                self.revision,
                16.0 + (self.n % 80) / 10,
            )
        )
        self.subject.conn.request(b"POST", PUT_PATH, self.subject.authHeaders, body)
        status, answer = wholeBody(self.subject.conn.take())
        check(status == 200, "put", answer)
        receipt = json.loads(answer)["objects"][0]
        check(receipt["object_revision"] == self.revision + 1, "receipt", receipt)
        self.revision = receipt["object_revision"]
        self.advance(0.01)


def setCollector(how: str, timers: Any) -> CollectorService | None:
    """
    The garbage collector as C{--collector} says: as C{twistd nestproto}
    runs it (L{CollectorService}, returned to be stopped), with only its
    thresholds, or as Python's defaults.
    """
    if how == "thresholds":
        gc.set_threshold(*COLLECTOR_THRESHOLDS)
    if how != "server":
        return None
    collector = CollectorService(timers)
    collector.startService()
    return collector


def run(args: argparse.Namespace) -> None:
    logLikeTwistd()
    with tempfile.TemporaryDirectory(prefix="bench-cycle-") as directory:
        store, device, control, advance = build(directory, args.task_clock)
        held = [
            Thermostat(serial, 2 + index, DEVICE_PORT)
            for index, serial in enumerate(serials("02AA01AC", args.held))
        ]
        for thermostat in held:
            thermostat.boot(device)
            thermostat.hold()
        # Once the thermostats are held, as a server in its steady state (the
        # heap's growth while they boot would set off whole-heap collections
        # in the measured cycles). The timers' own advance is bound to them.
        timers = advance.__self__  # type: ignore[attr-defined]
        collector = setCollector(args.collector, timers)
        cycle: Callable[[], None] = (
            CommandCycle(device, control, advance)
            if args.scenario == "command"
            else PutCycle(device, advance)
        )
        for _ in range(args.warmup):
            cycle()
        profile = cProfile.Profile() if args.profile else None
        EVENTS.clear()
        if args.instrument:
            _instrument("on")
        started = time.thread_time()
        if profile is not None:
            profile.enable()
        for _ in range(args.cycles):
            cycle()
        if profile is not None:
            profile.disable()
        spent = time.thread_time() - started
        if args.instrument:
            _instrument("off")
        for thermostat in held:
            check(thermostat.conn.take() == b"", "a held thermostat got data")
        if collector is not None:
            collector.stopService()
        store.close()
    if not args.quiet:
        print(
            json.dumps(
                {
                    "scenario": args.scenario,
                    "held": args.held,
                    "cycles": args.cycles,
                    "timers": "task.Clock" if args.task_clock else "reactor",
                    "us_per_cycle": round(spent / args.cycles * 1e6, 1),
                    "log_events_per_cycle": {
                        level: count / args.cycles for level, count in EVENTS.items()
                    },
                }
            )
        )
    if profile is not None:
        stats = pstats.Stats(profile)
        stats.sort_stats(args.profile).print_stats(60)


def _instrument(state: str) -> None:
    """Turn callgrind's instrumentation of this process on or off."""
    subprocess.run(
        ["callgrind_control", "--instr=" + state, str(os.getpid())],
        check=True,
        capture_output=True,
    )


_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)
_ANNOTATED = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.+?)\s*$")


def callgrind(args: argparse.Namespace) -> None:
    """Run twice under callgrind and print the difference per cycle."""
    with tempfile.TemporaryDirectory(prefix="bench-cycle-cg-") as directory:
        outputs = []
        processes = []
        for cycles in (args.cycles, 2 * args.cycles):
            out = os.path.join(directory, f"callgrind.{cycles}")
            outputs.append(out)
            command = [
                "valgrind",
                "--tool=callgrind",
                # Only the measured cycles are instrumented (much faster).
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--scenario",
                args.scenario,
                "--held",
                str(args.held),
                "--cycles",
                str(cycles),
                "--warmup",
                str(args.warmup),
                "--quiet",
                "--instrument",
            ] + (["--task-clock"] if args.task_clock else [])
            processes.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    # The same dict and set orders in every run.
                    env={**os.environ, "PYTHONHASHSEED": "0"},
                )
            )
        for process in processes:
            _, error = process.communicate()
            if process.returncode:
                sys.exit(error.decode(errors="replace")[-3000:])
        totals = [_total(out) for out in outputs]
        perCycle = (totals[1] - totals[0]) / args.cycles
        print(
            json.dumps(
                {
                    "scenario": args.scenario,
                    "held": args.held,
                    "timers": "task.Clock" if args.task_clock else "reactor",
                    "instructions_per_cycle": round(perCycle),
                    "runs": {
                        str(c): t
                        for c, t in zip(
                            (args.cycles, 2 * args.cycles), totals, strict=True
                        )
                    },
                }
            )
        )
        for inclusive in (True, False):
            costs = [_functions(out, inclusive) for out in outputs]
            difference = {
                name: (costs[1].get(name, 0) - costs[0].get(name, 0)) / args.cycles
                for name in costs[1]
            }
            top = sorted(
                (item for item in difference.items() if not _plumbing(item[0])),
                key=lambda item: -item[1],
            )[: args.top]
            print(f"\n{'inclusive' if inclusive else 'self'} instructions per cycle:")
            for name, cost in top:
                print(f"{cost:12,.0f}  {cost / perCycle:6.1%}  {_shortName(name)}")


#: The interpreter's own frames and calls, the process's start: every Python
#: function passes through them, so their inclusive cost says nothing.
_PLUMBING = re.compile(
    r"ceval|/call\.c|classobject\.c|pycore_|typeobject\.c:(slot_tp_call|type_call)"
    r"|main\.c|pythonrun\.c|libc-start|libc_start|\(below main\)|^\?\?\?:0x"
)


def _plumbing(name: str) -> bool:
    return _PLUMBING.search(name) is not None


def _shortName(name: str) -> str:
    """A function's name without its build directory and library path."""
    name = re.sub(r"^/tmp/python-build[^ ]*?/Python-[0-9.]+/", "", name)
    return re.sub(r" \[[^\]]*/([^/\]]+)\]$", r" [\1]", name)


def _total(path: str) -> int:
    with open(path, "rb") as f:
        found = _TOTALS.findall(f.read())
    return int(found[-1])


def _functions(path: str, inclusive: bool) -> dict[str, int]:
    output = subprocess.run(
        [
            "callgrind_annotate",
            f"--inclusive={'yes' if inclusive else 'no'}",
            "--threshold=100",
            path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: dict[str, int] = {}
    started = False
    for line in output.splitlines():
        if "file:function" in line:
            started = True
            continue
        if not started:
            continue
        match = _ANNOTATED.match(line)
        if match is not None:
            name = match.group(2)
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("command", "put"), default="command")
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--task-clock", action="store_true")
    parser.add_argument(
        "--collector",
        choices=("server", "thresholds", "python"),
        default="server",
        help="the garbage collector as the server runs it (the default), "
        "with only its thresholds (no freezing), or as Python's defaults",
    )
    parser.add_argument(
        "--profile",
        choices=("tottime", "cumulative", "calls"),
        help="cProfile the measured cycles and print the top 30 by this order",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions per cycle (runs --cycles and twice as many)",
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--instrument", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.callgrind:
        callgrind(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
