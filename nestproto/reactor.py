# -*- test-case-name: tests.test_reactor -*-
"""
The reactor of C{twistd --reactor nestproto}: Twisted's epoll reactor,
handing out at most L{MAX_READY_PER_PASS} ready connections per pass.

Twisted's L{EPollReactor} asks epoll for as many events as it has
descriptors. When 20,000 held subscribes reset at once, one pass gets
thousands of them and tears each down (about 45 µs apiece) before any timer
or other client runs: a pause of half a second or more. Capped, the same work
comes in batches with timers and other connections served between them
(bench/README.rst, "Issue 10").
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.main import installReactor

#: Ready descriptors handled per reactor pass at most. Tearing down a reset
#: held subscribe takes about 45 µs on an idle 2-core machine and 4-6 times
#: that on a loaded one (or a slower core): there, passes of 1,000 took
#: 160-275 ms, of 500 83-145 ms, of 250 45-57 ms (bench/README.rst, "Issue
#: 10"). A smaller pass costs one epoll_wait(2) more per 250, nothing else.
MAX_READY_PER_PASS = 250

if sys.platform == "linux":
    from twisted.internet.epollreactor import EPollReactor

    # Twisted's reactor gives each connection's events this legacy logging
    # context (the "system" of what it logs); kept so logs read the same.
    from twisted.python.log import callWithLogger

    class CappedEPollReactor(EPollReactor):
        """
        An epoll reactor that handles at most C{maxReady} ready descriptors
        per pass.

        The descriptors left over are not lost: Twisted registers them
        level-triggered (no C{EPOLLET}), so epoll still reports them on the
        next pass, and the kernel returns those it did not hand out before
        those it just did, so none waits behind a busy one.

        @ivar maxReady: the most ready descriptors one pass handles.
        """

        def __init__(self, maxReady: int = MAX_READY_PER_PASS) -> None:
            if maxReady < 1:
                raise ValueError(f"maxReady must be 1 or more, not {maxReady}")
            self.maxReady = maxReady
            super().__init__()

        def doPoll(self, timeout: float | None) -> None:
            """
            Wait up to C{timeout} seconds (forever if C{None}) for ready
            descriptors, and handle at most L{maxReady} of them.
            """
            if timeout is None:
                timeout = -1
            # As Twisted's: no more events than descriptors tracked.
            maxEvents = max(1, min(self.maxReady, len(self._selectables)))
            try:
                events = self._poller.poll(timeout, maxEvents)
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                # Other failures of epoll_wait(2) are our bugs: say so loudly.
                raise
            handle = self._doReadOrWrite
            for fd, event in events:
                try:
                    selectable = self._selectables[fd]
                except KeyError:
                    # Removed by a connection handled earlier in this pass.
                    continue
                callWithLogger(selectable, handle, selectable, fd, event)

        doIteration = doPoll


def install() -> None:
    """
    Install L{CappedEPollReactor}; where there is no epoll (not Linux),
    Twisted's default reactor.
    """
    if sys.platform == "linux":
        installReactor(CappedEPollReactor())
    else:
        from twisted.internet import default

        default.install()


def describe(reactor: Any) -> str:
    """
    What the start-up log says of C{reactor}: the capped one, or which one
    it is and how to get the capped one.
    """
    if sys.platform == "linux" and isinstance(reactor, CappedEPollReactor):
        return f"epoll, at most {reactor.maxReady} ready connections a pass"
    return (
        f"{type(reactor).__name__}, which may pause for half a second or more when "
        "20,000 devices disconnect at once; with thousands of devices run "
        "twistd --reactor nestproto"
    )
