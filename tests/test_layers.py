# -*- test-case-name: tests.test_layers -*-
"""
The layers read as the data flow (DESIGN.md): the core imports nothing of
the HTTP sides, and nothing in the package imports the tests.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "nestproto")
CORE = ["buckets", "model", "store", "membership", "presence", "hub", "state"]


def importsOf(module: str) -> set[str]:
    """The absolute names C{nestproto/<module>.py} imports."""
    with open(os.path.join(PACKAGE, module + ".py")) as f:
        tree = ast.parse(f.read())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "nestproto." if node.level else ""
            names.add(base + (node.module or ""))
    return names


class LayerTests(SynchronousTestCase):
    def test_coreImportsNoHTTPSide(self) -> None:
        """The core modules import nothing from device/, control/ or klein."""
        for module in CORE:
            for name in importsOf(module):
                for forbidden in ("nestproto.device", "nestproto.control", "klein"):
                    self.assertFalse(name.startswith(forbidden), (module, name))

    def test_packageImportsNoTests(self) -> None:
        """No module of the package imports the test suite."""
        for directory, _dirs, files in os.walk(PACKAGE):
            for file in files:
                if file.endswith(".py"):
                    module = os.path.relpath(os.path.join(directory, file), PACKAGE)
                    for name in importsOf(module[: -len(".py")]):
                        self.assertFalse(name.startswith("tests"), (module, name))
