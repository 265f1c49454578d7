# -*- test-case-name: tests.test_service -*-
"""
Per-request debug events that cost nothing while nobody keeps them.

A L{Logger}'s event costs its emit even when every observer drops it: a
debug line per subscribe or command, dropped by twistd nestproto's level
filter, was about 39,000 instructions, 3 % of a command-with-push
(bench/README.rst, issue 10). twistd nestproto turns them off at the source
when its observer would drop them (C{--log-level} above debug).
"""

from __future__ import annotations

from typing import ClassVar

from twisted.logger import Logger


class SwitchedLogger(Logger):
    """A L{Logger} whose debug events are emitted only while L{debugOn}."""

    #: Whether debug events are emitted at all; set by the service.
    debugOn: ClassVar[bool] = True

    def debug(self, format: str | None = None, **kwargs: object) -> None:
        if SwitchedLogger.debugOn:
            super().debug(format, **kwargs)
