"""
The cyclic garbage collector's policy while the server runs.

A process holding thousands of subscribes keeps millions of tracked
objects, and CPython's older generations are collected by walking all of
them: pauses of seconds at 17,000 held subscribes, and of hundreds of
milliseconds for the middle generation (bench/README.rst, issue 16). Yet
the objects of a held subscribe, its renewal, a push, a put and a dropped
connection are freed by reference counting alone; none is ever in a
reference cycle (tests/test_cyclic_garbage.py). Walking them finds nothing.

So whatever survives a collection is frozen (C{gc.freeze}): each
collection walks only the objects made since the last one, and the older
generations stay empty. Frozen objects are still freed by reference
counting. What freezing costs is a cycle that was alive at a collection and
dies later: it stays until a thaw. So that such garbage stays bounded, the
interpreter's allocated blocks are counted every L{CHECK_SECONDS} (cheap,
unlike counting the frozen objects, which walks them: a quarter of a second
at that size); once they number L{THAW_GROWTH} times those left by the last
whole-heap collection, everything is thawed and the whole heap collected
once. A growing number of devices does the same, so whole-heap pauses come
at doublings of the heap, not every few minutes.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: The collector's thresholds while serving (CPython's are 700, 10, 10):
#: a young collection walks at most about this many new objects.
COLLECTOR_THRESHOLDS = (10_000, 10, 10)
#: Allocated blocks, as a multiple of those the last whole-heap collection
#: left, at which everything is thawed and the whole heap collected.
THAW_GROWTH = 2.0
#: How often the allocated blocks are counted.
CHECK_SECONDS = 10.0
#: A whole-heap collection taking this long or longer is logged at info
#: (else at debug): at start-up and in a household it takes tens of ms.
NOTEWORTHY_MS = 100.0


@define
class CollectorService(Service):
    """
    While running: the collector's thresholds are L{COLLECTOR_THRESHOLDS}
    and each collection's survivors are frozen; every C{checkSeconds} the
    allocated blocks are counted and, past C{growth} times those the last
    whole-heap collection left, the whole heap is collected again.
    Stopping thaws everything and puts the previous thresholds back.
    """

    clock: IReactorTime
    thresholds: tuple[int, int, int] = COLLECTOR_THRESHOLDS
    growth: float = THAW_GROWTH
    checkSeconds: float = CHECK_SECONDS
    #: The interpreter's allocated blocks right after the last whole-heap
    #: collection.
    wholeHeap: int = field(default=0, init=False)
    _previous: tuple[int, int, int] | None = field(default=None, init=False)
    _check: LoopingCall | None = field(default=None, init=False)

    log = Logger()

    def startService(self) -> None:
        Service.startService(self)
        self._previous = gc.get_threshold()
        gc.set_threshold(*self.thresholds)
        self.collectWholeHeap()
        gc.callbacks.append(self.collected)
        self._check = LoopingCall(self.checkGrowth)
        self._check.clock = self.clock
        self._check.start(self.checkSeconds, now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._check is not None and self._check.running:
            self._check.stop()
        if self.collected in gc.callbacks:
            gc.callbacks.remove(self.collected)
        gc.unfreeze()
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            self._previous = None

    def collected(self, phase: str, info: dict[str, Any]) -> None:
        """A C{gc.callbacks} hook: freeze what survived a collection."""
        if phase == "stop":
            gc.freeze()

    def checkGrowth(self) -> None:
        """Collect the whole heap once it has grown too much."""
        if sys.getallocatedblocks() > self.growth * self.wholeHeap:
            self.collectWholeHeap()

    def collectWholeHeap(self) -> None:
        """Thaw everything, collect it all, and freeze what is left."""
        began = time.monotonic()
        before = sys.getallocatedblocks()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.wholeHeap = sys.getallocatedblocks()
        ms = (time.monotonic() - began) * 1000
        # A pause a thermostat could notice is worth an operator's line.
        emit = self.log.info if ms >= NOTEWORTHY_MS else self.log.debug
        emit(
            "collector: whole heap collected in {ms:.0f} ms: {collected} "
            "objects unreachable, allocated blocks {before} before, {after} after",
            ms=ms,
            collected=collected,
            before=before,
            after=self.wholeHeap,
        )
