# -*- test-case-name: tests.test_startup,tests.test_backup,tests.test_service -*-
"""
A real C{twistd -n nestproto} in a subprocess, run from the source tree:
start it, read what it logs as it logs it, reach its ports, stop it.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .helpers import basicAuth

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: twistd as a Python program, so the test runs the source tree's plugin.
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)

# Linux capabilities (linux/capability.h) and prctl's PR_CAPBSET_DROP.
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_NET_BIND_SERVICE = 10
_PR_CAPBSET_DROP = 24


def withoutCapabilities(*capabilities: int) -> Callable[[], None]:
    """
    A C{preexec_fn} that drops C{capabilities} from the bounding set, so
    the program it executes runs without them even as root: a test run as
    root can still meet a privileged port or a read-only directory.
    """

    def drop() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in capabilities:
            if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return drop


def unprivileged(case: SynchronousTestCase, *capabilities: int) -> dict[str, object]:
    """
    C{Popen} arguments that run a program without C{capabilities}: none
    when the tests do not run as root, a capability drop when they do.

    @raise SkipTest: running as root where capabilities cannot be dropped.
    """
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run(
        [sys.executable, "-c", "pass"],
        preexec_fn=withoutCapabilities(*capabilities),
        capture_output=True,
    )
    if probe.returncode != 0:
        raise SkipTest(
            "running as root and cannot drop capabilities: "
            + probe.stderr.decode(errors="replace")
        )
    return {"preexec_fn": withoutCapabilities(*capabilities)}


class Twistd:
    """
    One C{twistd -n nestproto} process, in the test's working directory.
    Its stdout (the log) and stderr are read line by line as they come; the
    test case's cleanup ends it.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        *arguments: str,
        twistdOptions: Sequence[str] = ("-n",),
        **popen: object,
    ) -> None:
        """
        @param arguments: C{nestproto}'s options.
        @param twistdOptions: twistd's own, before C{nestproto}.
        """
        self.process = subprocess.Popen(
            [sys.executable, "-c", TWISTD, "--pidfile=", *twistdOptions, "nestproto"]
            + list(arguments),
            # In the test's directory, as relative paths from mktemp are.
            env=dict(os.environ, PYTHONPATH=PROJECT_ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **popen,  # type: ignore[call-overload]
        )
        self.started = time.monotonic()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in [
                (self.process.stdout, self.stdout),
                (self.process.stderr, self.stderr),
            ]
        ]
        for reader in self._readers:
            reader.start()
        case.addCleanup(self.kill)

    def _read(self, stream: object, lines: list[str]) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything it has written so far, stdout then stderr."""
        with self._changed:
            return "\n".join(self.stdout + self.stderr)

    def waitFor(
        self, pattern: str | re.Pattern[str], timeout: float = 10
    ) -> re.Match[str]:
        """
        The first match of C{pattern} in a line of its log.

        @raise AssertionError: none within C{timeout} seconds, or the
            process ended without one.
        """
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.stdout:
                    found = compiled.search(line)
                    if found is not None:
                        return found
                ended = self.process.poll() is not None and not any(
                    reader.is_alive() for reader in self._readers
                )
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    raise AssertionError(
                        f"no log line matched {compiled.pattern!r}:\n{self.output}"
                    )
                self._changed.wait(min(left, 0.1))

    def ports(self) -> dict[str, int]:
        """The device and control ports, once it listens on both."""
        return {
            name: int(
                self.waitFor(rf"{name} endpoint listening on 127\.0\.0\.1:(\d+)")[1]
            )
            for name in ("device", "control")
        }

    def wait(self, timeout: float = 10) -> int:
        """Its exit status, once it has ended and its output is read."""
        status: int = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return status

    def stop(self, timeout: float = 10) -> int:
        """End it with SIGTERM, as a service manager does; its status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


#: Listen on a free loopback port.
LOOPBACK_ANY = "tcp:0:interface=127.0.0.1"


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A JSON request: its status and its decoded JSON answer, also for errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            contentType = e.headers.get("Content-Type", "")
            assert contentType.startswith("application/json"), contentType
            return e.code, json.loads(e.read())


def thermostatReports(device: str, serial: str) -> tuple[int, Any]:
    """
    A heat-only thermostat puts its shared and device buckets over v7 to the
    device port at C{device}; the status and the receipts.
    """
    return http(
        "POST",
        f"{device}/nest/transport/v7/put",
        {
            "session": "s",
            "objects": [
                {
                    "object_key": f"shared.{serial}",
                    "value": {
                        "target_temperature": 20.0,
                        "target_temperature_type": "heat",
                        "can_heat": True,
                        "can_cool": False,
                    },
                },
                {"object_key": f"device.{serial}", "value": {"current_humidity": 41}},
            ],
        },
        {**basicAuth(serial), "X-nl-protocol-version": "1"},
    )


def loopbackServer(
    case: SynchronousTestCase,
    data: str,
    *options: str,
    twistdOptions: Sequence[str] = ("-n",),
) -> tuple[Twistd, int, int]:
    """
    A C{twistd nestproto} on C{data} listening on free loopback ports, with
    no weather source and C{options}: it, and its device and control ports.
    """
    server = Twistd(
        case,
        "--data",
        data,
        "--device",
        LOOPBACK_ANY,
        "--control",
        LOOPBACK_ANY,
        "--weather",
        "none",
        *options,
        twistdOptions=twistdOptions,
    )
    ports = server.ports()
    return server, ports["device"], ports["control"]
