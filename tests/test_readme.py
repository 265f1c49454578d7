# -*- test-case-name: tests.test_readme -*-
"""
README.rst's two commands stay true: CI runs the very test command it gives.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from .twistd import loopbackServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def readmeCommands() -> list[str]:
    """The indented command lines of README.rst that create a venv."""
    return [
        line.strip()
        for line in _read("README.rst").splitlines()
        if line.startswith("    python3 -m venv")
    ]


class ReadmeTests(SynchronousTestCase):
    def test_twoCommands(self) -> None:
        """README gives one command that runs the server and one that tests."""
        commands = readmeCommands()
        self.assertEqual(len(commands), 2)
        self.assertIn("pip install . && twistd ", commands[0])
        self.assertIn("python -m twisted.trial tests", commands[1])

    def test_ciRunsTheReadmeTestCommand(self) -> None:
        """.ci/run contains README's test command verbatim."""
        self.assertIn(f"( {readmeCommands()[1]} )", _read(".ci/run"))

    def test_runCommandServes(self) -> None:
        """
        README's twistd command, given free loopback ports, a fresh data
        directory and no weather, serves on nestproto's reactor.
        """
        words = readmeCommands()[0].split("&& twistd ", 1)[1].split()
        self.assertEqual(words[-1], "nestproto")
        server, device, _ = loopbackServer(
            self, self.mktemp(), twistdOptions=words[:-1]
        )
        with urllib.request.urlopen(
            f"http://127.0.0.1:{device}/nest/ping", timeout=10
        ) as response:
            self.assertEqual(response.status, 200)
        if sys.platform == "linux":
            server.waitFor(r"reactor: epoll, at most 250 ready connections a pass")
        self.assertIn(server.stop(), (0, -15))
