#!/usr/bin/env python
"""
Scale-out benchmark (issue 16): three C{twistd -n nestproto} processes on
one PostgreSQL database, simulated thermostats over real TCP; one JSON line
printed per scenario, each figure beside its target.

 - C{held}: N thermostats in total (default 51,000) boot and hold a
   subscribe, spread evenly over the three processes. One client worker
   process per server holds its share (a process may open 20,000 files
   here, so one client could not hold them all).
 - C{push}: commands through the control port of one process for
   thermostats held on another, at C{--push-rate} a second; milliseconds
   from sending a command to its chunk arriving on the held connection
   (both clocks are the machine's CLOCK_MONOTONIC).
 - C{put}: C{--put-devices} thermostats per process put a changing
   C{target_temperature} with C{if_object_revision} in a loop, all three
   processes at once; durable acknowledgements a second in total, errors.

It reuses bench_transport.py's HTTP client and simulated thermostat. Run it
from the project root with psycopg installed; it creates and drops its own
database on C{--server} (see bench/README.rst)::

    python bench/bench_pg.py                                   # full size
    python bench/bench_pg.py --held 3000 --push-seconds 5      # quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_transport as bt  # noqa: E402

TARGETS = {"held": 50000, "push_p99_ms": 50.0, "put_acks_per_s": 2000.0}
PROCESSES = 3


class SharedServer(bt.Server):
    """A twistd nestproto on the shared database."""

    def __init__(self, args: argparse.Namespace, store: str) -> None:
        super().__init__(args)
        self.store = store

    def command(self) -> list[str]:
        return super().command() + ["--store", self.store, "--weather", "none"]


def serverArguments(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        data=None,
        server_profile=args.server_profile,
        gc_watch=args.gc_watch,
        hold_timeout=args.hold_timeout,
        history=True,
        plain_reactor=False,
        max_ready=None,
        mqtt=None,
    )


# The client worker: holds one server's share of thermostats


def watchClientCollections(minimumMs: float = 20.0) -> None:
    """
    Write each of this client's collector pauses of at least C{minimumMs}
    to stderr (one JSON line, CLOCK_MONOTONIC): a pause here delays the
    arrivals the push figures are made of.
    """
    began = [0.0]

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.monotonic()
            return
        ms = (time.monotonic() - began[0]) * 1000
        if ms >= minimumMs:
            row = {"client_gc": info["generation"], "at": round(began[0], 3)}
            print(json.dumps(row | {"ms": round(ms, 1)}), file=sys.stderr)

    gc.callbacks.append(watch)


async def worker(args: argparse.Namespace) -> int:
    bt.raiseFileLimit()
    watchClientCollections()
    devices = [
        bt.Device(serial, index, args.device_port)
        for index, serial in enumerate(bt.serials(args.prefix, args.count))
    ]
    started = time.monotonic()
    bootErrors = await bt.bootAll(devices, args.boot_concurrency)
    booted = time.monotonic()
    holdErrors, _ = await bt.holdAll(
        [d for d in devices if len(d.objects) >= 2], args.connect_concurrency
    )
    held = [d for d in devices if d.holding]
    # Out of this client's own collections from now on: its full collections
    # of 17,000 held devices would delay the arrivals the push figures time.
    gc.freeze()

    def pushed(
        device: bt.Device, objects: list[dict[str, Any]], arrived: float
    ) -> None:
        print(json.dumps({"push": device.serial, "at": time.monotonic()}), flush=True)

    for device in held:
        device.onPush = pushed
    print(
        json.dumps(
            {
                "held": len(held),
                "serials": [d.serial for d in held[: args.report_serials]],
                "boot_errors": len(bootErrors),
                "hold_errors": len(holdErrors),
                "first_errors": (bootErrors + holdErrors)[:3],
                "boot_s": round(booted - started, 1),
                "hold_s": round(time.monotonic() - booted, 1),
            }
        ),
        flush=True,
    )
    # Hold until the parent closes stdin.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    return 0


# The parent


async def startWorker(
    server: SharedServer, index: int, count: int, args: argparse.Namespace
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--worker",
        "--device-port",
        str(server.devicePort),
        "--count",
        str(count),
        "--prefix",
        f"02E{index}01AC",
        "--boot-concurrency",
        str(args.boot_concurrency),
        "--connect-concurrency",
        str(args.connect_concurrency),
        "--report-serials",
        str(args.push_devices),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=2**24,
    )


async def heldScenario(
    servers: list[SharedServer], args: argparse.Namespace
) -> tuple[list[asyncio.subprocess.Process], list[dict[str, Any]]]:
    share = args.held // PROCESSES
    started = time.monotonic()
    workers = [
        await startWorker(server, index, share, args)
        for index, server in enumerate(servers)
    ]
    reports = []
    for process in workers:
        assert process.stdout is not None
        reports.append(json.loads(await process.stdout.readline()))
    held = sum(r["held"] for r in reports)
    subscriptions = [
        await server.waitForSubscriptions(r["held"], 30)
        for server, r in zip(servers, reports, strict=True)
    ]
    bt.emit(
        {
            "scenario": "held",
            "processes": PROCESSES,
            "held": held,
            "held_per_process": [r["held"] for r in reports],
            "server_subscriptions": subscriptions,
            "boot_errors": sum(r["boot_errors"] for r in reports),
            "hold_errors": sum(r["hold_errors"] for r in reports),
            "first_errors": [e for r in reports for e in r["first_errors"]][:3],
            "boot_s": [r["boot_s"] for r in reports],
            "hold_s": [r["hold_s"] for r in reports],
            "seconds": round(time.monotonic() - started, 1),
            "server_rss_mib": [round(s.rssMiB(), 1) for s in servers],
            "target_held": TARGETS["held"],
            "met": held >= TARGETS["held"],
        }
    )
    return workers, reports


async def pushScenario(
    servers: list[SharedServer],
    workers: list[asyncio.subprocess.Process],
    reports: list[dict[str, Any]],
    args: argparse.Namespace,
) -> None:
    arrivals: dict[str, list[float]] = {}

    async def readPushes(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            event = json.loads(line)
            arrivals.setdefault(event["push"], []).append(event["at"])

    readers = [asyncio.ensure_future(readPushes(w)) for w in workers]
    # Commands go to the control port of the next process round.
    targets = [
        (serial, servers[(index + 1) % PROCESSES])
        for index, report in enumerate(reports)
        for serial in report["serials"]
    ]
    connections = {
        server.controlPort: [
            await bt.connect(server.controlPort)
            for _ in range(args.control_connections)
        ]
        for server in servers
    }
    idle = {port: asyncio.Queue[Any]() for port in connections}
    for port, each in connections.items():
        for connection in each:
            idle[port].put_nowait(connection)
    sent: list[tuple[str, float]] = []
    errors: list[str] = []
    heldOn = {
        serial: index
        for index, report in enumerate(reports)
        for serial in report["serials"]
    }

    async def command(serial: str, server: SharedServer, value: float) -> None:
        queue = idle[server.controlPort]
        connection = await queue.get()
        sent.append((serial, time.monotonic()))
        response = await bt._controlRequest(
            connection,
            server.controlPort,
            b"/command",
            {"serial": serial, "command": "set_temperature", "value": value},
        )
        if not response.ok:
            errors.append(f"{response.status} {response.error}")
        if connection.closed:
            connection = await bt.connect(server.controlPort)
        queue.put_nowait(connection)

    if args.gc_watch:
        # Each server logs every reactor stall (a 5 ms heartbeat late by
        # GC_REPORT_MS or more) from here on.
        for server in servers:
            await server.tell("heartbeat 5")
    total = int(args.push_rate * args.push_seconds)
    tasks = []
    started = time.monotonic()
    for n in range(total):
        delay = started + n / args.push_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        serial, server = targets[n % len(targets)]
        value = 21.5 if (n // len(targets)) % 2 == 0 else 22.0
        tasks.append(asyncio.ensure_future(command(serial, server, value)))
    await asyncio.gather(*tasks)
    await asyncio.sleep(2)
    ended = time.monotonic()
    if args.gc_watch:
        for server in servers:
            await server.tell("heartbeat off")
    for reader in readers:
        reader.cancel()
    for each in connections.values():
        for connection in each:
            connection.close()
    # Each command's push is the first arrival for its serial after it.
    latencies: list[float] = []
    slowest: list[tuple[float, float, int]] = []
    missing = 0
    for serial, at in sent:
        later = [t for t in arrivals.get(serial, []) if t >= at]
        if later:
            latencies.append(min(later) - at)
            slowest.append((min(later) - at, at - started, heldOn[serial]))
            arrivals[serial].remove(min(later))
        else:
            missing += 1
    p99 = bt.percentile(latencies, 0.99)
    bt.emit(
        {
            "scenario": "push_across_processes",
            "path": "control POST /command on process i+1, device held on i",
            "commands": total,
            "commands_per_s": round(total / (time.monotonic() - started - 2), 1),
            "command_errors": len(errors),
            "first_errors": errors[:3],
            "pushes_received": len(latencies),
            "pushes_missing": missing,
            "push_ms_p50": bt.ms(bt.percentile(latencies, 0.5)),
            "push_ms_p90": bt.ms(bt.percentile(latencies, 0.9)),
            "push_ms_p99": bt.ms(p99),
            "push_ms_max": bt.ms(max(latencies) if latencies else None),
            # To set beside the servers' collections (--gc-watch): when the
            # window began (CLOCK_MONOTONIC), and the slowest pushes as
            # [s into the window, ms, process holding the thermostat].
            "window_started_at": round(started, 3),
            "slowest": [
                [round(at, 2), bt.ms(latency), index]
                for latency, at, index in sorted(slowest, reverse=True)[:8]
            ],
            "target_push_ms_p99": TARGETS["push_p99_ms"],
            "server_gc_pauses": [s.gcPauses(started, ended) for s in servers],
            "server_stalls": [s.stalls(started, ended) for s in servers]
            if args.gc_watch
            else None,
            "met": p99 is not None
            and p99 * 1000 <= TARGETS["push_p99_ms"]
            and not missing
            and not errors,
        }
    )


def cpuNow(servers: list[SharedServer]) -> dict[str, float]:
    """
    CPU seconds so far of the servers (all three), this client process, and
    the PostgreSQL processes (those alive now: a good guess for a scenario
    whose connections stay open).
    """
    tick = os.sysconf("SC_CLK_TCK")
    database = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        if name.startswith("postgres"):
            fields = rest.split()
            database += int(fields[11]) + int(fields[12])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "servers": sum(s.cpuSeconds() for s in servers),
        "client": usage.ru_utime + usage.ru_stime,
        "postgresql": database / tick,
    }


async def putScenario(servers: list[SharedServer], args: argparse.Namespace) -> None:
    devices = [
        bt.Device(serial, index, server.devicePort)
        for n, server in enumerate(servers)
        for index, serial in enumerate(bt.serials(f"02F{n}01AC", args.put_devices))
    ]
    bootErrors = await bt.bootAll(devices, 50)
    latencies: list[float] = []
    errors: list[str] = []
    conflicts = 0
    deadline = time.perf_counter() + args.put_seconds

    async def putter(device: bt.Device) -> None:
        nonlocal conflicts
        conflicts += await bt.conditionalPuts(device, deadline, latencies, errors)

    cpuBefore = cpuNow(servers)
    started = time.monotonic()
    await asyncio.gather(*(putter(d) for d in devices if len(d.objects) >= 2))
    elapsed = time.monotonic() - started
    cpu = {k: v - cpuBefore[k] for k, v in cpuNow(servers).items()}
    acks = len(latencies) - len(errors)
    bt.emit(
        {
            "scenario": "put",
            "processes": PROCESSES,
            "devices": len(devices),
            "boot_errors": len(bootErrors),
            "seconds": round(elapsed, 2),
            "acks": acks,
            "acks_per_s": round(acks / elapsed, 1),
            "target_acks_per_s": TARGETS["put_acks_per_s"],
            "put_ms_p50": bt.ms(bt.percentile(latencies, 0.5)),
            "put_ms_p99": bt.ms(bt.percentile(latencies, 0.99)),
            "errors": len(errors),
            "first_errors": errors[:3],
            "revision_conflicts": conflicts,
            "cpu_ms_per_ack": {
                k: round(v / max(acks, 1) * 1000, 3) for k, v in cpu.items()
            },
            "load_average": os.getloadavg()[0],
            "met": acks / elapsed >= TARGETS["put_acks_per_s"] and not errors,
        }
    )


async def collectorScenario(servers: list[SharedServer]) -> None:
    """
    With C{--gc-watch}, last: each server's tracked and frozen objects, and
    the cyclic garbage a whole collection then finds, frozen objects
    included (what the collector policy would leak if it never thawed).
    """
    rows = []
    for server in servers:
        census = await server.census() or {}
        (garbage,) = [r for r in await server.tell("garbage") if "garbage" in r]
        rows.append(
            {
                "tracked": census.get("tracked"),
                "frozen": census.get("frozen"),
                "cyclic_garbage": garbage["count"],
                "garbage_kinds": garbage["kinds"],
                "garbage_functions": garbage.get("functions"),
            }
        )
    bt.emit({"scenario": "collector", "servers": rows})


async def run(args: argparse.Namespace) -> int:
    import psycopg

    bt.raiseFileLimit()
    name = "nestproto_bench_" + secrets.token_hex(4)
    with psycopg.connect(args.server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = psycopg.conninfo.conninfo_to_dict(args.server)
    store = "postgresql://{}@{}:{}/{}".format(
        params.get("user", "postgres"),
        params.get("host", "127.0.0.1"),
        params.get("port", 5432),
        name,
    )
    servers = [SharedServer(serverArguments(args), store) for _ in range(PROCESSES)]
    if args.server_profile:
        for index, server in enumerate(servers):
            server.profile = f"{Path(args.server_profile).resolve()}.{index}"
    workers: list[asyncio.subprocess.Process] = []
    try:
        for server in servers:
            await server.start()
        if args.held:
            workers, reports = await heldScenario(servers, args)
            await pushScenario(servers, workers, reports, args)
        if args.put_seconds:
            await putScenario(servers, args)
        if args.gc_watch:
            await collectorScenario(servers)
    finally:
        for process in workers:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
        for server in servers:
            server.stop()
            server.cleanUp(keep=args.gc_watch)
            if args.gc_watch:
                print(f"gc log: {server.gcLog}", file=sys.stderr)
        with psycopg.connect(args.server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.server_profile:
        bt._printProfile(servers[0].profile)
    return 0


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server",
        default="host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        help="libpq DSN of a database to create the bench database from",
    )
    parser.add_argument("--held", type=int, default=51000)
    parser.add_argument("--boot-concurrency", type=int, default=30)
    parser.add_argument("--connect-concurrency", type=int, default=500)
    parser.add_argument("--hold-timeout", type=float, default=290.0)
    parser.add_argument("--push-devices", type=int, default=300)
    parser.add_argument("--push-rate", type=float, default=50.0)
    parser.add_argument("--push-seconds", type=float, default=10.0)
    parser.add_argument("--control-connections", type=int, default=4)
    parser.add_argument("--put-devices", type=int, default=50)
    parser.add_argument("--put-seconds", type=float, default=10.0)
    parser.add_argument(
        "--server-profile",
        help="cProfile each server into this path plus .0, .1, .2; print the first",
    )
    parser.add_argument(
        "--gc-watch",
        action="store_true",
        help="log each server's garbage collections (gc.jsonl in its data directory)",
    )
    # The worker's own arguments.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--report-serials", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(sys.argv[1:] if argv is None else argv)
    return asyncio.run(worker(args) if args.worker else run(args))


if __name__ == "__main__":
    sys.exit(main())
