# -*- test-case-name: tests.test_readme -*-
"""
README.rst's two commands stay true: CI runs the very test command it gives.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

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
        self.assertTrue(commands[0].endswith("pip install . && twistd -n nestproto"))
        self.assertIn("python -m twisted.trial tests", commands[1])

    def test_ciRunsTheReadmeTestCommand(self) -> None:
        """.ci/run contains README's test command verbatim."""
        self.assertIn(f"( {readmeCommands()[1]} )", _read(".ci/run"))
