# -*- test-case-name: tests.test_help -*-
"""
The command-line help of every nestproto command: plain text (no epytext
markup from a docstring), and any PROTOCOL.md section it cites exists.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from nestproto import __main__ as nestprotoMain
from nestproto import backup, restore
from nestproto.service import Options as ServerOptions

from .twistd import PROJECT_ROOT, TWISTD

#: The sections of PROTOCOL.md (its headings).
PROTOCOL_SECTIONS = frozenset(
    [str(n) for n in range(1, 21)]
    + [f"2.{n}" for n in range(1, 4)]
    + [f"6.{n}" for n in range(1, 6)]
    + [f"7.{n}" for n in range(1, 4)]
    + [f"10.{n}" for n in range(1, 8)]
    + [f"11.{n}" for n in range(1, 7)]
    + [f"16.{n}" for n in range(1, 7)]
    + [f"20.{n}" for n in range(1, 8)]
)
#: Epytext markup (C{code}, L{link}, I{italic}, B{bold}, fields).
_MARKUP = re.compile(r"\b[CLIBUEMXS]\{|^\s*@\w+", re.MULTILINE)
_CITED = re.compile(r"§\s*(\d+(?:\.\d+)?)|sections? (\d+(?:\.\d+)?)")


def _argparseHelp(main: Callable[[list[str]], int]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    return out.getvalue()


class HelpTests(SynchronousTestCase):
    def assertPlain(self, name: str, text: str) -> None:
        """C{text} has no epytext markup and cites only existing sections."""
        self.assertTrue(text.strip(), name)
        self.assertIsNone(_MARKUP.search(text), f"{name}:\n{text}")
        for match in _CITED.finditer(text):
            section = match.group(1) or match.group(2)
            self.assertIn(section, PROTOCOL_SECTIONS, f"{name} cites §{section}")

    def test_twistdNestproto(self) -> None:
        """C{twistd nestproto --help}, as twistd prints it."""
        done = subprocess.run(
            [sys.executable, "-c", TWISTD, "nestproto", "--help"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("--pairing-required", done.stdout)
        self.assertPlain("twistd nestproto --help", done.stdout)
        self.assertPlain("nestproto Options", str(ServerOptions()))

    def test_usageOptionsTools(self) -> None:
        """
        The replay and simulator commands (usage.Options, which shows the
        C{__main__} module's docstring when it has no C{longdesc}).
        """
        for module in ["nestproto.replay", "nestproto.simulator"]:
            done = subprocess.run(
                [sys.executable, "-m", module, "--help"],
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertPlain(module, done.stdout)

    def test_argparseTools(self) -> None:
        """C{python -m nestproto}, backup and restore (argparse)."""
        for name, main in [
            ("nestproto", nestprotoMain.main),
            ("backup", backup.main),
            ("restore", restore.main),
        ]:
            self.assertPlain(name, _argparseHelp(main))

    def test_markupDetected(self) -> None:
        """The check finds markup and sections that do not exist."""
        self.assertIsNotNone(_MARKUP.search("run C{twistd}"))
        self.assertRaises(
            self.failureException, self.assertPlain, "x", "see PROTOCOL.md §21"
        )
        self.assertRaises(self.failureException, self.assertPlain, "x", "L{Bucket}")
